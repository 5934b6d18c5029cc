"""Compile ``kernels/allreduce_norm.py`` for sm_90 without a GPU (``_compile_for_gpu``'s fake
driver; run where TRITON_INTERPRET is unset) and print one JSON line describing its PTX: the
system-scope release / acquire CAS of the barrier, and whether the row loads and stores are
128-bit. Used by ``test_allreduce_norm.py``."""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(__file__)
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..")]


def main() -> None:
    import _compile_for_gpu
    _compile_for_gpu._setup()
    import torch
    from triton.runtime.jit import JITFunction

    from miniinfer.kernels import allreduce_norm as arn
    kernels = []
    warm = JITFunction.run  # the fake driver's compile-only run

    def keep(self, *args, grid, warmup, **kwargs):
        kernel = warm(self, *args, grid=grid, warmup=warmup, **kwargs)
        kernels.append(kernel)
        return kernel
    JITFunction.run = keep
    x = torch.empty(4, 3584, dtype=torch.bfloat16)
    ptrs = torch.zeros(2, dtype=torch.int64)
    arn.allreduce_add_rms_norm_(x, torch.empty_like(x), torch.empty(3584, dtype=torch.bfloat16), 1e-6, ptrs, ptrs, 0)
    ptx = kernels[0].asm["ptx"]
    lines = [ln.strip() for ln in ptx.splitlines()]
    release = [i for i, ln in enumerate(lines) if "atom.global.release.sys.cas" in ln]
    acquire = [i for i, ln in enumerate(lines) if "atom.global.acquire.sys.cas" in ln]
    stores = [i for i, ln in enumerate(lines) if "st.global" in ln]
    print(json.dumps({"release": len(release), "acquire": len(acquire),
                      "scalar_16bit_memops": sum("global.b16" in ln for ln in lines),
                      "store_before_release": bool(stores) and stores[0] < min(release, default=0),
                      "release_before_acquire": bool(release and acquire) and max(release) < min(acquire)}))


if __name__ == "__main__":
    main()
