"""Read llama.cpp GGUF files: an HF-style config dict and HF-named, dequantized weights.

The metadata is parsed by a small reader of our own (``gguf.GGUFReader`` builds a numpy
memmap per field part and takes seconds on a 49k-token vocabulary); the tensor data is
memory-mapped and dequantized with ``gguf.quants.dequantize``.

Two llama.cpp conventions are undone here:

* GGUF lists a tensor's dims innermost first (``ne[0]`` = input features), so a
  ``[in, out]`` GGUF shape is an HF ``[out, in]`` weight.
* ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj``/``k_proj`` of *llama*-arch
  models so that llama.cpp's interleaved ("GPT-J" style) rotary matches HF's half-split
  ("NeoX" style) one.  Per head, HF row ``(half, j)`` went to row ``(j, half)``; we
  swap back.  Qwen2/Qwen3 GGUFs use NeoX rotary in llama.cpp and are not permuted.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# general.architecture -> (HF architectures[0], HF model_type)
SUPPORTED_GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# ggml tensor types we dequantize (all go through gguf.quants.dequantize).
SUPPORTED_GGML_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# ---------------------------------------------------------------------------------------
# Minimal GGUF (v2/v3, little-endian) reader
# ---------------------------------------------------------------------------------------

# GGUF metadata value types -> struct format (scalars)
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_DTYPE = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
             6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (ne[0]) first
    ggml_type: int
    offset: int  # relative to the start of the data section

    @property
    def type_name(self) -> str:
        return _ggml_type_name(self.ggml_type)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


def _ggml_type_name(t: int) -> str:
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"<unknown ggml type {t}>"


class _GGUFFile:
    """Header, metadata and tensor table of a GGUF file; tensor bytes stay memory-mapped."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        self.path = path
        with open(path, "rb") as f:
            # ACCESS_COPY: writable (copy-on-write) pages, so numpy/torch views never warn
            # about read-only memory; nothing is ever written back to the file.
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            self.close()
            raise ValueError(f"{path} is not a valid GGUF file (truncated or corrupt header: {e})") from e
        except Exception:
            self.close()
            raise

    # -- low-level readers ------------------------------------------------------------
    def _unpack(self, fmt: str):
        vals = struct.unpack_from("<" + fmt, self._mm, self._pos)
        self._pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def _string(self) -> str:
        n = self._unpack("Q")
        b = self._mm[self._pos:self._pos + n]
        if len(b) != n:
            raise struct.error("string runs past the end of the file")
        self._pos += n
        return b.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._unpack("I"), self._unpack("Q")
            if itype == _STRING:
                return [self._string() for _ in range(count)]
            if itype in _NP_DTYPE:
                dt = np.dtype(_NP_DTYPE[itype]).newbyteorder("<")
                arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(itype) for _ in range(count)]  # nested arrays
        if vtype in _SCALAR_FMT:
            return self._unpack(_SCALAR_FMT[vtype])
        raise ValueError(f"unknown GGUF metadata value type {vtype}")

    # -- structure --------------------------------------------------------------------
    def _parse(self) -> None:
        self._pos = 0
        if self._mm[:4] != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic {bytes(self._mm[:4])!r})")
        self._pos = 4
        version = self._unpack("I")
        if version & 0xFFFF == 0 and version != 0:
            raise ValueError(f"{self.path} is a big-endian GGUF file, which is not supported")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("I"))
        self.tensors: list[_TensorInfo] = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("I")
            dims = tuple(int(d) for d in struct.unpack_from(f"<{n_dims}Q", self._mm, self._pos))
            self._pos += 8 * n_dims
            ggml_type, offset = self._unpack("I"), self._unpack("Q")
            self.tensors.append(_TensorInfo(name, dims, ggml_type, offset))
        align = int(self.fields.get("general.alignment", 32)) or 32
        self.data_start = (self._pos + align - 1) // align * align

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # a numpy view is still alive; the GC unmaps it later
            pass

    def __enter__(self) -> "_GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tensor bytes -----------------------------------------------------------------
    def raw(self, t: _TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 of shape ``(*hf_shape[:-1], bytes_per_row)``."""
        from gguf.constants import GGML_QUANT_SIZES
        from gguf import GGMLQuantizationType
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        n_elem = math.prod(t.dims)
        row = t.dims[0] if t.dims else 1
        if row % block:
            raise ValueError(f"tensor {t.name!r}: row length {row} is not a multiple of the "
                             f"{t.type_name} block size {block}")
        nbytes = n_elem // block * type_size
        start = self.data_start + t.offset
        if start + nbytes > len(self._mm):
            raise ValueError(f"tensor {t.name!r} runs past the end of {self.path} (truncated file?)")
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=start)
        return arr.reshape(*t.hf_shape[:-1], row // block * type_size)


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

def _arch(fields: dict[str, Any], path: str) -> str:
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} "
            f"({', '.join(a for a, _ in SUPPORTED_GGUF_ARCHITECTURES.values())})")
    return arch


def _llama3_rope_scaling(freq_factors: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Recognise llama.cpp's precomputed Llama-3.x ``rope_freqs`` as HF ``llama3`` scaling.

    The converter turns ``rope_scaling={"rope_type": "llama3", ...}`` into a per-frequency
    factor tensor and drops the parameters; we try the published Llama 3.1/3.2 settings
    and accept the first that reproduces the tensor exactly.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    factor = float(np.max(freq_factors))
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048)):
        low_wl, high_wl = orig / low, orig / high
        smooth = (orig / wavelen - low) / (high - low)
        expect = np.where(wavelen < high_wl, 1.0,
                          np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expect.shape == freq_factors.shape and np.allclose(expect, freq_factors, rtol=1e-4, atol=1e-5):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    return None


def _f32(x: Any) -> float:
    """GGUF stores float32; print it back as the short decimal it was written from (1e-05)."""
    return float(str(np.float32(x)))


def _config_from(g: _GGUFFile) -> dict[str, Any]:
    f = g.fields
    arch = _arch(f, g.path)
    hf_arch, model_type = SUPPORTED_GGUF_ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        return f.get(f"{arch}.{key}", default)

    names = {t.name for t in g.tensors}
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer list in some files; all equal for our archs
        kv_heads = max(kv_heads)
    ffn = get("feed_forward_length")
    if isinstance(ffn, list):
        ffn = max(ffn)
    head_dim = get("attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = get("rope.dimension_count")
    head_dim = int(head_dim) if head_dim else hidden // heads

    vocab = get("vocab_size")
    if vocab is None:
        tokens = f.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        else:
            emb = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
            vocab = emb.hf_shape[0] if emb is not None else None
    if vocab is None:
        raise ValueError(f"{g.path}: cannot determine vocab_size (no {arch}.vocab_size, "
                         "tokenizer.ggml.tokens or token_embd.weight)")

    rope_theta = _f32(get("rope.freq_base", 10000.0))
    ctx = int(get("context_length", 4096))
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "max_position_embeddings": ctx,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in f:
        cfg["pad_token_id"] = f["tokenizer.ggml.padding_token_id"]

    # RoPE scaling: explicit metadata (linear / yarn / longrope ...) ...
    kind = get("rope.scaling.type")
    if kind and kind != "none":
        rs: dict[str, Any] = {"rope_type": kind}
        if get("rope.scaling.factor") is not None:
            rs["factor"] = _f32(get("rope.scaling.factor"))
        if get("rope.scaling.original_context_length") is not None:
            rs["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        if get("rope.scaling.attn_factor") is not None:
            rs["attention_factor"] = _f32(get("rope.scaling.attn_factor"))
        for src, dst in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                         ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if get(src) is not None:
                rs[dst] = _f32(get(src))
        cfg["rope_scaling"] = rs
    # ... or Llama-3.x's precomputed frequency factors.
    elif "rope_freqs.weight" in names:
        t = next(t for t in g.tensors if t.name == "rope_freqs.weight")
        factors = _dequantize(g, t).astype(np.float64).reshape(-1)
        rs = _llama3_rope_scaling(factors, head_dim, rope_theta)
        if rs is None:
            logger.warning("%s: rope_freqs.weight does not match Llama-3 rope scaling; ignoring it", g.path)
        else:
            cfg["rope_scaling"] = rs
    return cfg


def read_gguf_config(path: str) -> dict[str, Any]:
    """Return an HF ``config.json``-style dict describing the model in a GGUF file."""
    with _GGUFFile(path) as g:
        return _config_from(g)


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors llama.cpp stores that have no HF counterpart (consumed by read_gguf_config).
_SKIP = {"rope_freqs.weight"}


def gguf_to_hf_name(name: str) -> str | None:
    """Map a llama.cpp tensor name to its HF name (None if it has no HF counterpart)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _check_type(t: _TensorInfo) -> None:
    if t.type_name not in SUPPORTED_GGML_TYPES:
        raise ValueError(
            f"tensor {t.name!r} has GGML type {t.type_name}, which is not supported; "
            f"supported types: {', '.join(SUPPORTED_GGML_TYPES)}")


def _dequantize(g: _GGUFFile, t: _TensorInfo) -> np.ndarray:
    """float32 numpy array of HF shape."""
    from gguf.quants import dequantize
    from gguf import GGMLQuantizationType
    _check_type(t)
    out = dequantize(g.raw(t), GGMLQuantizationType(t.ggml_type))
    return out.reshape(t.hf_shape)


def _to_torch(g: _GGUFFile, t: _TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    _check_type(t)
    kind = t.type_name
    # Fast paths: plain float tensors are viewed straight from the mapping and copied once.
    if kind in ("F32", "F16", "BF16"):
        raw = g.raw(t)
        if kind == "F32":
            src = torch.from_numpy(raw.view(np.float32))
        elif kind == "F16":
            src = torch.from_numpy(raw.view(np.float16))
        else:
            src = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return src.reshape(t.hf_shape).to(dtype, copy=True)
    return torch.from_numpy(_dequantize(g, t)).to(dtype)


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute()`` of q/k rows (works for weights and biases)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute a q/k tensor of {rows} rows for {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def iter_gguf_weights(path: str, dtype: torch.dtype = torch.float32, progress: bool = True,
                      quantized_rows: dict[str, tuple[str, torch.Tensor]] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight of a GGUF model, dequantized to ``dtype``.

    Tensors come out in HF's ``[out, in]`` layout; llama-arch q/k projections are
    un-permuted back to HF's rotary convention.  Every tensor's type is checked before
    any is dequantized, so an unsupported quantization fails fast.  With ``quantized_rows``,
    every Q4_1 / Q8_0 matrix is also stored there as ``(type, raw blocks uint8 [out, bytes])``
    (rows un-permuted the same way) for the CPU kernels that multiply them directly.
    """
    from tqdm.auto import tqdm

    g = _GGUFFile(path)
    try:
        arch = _arch(g.fields, path)
        for t in g.tensors:
            if t.name not in _SKIP and gguf_to_hf_name(t.name) is not None:
                _check_type(t)
        heads = int(g.fields[f"{arch}.attention.head_count"])
        kv_heads = g.fields.get(f"{arch}.attention.head_count_kv", heads)
        kv_heads = int(max(kv_heads) if isinstance(kv_heads, list) else kv_heads)
        permute = arch == "llama"

        bar = tqdm(g.tensors, desc=f"Loading {os.path.basename(path)}", unit="tensor",
                   disable=not progress, leave=False)
        for t in bar:
            hf_name = gguf_to_hf_name(t.name)
            if hf_name is None:
                if t.name not in _SKIP:
                    logger.warning("%s: ignoring GGUF tensor %r (no HF counterpart)", path, t.name)
                continue
            w = _to_torch(g, t, dtype)
            raw = None
            if quantized_rows is not None and t.type_name in ("Q4_1", "Q8_0") and len(t.hf_shape) == 2:
                raw = torch.from_numpy(g.raw(t).copy())
            if permute and ".attn_q." in t.name:
                w = _unpermute_rotary(w, heads)
                raw = None if raw is None else _unpermute_rotary(raw, heads)
            elif permute and ".attn_k." in t.name:
                w = _unpermute_rotary(w, kv_heads)
                raw = None if raw is None else _unpermute_rotary(raw, kv_heads)
            if raw is not None:
                quantized_rows[hf_name] = (t.type_name, raw)
            yield hf_name, w
        bar.close()
    finally:
        g.close()
