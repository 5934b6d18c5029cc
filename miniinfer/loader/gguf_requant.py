"""Convert GGUF Q4_0 / Q4_K / Q6_K rows at load time into the two block formats the CPU
kernels multiply (Q4_1 and Q8_0, ``kernels/cpu_kernels.c``), so those weights stay quantized
instead of being dequantized to fp32 (issue #17).

Block layouts (llama.cpp ``ggml-common.h`` / ``ggml-quants.c``; gguf-py ``gguf/quants.py``,
whose ``dequantize_blocks`` are the reference the tests compare against):

* ``Q4_0``, 32 weights, 18 bytes: fp16 ``d``; 16 bytes ``qs``, weight ``i < 16`` is the low
  nibble of ``qs[i]``, weight ``16 + i`` the high one; value ``(q - 8) * d``.
* ``Q4_1``, 32 weights, 20 bytes: fp16 ``d``, fp16 ``m``; nibbles as Q4_0; value ``q * d + m``.
* ``Q8_0``, 32 weights, 34 bytes: fp16 ``d``; 32 int8 ``q``; value ``q * d``.
* ``Q4_K``, 256 weights, 144 bytes: fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit scales
  ``sc[8]`` and mins ``m[8]`` (``get_scale_min_k4``), 128 bytes ``qs``. Sub-block
  ``j = 2 * c + h`` (32 weights) uses nibble ``h`` (0 low, 1 high) of ``qs[32 c : 32 c + 32]``;
  value ``d * sc[j] * q - dmin * m[j]``.
* ``Q6_K``, 256 weights, 210 bytes: 128 bytes ``ql`` (low 4 bits), 64 bytes ``qh`` (high 2
  bits), 16 int8 scales, fp16 ``d``; 16 sub-blocks of 16; value ``d * sc[j] * (q - 32)``.

Conversions (all vectorised over blocks; rows are ``uint8 [rows, bytes per row]`` in and out):

* Q4_0 -> Q4_1: ``m = -8 d``, same nibbles. Exact (a power-of-two multiple of an fp16, and
  ``d * q + m`` equals ``d * (q - 8)`` in fp32); None if ``8 d`` overflows fp16.
* Q4_K -> Q4_1 (8 blocks a super-block): ``d' = fp16(d sc[j])``, ``m' = fp16(-dmin m[j])``,
  nibbles re-laid. Not exact: the two products are rounded to fp16 (relative 2^-12 each).
* Q6_K -> Q8_0 (8 blocks a super-block, each covering two sub-blocks of 16): each block is
  re-quantized from the exact Q6_K values; of two candidates the one with the smaller max
  error is kept: (a) ``n = sc q`` divided by ``g = gcd(sc_a, sc_b)`` when it fits int8, with
  ``d' = fp16(d g)`` (error <= 2^-12 relative to the block max; exact when ``d g`` is an
  fp16), (b) ``d' = fp16(max |v| / 127)``, ``q' = round(v / d')`` (error <= d'/2, ~1/254 of
  the block max).
* Q4_1 -> Q8_0 (only for a fused projection whose other parts are Q8_0, e.g. a Q4_K
  ``attn_q`` / ``attn_k`` next to a Q6_K ``attn_v``, so the whole ``qkv_proj`` stays quantized):
  the 32 exact values ``v = d q + m`` (fp32) re-quantized, ``d' = fp16(max |v| / 127)``,
  ``q' = round(v / d')`` clipped to [-127, 127] (the next fp16 up for ``d'`` when that has
  the smaller max error, as for subnormal ``d'``). Error <= d'/2, ~1/254 of the block max
  (measured on random Q4_1 blocks, vs their fp32 dequantization: <= 3.94e-3 = 1/254 of the
  block max while ``d'`` is a normal fp16, ``max |v| >= 127 * 2^-14 ~ 7.8e-3``; up to
  6.9e-3 with subnormal ``d'``, ``max |v| ~ 2e-5``).

Measured against gguf-py's dequantization, on random blocks (tests/loader/test_gguf_requant.py)
and on SmolLM2-135M ``ffn_down`` matrices and Gaussian ones quantized by llama.cpp's own
``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref``: Q4_K -> Q4_1 max |error| / max |w| of a
row <= 1.3e-3, Frobenius relative error ~6.7e-4 (Q4_K's own error there: 2e-2 to 7e-2);
Q6_K -> Q8_0 max |error| / max |w| of a row <= 3.94e-3 (1/254), Frobenius ~5.3e-3 (Q6_K's own
error: ~1.8e-2, so the total grows by ~4 %).
"""
from __future__ import annotations

