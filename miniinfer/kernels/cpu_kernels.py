"""CPU kernels in C (``cpu_kernels.c``): GGUF Q4_1 / Q8_0 weights kept quantized and multiplied
by fp32 activations, decode attention straight over the paged fp32 KV cache, and the element-wise
ops of a decoder layer.

The C file is compiled on first use with the machine's C compiler (``-O3 -fopenmp``, no
``-march``) into a per-user cache and loaded with ctypes. The library holds three
implementations of every kernel, AVX-512, AVX2 + FMA and portable C, and runs the best one
this CPU supports (:func:`isa`); ``MINIINFER_CPU_ISA=avx512|avx2|scalar`` or :func:`set_isa`
forces one. As the build has no machine-specific flags, a cached library runs on any machine of
its architecture (x86-64: all three paths; ARM64 and others: the portable one). Where nothing
builds (no compiler, a compile error) :func:`available` says so, with a warning, and the model
keeps its dense weights.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import numpy as np
import torch

logger = logging.getLogger("miniinfer")

BLOCK = 32  # weights per block (both formats)
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # Q4_1: fp16 d, fp16 m, 16 nibble bytes; Q8_0: fp16 d, 32 int8
FORMATS = tuple(BLOCK_BYTES)
ROWS = 16  # output rows per packed record
ISAS = ("scalar", "avx2", "avx512")  # kernel implementations, in the C side's numbering
ISA_ENV = "MINIINFER_CPU_ISA"
_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernels.c")
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


def _compiler_id(cc: str) -> bytes:
    """The compiler's identity for the cache key (an upgraded compiler rebuilds), without
    running it: its resolved path, size and modification time."""
    real = os.path.realpath(cc)
    try:
        st = os.stat(real)
        return f"{real}:{st.st_size}:{st.st_mtime_ns}".encode()
    except OSError:
        return real.encode()


def _build(cc: str) -> str:
    """Compile the C file into the per-user cache (once per source, flags, compiler and
    architecture: the library has no CPU-specific flags, it picks its code path at run time)."""
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), platform.machine().encode(),
                                     _compiler_id(cc)]))
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "miniinfer")
    path = os.path.join(cache, f"cpu_kernels-{key.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, _SOURCE, "-o", tmp], check=True, capture_output=True, timeout=300)
        os.replace(tmp, path)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _pick_isa(requested: str | None, supported: tuple[str, ...]) -> str:
    """The path to run: ``requested`` (``MINIINFER_CPU_ISA``) where this CPU supports it, else
    the best one it supports (with a warning when something else was asked for)."""
    best = supported[-1]
    requested = (requested or "").strip().lower()
    if requested in ("", "auto"):
        return best
    if requested not in ISAS:
        logger.warning("%s=%s is not one of %s (or auto); using %s", ISA_ENV, requested, ", ".join(ISAS), best)
        return best
    if requested not in supported:
        logger.warning("%s=%s: this CPU does not support it (it runs %s); using %s", ISA_ENV, requested,
                       ", ".join(supported), best)
        return best
    return requested


@functools.cache
def _library() -> ctypes.CDLL | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        logger.warning("CPU kernels not built (no C compiler: gcc or cc), using the torch/oneDNN path")
        return None
    try:
        lib = ctypes.CDLL(_build(cc))
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        logger.warning("CPU kernels not built, using the torch/oneDNN path (%s): %s", e,
                       err.decode(errors="replace")[-500:])
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.q4_1_gemm.argtypes = [p, p, p, i, i, i]
    lib.q4_1_gemm.restype = None
    lib.q8_0_gemm.argtypes = [p, p, p, i, i, i]
    lib.q8_0_gemm.restype = None
    lib.q4_1_gemm_int8.argtypes = [p, p, p, i, i, i]
    lib.q4_1_gemm_int8.restype = i
    lib.paged_decode_attention.argtypes = [p, p, p, p, i, p, p, i, i, i, i, i, i, ctypes.c_float, i, p]
    lib.paged_decode_attention.restype = i
    lib.rms_norm.argtypes = [p, p, p, p, i, i, ctypes.c_float]
    lib.rms_norm.restype = None
    lib.silu_and_mul.argtypes = [p, p, i, i]
    lib.silu_and_mul.restype = None
    lg = ctypes.c_long
    lib.rope_neox.argtypes = [p, lg, i, i, i, i, p, p, p, lg]
    lib.rope_neox.restype = i
    lib.store_kv.argtypes = [p, lg, p, lg, p, p, p, i, i, lg]
    lib.store_kv.restype = i
    lib.decode_scratch_floats.argtypes, lib.decode_scratch_floats.restype = [i] * 6, lg
    lib.decode_layers.argtypes = [p, i, p, p, p, i, i, i, i, i, i, ctypes.c_float, p, p, i, lg, p, lg, p, i, p,
                                  i, i, ctypes.c_float, i, p, i]
    lib.decode_layers.restype = i
    for name in ("miniinfer_cpu_isas", "miniinfer_isa", "miniinfer_int8_kernel"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [], i
    lib.miniinfer_set_isa.argtypes, lib.miniinfer_set_isa.restype = [i], i
    supported = _supported(lib)
    chosen = _pick_isa(os.environ.get(ISA_ENV), supported)
    lib.miniinfer_set_isa(ISAS.index(chosen))
    logger.info("CPU kernels: %s path (this CPU runs %s)", chosen, ", ".join(supported))
    return lib


def _supported(lib: ctypes.CDLL) -> tuple[str, ...]:
    mask = lib.miniinfer_cpu_isas()
    return tuple(name for bit, name in enumerate(ISAS) if mask >> bit & 1)


def available() -> bool:
    """True when the kernels are built (or buildable) and load on this machine."""
    return _library() is not None


def supported_isas() -> tuple[str, ...]:
    """The kernel paths this CPU can run, worst to best (``()`` where the kernels don't build)."""
    lib = _library()
    return () if lib is None else _supported(lib)


def isa() -> str | None:
    """The kernel path that runs now (``"avx512"``, ``"avx2"`` or ``"scalar"``), None without kernels."""
    lib = _library()
    return None if lib is None else ISAS[lib.miniinfer_isa()]


def set_isa(name: str | None) -> str:
    """Run the kernels' ``name`` path from now on (process-wide); None: back to the default
    (``MINIINFER_CPU_ISA``, else the best this CPU supports). Returns the path now running."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available on this machine")
    supported = _supported(lib)
    if name is None:
        name = _pick_isa(os.environ.get(ISA_ENV), supported)
    if name not in ISAS:
        raise ValueError(f"unknown CPU kernel path {name!r}: one of {ISAS}")
    if name not in supported or lib.miniinfer_set_isa(ISAS.index(name)) < 0:
        raise ValueError(f"this CPU does not support the {name} kernels (it runs {', '.join(supported)})")
    logger.info("CPU kernels: %s path", name)
    return name


@contextlib.contextmanager
def use_isa(name: str | None):
    """``with use_isa("avx2"): ...`` runs the kernels' ``name`` path inside the block (see
    :func:`set_isa`), then the path that ran before."""
    previous = isa()
    set_isa(name)
    try:
        yield isa()
    finally:
        set_isa(previous)


def _check(blocks: torch.Tensor, in_features: int, fmt: str) -> tuple[int, int]:
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    n, k = blocks.shape[0], in_features
    if n % ROWS or k % BLOCK or blocks.shape[1] != k // BLOCK * BLOCK_BYTES[fmt]:
        raise ValueError(f"{fmt} weight [{n}, {k}] does not fit the kernel (rows % {ROWS}, cols % {BLOCK})")
    return n, k // BLOCK


def repack(blocks: torch.Tensor, in_features: int, fmt: str = "Q4_1") -> torch.Tensor:
    """GGUF rows ``uint8 [N, K/32 * block bytes]`` -> the kernel's 16-row records (see the C file)."""
    n, nb = _check(blocks, in_features, fmt)
    g = n // ROWS
    b = blocks.numpy().reshape(g, ROWS, nb, BLOCK_BYTES[fmt]).transpose(0, 2, 1, 3)  # [g, b, l, bytes]
    if fmt == "Q4_1":
        out = np.empty((g, nb, 320), dtype=np.uint8)
        out[:, :, 0:32] = b[:, :, :, 0:2].reshape(g, nb, 32)  # d of the 16 rows
        out[:, :, 32:64] = b[:, :, :, 2:4].reshape(g, nb, 32)  # m of the 16 rows
        qs = b[:, :, :, 4:20].reshape(g, nb, ROWS, 4, 4).transpose(0, 1, 3, 2, 4)  # [g, b, h, l, 4]
        out[:, :, 64:] = qs.reshape(g, nb, 256)
    else:
        out = np.empty((g, nb, 544), dtype=np.uint8)
        out[:, :, 0:32] = b[:, :, :, 0:2].reshape(g, nb, 32)
        qs = b[:, :, :, 2:34].reshape(g, nb, ROWS, 8, 4).transpose(0, 1, 3, 2, 4)  # [g, b, h, l, 4]
        out[:, :, 32:] = qs.reshape(g, nb, 512)
    return torch.from_numpy(out.reshape(-1))


