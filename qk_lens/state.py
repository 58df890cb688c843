"""What qk_lens keeps on a model it explains: its dictionaries and its captures.

Engines (attribution, graphs, steering) reach a model's captures, frozen maps and dictionaries
through these functions, never through the methods the facade adds to the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from qk_lens.arch import BlockMaps, LayerQK, arch_of
from qk_lens.capture import Capture, CaptureCache, prompt_to_tokens
from qk_lens.checks import check_index

if TYPE_CHECKING:
    from qk_lens.dictionaries import Dictionary
    from qk_lens.transcoders import Transcoders

_STATE_ATTR = "_qk_lens_state"
# Set on the classes qk_lens.attach makes (and HookedQKTransformer): engines accept those models.
ATTACHED_MARKER = "qk_lens_attached"


@dataclass
class QKState:
    """Per-model state: dictionaries by the attention layer they serve, and the capture cache."""

    dictionaries: dict[int, Dictionary] = field(default_factory=dict)
    captures: CaptureCache = field(default_factory=CaptureCache)
    transcoders: Transcoders | None = None  # the replacement of every MLP (model.add_transcoders)
    # Inside capture_scope: the layers whose attention scores and patterns captures record.
    pattern_layers: frozenset[int] | None = None


def state_of(model: Any) -> QKState:
    """The model's qk_lens state (created on first use; checks the model is one qk_lens reads)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        arch_of(model)  # a clear TypeError for a model no adapter knows
        state = QKState()
        model.__dict__[_STATE_ATTR] = state
    return state


def require_attached(model: Any) -> None:
    """TypeError unless ``model`` has qk_lens attached (``qk_lens.attach(model)``)."""
    if not getattr(type(model), ATTACHED_MARKER, False):
        raise TypeError(
            f"model must be a HookedTransformer with qk_lens attached (qk_lens.attach(model)), "
            f"got {type(model).__name__}"
        )


def capture(model: Any, prompt: Any) -> Capture:
    """The (cached) capture of ``prompt``: one forward pass, reused by every call on it."""
    return capture_tokens(model, prompt_to_tokens(model, prompt))


def capture_tokens(model: Any, tokens: Int[Tensor, "pos"]) -> Capture:
    """:func:`capture` for tokens already validated by :func:`prompt_to_tokens`."""
    state = state_of(model)
    return state.captures.get(model, tokens, state.pattern_layers)


@contextmanager
def capture_scope(model: Any, layers: Iterable[int]) -> Iterator[None]:
    """Captures made inside record attention scores and patterns of ``layers`` only.

    Those [head, q, k] tensors are a capture's memory at long context (all 12 layers of a
    gpt2-small at 4096 tokens: 19 GB); a table of one layer needs that layer's. Calls inside
    that read another layer's pattern get a KeyError saying so.
    """
    n_layers = arch_of(model).n_layers
    scope = frozenset(check_index("layer", layer, n_layers, "layers") for layer in layers)
    state = state_of(model)
    before = state.pattern_layers
    state.pattern_layers = scope if before is None else scope & before
    try:
        yield
    finally:
        state.pattern_layers = before


def layer_qk(model: Any, cap: Capture, layer: int) -> LayerQK:
    """The frozen query/key maps of ``layer`` on ``cap`` (built once per capture)."""
    key = ("layer_qk", layer)
    if key not in cap.derived:
        cap.derived[key] = LayerQK(arch_of(model).layer(layer), cap)
    return cap.derived[key]


def block_maps(model: Any, cap: Capture, layer: int) -> BlockMaps:
    """Block ``layer`` with its patterns and norm scales frozen at ``cap`` (once per capture)."""
    key = ("block_maps", layer)
    if key not in cap.derived:
        arch = arch_of(model)
        cap.derived[key] = BlockMaps(arch.layer(layer), cap, arch.dtype, capture_device(cap))
    return cap.derived[key]


def capture_device(cap: Capture) -> torch.device:
    for t in cap.acts.values():
        return t.device
    return torch.device("cpu")
