"""Compile the Triton kernels for a CUDA target on a machine without a GPU.

Run as a script (``python _compile_for_gpu.py [arch]``) in a process where
TRITON_INTERPRET is unset. A fake driver reports the target; every kernel launch made by
the public wrappers (on CPU tensors) is turned into a compile-only warmup. Prints one JSON
line: {"status": "ok", "kernels": [...]} or {"status": "setup-failed", "error": ...}.
Compile errors propagate (non-zero exit).
"""
from __future__ import annotations

import json
import os
import sys

ARCH = int(sys.argv[1]) if len(sys.argv) > 1 else 90


def _setup():
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class _FakeDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_FakeDriver())
    compiled = []
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        if hasattr(kernel, "result"):
            kernel = kernel.result()
        md = kernel.metadata
        compiled.append(dict(name=self.fn.__name__, num_warps=md.num_warps,
                             num_stages=md.num_stages, shared=md.shared,
                             pdl=bool(getattr(md, "launch_pdl", False)),
                             wait_first=_wait_first(kernel.asm.get("ptx", ""))))
        return kernel

    JITFunction.run = run
    return compiled


def _wait_first(ptx: str) -> bool | None:
    """For a PDL kernel's PTX: whether ``griddepcontrol.wait`` comes before its first global
    memory access (None: no wait in it)."""
    import re
    lines = ptx.splitlines()
    wait = next((i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln), None)
    if wait is None:
        return None
    mem = re.compile(r"\b(ld|st|atom|red|cp\.async|prefetch)\.global|\bcp\.async")
    first = next((i for i, ln in enumerate(lines) if mem.search(ln)), len(lines))
    return wait < first


def _compile_all():
    import torch

    from miniinfer.kernels import decode_attention as da
    from miniinfer.kernels import extend_attention as ea
    from miniinfer.kernels.activation import silu_and_mul
    from miniinfer.kernels.kv_store import store_kv_cache
    from miniinfer.kernels.norm import fused_add_rms_norm_, rms_norm
    from miniinfer.kernels.rope import apply_rope_

    # CPU tensors stand in for CUDA ones: use the GPU code paths / an H100's SM count.
    da.dot_upcast = ea.dot_upcast = lambda *a: False
    da.num_sms = lambda device: 132
    dt = torch.bfloat16
    for H, Hkv, D in [(32, 8, 128), (9, 3, 64)]:
        T = 4
        qkv = torch.zeros(T, (H + 2 * Hkv) * D, dtype=dt)
        q = qkv[:, : H * D].view(T, H, D)
        k = qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D)
        v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
        apply_rope_(torch.zeros(T, dtype=torch.int64), q, k, torch.zeros(16, D), D)
        rms_norm(q, torch.ones(D, dtype=dt), 1e-6, out=q)
        kc = torch.zeros(8, 16, Hkv, D, dtype=dt)
        vc = torch.zeros_like(kc)
        store_kv_cache(k, v, kc, vc, torch.zeros(T, dtype=torch.int64))
        bt = torch.zeros(T, 4, dtype=torch.int32)
        sl = torch.ones(T, dtype=torch.int32)
        da.paged_decode_attention(q, kc, vc, bt, sl, 0.1, max_seq_len=64, num_splits=1)
        da.paged_decode_attention(q, kc, vc, bt, sl, 0.1, max_seq_len=4096)
        qsl = torch.zeros(3, dtype=torch.int32)
        ea.paged_extend_attention(q, kc, vc, bt, qsl, sl[:2], 512, 0.1)
        ea.paged_extend_attention(q, kc, vc, bt, qsl, sl[:2], 512, 0.1,
                                  tree_mask=torch.full((T,), -1, dtype=torch.int64))  # HAS_TREE
        # FP8 (e4m3) KV cache: the store's quantizing variant and the attention FP8 variants
        kc8 = torch.zeros(8, 16, Hkv, D, dtype=torch.float8_e4m3fn)
        vc8 = torch.zeros_like(kc8)
        store_kv_cache(k, v, kc8, vc8, torch.zeros(T, dtype=torch.int64), k_scale=0.5, v_scale=2.0)
        fp8 = dict(k_scale=0.5, v_scale=2.0)
        da.paged_decode_attention(q, kc8, vc8, bt, sl, 0.1, max_seq_len=64, num_splits=1, **fp8)
        da.paged_decode_attention(q, kc8, vc8, bt, sl, 0.1, max_seq_len=4096, **fp8)
        ea.paged_extend_attention(q, kc8, vc8, bt, qsl, sl[:2], 512, 0.1, **fp8)
        ea.paged_extend_attention(q, kc8, vc8, bt, qsl, sl[:2], 512, 0.1,
                                  tree_mask=torch.full((T,), -1, dtype=torch.int64), **fp8)
    x = torch.zeros(4, 2048, dtype=dt)
    rms_norm(x, torch.ones(2048, dtype=dt), 1e-6)
    fused_add_rms_norm_(x, x.clone(), torch.ones(2048, dtype=dt), 1e-6)
    silu_and_mul(x)