def dequantize(blocks: torch.Tensor, in_features: int, fmt: str = "Q4_1") -> torch.Tensor:
    """fp32 ``[N, K]`` of GGUF rows (the reference the kernels are tested against)."""
    n, nb = blocks.shape[0], in_features // BLOCK
    b = blocks.numpy().reshape(n, nb, BLOCK_BYTES[fmt])
    d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)  # [n, nb, 1]
    if fmt == "Q8_0":
        q = b[:, :, 2:].copy().view(np.int8).astype(np.float32)
        return torch.from_numpy((d * q).reshape(n, in_features))
    m = b[:, :, 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[:, :, 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)  # weights 0..15, 16..31
    return torch.from_numpy((d * q + m).reshape(n, in_features))


def int8_kernel() -> str | None:
    """The Q4_1 x int8-activation kernel that ``gemm(..., int8=True)`` runs on the active path:
    ``"avx512-vnni"``, ``"avx2"`` (also the avx512 path's on CPUs without AVX-512 VNNI) or None
    (portable path, or no kernels: fp32 activations)."""
    lib = _library()
    return None if lib is None else (None, "avx2", "avx512-vnni")[lib.miniinfer_int8_kernel()]


def gemm(x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int,
         fmt: str = "Q4_1", int8: bool = False) -> torch.Tensor:
    """``x [M, K] fp32 @ W.T`` for a weight packed by :func:`repack`. ``int8`` (Q4_1 only):
    quantize x per row and 32-block to int8 (scale max|x| / 127, as llama.cpp's Q8_1) and
    multiply with integer dot products (:func:`int8_kernel`; the portable path stays fp32)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available on this machine")
    x = x.contiguous()
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[-1] != in_features:
        raise ValueError(f"expected fp32 [M, {in_features}], got {x.dtype} {tuple(x.shape)}")
    m = x.shape[0]
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m == 0:
        return y
    if fmt == "Q4_1" and int8:
        if lib.q4_1_gemm_int8(packed.data_ptr(), x.data_ptr(), y.data_ptr(), m, out_features, in_features) == 2:
            raise MemoryError("q4_1_gemm_int8: out of memory")
    elif fmt == "Q4_1":
        lib.q4_1_gemm(packed.data_ptr(), x.data_ptr(), y.data_ptr(), m, out_features, in_features)
    elif fmt == "Q8_0":
        lib.q8_0_gemm(packed.data_ptr(), x.data_ptr(), y.data_ptr(), m, out_features, in_features)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return y


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                           scale: float, tree_bits: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence (q ``[B, H, D]`` fp32) against its first ``seq_lens[b]``
    cached tokens (fp32 caches ``[blocks, block_size, Hkv, D]``, int32 block tables).
    ``tree_bits`` [B] int64 (optional): -1 for a plain row; otherwise row b sees keys below
    ``seq_lens[b] - 64`` and, of the last 64, those whose bit is set (bit 0 = the oldest; see
    ``AttentionMetadata``'s tree mask, ``seq_lens[b]`` being the sequence's whole KV length)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available on this machine")
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if q.dtype != torch.float32 or k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
        raise ValueError("paged_decode_attention takes fp32 q and caches")
    if d % 16 or d > 128 or h % hkv:
        raise ValueError(f"head_dim must be a multiple of 16 up to 128 and heads a multiple of KV heads, "
                         f"got D={d}, H={h}, Hkv={hkv}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the caches must be contiguous")
    q = q.contiguous()
    tables = _int_rows(block_tables, torch.int32)
    lens = _int_rows(seq_lens, torch.int32)
    if tables.shape[0] != b or lens.shape[0] != b:
        raise ValueError(f"{b} queries but {tables.shape[0]} block tables and {lens.shape[0]} lengths")
    bits = None if tree_bits is None else _int_rows(tree_bits, torch.int64)
    if bits is not None and bits.shape != (b,):
        raise ValueError(f"{b} queries but tree_bits of shape {tuple(bits.shape)}")
    out = torch.empty_like(q)
    err = lib.paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                     tables.stride(0), lens.data_ptr(), out.data_ptr(), b, h, hkv, d,
                                     block_size, max_len, scale, k_cache.shape[0],
                                     None if bits is None else bits.data_ptr())
    if err:  # the C code checks what would read out of bounds (it did nothing)
        raise ValueError(f"seq_lens must be in [1, {min(max_len, tables.shape[1] * block_size)}]" if err == 1 else
                         f"block table entries must be in [0, {k_cache.shape[0]})" if err == 2 else
                         "out of memory")
    return out


def _int_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor:
    """``rms_norm(x) * weight`` into a new tensor; with ``residual``, first ``residual += x``
    (in place) and normalize the sum. Rows are the last dimension."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    w = weight.contiguous()
    _library().rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), w.data_ptr(),
                        out.data_ptr(), x.numel() // n, n, eps)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :n]) * x[..., n:]`` for ``x [..., 2n]``."""
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    _library().silu_and_mul(x.data_ptr(), out.data_ptr(), x.numel() // (2 * n), n)
    return out


def rope_neox(x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
              cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """NeoX RoPE of ``heads`` heads laid side by side at the start of each row of ``x [T, ...]``
    (row stride free, last dimension contiguous), into a new ``[T, heads, head_dim]``."""
    t = x.shape[0]
    rot = cos_sin_cache.shape[-1]
    if x.stride(-1) != 1 or x.dtype != torch.float32 or rot > head_dim or rot % 2:
        raise ValueError("rope_neox takes fp32 rows with a contiguous last dimension")
    pos = _int_rows(positions, torch.int64)
    out = torch.empty(t, heads, head_dim, dtype=torch.float32)
    cache = cos_sin_cache.contiguous()
    if _library().rope_neox(x.data_ptr(), x.stride(0), t, heads, head_dim, rot, pos.data_ptr(), cache.data_ptr(),
                            out.data_ptr(), cache.shape[0]):
        raise ValueError(f"positions must be in [0, {cache.shape[0]})")
    return out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """``k_cache[slot] = k[t]`` (and v) for every token whose slot is >= 0. k, v: ``[T, Hkv, D]``
    fp32 with contiguous rows (any row stride); caches contiguous fp32."""
    t, width = k.shape[0], k.shape[1] * k.shape[2]
    slots = _int_rows(slot_mapping, torch.int64)
    n_slots = k_cache.numel() // width
    if _library().store_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(),
                           k_cache.data_ptr(), v_cache.data_ptr(), t, width, n_slots):
        raise ValueError(f"slot_mapping entries must be in [-1, {n_slots})")
