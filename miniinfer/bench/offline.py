"""Offline benchmarks (shared/BENCHMARKS.md §1, §2, §3, §5, §8), each with its baseline in
the same run and the ratio reported."""
from __future__ import annotations

import gc
import statistics
import time

import torch
from tqdm.auto import tqdm

from miniinfer.bench.common import device_ms, hf_model_from_config, median_time, random_workload, sync
from miniinfer.sampling_params import SamplingParams


def _llm(model: str, **kw):
    from miniinfer import LLM
    kw.setdefault("progress", False)
    if model in ("qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen3-0.6b", "qwen3-8b", "llama-3-8b"):
        kw.setdefault("load_format", "dummy")
    return LLM(model, **kw)


def _free() -> None:
    """Return GPU memory after the caller has dropped its references (``del llm``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- §1 offline throughput ---------------------------------------------------------
def throughput(model: str, num_requests: int = 256, hf_num_requests: int | None = None, hf: bool = True,
               prefix: str = "", **engine_kw) -> dict:
    prompts, outs = random_workload(num_requests, (100, 1024), (100, 1024), seed=0)
    llm = _llm(model, max_model_len=4096, **engine_kw)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=o) for o in outs]
    llm.generate([prompts[0]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up request
    sync()
    t = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=True)
    sync()
    wall = time.perf_counter() - t
    total = sum(len(r.outputs[0].token_ids) for r in res)
    m = {f"{prefix}offline_throughput_tok_s": total / wall, f"{prefix}offline_wall_s": wall,
         f"{prefix}offline_output_tokens": total}
    hf_config = llm.engine.model_config.hf_config
    dtype = llm.engine.runner.dtype
    device = str(llm.engine.runner.device)
    del llm
    _free()
    if hf:
        n = hf_num_requests or num_requests
        m[f"{prefix}offline_throughput_hf_tok_s"] = hf_throughput(hf_config, prompts[:n], outs[:n], dtype, device)
        m[f"{prefix}offline_hf_num_requests"] = n
        m[f"{prefix}offline_throughput_ratio_vs_hf"] = (m[f"{prefix}offline_throughput_tok_s"]
                                                        / m[f"{prefix}offline_throughput_hf_tok_s"])
    return m


def hf_throughput(hf_config: dict, prompts, outs, dtype, device) -> float:
    from transformers import GenerationConfig
    model = hf_model_from_config(hf_config, dtype, device)
    mean_new = int(round(statistics.mean(outs)))
    gen = GenerationConfig(max_new_tokens=mean_new, do_sample=True, temperature=0.6, eos_token_id=None,
                           pad_token_id=0)
    try:
        sync()
        t = time.perf_counter()
        res = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=True)
        sync()
        wall = time.perf_counter() - t
        total = sum(len(r.generated_tokens) for r in res.values())
    except Exception as e:  # older transformers: fall back to padded static batches
        print(f"generate_batch unavailable ({e!r}); padded generate instead")
        total, wall = _hf_padded(model, prompts, mean_new, device, batch=32)
    del model
    _free()
    return total / wall


def _hf_padded(model, prompts, max_new, device, batch):
    total, wall = 0, 0.0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        sync()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
        sync()
        wall += time.perf_counter() - t
        total += (out.shape[1] - width) * len(chunk)
    return total, wall


# --- §2 latency at batch 1 -----------------------------------------------------------
def hbm_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted): the best of five batches
    of ten copies timed with CUDA events, so that a roofline uses the card's stable figure (a
    host-timed median read 3.80 TB/s on an H200 where events read 4.26 in the next process)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best_ms = min(device_ms(lambda: b.copy_(a), 10) for _ in range(5))
    del a, b
    _free()
    return 2 * n / (best_ms / 1e3)


def latency(model: str, hf: bool = True, prefix: str | None = None, **engine_kw) -> dict:
    import random
    rng = random.Random(1)
    name = prefix if prefix is not None else model.replace("-", "_").replace("qwen2_", "qwen2_")
    llm = _llm(model, **engine_kw)
    vocab = min(llm.engine.model_config.vocab_size, 10000)

    def fresh(n):
        return [rng.randrange(vocab) for _ in range(n)]

    greedy1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    greedy256 = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    llm.generate([fresh(128)], greedy256, use_tqdm=False)  # warm-up
    m = {}

    def ttft(n):
        return median_time(lambda: llm.generate([fresh(n)], greedy1, use_tqdm=False)) * 1e3

    t128 = ttft(128)
    m[f"{name}_ttft_128_ms"] = t128
    m[f"{name}_ttft_1024_ms"] = ttft(1024)
    e2e = median_time(lambda: llm.generate([fresh(128)], greedy256, use_tqdm=False)) * 1e3
    tpot = (e2e - t128) / 255
    m[f"{name}_bs1_tpot_ms"] = tpot
    m.update(graph_times(llm.engine.runner, name))
    mc = llm.engine.model_config
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    hf_config, dtype, device = mc.hf_config, llm.engine.runner.dtype, str(llm.engine.runner.device)
    del llm
    _free()
    if torch.cuda.is_available():
        bw = hbm_bandwidth()
        m["hbm_bandwidth_gb_s"] = bw / 1e9
        m[f"{name}_bs1_roofline_ms"] = weight_bytes / bw * 1e3
        m[f"{name}_bs1_roofline_ratio"] = tpot / (weight_bytes / bw * 1e3)
    if hf:
        model_hf = hf_model_from_config(hf_config, dtype, device)
        ids = torch.tensor([fresh(128)], device=device)

        def run(n):
            model_hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        run(2)
        hf_ttft = median_time(lambda: run(1)) * 1e3
        hf_e2e = median_time(lambda: run(256)) * 1e3
        m[f"{name}_hf_ttft_128_ms"] = hf_ttft
        m[f"{name}_hf_bs1_tpot_ms"] = (hf_e2e - hf_ttft) / 255
        m[f"{name}_bs1_tpot_ratio_vs_hf"] = m[f"{name}_hf_bs1_tpot_ms"] / tpot
        del model_hf
        _free()
    return m


def graph_times(runner, name: str) -> dict:
    """Device time of one replay of the bs-1 decode graph (context 256) and of the 128/1024-token
    prefill graphs: the GPU's share of TPOT / TTFT, the rest being host work."""
    graphs = runner.cuda_graphs
    if not torch.cuda.is_available() or graphs is None or not graphs.decode:
        return {}

    from miniinfer.bench.common import device_ms
    m = {}
    attn = graphs.attn
    attn.seq_lens[:1].fill_(256)
    m[f"{name}_bs1_decode_graph_ms"] = device_ms(graphs.decode[1][0], 50)
    for t in (128, 1024):
        if t in graphs.prefill:
            attn.prefill_qsl[1] = t
            attn.seq_lens[:1].fill_(t)
            m[f"{name}_prefill_{t}_graph_ms"] = device_ms(graphs.prefill[t][0], 50)
    attn.reset()
    return m