import numpy as np

__all__ = ["KERNEL_TARGET", "q4_0_to_q4_1", "q4_1_to_q8_0", "q4_k_to_q4_1", "q6_k_to_q8_0",
           "to_kernel_rows"]

QK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
QK_K = 256  # weights per K-quant super-block
BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q6_K": 210}
# GGUF type -> the kernel format it is converted to
KERNEL_TARGET = {"Q4_0": "Q4_1", "Q4_K": "Q4_1", "Q6_K": "Q8_0"}
_CHUNK_ROWS = 256  # rows converted at a time (bounds the float64 temporaries: ~8 copies of a chunk)


def _blocks(rows: np.ndarray, fmt: str) -> np.ndarray:
    """``uint8 [rows, bytes]`` -> ``uint8 [n blocks, block bytes]`` (a copy if not contiguous)."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] % BYTES[fmt]:
        raise ValueError(f"{fmt} rows must be uint8 [rows, k * {BYTES[fmt]}], got {rows.shape}")
    return rows.reshape(-1, BYTES[fmt])


def _fp16(x: np.ndarray) -> np.ndarray | None:
    """``x`` (float32/64) as fp16, or None if a finite value overflows."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    if not np.isfinite(h[np.isfinite(x)]).all():
        return None
    return h


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """``uint8 [..., 32]`` values 0..15 -> Q4_1's 16 bytes (low nibble = weights 0..15)."""
    return q[..., :16] | (q[..., 16:] << np.uint8(4))


def q4_0_to_q4_1(rows: np.ndarray) -> np.ndarray | None:
    """Q4_0 rows ``uint8 [n, k/32 * 18]`` -> Q4_1 rows ``uint8 [n, k/32 * 20]``, exactly.

    ``m = -8 d`` is a power-of-two multiple of the fp16 ``d``, so it is an fp16 too unless it
    overflows (``|d| > 8188``): then None (the caller dequantizes the tensor instead)."""
    b = _blocks(rows, "Q4_0")
    d = b[:, 0:2].copy().view(np.float16)
    m = _fp16(-8.0 * d.astype(np.float32))
    if m is None:
        return None
    out = np.empty((b.shape[0], BYTES["Q4_1"]), dtype=np.uint8)
    out[:, 0:2] = b[:, 0:2]
    out[:, 2:4] = m.view(np.uint8)
    out[:, 4:] = b[:, 2:]  # same nibble order in both formats
    return out.reshape(rows.shape[0], -1)


