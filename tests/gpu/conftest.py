"""GPU tests share one process with the kernel tests when run together (``pytest tests/kernels
tests/gpu``, ``benchmarks/gpu_suite.py``): the kernel tests' freed tensors stay in torch's caching
allocator, and an engine built afterwards sizes its KV cache from the memory the device reports
free (seen on an H200: 0 blocks). Hand the cache back before every test here."""
import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _release_cached_gpu_memory():
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
    yield
