"""Without a GPU, still check that the real Triton compiler (not only the interpreter)
accepts every kernel for an H100 (sm_90): the interpreter is more permissive."""
import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_sm90():
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(here, "_compile_for_gpu.py"), "90"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["status"] != "ok":
        pytest.skip(f"compile harness unavailable with this triton: {result['error']}")
    names = {k["name"] for k in result["kernels"]}
    assert {"_decode_stage1_kernel", "_decode_stage2_kernel", "_extend_kernel", "_rope_kernel",
            "_rms_norm_kernel", "_fused_add_rms_norm_kernel", "_silu_and_mul_kernel",
            "_store_kv_kernel"} <= names
    count = {n: sum(k["name"] == n and not k["pdl"] for k in result["kernels"]) for n in names}
    assert count["_extend_kernel"] == 8  # 2 shapes x (plain, HAS_TREE) x (bf16, fp8 KV cache)
    assert count["_decode_stage1_kernel"] == 8  # 2 shapes x (direct, split) x (bf16, fp8 KV cache)
    assert count["_store_kv_kernel"] == 4  # 2 shapes x (bf16, fp8 KV cache)
    # the decode path as launched on sm_90+: programmatic dependent launch (kernels/pdl.py)
    assert {k["name"] for k in result["kernels"] if k["pdl"]} == {
        "_rope_kv_store_kernel", "_decode_stage1_kernel", "_decode_stage2_kernel", "_fused_add_rms_norm_kernel",
        "_rms_norm_kernel", "_silu_and_mul_kernel", "_gemv_kernel", "_splitk_reduce_kernel", "_rope_kernel",
        "_store_kv_kernel"}
    # ... and each waits for the previous kernel before its first global memory access
    assert all(k["wait_first"] for k in result["kernels"] if k["pdl"]), [k for k in result["kernels"] if k["pdl"]]
    assert not any(k["wait_first"] is not None for k in result["kernels"] if not k["pdl"])
    for k in result["kernels"]:
        assert k["shared"] <= 227 * 1024, k  # fits an H100 SM
