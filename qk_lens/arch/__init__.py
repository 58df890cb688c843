"""Architecture adapters: the only code that knows how a model family is wired.

:func:`arch_of` gives the :class:`ModelArch` of a model (built once per model and dtype, its
layers rebuilt only when their weights change). Everything downstream (capture, bases,
attribution, graphs, steering, atlas) reads the model through it. To support a new model
class, write an adapter that fills in :class:`ModelArch` / :class:`LayerArch` and register it
in :data:`ADAPTERS`; see docs/architectures.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qk_lens.arch.block import BlockMaps
from qk_lens.arch.bridge import bridge_arch, is_bridge
from qk_lens.arch.hooked import hooked_arch, is_hooked
from qk_lens.arch.layer import (
    LayerArch,
    LayerHooks,
    ModelArch,
    QKNorm,
    Rotary,
    compute_dtype,
)
from qk_lens.arch.norms import FrozenNorm, linearize_norm
from qk_lens.arch.qk import SIDES, LayerQK, Side

__all__ = [
    "ADAPTERS",
    "SIDES",
    "BlockMaps",
    "FrozenNorm",
    "LayerArch",
    "LayerHooks",
    "LayerQK",
    "ModelArch",
    "QKNorm",
    "Rotary",
    "Side",
    "arch_of",
    "compute_dtype",
    "forget",
    "linearize_norm",
    "supported",
]

# (name, recognizer, builder): the first adapter that recognizes a model describes it.
ADAPTERS: list[tuple[str, Callable[[Any], bool], Callable[[Any], ModelArch]]] = [
    ("transformer_lens.HookedTransformer", is_hooked, hooked_arch),
    ("transformer_lens.model_bridge.TransformerBridge", is_bridge, bridge_arch),
]
_CACHE_ATTR = "_qk_lens_arch"


def forget(model: Any) -> None:
    """Drop the cached description (after editing the model's config by hand)."""
    model.__dict__.pop(_CACHE_ATTR, None)


def supported(model: Any) -> bool:
    return any(recognizes(model) for _, recognizes, _ in ADAPTERS)


def arch_of(model: Any) -> ModelArch:
    """The model's :class:`ModelArch`, cached on the model (rebuilt if its dtype changes)."""
    hit = model.__dict__.get(_CACHE_ATTR)
    cfg = getattr(model, "cfg", None)
    if hit is not None and hit[0] == (id(cfg), getattr(cfg, "dtype", None)):
        return hit[1]  # only a recognized model is ever given a cached arch
    builders = [build for _, recognizes, build in ADAPTERS if recognizes(model)]
    if not builders:
        names = ", ".join(name for name, _, _ in ADAPTERS)
        raise TypeError(
            f"qk_lens has no architecture adapter for {type(model).__name__}; supported model "
            f"classes: {names}"
        )
    key = (id(model.cfg), model.cfg.dtype)
    hit = model.__dict__.get(_CACHE_ATTR)
    if hit is None or hit[0] != key:
        hit = (key, builders[0](model))
        model.__dict__[_CACHE_ATTR] = hit
    return hit[1]
