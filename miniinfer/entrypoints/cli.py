"""The ``miniinfer`` command: serve, generate, chat, bench."""
from __future__ import annotations

import argparse
import os
import sys
import uuid

from miniinfer.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser, positional_model: bool = False) -> None:
    if positional_model:
        p.add_argument("model", nargs="?", default=None,
                       help="HF folder, .gguf file or preset; default: the embedded SmolLM2-135M-Instruct")
    else:
        p.add_argument("--model", default=None,
                       help="HF folder, .gguf file or preset; default: the embedded SmolLM2-135M-Instruct")
    g = p.add_argument_group("engine")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="CPU KV-cache budget")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--overlap", dest="overlap_scheduling", action="store_true",
                   help="overlap scheduling (CPU prepares step N+1 while the GPU runs step N)")
    g.add_argument("--no-overlap", dest="overlap_scheduling", action="store_false")
    p.set_defaults(overlap_scheduling=True)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--no-warmup", dest="warmup", action="store_false")
    g.add_argument("--no-cpu-packed-weights", dest="cpu_packed_weights", action="store_false",
                   help="CPU fp32: keep plain weights (MKL sgemm) instead of oneDNN-packed ones")
    g.add_argument("--no-cpu-gguf-kernels", dest="cpu_gguf_kernels", action="store_false",
                   help="CPU, GGUF Q4_1/Q8_0: dequantize the weights instead of multiplying them quantized")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
    g.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)


def engine_config_from_args(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=a.model, load_format=a.load_format, dtype=a.dtype, device=a.device,
        max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
        kv_cache_memory_gb=a.kv_cache_memory_gb, gpu_memory_utilization=a.gpu_memory_utilization,
        enable_prefix_caching=a.enable_prefix_caching, overlap_scheduling=a.overlap_scheduling,
        enforce_eager=a.enforce_eager, warmup=a.warmup, attention_backend=a.attention_backend,
        cpu_packed_weights=a.cpu_packed_weights, cpu_gguf_kernels=a.cpu_gguf_kernels, tensor_parallel_size=a.tensor_parallel_size, seed=a.seed)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None)


def sampling_params_from_args(a: argparse.Namespace):
    from miniinfer.sampling_params import SamplingParams
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.sampling_seed,
                          stop=a.stop)


def stream_one(engine, prompt: str, params, out=None) -> str:
    """Run one request through the engine, printing text as it is produced."""
    out = out or sys.stdout  # looked up now: callers (and tests) may have redirected it
    rid = uuid.uuid4().hex
    engine.add_request(rid, prompt, params)
    shown = 0
    text = ""
    while engine.has_unfinished_requests():
        for o in engine.step():
            text = o.outputs[0].text
            out.write(text[shown:])
            out.flush()
            shown = len(text)
    out.write("\n")
    return text


def cmd_generate(a) -> int:
    from miniinfer.engine.llm_engine import LLMEngine
    engine = LLMEngine(engine_config_from_args(a))
    params = sampling_params_from_args(a)
    prompt = a.prompt
    if not a.raw and engine.tokenizer is not None and engine.tokenizer.chat_template:
        prompt = engine.apply_chat_template([{"role": "user", "content": a.prompt}])
    stream_one(engine, prompt, params)
    return 0


def cmd_chat(a) -> int:
    from miniinfer.engine.llm_engine import LLMEngine
    engine = LLMEngine(engine_config_from_args(a))
    params = sampling_params_from_args(a)
    history: list[dict] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    print("Chatting with", engine.model_name, "- empty line or Ctrl-D to quit.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = stream_one(engine, engine.apply_chat_template(history), params)
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_serve(a) -> int:
    from miniinfer.server.api_server import run_server
    api_key = a.api_key or os.environ.get("MINIINFER_API_KEY")
    run_server(engine_config_from_args(a), host=a.host, port=a.port, api_key=api_key, max_n=a.max_n,
               served_model_name=a.served_model_name)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from miniinfer.bench.cli import main as bench_main
        return bench_main(argv[1:])
    p = argparse.ArgumentParser(prog="miniinfer", description="MiniInfer: a compact LLM inference engine")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web page")
    add_engine_args(s, positional_model=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None)
    s.add_argument("--max-n", type=int, default=8)
    s.add_argument("--served-model-name", default=None)
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="don't apply the chat template")
    add_engine_args(g)
    add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal")
    c.add_argument("--system", default=None)
    add_engine_args(c)
    add_sampling_args(c)
    c.set_defaults(fn=cmd_chat)

    sub.add_parser("bench", help="benchmarks: throughput | latency | sweep | startup | prefix | serve | cpu")
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
