"""The ``miniinfer`` command: serve, generate, chat, bench."""
from __future__ import annotations

import argparse
import json
import ast
import dataclasses
import functools
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
import typing
import uuid

from miniinfer.config import EngineConfig


_MODEL_HELP = "HF folder, .gguf file or preset; default: the embedded SmolLM2-135M-Instruct"

# The engine flags are made from the fields of EngineConfig, so a new field is a new flag:
# ``some_option: int = 4`` gives ``--some-option N``; a bool that defaults to False gives
# ``--some-option``, one that defaults to True gives ``--no-some-option`` (an ``enable_``
# prefix is dropped there: ``--no-prefix-caching``).  The help is, in this order, _HELP[name],
# the field's ``metadata["help"]``, or the comment at the end of the field's line in config.py.
# Fields of other types than bool/int/float/str (or Optional/list/Literal of them) get no flag.
_HELP = {
    "speculative_config": 'speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                          "(methods: ngram; draft_model with \"model\"; eagle, with \"eagle_topk\" and "
                          "\"num_draft_tokens\" for an EAGLE-2 tree)",
    "tokenizer": "tokenizer folder or .gguf file; default: the model's",
    "dtype": "auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, float32 on CPU)",
    "seed": "engine seed for requests that don't set their own",
    "max_model_len": "longest prompt + output in tokens; default: the model's limit",
    "max_num_seqs": "most sequences in one step",
    "block_size": "tokens per KV-cache block (a power of two)",
    "gpu_memory_utilization": "share of GPU memory the engine may use",
    "enable_chunked_prefill": "no chunked prefill: a prompt is not split over steps",
    "enable_prefix_caching": "no prefix caching: KV blocks are not reused across requests",
    "warmup": "skip the warm-up run at start",
    "max_logprobs": "most logprobs a request may ask for",
    "tensor_parallel_size": "number of devices (tensor parallelism)",
    "overlap_scheduling": "no overlap scheduling: the host no longer prepares step N+1 while the "
                          "device runs step N",
    "cpu_packed_weights": "CPU fp32: keep plain weights (MKL sgemm) instead of oneDNN-packed ones",
    "cpu_gguf_kernels": "CPU, GGUF Q4_1/Q8_0: dequantize the weights instead of multiplying them "
                        "quantized",
}
_CHOICES = {
    "load_format": ("auto", "safetensors", "gguf", "dummy"),
    "attention_backend": ("auto", "torch", "cpu", "triton"),
}
# Older or shorter spellings, kept next to the generated flag.
_ALIASES = {
    "overlap_scheduling": ("--no-overlap",),
    "tensor_parallel_size": ("--tp",),
}


@functools.lru_cache(maxsize=None)
def _field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the lines ``name: type = default  # comment`` of cls's source."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(src)
        comments = {t.start[0]: t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(src).readline)
                    if t.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = comments.get(node.end_lineno) or comments.get(node.lineno)
            if text:
                out[node.target.id] = text
    return out


def _without_none(tp):
    """``X | None`` -> X (None when the union has several other members); anything else as is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else None
    return tp


def _engine_fields() -> list[tuple[dataclasses.Field, object]]:
    """(field, type without its ``| None``) for every init field of EngineConfig."""
    hints = typing.get_type_hints(EngineConfig)
    return [(f, _without_none(hints.get(f.name, f.type))) for f in dataclasses.fields(EngineConfig)
            if f.init]


def _flag_spec(f: dataclasses.Field, tp) -> tuple[list[str], dict] | None:
    """Option strings and add_argument keywords for one EngineConfig field (None: no flag)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = argparse.SUPPRESS  # a required field: EngineConfig reports it when not given
    name = f.name.replace("_", "-")
    aliases = _ALIASES.get(f.name, ())
    help_text = (_HELP.get(f.name) or f.metadata.get("help")
                 or _field_comments(EngineConfig).get(f.name) or f.name.replace("_", " "))
    help_text = help_text.replace("%", "%%")
    kw: dict = {"dest": f.name, "default": default}
    if tp is bool:
        if default is True:
            if f.name not in _HELP:
                help_text = "turn off: " + help_text
            return ["--no-" + name.removeprefix("enable-"), *aliases], dict(
                kw, action="store_false", help=help_text)
        action = "store_true" if default is False else argparse.BooleanOptionalAction
        return ["--" + name, *aliases], dict(kw, action=action, help=help_text)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if f.metadata.get("json"):
        kw["type"] = _json_arg
    elif origin is typing.Literal and args:
        kw.update(choices=args, type=type(args[0]))
    elif origin in (list, tuple) and args and args[0] in (int, float, str):
        kw.update(nargs="+", type=args[0])
    elif tp in (int, float, str):
        kw["type"] = tp
    else:
        return None
    if f.name in _CHOICES:
        kw["choices"] = _CHOICES[f.name]
    if default is not None and default is not argparse.SUPPRESS:
        help_text += " (default: %(default)s)"
    return ["--" + name, *aliases], dict(kw, help=help_text)


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def add_engine_args(p: argparse.ArgumentParser, positional_model: bool = False) -> None:
    """One flag per EngineConfig field; the model is positional for ``serve``."""
    if positional_model:
        p.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    else:
        p.add_argument("--model", default=None, help=_MODEL_HELP)
    g = p.add_argument_group("engine")
    for f, tp in _engine_fields():
        spec = None if f.name == "model" else _flag_spec(f, tp)
        if spec is not None:
            g.add_argument(*spec[0], **spec[1])


def engine_config_from_args(a: argparse.Namespace) -> EngineConfig:
    kwargs = {}
    for f, tp in _engine_fields():
        if hasattr(a, f.name):
            v = getattr(a, f.name)
            kwargs[f.name] = tuple(v) if isinstance(v, list) and typing.get_origin(tp) is tuple else v
    return EngineConfig(**kwargs)


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
    config = engine_config_from_args(a)
    if config.distributed_executor_backend == "external_launcher" and int(os.environ.get("RANK", "0")) > 0:
        # a torchrun rank > 0: no server; it serves rank 0's engine and exits with it
        from miniinfer.engine.llm_engine import LLMEngine
        LLMEngine(config, progress=False)
        return 0
    run_server(config, host=a.host, port=a.port, api_key=api_key, max_n=a.max_n,
               served_model_name=a.served_model_name, shutdown_grace_s=a.shutdown_grace,
               request_timeout_s=a.request_timeout)
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
    s.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds requests in flight get to finish after SIGTERM")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="abort a request running longer than this many seconds (504)")
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
