"""The model registry: the one list of the architectures MiniInfer runs.

Each family lives in its own small module under ``miniinfer/models/`` (``llama.py``,
``qwen2.py``, ``qwen3.py``): a subclass of the shared :class:`DecoderForCausalLM` whose
``family`` attribute (a :class:`ModelFamily`) declares what the rest of the code needs to
know about it (its HF architecture names and ``model_type``, the flags
:class:`~miniinfer.config.ModelConfig` sets from them, how its GGUF files look), and whose
``packed_modules_mapping`` lists the fused projections and the HF tensors they are built
from. ``_MODELS`` below names those modules; they are imported on first use.

Adding a family (e.g. Mistral) is one new module plus one line in ``_MODELS``.
``ModelConfig.from_hf_dict``, the GGUF loader and ``build_model`` all resolve through here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from miniinfer.models.decoder import DecoderForCausalLM

# module under miniinfer/models/ -> its model class. The order is the order of error messages.
_MODELS: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp's ``convert_hf_to_gguf.py`` writes a family.

    ``architecture``: the file's ``general.architecture`` (also the prefix of its metadata
    keys, e.g. ``llama.block_count``). ``permuted_qk``: q/k rows were permuted per head so
    that llama.cpp's interleaved RoPE matches HF's half-split one; the loader permutes them
    back. ``head_dim_from_rope``: without ``<arch>.attention.key_length``, the head size is
    ``<arch>.rope.dimension_count``.
    """

    architecture: str
    permuted_qk: bool = False
    head_dim_from_rope: bool = False


@dataclass(frozen=True)
class ModelFamily:
    """What the engine needs to know about one model family, besides its modules.

    ``architectures``: the HF ``config.json`` ``architectures[0]`` names it accepts (the first
    is the canonical one, e.g. what a GGUF file's config reports). ``model_type``: the HF
    ``model_type`` (used when ``architectures`` is absent). ``attention_bias``: whether q/k/v
    have a bias when ``config.json`` does not say. ``qk_norm``: per-head RMSNorm on q and k.
    ``gguf``: how its GGUF files look (None: no GGUF support).
    """

    architectures: tuple[str, ...]
    model_type: str
    attention_bias: bool = False
    qk_norm: bool = False
    gguf: GGUFSpec | None = None

    @property
    def architecture(self) -> str:
        """The canonical HF architecture name (``architectures[0]``)."""
        return self.architectures[0]


@cache
def _registered() -> tuple[type["DecoderForCausalLM"], ...]:
    """Import every family module once; check that no two families claim the same name."""
    classes = []
    for module, class_name in _MODELS.items():
        cls = getattr(importlib.import_module(f"miniinfer.models.{module}"), class_name)
        if not isinstance(getattr(cls, "family", None), ModelFamily):
            raise TypeError(f"{cls.__qualname__} (miniinfer.models.{module}) declares no ModelFamily")
        classes.append(cls)
    for what, key in (("architecture", lambda f: f.architectures), ("model_type", lambda f: (f.model_type,)),
                      ("GGUF architecture", lambda f: (f.gguf.architecture,) if f.gguf else ())):
        names = [n for cls in classes for n in key(cls.family)]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise RuntimeError(f"model registry: {what} {sorted(dup)} claimed by more than one family")
    return tuple(classes)


def model_families() -> tuple[ModelFamily, ...]:
    """Every registered family, in registry order."""
    return tuple(cls.family for cls in _registered())


def supported_architectures() -> tuple[str, ...]:
    """Every HF architecture name the engine accepts, e.g. ``("LlamaForCausalLM", ...)``."""
    return tuple(a for f in model_families() for a in f.architectures)


def get_model_class(architecture: str) -> type["DecoderForCausalLM"]:
    """The model class for an HF architecture name.

    Raises ``ValueError`` (naming the supported architectures) for an unknown one.
    """
    for cls in _registered():
        if architecture in cls.family.architectures:
            return cls
    raise ValueError(f"architecture {architecture!r} is not supported; "
                     f"supported architectures: {', '.join(supported_architectures())}")


def resolve_model_family(hf_config: dict[str, Any]) -> tuple[str, ModelFamily]:
    """``(architecture, family)`` for an HF ``config.json`` dict: by ``architectures[0]``, else
    by ``model_type``.

    Raises ``ValueError`` naming the supported architectures when neither is registered.
    """
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type", "")
    for family in model_families():
        if (archs[0] in family.architectures) if archs else (model_type == family.model_type):
            return (archs[0] if archs else family.architecture), family
    name = archs[0] if archs else ""
    raise ValueError(f"architecture {name or hf_config.get('model_type')!r} is not supported; "
                     f"supported architectures: {', '.join(supported_architectures())}")


def gguf_family(gguf_architecture: Any, path: str = "") -> ModelFamily:
    """The family whose GGUF files have ``general.architecture == gguf_architecture``.

    Raises ``ValueError`` (prefixed with ``path``, naming the supported GGUF architectures
    and their HF names) for an unknown one.
    """
    families = [f for f in model_families() if f.gguf is not None]
    for family in families:
        if family.gguf.architecture == gguf_architecture:
            return family
    raise ValueError(
        f"{path}: GGUF architecture {gguf_architecture!r} is not supported; supported architectures: "
        f"{', '.join(f.gguf.architecture for f in families)} "
        f"({', '.join(f.architecture for f in families)})")