# --- §3 decode batch sweep -----------------------------------------------------------
def sweep(model: str, sizes=(1, 8, 32, 64, 128, 256), prefix: str | None = None, **engine_kw) -> dict:
    name = prefix if prefix is not None else model.replace("-", "_")
    llm = _llm(model, **engine_kw)
    m = {}
    llm.generate([list(range(1, 129))], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    for bs in tqdm(sizes, desc="sweep"):
        prompts, _ = random_workload(bs, (128, 128), (128, 128), seed=bs)
        p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        sync()
        t = time.perf_counter()
        llm.generate(prompts, p, use_tqdm=False)
        sync()
        m[f"{name}_sweep_bs{bs}_tok_s"] = bs * 128 / (time.perf_counter() - t)
    del llm
    _free()
    return m


# --- §5 shared prefix ----------------------------------------------------------------
def prefix_workload(seed: int, prefix_len: int = 2048, requests: int = 64, vocab: int = 10000) -> list[list[int]]:
    """§5's prompts: one shared ``prefix_len``-token prefix + 64 own tokens each, random ids."""
    import random
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(prefix_len)]
    return [system + [rng.randrange(vocab) for _ in range(64)] for _ in range(requests)]


def prefix_cache(model: str, **engine_kw) -> dict:
    """§5: 64 requests = one shared 2,048-token prefix + 64 own tokens, 64 greedy tokens each, all
    at once; prefix caching on vs off, each engine warmed by the same workload over another
    prefix first (so that neither side pays first-use costs of its step shapes, e.g. cuBLAS's
    for a new token count, in the timed run; the timed prefix is not in any cache)."""
    warm, prompts = prefix_workload(4), prefix_workload(5)
    p = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    m = {}
    for on in (True, False):
        llm = _llm(model, enable_prefix_caching=on, max_model_len=4096, **engine_kw)
        llm.generate(warm, p, use_tqdm=False)
        sync()
        t = time.perf_counter()
        res = llm.generate(prompts, p, use_tqdm=False)
        sync()
        wall = time.perf_counter() - t
        ttft = statistics.mean(r.metrics["first_token_time"] - r.metrics["arrival_time"] for r in res)
        tag = "on" if on else "off"
        m[f"prefix_{tag}_mean_ttft_ms"] = ttft * 1e3
        m[f"prefix_{tag}_throughput_tok_s"] = 64 * 64 / wall
        if on:
            m["prefix_cached_tokens_mean"] = statistics.mean(r.num_cached_tokens for r in res)
        del llm, res
        _free()
    m["prefix_ttft_speedup"] = m["prefix_off_mean_ttft_ms"] / m["prefix_on_mean_ttft_ms"]
    m["prefix_throughput_gain"] = m["prefix_on_throughput_tok_s"] / m["prefix_off_throughput_tok_s"]
    return m