def _compile_pdl():
    """The decode path's kernels as launched on sm_90+ GPUs: programmatic dependent launch
    (kernels/pdl.py); the GEMV with and without split-K."""
    import torch

    from miniinfer.kernels import activation, decode_attention, gemv, kv_store, norm, rope, rope_kv_store

    on = lambda device: {"USE_PDL": True, "launch_pdl": True}  # noqa: E731
    for mod in (activation, decode_attention, gemv, kv_store, norm, rope, rope_kv_store):
        mod.pdl_launch = on
    decode_attention.dot_upcast = gemv.dot_upcast = lambda *a: False
    decode_attention.num_sms = gemv.num_sms = lambda device: 132
    dt = torch.bfloat16
    H, Hkv, D = 28, 4, 128
    qkv = torch.zeros(1, (H + 2 * Hkv) * D, dtype=dt)
    q = qkv[:, : H * D].view(1, H, D)
    k = qkv[:, H * D:(H + Hkv) * D].view(1, Hkv, D)
    v = qkv[:, (H + Hkv) * D:].view(1, Hkv, D)
    kc = torch.zeros(8, 16, Hkv, D, dtype=dt)
    rope_kv_store.rope_store_kv_cache_(torch.zeros(1, dtype=torch.int64), q, k, v, torch.zeros(16, D), D,
                                       kc, torch.zeros_like(kc), torch.zeros(1, dtype=torch.int64))
    rope.apply_rope_(torch.zeros(1, dtype=torch.int64), q, k, torch.zeros(16, D), D)  # Qwen3 q/k-norm path
    kv_store.store_kv_cache(k, v, kc, torch.zeros_like(kc), torch.zeros(1, dtype=torch.int64))
    bt = torch.zeros(1, 4, dtype=torch.int32)
    sl = torch.ones(1, dtype=torch.int32)
    decode_attention.paged_decode_attention(q, kc, torch.zeros_like(kc), bt, sl, 0.1, max_seq_len=4096)
    x = torch.zeros(1, 3584, dtype=dt)
    norm.fused_add_rms_norm_(x, x.clone(), torch.ones(3584, dtype=dt), 1e-6)
    norm.rms_norm(x, torch.ones(3584, dtype=dt), 1e-6)
    activation.silu_and_mul(x)
    gemv.gemv(x, torch.zeros(4608, 3584, dtype=dt), torch.zeros(4608, dtype=dt))
    gemv.gemv(x, torch.zeros(3584, 3584, dtype=dt), config=gemv.GemvConfig(block_n=4, block_k=512, split_k=4))


def main():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET"
    try:
        compiled = _setup()
    except Exception as e:  # triton internals moved: the caller skips
        print(json.dumps(dict(status="setup-failed", error=repr(e))))
        return
    _compile_all()
    _compile_pdl()
    print(json.dumps(dict(status="ok", kernels=compiled)))


if __name__ == "__main__":
    main()
