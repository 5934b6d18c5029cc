"""Configuration: one dataclass for the engine, one for the model's shape."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from miniinfer.models.registry import resolve_model_family

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # auto: the model dtype; fp8*: float8_e4m3fn (GPU only)


def parse_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """A torch dtype from a name (``"bfloat16"``, ``"bf16"``, ``"fp32"``, ...) or a torch dtype.

    ``"auto"`` is bfloat16 on CUDA and float32 elsewhere. Raises ``ValueError`` (listing the
    names) for an unknown one.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES) + ['auto']}, got {dtype!r}")
    return _DTYPES[dtype]


@dataclass
class ModelConfig:
    """The shape of a decoder-only transformer, read from an HF ``config.json``.

    The architecture must be one of ``models/registry.py``'s; its family sets the defaults
    of the per-family flags (``attention_bias``, ``qk_norm``).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Parse an HF ``config.json`` dict (transformers 4 or 5 layout).

        Raises ``ValueError`` naming the supported architectures when neither
        ``architectures[0]`` nor ``model_type`` is registered, and ``KeyError`` when a
        required shape key (``hidden_size``, ``num_attention_heads``, ...) is missing.
        """
        arch, family = resolve_model_family(cfg)
        num_heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope_from_hf(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family.attention_bias)),
            qk_norm=family.qk_norm,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hf_config=dict(cfg),
        )


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from ``rope_theta``/``rope_scaling`` or transformers 5's
    ``rope_parameters``; ``rope_scaling`` always has ``rope_type``, and is None for default RoPE."""
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    params = cfg.get("rope_parameters")  # transformers >= 5 layout
    if isinstance(params, dict):
        rope_theta = rope_theta or params.get("rope_theta")
        if params.get("rope_type", "default") != "default":
            rope_scaling = rope_scaling or params
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        rope_scaling["rope_type"] = kind
        if kind == "default":
            rope_scaling = None
    return float(rope_theta or 10000.0), rope_scaling


def offline_max_num_batched_tokens(device: str = "auto") -> int:
    """The ``LLM`` class's default step budget, as vLLM's offline default: 16,384 tokens on a
    GPU of at least 70 GiB other than an A100, else 8,192 (``EngineConfig``'s, which the server
    keeps for its latency). Larger prefill chunks, H200, same lease: a 16k prompt's TTFT on
    Qwen2-7B 470 -> 434 ms (one chunk instead of two), §9 long prompts 3,354 -> 3,561 tok/s."""
    device = str(device)  # a torch.device too
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return 8192
    props = torch.cuda.get_device_properties(torch.device(device))
    return 16384 if props.total_memory >= 70 * 2 ** 30 and "a100" not in props.name.lower() else 8192


@dataclass
class EngineConfig:
    """Everything the engine needs to know, in one place. ``LLM(**kwargs)`` fills it."""

    model: str | None = None  # HF folder, .gguf file, preset name (dummy), or None = embedded SmolLM2
    tokenizer: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # per-step token budget (chunked prefill)
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8 | fp8_e4m3: e4m3 KV cache, half the bytes (CUDA only)
    num_kv_blocks: int | None = None  # overrides the memory-based sizing
    kv_cache_memory_gb: float | None = None  # CPU KV budget; default 2 GiB
    gpu_memory_utilization: float = 0.9
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # the host prepares step N+1 while the device runs step N (with speculation: EAGLE's fused
    # step only, which queues step N+1 itself; other speculative steps are synchronous)
    overlap_scheduling: bool = True
    attention_backend: str = "auto"  # auto | torch | cpu (torch + C decode kernel) | triton
    # triton backend: auto (chunks >= 1,024 new tokens: cuDNN SDPA + the paged prefix kernel) | triton
    # (the paged kernel only). H200, same lease: §9 long prompts 3,365 -> 3,475 tok/s, 16k TTFT 500 -> 471 ms
    prefill_attention: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs
    cpu_packed_weights: bool = True  # CPU fp32: weights pre-packed for oneDNN (~2x faster GEMMs)
    cpu_gguf_kernels: bool = True  # CPU fp32, GGUF Q4_1/Q8_0: weights stay quantized, AVX-512 kernels
    cpu_int8_activations: bool = False  # CPU GGUF Q4_1: int8 activations as llama.cpp, every row count: ~3x faster GEMMs, logits ~5% off
    warmup: bool = True
    check_integrity_when_idle: bool = True  # verify KV bookkeeping whenever the engine goes idle
    max_logprobs: int = 20
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # mp: the engine spawns its ranks | external_launcher: torchrun did
    all_reduce_mode: str = "auto"  # tensor parallelism on CUDA: auto | nccl | symm_mem (one-/two-shot, see comm.py)
    reasoning_parser: str | None = None  # qwen3 | deepseek_r1: <think> split off, grammars start after it
    structured_output_overlap: bool = True  # fill grammar masks while the forward runs (off: after it, for A/B)
    deferred_sampling: bool = True  # overlap scheduling: sample constrained steps after the next is staged (mask filled on a thread)
    # speculative decoding, e.g. {"method": "ngram", "num_speculative_tokens": 4} (spec_decode/config.py)
    speculative_config: Any = field(default=None, metadata={"json": True})
    trust_remote_code: bool = False  # accepted for API parity; never executes remote code

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and not self.device.startswith("cuda"):
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is a GPU option (the Triton path); "
                             f"device {self.device!r} keeps the model-dtype cache: use kv_cache_dtype='auto'")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not (0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.reasoning_parser is not None:
            from miniinfer.reasoning import reasoning_markers
            reasoning_markers(self.reasoning_parser)  # raises for an unknown name
        if self.speculative_config is not None:
            from miniinfer.spec_decode.config import SpeculativeConfig
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if self.distributed_executor_backend not in ("mp", "external_launcher"):
            raise ValueError("distributed_executor_backend must be mp or external_launcher, got "
                             f"{self.distributed_executor_backend!r}")
        if self.prefill_attention not in ("auto", "triton"):
            raise ValueError(f"prefill_attention must be auto or triton, got {self.prefill_attention!r}")
        if self.all_reduce_mode not in ("auto", "nccl", "symm_mem"):
            raise ValueError(f"all_reduce_mode must be auto, nccl or symm_mem, got {self.all_reduce_mode!r}")
        if self.tensor_parallel_size > 1 and self.speculative_config is not None:
            raise ValueError("speculative_config: speculative decoding with tensor_parallel_size > 1 "
                             "is not supported yet")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, self.device)