# --- §8 CPU, embedded model ------------------------------------------------------------
CPU_QUESTIONS = [
    "What is the capital of France?", "Give me three tips for staying healthy.",
    "Explain what a neural network is in one paragraph.", "Write a haiku about the sea.",
    "What is 17 times 23?", "Name the planets of the solar system.",
    "How do I boil an egg?", "Translate 'good morning' into Spanish.",
    "What causes rain?", "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?", "Suggest a name for a pet turtle.",
    "What is photosynthesis?", "List three uses of Python.",
    "How far is the Moon from Earth?", "Describe a cat to someone who has never seen one.",
]


def _cpu_engine(**engine_kw):
    """Our engine on the embedded model with the §8 prompts, warmed up by one short request."""
    from miniinfer import LLM
    llm = LLM(None, progress=False, **engine_kw)
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in CPU_QUESTIONS]
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    return llm, prompts


def _cpu_time(llm, prompts, max_tokens: int) -> tuple[int, float]:
    t = time.perf_counter()
    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return sum(len(r.outputs[0].token_ids) for r in res), time.perf_counter() - t


class _HFCPU:
    """HF transformers on the same GGUF in fp32, batched ``generate`` with left padding."""

    def __init__(self, llm, prompts):
        import os
        from transformers import AutoModelForCausalLM
        from miniinfer.loader.embedded import embedded_model_path
        path = embedded_model_path()
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        tok = llm.engine.tokenizer
        ids = [tok.encode(x, add_special_tokens=False) for x in prompts]
        self.width = max(map(len, ids))
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.inp = torch.tensor([[self.pad] * (self.width - len(x)) + x for x in ids])
        self.mask = torch.tensor([[0] * (self.width - len(x)) + [1] * len(x) for x in ids])
        self.eos = sorted(llm.engine.eos_token_ids)
        with torch.no_grad():
            self.model.generate(input_ids=self.inp[:1], attention_mask=self.mask[:1], max_new_tokens=4,
                                do_sample=False)

    def time(self, max_tokens: int) -> tuple[int, float]:
        with torch.no_grad():
            t = time.perf_counter()
            out = self.model.generate(input_ids=self.inp, attention_mask=self.mask, max_new_tokens=max_tokens,
                                      do_sample=False, eos_token_id=self.eos, pad_token_id=self.pad)
            wall = time.perf_counter() - t
        tokens = 0
        for row in out[:, self.width:].tolist():  # up to and including the first EOS, as we count
            n = 0
            for tkn in row:
                n += 1
                if tkn in self.eos:
                    break
            tokens += n
        return tokens, wall


