"""The EAGLE draft head (``spec_decode/eagle_head.py``) against the training-time module of
``benchmarks/train_eagle.py``: same weights, same h through the paged path (teacher-forced
chunks, a decode, and the draft chain that feeds the head's own output back); the trainer's
``--quick`` CPU run writes a head that loads; bad head files are a clear ValueError."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from miniinfer.attention import get_backend
from miniinfer.attention.metadata import cache_slots, forward_context
from miniinfer.config import ModelConfig
from miniinfer.spec_decode.eagle_head import EagleHead
from miniinfer.worker.input_batch import meta_from_lists

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "benchmarks", "train_eagle.py")
BLOCK = 4
TABLE = [5, 2, 9, 0, 7, 11, 3, 14]  # a scattered block table: 32 positions


def _train_module():
    spec = importlib.util.spec_from_file_location("train_eagle", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_config() -> ModelConfig:
    return ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False})


def _backends() -> list[str]:
    from miniinfer.kernels import cpu_kernels
    return ["torch"] + (["cpu"] if cpu_kernels.available() else [])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TrainHead with random weights (norms perturbed away from 1) saved as a head file."""
    from safetensors.torch import save_file
    te = _train_module()
    torch.manual_seed(0)
    head = te.TrainHead(_tiny_config(), 64).eval()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            else:
                p.normal_(0.0, 0.1)
    path = str(tmp_path_factory.mktemp("eagle") / "head.safetensors")
    save_file(head.hf_state_dict(torch.float32), path)
    return head, path


def _paged_step(head: EagleHead, embeds, feats, start: int, seq_len: int) -> torch.Tensor:
    """Positions start .. seq_len-1 of the one sequence, with everything before cached."""
    n = seq_len - start
    slots = torch.tensor(cache_slots(TABLE, start, seq_len, BLOCK), dtype=torch.int64)
    meta = meta_from_lists([n], [seq_len], [TABLE], slots, int(n == 1), torch.device("cpu"))
    with torch.inference_mode(), forward_context(meta):
        return head(embeds, feats, torch.arange(start, seq_len))


