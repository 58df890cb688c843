"""The one forward pass per prompt, and the frozen quantities every explanation reads from it.

A :class:`Capture` is keyed by the prompt's tokens and by the version counters of the model's
parameters, so a later call on the same prompt reuses it and an in-place weight edit
(``fold_ln``, ``load_state_dict``, a manual ``W_Q.data[...] = ...``) invalidates it.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch import arch_of


def prompt_to_tokens(model: Any, prompt: Any) -> Int[Tensor, "pos"]:
    """Turn a string, a list of token ids or a tensor into one 1-D token tensor, validated."""
    if isinstance(prompt, str):
        if prompt == "":
            raise ValueError("prompt is an empty string; give at least one token of text")
        if model.tokenizer is None:
            raise ValueError(
                "prompt is a string but the model has no tokenizer; pass token ids "
                "(a list of ints or a LongTensor) instead"
            )
        tokens = model.to_tokens(prompt)[0]
    elif isinstance(prompt, Tensor):
        if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise TypeError(f"prompt tensor must hold integer token ids, got dtype {prompt.dtype}")
        tokens = prompt
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(
                    f"prompt tensor has batch size {tokens.shape[0]}; qk_lens explains one prompt "
                    "at a time: pass tokens of shape [pos] or [1, pos]"
                )
            tokens = tokens[0]
        elif tokens.ndim != 1:
            raise ValueError(
                f"prompt tensor must have shape [pos] or [1, pos], got {tuple(prompt.shape)}"
            )
    elif isinstance(prompt, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise TypeError("prompt list must contain token ids (ints)")
        tokens = torch.tensor(list(prompt), dtype=torch.long)
    else:
        raise TypeError(
            f"prompt must be a str, a list of token ids or a LongTensor, got {type(prompt).__name__}"
        )
    tokens = tokens.detach().to("cpu", torch.long)
    if tokens.numel() == 0:
        raise ValueError("prompt has no tokens; give at least one token")
    arch = arch_of(model)
    d_vocab = arch.d_vocab
    if tokens.min() < 0 or tokens.max() >= d_vocab:
        raise ValueError(
            f"token ids must lie in [0, {d_vocab}) for this model; got range "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    if tokens.numel() > arch.n_ctx:
        raise ValueError(f"prompt has {tokens.numel()} tokens; this model's n_ctx is {arch.n_ctx}")
    return tokens


@dataclass
class Capture:
    """Everything frozen for one prompt: tokens and the cached hook activations (batch dim dropped,
    except for the flattened ``[pos·head, 1]`` qk-norm scales)."""

    tokens: Int[Tensor, "pos"]
    acts: dict[str, Tensor]
    str_tokens: list[str] | None
    # Derived per-layer data (dictionary decompositions, frozen maps, raw scores), filled lazily.
    derived: dict[Any, Any] = field(default_factory=dict)
    # Maps the recorded input of the unembedding to the model's logits (same modules, same ops).
    unembed: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    logits_input: str | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())

    def get(self, name: str) -> Tensor:
        try:
            return self.acts[name]
        except KeyError:
            if name.endswith(SQUARE_HOOKS):
                raise KeyError(
                    f"hook {name!r} was not recorded: this capture was made inside "
                    "qk_lens.capture_scope(model, layers=...) for other layers"
                ) from None
            raise KeyError(f"hook {name!r} was not recorded by the capture") from None

    def has(self, name: str) -> bool:
        return name in self.acts

    def layer_act(self, layer: int, name: str) -> Tensor:
        return self.get(f"blocks.{layer}.{name}")

    def pattern(self, layer: int) -> Float[Tensor, "head q k"]:
        return self.layer_act(layer, "attn.hook_pattern")

    def scores(self, layer: int) -> Float[Tensor, "head q k"]:
        return self.layer_act(layer, "attn.hook_attn_scores")

    def batched(self, name: str) -> Tensor:
        """The recorded tensor with its batch axis of 1 put back, as a forward's hook sees it."""
        t = self.get(name)
        return t if name.endswith("norm.hook_scale") else t[None]

    def logits(self) -> Float[Tensor, "pos vocab"]:
        """The forward's logits (output softcap included), from the recorded unembedding input:
        the same modules on the same tensor, so the same numbers, without a second forward."""
        if "logits" not in self.derived:
            if self.unembed is None or self.logits_input is None:
                raise ValueError("this capture was made without the unembedding's input")
            with torch.no_grad():
                self.derived["logits"] = self.unembed(self.get(self.logits_input)[None])[0]
        return self.derived["logits"]


