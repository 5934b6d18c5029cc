"""A minimal reader of llama.cpp GGUF files (v2/v3, little-endian).

It parses the header, the metadata (into plain Python values) and the tensor table, and
keeps the tensor bytes memory-mapped. It is ours rather than ``gguf.GGUFReader``, which
builds numpy views for every part of every metadata field: on the embedded SmolLM2-135M
(a 49k-token vocabulary) opening a file takes ~1.9 s with it against ~50 ms here, and the
engine opens the file twice (config, then weights).

Dequantization is ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"

# ggml tensor types we dequantize (all go through gguf.quants.dequantize).
SUPPORTED_GGML_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# GGUF metadata value types -> struct format (scalars) / numpy dtype (arrays)
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_DTYPE = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
             6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


def ggml_type_name(ggml_type: int) -> str:
    """``"Q4_1"`` for a ggml type id; ``"<unknown ggml type N>"`` for one gguf-py lacks."""
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"<unknown ggml type {ggml_type}>"


@dataclass
class GGUFTensorInfo:
    """One entry of the tensor table."""

    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (ne[0]) first
    ggml_type: int
    offset: int  # relative to the start of the data section

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape in HF/torch order (outermost first): ``[out, in]`` for a matrix."""
        return tuple(reversed(self.dims))


def check_ggml_type(t: GGUFTensorInfo) -> None:
    """Raise ``ValueError`` (naming the tensor, its type and the supported types) unless
    ``t``'s type is one we dequantize."""
    if t.type_name not in SUPPORTED_GGML_TYPES:
        raise ValueError(
            f"tensor {t.name!r} has GGML type {t.type_name}, which is not supported; "
            f"supported types: {', '.join(SUPPORTED_GGML_TYPES)}")


class GGUFFile:
    """Header, metadata (``fields``: key -> Python value) and tensor table (``tensors``) of a
    GGUF file; tensor bytes stay memory-mapped. A context manager (``close`` unmaps).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not
    GGUF, is big-endian, has an unsupported version, or has a truncated or corrupt header.
    """

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
        self.tensors: list[GGUFTensorInfo] = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("I")
            dims = tuple(int(d) for d in struct.unpack_from(f"<{n_dims}Q", self._mm, self._pos))
            self._pos += 8 * n_dims
            ggml_type, offset = self._unpack("I"), self._unpack("Q")
            self.tensors.append(GGUFTensorInfo(name, dims, ggml_type, offset))
        align = int(self.fields.get("general.alignment", 32)) or 32
        self.data_start = (self._pos + align - 1) // align * align

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # a numpy view is still alive; the GC unmaps it later
            pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tensor bytes -----------------------------------------------------------------
    def tensor(self, name: str) -> GGUFTensorInfo | None:
        """The tensor table entry called ``name``, or None."""
        return next((t for t in self.tensors if t.name == name), None)

    def raw(self, t: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 of shape ``(*hf_shape[:-1], bytes_per_row)``, a view of
        the mapping. Raises ``ValueError`` if a row is not whole blocks or the data runs past
        the end of the file."""
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

    def dequantize(self, t: GGUFTensorInfo) -> np.ndarray:
        """The tensor as float32 of ``hf_shape``. Raises ``ValueError`` for a type outside
        ``SUPPORTED_GGML_TYPES``."""
        from gguf.quants import dequantize
        from gguf import GGMLQuantizationType
        check_ggml_type(t)
        return dequantize(self.raw(t), GGMLQuantizationType(t.ggml_type)).reshape(t.hf_shape)