def _eagle(cfg, path, backend, q8: bool = False) -> EagleHead:
    """A loaded head with its cache; ``q8``: the CPU Q8_0 projections (else fp32 nn.Linear)."""
    head = EagleHead(cfg, get_backend(backend, "cpu"), 64, "cpu", torch.float32)
    head.cpu_q8 = q8
    head.load(path)
    cache = head.allocate_kv_cache(16, BLOCK)
    assert cache.shape == (2, 1, 16, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    return head


@pytest.mark.parametrize("backend", _backends())
def test_parity_teacher_forced_and_chain(trained, backend):
    train_head, path = trained
    cfg = _tiny_config()
    gen = torch.Generator().manual_seed(1)
    length = 13
    emb = torch.randn(length, cfg.hidden_size, generator=gen)
    feats = 2.0 * torch.randn(length, cfg.hidden_size, generator=gen)
    feats[0] = 0.0  # f_{-1}: nothing before the first position
    with torch.no_grad():
        ref = train_head(emb[None], feats[None], 3)  # [h_1, h_2, h_3], each [1, L, H]

    # teacher-forced: a prefill chunk, an extend chunk over the cached prefix, one decode
    head = _eagle(cfg, path, backend)
    got = [_paged_step(head, emb[a:b], feats[a:b], a, b) for a, b in ((0, 7), (7, 12), (12, 13))]
    torch.testing.assert_close(torch.cat(got), ref[0][0], atol=1e-4, rtol=1e-4)

    # the draft chain from anchor a: the cache holds the teacher-forced positions 0..a, then
    # each deeper step feeds the head's own previous output as the feature
    a = 8
    head = _eagle(cfg, path, backend)
    h = _paged_step(head, emb[:a + 1], feats[:a + 1], 0, a + 1)[-1:]
    for depth in (2, 3):
        p = a + depth - 1
        h = _paged_step(head, emb[p:p + 1], h, p, p + 1)
        torch.testing.assert_close(h[0], ref[depth - 1][0, p], atol=1e-4, rtol=1e-4)


def test_load_rejects_bad_files(trained, tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = trained
    cfg = _tiny_config()
    good = load_file(path)
    head = EagleHead(cfg, get_backend("torch", "cpu"), 64)
    cases = {
        "missing": {k: v for k, v in good.items() if k != "norm.weight"},
        "mis-shaped": {**good, "fc.weight": torch.zeros(cfg.hidden_size, cfg.hidden_size)},
        "unexpected": {**good, "layers.1.mlp.up_proj.weight": torch.zeros(2, 2)},
    }
    for word, tensors in cases.items():
        bad = str(tmp_path / f"{word}.safetensors")
        save_file(tensors, bad)
        with pytest.raises(ValueError, match=word):
            head.load(bad)
    head.load(path)  # the good file still loads


def test_quick_training_run_writes_a_loadable_head(tmp_path):
    from miniinfer.loader.embedded import embedded_model_path
    try:
        gguf = embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"embedded model missing: {e}")
    out = tmp_path / "head.safetensors"
    proc = subprocess.run([sys.executable, TRAIN, "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "head.json").read_text())
    assert metrics["train"]["steps"] == 4
    for split in ("val", "eval_prompts"):
        m = metrics[split]
        assert 0.0 <= m["top1"] <= 1.0 and m["positions"] > 0
        assert len(m["p_accept_first_j"]) == m["chain_depth"]

    from miniinfer.loader.gguf_loader import read_gguf_config
    cfg = ModelConfig.from_hf_dict(read_gguf_config(gguf))
    head = EagleHead(cfg, get_backend("torch", "cpu"), 128)
    head.load(str(out))
    head.allocate_kv_cache(4, 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, cfg.hidden_size, generator=gen)
    slots = torch.arange(5, dtype=torch.int64)
    meta = meta_from_lists([5], [5], [[0]], slots, 0, torch.device("cpu"))
    with torch.inference_mode(), forward_context(meta):
        h = head(x, x, torch.arange(5))
    assert h.shape == (5, cfg.hidden_size) and torch.isfinite(h).all()


@pytest.mark.parametrize("frac", [0.0, 0.1, 0.3, 0.5, 0.6, 0.75, 1.0])
def test_generate_greedy_share(frac):
    """``generate(..., greedy_frac)`` decodes that share of the rows greedily, evenly spread
    (0.5: the even rows, as before the option). Float multiples of 0.3 or 0.6 fall just below a
    block edge: ``(i * frac) % 1.0 < frac`` made ~39 % / ~79 % of the rows greedy."""
    from types import SimpleNamespace
    mod = _train_module()
    seen = []

    def fake_generate(texts, params, use_tqdm=False):
        seen.extend(params)
        return [SimpleNamespace(prompt_token_ids=t["prompt_token_ids"], outputs=[SimpleNamespace(token_ids=[9])])
                for t in texts]
    engine = SimpleNamespace(max_model_len=64, apply_chat_template=lambda m: m, tokenize=lambda m: [1, 2])
    llm = SimpleNamespace(engine=engine, generate=fake_generate)
    n = 1000
    out = mod.generate(llm, [[{"role": "user", "content": "x"}]] * n, 8, 0, frac)
    greedy = [g for _, _, g in out]
    assert greedy == [p.temperature == 0.0 for p in seen]
    assert sum(greedy) == round(frac * n)
    assert all(sum(greedy[i:i + 20]) == round(frac * 20) for i in range(0, n, 20))  # evenly spread
    if frac == 0.5:
        assert greedy[:4] == [True, False, True, False]


# --- CPU Q8_0 head (eagle_head.quantize_for_cpu) ----------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _needs_kernels():
    from miniinfer.kernels import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip("CPU kernels not built here")


def test_q8_head_close_to_fp32(trained):
    """Prefill chunk, extend, decodes and a self-fed chain: the Q8_0 head (one C call a
    decode-sized step) within 2 % of the fp32 head; its top-1 over a random LM head agrees."""
    _needs_kernels()
    from miniinfer.models.packed_linear import QuantizedLinear
    _, path = trained
    cfg = _tiny_config()
    gen = torch.Generator().manual_seed(2)
    lm = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen)
    agree = total = 0
    for trial in range(10):
        ref, q8 = _eagle(cfg, path, "cpu"), _eagle(cfg, path, "cpu", q8=True)
        assert isinstance(q8.fc, QuantizedLinear) and isinstance(q8.layers[0].mlp.down_proj, QuantizedLinear)
        assert isinstance(ref.fc, torch.nn.Linear)
        emb = torch.randn(32, cfg.hidden_size, generator=gen)
        feats = 2.0 * torch.randn(32, cfg.hidden_size, generator=gen)
        outs = {}
        for name, head in (("ref", ref), ("q8", q8)):  # q8 gets the features ref fed itself
            got = [_paged_step(head, emb[a:b], feats[a:b], a, b) for a, b in ((0, 16), (16, 20))]
            for p in range(20, 32):  # decodes feeding the fp32 head's own output back
                f = feats[p:p + 1] if p == 20 else outs["ref"][p - 1:p] if name == "q8" else got[-1][-1:]
                got.append(_paged_step(head, emb[p:p + 1], f, p, p + 1))
            outs[name] = torch.cat(got)
        assert q8.cpu_decode, "decode steps of the Q8_0 head run through CPUDecodePlan"
        assert _rel(outs["q8"], outs["ref"]) < 0.02
        agree += int(((outs["q8"] @ lm.t()).argmax(-1) == (outs["ref"] @ lm.t()).argmax(-1)).sum())
        total += 32
    assert agree / total > 0.9, f"top-1 agreement {agree}/{total}"


def test_q8_off_switch(trained, monkeypatch):
    """MINIINFER_EAGLE_CPU_Q8=0 keeps the fp32 linears (A/B)."""
    _needs_kernels()
    from miniinfer.spec_decode.eagle_head import CPU_Q8_ENV
    _, path = trained
    monkeypatch.setenv(CPU_Q8_ENV, "0")
    head = EagleHead(_tiny_config(), get_backend("cpu", "cpu"), 64)
    head.load(path)
    assert not head.cpu_q8 and isinstance(head.fc, torch.nn.Linear) and head.cpu_decode is False


@pytest.fixture(scope="module")
def eagle_llm():
    from miniinfer import LLM
    try:
        return LLM(None, dtype="float32", max_model_len=2048, progress=False,
                   speculative_config={"method": "eagle", "num_speculative_tokens": 3})
    except FileNotFoundError as e:
        pytest.skip(f"embedded model missing: {e}")


def test_q8_shipped_head_real_weights(eagle_llm):
    """The shipped head on SmolLM2 embeddings (features: the fp32 head's own outputs, shifted):
    Q8_0 head + Q8_0 draft vocabulary vs fp32 over ~300 positions."""
    _needs_kernels()
    from miniinfer.models.packed_linear import QuantizedLinear
    from miniinfer.spec_decode.eagle import EMBEDDED_HEAD
    d = eagle_llm.engine
    drafter = d.proposer
    assert isinstance(drafter.head.fc, QuantizedLinear) and drafter.vocab_q8 is not None
    text = ("Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
            "to make glucose and oxygen. ") * 12
    ids = torch.tensor(d.tokenize(text)[:300])
    n = ids.shape[0]
    assert n >= 250
    heads = {}
    for q8 in (False, True):
        head = EagleHead(d.model_config, get_backend("cpu", "cpu"), 512, "cpu", torch.float32)
        head.cpu_q8 = q8
        head.load(EMBEDDED_HEAD)
        head.allocate_kv_cache(20, 16)
        heads[q8] = head
    table = list(range(20))

    def run(head, feats):
        slots = torch.arange(n, dtype=torch.int64)
        meta = meta_from_lists([n], [n], [table], slots, 0, torch.device("cpu"))
        with torch.inference_mode(), forward_context(meta):
            return head(drafter.target.embed(ids), feats, torch.arange(n))

    with torch.inference_mode():
        h0 = run(heads[False], torch.zeros(n, d.model_config.hidden_size))
        feats = torch.cat([torch.zeros_like(h0[:1]), h0[:-1]])
        ref, got = run(heads[False], feats), run(heads[True], feats)
        assert _rel(got, ref) < 0.02
        q8_ids = drafter.top_tokens(got, 1)[1]
        vq = drafter.vocab_q8
        drafter.vocab_q8 = None  # the fp32 draft vocabulary
        try:
            ref_ids = drafter.top_tokens(ref, 1)[1]
        finally:
            drafter.vocab_q8 = vq
    agree = float((q8_ids == ref_ids).float().mean())
    assert agree > 0.9, agree