def recorder(
    model: Any, names: Iterable[str]
) -> tuple[dict[str, Tensor], list[tuple[Callable[[str], bool], Callable]]]:
    """(acts, fwd_hooks): hooks that record each named activation into ``acts`` under the name
    asked for (a bridge's hook point answers to an alias and a canonical name)."""
    arch = arch_of(model)
    points = arch.points()
    wanted = set(names)
    names_of: dict[int, list[str]] = {}
    for name in wanted:
        names_of.setdefault(id(points[name]), []).append(name)
    # the names a forward registers hooks by (an alias may not be one of them)
    run_names = wanted | {arch.run_name(name, points) for name in wanted}
    acts: dict[str, Tensor] = {}

    def save(tensor: Tensor, hook: Any) -> None:
        for name in names_of.get(id(hook), [hook.name]):
            acts[name] = tensor.detach()

    return acts, [(lambda name: name in run_names, save)]


# The hooks that hold a [head, q, k] tensor per layer: T² each, so at long context they are
# most of a capture's memory (gpt2-small at 4096 tokens: 9.7 GB per kind over 12 layers).
SQUARE_HOOKS = ("attn.hook_attn_scores", "attn.hook_pattern")


def scoped_hooks(names: set[str], pattern_layers: frozenset[int] | None) -> set[str]:
    """``names`` without the T² hooks of layers outside ``pattern_layers`` (None: all layers)."""
    if pattern_layers is None:
        return names
    keep = {f"blocks.{layer}.{h}" for layer in pattern_layers for h in SQUARE_HOOKS}
    return {n for n in names if not n.endswith(SQUARE_HOOKS) or n in keep}


def run_capture(
    model: Any, tokens: Int[Tensor, "pos"], pattern_layers: frozenset[int] | None = None
) -> Capture:
    """One forward pass with hooks recording what every explanation on this prompt needs
    (the attention scores and patterns only of ``pattern_layers``, when given)."""
    arch = arch_of(model)
    acts, record = recorder(model, scoped_hooks(arch.capture_hooks(), pattern_layers))
    with torch.no_grad(), arch.exact_forward():
        model.run_with_hooks(tokens[None].to(arch.device), fwd_hooks=record, return_type=None)
    # Drop the batch axis; q_norm/k_norm scales are flattened [batch*pos*head, 1].
    squeezed = {}
    for name, t in acts.items():
        squeezed[name] = t if name.endswith("norm.hook_scale") else t[0]
    str_tokens = None
    if model.tokenizer is not None:
        str_tokens = [model.tokenizer.decode([t]) for t in tokens.tolist()]
    return Capture(
        tokens, squeezed, str_tokens, unembed=arch.logits, logits_input=arch.logits_input
    )


class CaptureCache:
    """A small LRU of captures, keyed by tokens and the parameters' in-place version counters.

    Walking ``model.parameters()`` costs milliseconds on TransformerLens models (hundreds of
    HookPoint modules), so the parameter list is kept and re-read only when the model's
    structure changes (e.g. ``fold_ln`` swapping LayerNorm for LayerNormPre). Assigning a new
    ``nn.Parameter`` by hand is not seen: call ``model.clear_qk_cache()`` after doing that.
    """

    def __init__(self, max_size: int = 4) -> None:
        self.max_size = max_size
        self._items: OrderedDict[Any, Capture] = OrderedDict()
        self._structure: tuple = ()
        self._params: list[Tensor] = []

    @staticmethod
    def _structure_of(model: Any) -> tuple:
        blocks = getattr(model, "blocks", [])
        return (id(model), *map(id, chain.from_iterable(b._modules.values() for b in blocks)))

    def _key(self, model: Any, tokens: Tensor) -> tuple:
        structure = self._structure_of(model)
        if structure != self._structure:
            self._structure = structure
            self._params = list(model.parameters())
            self._items.clear()
        versions = tuple(map(operator.attrgetter("_version"), self._params))
        arch = arch_of(model)
        # the first parameter's device is the model's (what ModelArch.device reads, without
        # walking the module tree on every call)
        device = self._params[0].device if self._params else arch.device
        return (tuple(tokens.tolist()), versions, arch.model_dtype, str(device))

    def get(
        self, model: Any, tokens: Tensor, pattern_layers: frozenset[int] | None = None
    ) -> Capture:
        key = (*self._key(model, tokens), pattern_layers)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        cap = run_capture(model, tokens, pattern_layers)
        self._items[key] = cap
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)
        return cap

    def clear(self) -> None:
        self._items.clear()
        self._structure = ()