def _q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes ``uint8 [n, 12]`` -> 6-bit scales and mins ``uint8 [n, 8]`` each
    (llama.cpp ``get_scale_min_k4``: j < 4 in the low 6 bits of bytes j / j+4; j >= 4 split
    over the nibbles of bytes j+4 and the top 2 bits of bytes j-4 / j)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def q4_k_to_q4_1(rows: np.ndarray) -> np.ndarray | None:
    """Q4_K rows ``uint8 [n, k/256 * 144]`` -> Q4_1 rows ``uint8 [n, k/32 * 20]``: one Q4_1
    block per 32-weight sub-block, ``d' = fp16(d * sc[j])``, ``m' = fp16(-dmin * m[j])``, the
    same 4-bit values. Not exact (the products are rounded to fp16); None on fp16 overflow."""
    b = _blocks(rows, "Q4_K")
    n = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = _q4_k_scale_min(b[:, 4:16])
    d1 = _fp16(d * sc.astype(np.float32))  # [n, 8], exact in fp32 (11 + 6 bits)
    m1 = _fp16(-(dmin * mn.astype(np.float32)))
    if d1 is None or m1 is None:
        return None
    qs = b[:, 16:].reshape(n, 4, 32)
    q = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2).reshape(n, 8, 32)  # sub-block 2c+h
    out = np.empty((n, 8, BYTES["Q4_1"]), dtype=np.uint8)
    out[:, :, 0:2] = d1.reshape(n, 8, 1).view(np.uint8)
    out[:, :, 2:4] = m1.reshape(n, 8, 1).view(np.uint8)
    out[:, :, 4:] = _pack_nibbles(q)
    return out.reshape(rows.shape[0], -1)


def _q6_k_ints(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K blocks ``uint8 [n, 210]`` -> (``q - 32`` int16 [n, 16, 16], scales int16 [n, 16],
    ``d`` float32 [n, 1]), in gguf-py's ``Q6_K.dequantize_blocks`` order."""
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].view(np.int8).astype(np.int16)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    lo = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    hi = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(0x03)
    q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << np.uint8(4))).astype(np.int16) - 32
    return q.reshape(n, 16, 16), sc, d


def q6_k_to_q8_0(rows: np.ndarray) -> np.ndarray | None:
    """Q6_K rows ``uint8 [n, k/256 * 210]`` -> Q8_0 rows ``uint8 [n, k/32 * 34]``: each Q8_0
    block (two Q6_K sub-blocks of 16, scales ``sc_a``, ``sc_b``) re-quantized from the exact
    values, keeping the better of the gcd candidate and the max/127 one (module docstring).
    Not exact in general; None on fp16 overflow."""
    b = _blocks(rows, "Q6_K")
    n = b.shape[0]
    q, sc, d = _q6_k_ints(b)
    ints = (q * sc[:, :, None]).reshape(n, 8, 32).astype(np.int32)  # |sc q| <= 4096
    d = d.reshape(n, 1, 1).astype(np.float64)
    v = d * ints  # the exact Q6_K values (also exact in fp32, as gguf-py computes them)

    # (b) d' = fp16(max|v| / 127), q' = round(v / d')
    amax = np.abs(v).max(axis=-1, keepdims=True)
    db = _fp16(amax / 127.0)
    if db is None:
        return None
    db64 = db.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        qb = np.where(db64 > 0, np.rint(v / db64), 0).clip(-127, 127)
    err_b = np.abs(qb * db64 - v).max(axis=-1)

    # (a) integers divided by g = gcd(|sc_a|, |sc_b|): d' = fp16(d g), q' = sc q / g
    sc2 = np.abs(sc.reshape(n, 8, 2).astype(np.int32))
    g = np.maximum(np.gcd(sc2[..., 0], sc2[..., 1]), 1)[..., None]  # [n, 8, 1]
    qa = ints // g
    fits = np.abs(qa).max(axis=-1) <= 127
    da = _fp16(d * g)
    if da is None:  # the overflowing blocks cannot take candidate (a)
        with np.errstate(over="ignore"):
            da = (d * g).astype(np.float16)
        fits &= np.isfinite(da[..., 0])
    err_a = np.where(fits, np.abs(qa * da.astype(np.float64) - v).max(axis=-1), np.inf)

    use_a = err_a <= err_b  # [n, 8]
    dq = np.where(use_a[..., None], da, db)
    qq = np.where(use_a[..., None], qa.clip(-127, 127), qb).astype(np.int8)
    out = np.empty((n, 8, BYTES["Q8_0"]), dtype=np.uint8)
    out[:, :, 0:2] = dq.astype(np.float16).view(np.uint8)
    out[:, :, 2:] = qq.view(np.uint8)
    return out.reshape(rows.shape[0], -1)


