"""Shared pieces of the benchmarks: result files, devices, workloads, HF baselines."""
from __future__ import annotations

import datetime
import json
import os
import random
import statistics
import sys
import time

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform
    model = ""
    try:  # Linux: the CPU's marketing name, as results from different CPUs don't compare
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores, {model or platform.processor() or platform.machine()})"


def cpu_device_description() -> str:
    """``device_name()`` plus the CPU's family / model, its SIMD flags and the C kernels' ISA
    paths it runs (the CPU benchmarks' device field: results from different CPUs don't compare)."""
    from miniinfer.kernels import cpu_kernels
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    simd = [x for x in info.get("flags", "").split() if x.startswith(("avx", "fma", "f16c", "amx"))]
    return (f"{device_name()}, family {info.get('cpu family')} model {info.get('model')}, "
            f"{' '.join(simd)}; MiniInfer ISA paths: {', '.join(cpu_kernels.supported_isas())}")


def write_result(path: str | None, metrics: dict, name: str = "") -> dict:
    result = {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "command": "miniinfer bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "metrics": metrics,
    }
    print(json.dumps(result, indent=2))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(llm, prompts, params) -> tuple[list, float, int]:
    """``llm.generate(prompts, params)`` between two device syncs: (outputs, wall seconds,
    output tokens of the first completion of each)."""
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - t
    return outs, wall, sum(len(o.outputs[0].token_ids) for o in outs)


def device_ms(fn, iters: int = 20) -> float:
    """Mean device milliseconds of ``fn`` over ``iters`` back-to-back calls (CUDA events;
    one untimed call first). Host-bound callables measure their launch rate instead."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def random_workload(num: int, in_range: tuple[int, int], out_range: tuple[int, int], seed: int = 0,
                    vocab: int = 10000) -> tuple[list[list[int]], list[int]]:
    """Shared workload: random prompt ids in [0, vocab), uniform lengths and output lengths."""
    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(num):
        n = rng.randint(*in_range)
        prompts.append([rng.randrange(vocab) for _ in range(n)])
        outs.append(rng.randint(*out_range))
    return prompts, outs


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_model_from_config(hf_config: dict, dtype: torch.dtype, device: str):
    """A transformers model of the same shape (random weights) for speed baselines."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(hf_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