def cpu(max_tokens: int = 64, hf: bool = True, bf16: bool = True, repeats: int = 3, **engine_kw) -> dict:
    """§8: ours in fp32 (the CPU default; HF transformers loads the GGUF in fp32 too) against
    HF ``generate``, timed alternately ``repeats`` times (this shared 2-core machine drifts by
    tens of percent within a minute; medians of interleaved runs keep the ratio honest).
    Ablations, one run each: the GGUF kernels off (dequantized weights, oneDNN-packed), all
    weight packing off (plain MKL sgemm), and the opt-in bf16 mode (the 4-bit model's answers
    degrade in bf16)."""
    engine_kw.setdefault("dtype", "float32")
    llm, prompts = _cpu_engine(**engine_kw)
    base = _HFCPU(llm, prompts) if hf else None
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_cpu_time(llm, prompts, max_tokens))
        if base is not None:
            theirs.append(base.time(max_tokens))
    tokens = ours[0][0]
    wall = statistics.median(w for _, w in ours)
    m = {"cpu_throughput_tok_s": tokens / wall, "cpu_output_tokens": tokens, "cpu_wall_s": wall,
         "cpu_wall_s_min": min(w for _, w in ours), "cpu_wall_s_max": max(w for _, w in ours)}
    if engine_kw.get("cpu_gguf_kernels", True):  # ablation: weights dequantized, oneDNN-packed fp32
        dense, p = _cpu_engine(**{**engine_kw, "cpu_gguf_kernels": False})
        n, w = _cpu_time(dense, p, max_tokens)
        m["cpu_gguf_kernels_off_throughput_tok_s"] = n / w
        m["cpu_gguf_kernels_gain"] = m["cpu_throughput_tok_s"] / m["cpu_gguf_kernels_off_throughput_tok_s"]
        del dense
    if engine_kw.get("cpu_packed_weights", True):  # ablation: plain weights, MKL sgemm
        plain, p = _cpu_engine(**{**engine_kw, "cpu_packed_weights": False, "cpu_gguf_kernels": False})
        n, w = _cpu_time(plain, p, max_tokens)
        m["cpu_unpacked_throughput_tok_s"] = n / w
        m["cpu_packed_weights_gain"] = m["cpu_throughput_tok_s"] / m["cpu_unpacked_throughput_tok_s"]
        del plain
    if bf16:
        half, p = _cpu_engine(**{**engine_kw, "dtype": "bfloat16"})
        n, w = _cpu_time(half, p, max_tokens)
        m["cpu_bf16_throughput_tok_s"] = n / w
        del half
    if base is not None:
        hf_tokens = theirs[0][0]
        hf_wall = statistics.median(w for _, w in theirs)
        m.update({"cpu_hf_throughput_tok_s": hf_tokens / hf_wall, "cpu_hf_output_tokens": hf_tokens,
                  "cpu_hf_wall_s": hf_wall, "cpu_hf_wall_s_min": min(w for _, w in theirs),
                  "cpu_hf_wall_s_max": max(w for _, w in theirs)})
        m["cpu_throughput_ratio_vs_hf"] = m["cpu_throughput_tok_s"] / m["cpu_hf_throughput_tok_s"]
        if "cpu_bf16_throughput_tok_s" in m:
            m["cpu_bf16_throughput_ratio_vs_hf"] = m["cpu_bf16_throughput_tok_s"] / m["cpu_hf_throughput_tok_s"]
    return m


# --- §6 overlap scheduling ablation ---------------------------------------------------------
def overlap_ablation(throughput_model: str = "qwen3-0.6b", latency_model: str = "qwen2-0.5b",
                     num_requests: int = 256, **engine_kw) -> dict:
    """Workloads 1 and 2 with overlap scheduling on and off, in the same process."""
    engine_kw.pop("overlap_scheduling", None)
    m: dict = {}
    for on in (True, False):
        tag = "" if on else "_no_overlap"
        t = throughput(throughput_model, num_requests, hf=False, overlap_scheduling=on, **engine_kw)
        m[f"offline_throughput_tok_s{tag}"] = t["offline_throughput_tok_s"]
        lat = latency(latency_model, hf=False, overlap_scheduling=on, **engine_kw)
        for k, v in lat.items():
            if k.startswith("hbm") or "roofline" in k:
                continue
            m[f"{k}{tag}"] = v
    name = latency_model.replace("-", "_")
    m["overlap_throughput_gain"] = m["offline_throughput_tok_s"] / m["offline_throughput_tok_s_no_overlap"]
    m["overlap_tpot_gain"] = m[f"{name}_bs1_tpot_ms_no_overlap"] / m[f"{name}_bs1_tpot_ms"]
    return m