def q4_1_to_q8_0(rows: np.ndarray) -> np.ndarray | None:
    """Q4_1 rows ``uint8 [n, k/32 * 20]`` -> Q8_0 rows ``uint8 [n, k/32 * 34]``: each block's
    exact values ``d q + m`` (fp32, as the kernels compute them) re-quantized with
    ``d' = fp16(max |v| / 127)`` (or the next fp16 up when that has the smaller max error:
    subnormal ``d'``), ``q' = round(v / d')`` (nearest, clipped to +-127). Not exact: error
    <= d'/2, about 1/254 of the block's max |v| (up to ~1/145 measured where ``d'`` is a coarse
    fp16 subnormal, ``max |v| < 127 * 2^-14``); None on fp16 overflow. Converted in chunks of
    rows (bounds the float64 temporaries)."""
    return _in_chunks(_q4_1_to_q8_0_chunk, rows)


def _q4_1_to_q8_0_chunk(rows: np.ndarray) -> np.ndarray | None:
    """:func:`q4_1_to_q8_0` on one chunk of rows."""
    b = _blocks(rows, "Q4_1")
    n = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[:, 4:]
    q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).astype(np.float32)  # [n, 32]
    v = (d * q + m).astype(np.float64)  # the exact Q4_1 values
    amax = np.abs(v).max(axis=-1, keepdims=True)
    d1 = _fp16(amax / 127.0)
    if d1 is None or not np.isfinite(v).all():
        return None
    # the nearest fp16 may lie below max|v|/127 (then q' clips); the next one up never clips.
    # Keep the one with the smaller max error (it matters for coarse, subnormal d')
    with np.errstate(over="ignore"):
        d2 = np.nextafter(d1, np.float16(np.inf))

    def candidate(dc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c64 = dc.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            qc = np.where(c64 > 0, np.rint(v / c64), 0).clip(-127, 127)
        err = np.abs(qc * c64 - v).max(axis=-1, keepdims=True)
        return qc, np.where(np.isfinite(dc), err, np.inf)

    (q1, e1), (q2, e2) = candidate(d1), candidate(d2)
    up = e2 < e1  # [n, 1]
    best_d, best_q = np.where(up, d2, d1), np.where(up, q2, q1)
    out = np.empty((n, BYTES["Q8_0"]), dtype=np.uint8)
    out[:, 0:2] = best_d.astype(np.float16).view(np.uint8)
    out[:, 2:] = best_q.astype(np.int8).view(np.uint8)
    return out.reshape(rows.shape[0], -1)


_CONVERT = {"Q4_0": q4_0_to_q4_1, "Q4_K": q4_k_to_q4_1, "Q6_K": q6_k_to_q8_0}


def to_kernel_rows(fmt: str, rows: np.ndarray) -> tuple[str, np.ndarray] | None:
    """GGUF rows ``uint8 [n, bytes per row]`` of type ``fmt`` -> ``(kernel format, rows)`` the
    CPU kernels take (Q4_1 / Q8_0 pass through unchanged, as a copy), converted in chunks of
    rows; None for a type with no conversion or if a scale overflows fp16 (then the caller
    keeps the tensor dequantized)."""
    if fmt in ("Q4_1", "Q8_0"):
        return fmt, np.array(rows, dtype=np.uint8, copy=True)
    convert = _CONVERT.get(fmt)
    if convert is None or rows.ndim != 2:
        return None
    out = _in_chunks(convert, rows)
    return None if out is None else (KERNEL_TARGET[fmt], out)


def _in_chunks(convert, rows: np.ndarray) -> np.ndarray | None:
    """``convert`` applied to ``_CHUNK_ROWS`` rows at a time (bounds the float64 temporaries);
    None if any chunk gives None, or for no rows."""
    parts = []
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        part = convert(rows[start:start + _CHUNK_ROWS])
        if part is None:
            return None
        parts.append(part)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
