"""Kernel tests: run on the GPU when there is one, else under Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``triton`` itself is first imported (triton.language's
own helpers such as ``tl.sum`` are decorated at import time), so it is set here before
importing ``triton``; tests import kernel modules inside test functions. If triton
was already imported in compiled mode by an earlier test module of the same session, the
CPU run cannot switch to the interpreter and the Triton tests are skipped (set
``TRITON_INTERPRET=1`` in a top-level ``tests/conftest.py`` to avoid that). The C CPU kernel
tests (``test_cpu_kernels.py``) need no triton: they never skip for it.
"""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

HAS_TRITON = importlib.util.find_spec("triton") is not None
if not HAS_CUDA and HAS_TRITON:
    os.environ["TRITON_INTERPRET"] = "1"
CPU_ONLY_MODULES = {"test_cpu_kernels", "test_cpu_tree_mask"}  # C kernels, no triton



def _patch_interpreter_scalar_index() -> None:
    """NumPy >= 2.4 refuses ``int()`` of a 1-element 1-d array, which is how Triton 3.6's
    interpreter holds scalars, so ``range(start, end, STEP)`` over runtime scalars fails
    ("only 0-dimensional arrays can be converted"). Convert through ``.item()`` instead."""
    from triton.runtime import interpreter as interp

    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_miniinfer_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))

    patched._miniinfer_patched = True
    interp._patch_lang_tensor = patched


_STALE_TRITON = False
if not HAS_CUDA and HAS_TRITON:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    _STALE_TRITON = not isinstance(triton.language.sum, InterpretedFunction)
    _patch_interpreter_scalar_index()


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    if request.module.__name__.rpartition(".")[2] not in CPU_ONLY_MODULES:
        if not HAS_TRITON:
            pytest.skip("needs triton (a GPU, or its CPU interpreter)")
        if _STALE_TRITON:
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; the Triton kernel "
                        "tests on CPU need it set before the first triton import")
    torch.manual_seed(0)
