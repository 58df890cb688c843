"""What a model is, as qk_lens reads it: one :class:`ModelArch` per model, one :class:`LayerArch`
per layer, built once by the model's adapter and reused by every explanation.

These are plain descriptions (weights in the explanation dtype, the norms as
:class:`~qk_lens.arch.norms.FrozenNorm`, and the attention variant's switches); the math that
uses them (:class:`~qk_lens.arch.qk.LayerQK`, :class:`~qk_lens.arch.block.BlockMaps`) knows
no model family. An adapter (``qk_lens.arch.hooked`` for TransformerLens's HookedTransformer)
is the only code that reads a model's config to fill them in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch.norms import FrozenNorm

if TYPE_CHECKING:
    from qk_lens.capture import Capture

MLPMode = Literal["sequential", "parallel"]
QKNormKind = Literal["per_head", "full"]
PositionalKind = Literal["standard", "rotary", "alibi", "shortformer", "none"]


# Per-layer hooks every explanation may read (names a model lacks are skipped).
LAYER_CAPTURE_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln1_post.hook_scale",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.q_norm.hook_scale",
    "attn.k_norm.hook_scale",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_mlp_out",
)
MODEL_CAPTURE_HOOKS = ("hook_embed", "hook_pos_embed")


def capture_hook_names(
    points: Mapping[str, Any],
    n_layers: int,
    extra_layer_hooks: tuple[str, ...] = (),
    extra_model_hooks: tuple[str, ...] = (),
) -> set[str]:
    """Full names of the hooks a capture records: those of :data:`LAYER_CAPTURE_HOOKS` /
    :data:`MODEL_CAPTURE_HOOKS` (and an adapter's extras) among the model's hook ``points``."""
    names = {*MODEL_CAPTURE_HOOKS, *extra_model_hooks}
    for layer in range(n_layers):
        names.update(f"blocks.{layer}.{h}" for h in (*LAYER_CAPTURE_HOOKS, *extra_layer_hooks))
    return names & set(points)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Explanations run in float64 for float64 models and float32 otherwise (bf16/fp16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LayerHooks:
    """Hook names of one layer, relative to ``blocks.L.``; ``None`` where the model has none."""

    resid_pre: str = "hook_resid_pre"
    q: str = "attn.hook_q"
    k: str = "attn.hook_k"
    rot_q: str | None = "attn.hook_rot_q"
    rot_k: str | None = "attn.hook_rot_k"
    scores: str = "attn.hook_attn_scores"
    pattern: str = "attn.hook_pattern"
    z: str = "attn.hook_z"
    attn_out: str = "hook_attn_out"
    mlp_out: str | None = "hook_mlp_out"


@dataclass(eq=False)
class Rotary:
    """Rotary embedding of one layer: the first ``rotary_dim`` dimensions of each query/key rotate
    by the angle of the vector's own position. ``tables(cap)`` returns the (cos, sin) the model
    used in the captured forward, ``[position, rotary_dim]`` (its own buffers, read after the
    forward, or the values its hooks recorded); ``rotate_half`` is the model's pairing (NeoX
    halves or GPT-J adjacent pairs)."""

    tables: Callable[[Capture], tuple[Tensor, Tensor]]
    rotate_half: Callable[[Tensor], Tensor]

    def apply(
        self, x: Float[Tensor, "h n d_head"], positions: Int[Tensor, "n"], cap: Capture
    ) -> Float[Tensor, "h n d_head"]:
        cos_table, sin_table = self.tables(cap)
        cos = cos_table.to(x.dtype)[positions][None]
        sin = sin_table.to(x.dtype)[positions][None]
        dim = cos.shape[-1]
        x_rot, x_pass = x[..., :dim], x[..., dim:]
        rotated = x_rot * cos + self.rotate_half(x_rot) * sin
        return torch.cat([rotated, x_pass], dim=-1)


@dataclass(eq=False)
class QKNorm:
    """qk-norm: a norm on each query and key (``per_head``: over d_head, Gemma-3 / Qwen-3;
    ``full``: over all heads at once, OLMo-2). Frozen, it divides by the captured scale and
    multiplies by the gain. ``scale_layout`` says how the hooks record the scales:
    ``"pos_head"`` flattened ``[pos·head, 1]`` (TransformerLens), ``"head_pos"`` as
    ``[head, pos, 1]`` (TransformerBridge; the capture drops the batch axis)."""

    kind: QKNormKind
    q_weight: Float[Tensor, "..."] | None
    k_weight: Float[Tensor, "..."] | None
    q_scale_hook: str = "attn.q_norm.hook_scale"
    k_scale_hook: str = "attn.k_norm.hook_scale"
    scale_layout: Literal["pos_head", "head_pos"] = "pos_head"


@dataclass(eq=False)
class LayerArch:
    """One transformer block, frozen-map ready. Weights are detached, in :attr:`dtype`.

    Attention reads ``attn_in(resid)``; its output passes ``attn_out`` (when set) before the
    residual add. The MLP (``mlp_mode``) reads ``mlp_in`` of the residual after attention
    (``sequential``) or of the block's input (``parallel``); ``mlp_out`` as for attention.
    Query head h reads key/value head ``h // group``.
    """

    layer: int
    dtype: torch.dtype
    n_heads: int
    n_kv: int
    d_head: int
    attn_in: FrozenNorm
    attn_out: FrozenNorm | None
    W_Q: Float[Tensor, "head d_model d_head"]
    b_Q: Float[Tensor, "head d_head"]
    W_K: Float[Tensor, "kv_head d_model d_head"]
    b_K: Float[Tensor, "kv_head d_head"]
    W_V: Float[Tensor, "kv_head d_model d_head"]
    b_V: Float[Tensor, "kv_head d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_O: Float[Tensor, "d_model"]
    attn_scale: float
    causal: bool = True
    window: int | None = None
    qk_norm: QKNorm | None = None
    rotary: Rotary | None = None
    softcap: float | None = None
    alibi: Callable[[int], Float[Tensor, "head pos pos"]] | None = None
    clip: float | None = None
    logn_length: int | None = None  # Qwen-1 log-n query scaling past this training length
    shortformer: bool = False  # positional embeddings added to attention's input only
    mlp: torch.nn.Module | None = None
    mlp_mode: MLPMode | None = None
    mlp_in: FrozenNorm | None = None
    mlp_out: FrozenNorm | None = None
    hooks: LayerHooks = LayerHooks()

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without GQA/MQA)."""
        return self.n_heads // self.n_kv

    def kv_heads(self, heads: Int[Tensor, "h"]) -> Int[Tensor, "h"]:
        """The key/value head each query head reads."""
        return heads // self.group

    def per_query_head(self, t: Float[Tensor, "kv_head ..."]) -> Float[Tensor, "head ..."]:
        """A per-kv-head tensor repeated for each query head of its group."""
        return t if self.group == 1 else torch.repeat_interleave(t, self.group, dim=0)

    def head_weights(
        self, side: str, heads: Int[Tensor, "h"]
    ) -> tuple[Float[Tensor, "h d_model d_head"], Float[Tensor, "h d_head"]]:
        """W_Q/b_Q of the query heads, or W_K/b_K of the key heads they read."""
        if side == "query":
            return self.W_Q[heads], self.b_Q[heads]
        kv = self.kv_heads(heads)
        return self.W_K[kv], self.b_K[kv]

    def logn_factor(self, positions: Int[Tensor, "n"], n_tokens: int) -> Float[Tensor, "n"]:
        """Qwen-1's query scaling: log(p+1)/log(train length) past the training length."""
        if self.logn_length is None or n_tokens <= self.logn_length:
            return torch.ones(len(positions), dtype=self.dtype)
        p = (positions + 1).to(self.dtype)
        return torch.where(p > self.logn_length, p.log() / math.log(self.logn_length), 1.0)

    def key_allowed(self, q_pos: Int[Tensor, "nq"], k_pos: Int[Tensor, "nk"]) -> torch.BoolTensor:
        """Which (query, key) pairs the model's mask lets through."""
        ok = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
        if self.causal:
            ok &= k_pos[None, :] <= q_pos[:, None]
            if self.window is not None:
                ok &= k_pos[None, :] > q_pos[:, None] - self.window
        return ok

    def describe_mask(self, q: int, n_tokens: int) -> str:
        if not self.causal:
            return f"any key in [0, {n_tokens})"
        lo = 0 if self.window is None else max(0, q - self.window + 1)
        extra = "" if self.window is None else f" (local attention, window {self.window})"
        return f"keys in [{lo}, {q}]{extra}"


@dataclass(eq=False)
class ModelArch:
    """A model as qk_lens reads it: sizes, embeddings, final norm, unembedding, and its layers.

    ``layer(L)`` is built once and rebuilt only when the block's parameters change in place or
    its modules are replaced (``fold_ln``).
    """

    model: Any
    name: str
    dtype: torch.dtype  # the explanation dtype
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    positional: PositionalKind
    attn_only: bool
    post_norm: bool  # OLMo-2/3: ln1/ln2 normalize the sublayer outputs, not their inputs
    moe: bool
    final_norm: FrozenNorm
    embed_norm: FrozenNorm | None
    logits_softcap: float | None
    build_layer: Callable[[int], LayerArch]
    layer_key: Callable[[int], tuple]
    # Gives each query head its own copy of its group's key/value for a forward (GQA), so that
    # one query head's key can be edited alone; None where the model has no such switch.
    ungrouped: Callable[[], AbstractContextManager[None]] | None
    capture_hooks: Callable[[], set[str]]
    # The forward qk_lens runs (capture, steering): the model's own, with whatever the adapter
    # needs for exact hooks (e.g. a bridge's norms in the model's dtype).
    exact_forward: Callable[[], AbstractContextManager[None]]
    # [batch, pos, d_model] at ``logits_input`` → the model's logits (output softcap included)
    logits: Callable[[Tensor], Tensor]
    logits_input: str
    model_dtype: torch.dtype
    centred_residual: bool = False  # every reader of the residual centres it (LayerNorm)
    embed_hooks: tuple[str, ...] = ("hook_embed", "hook_pos_embed")
    # Every hook point by every name it answers to (a bridge's aliases included, which SAELens's
    # SAETransformerBridge leaves out of its hook_dict); None: the model's hook_dict.
    hook_points: Callable[[], dict[str, Any]] | None = None
    # The token embedding as the forward applies it (a scale inside the embedding module
    # included); None: the model's W_E.
    embed_weight: Callable[[], Tensor] | None = None

    def __post_init__(self) -> None:
        self._layers: dict[int, tuple[tuple, LayerArch]] = {}

    def layer(self, layer: int) -> LayerArch:
        key = self.layer_key(layer)
        hit = self._layers.get(layer)
        if hit is None or hit[0] != key:
            hit = (key, self.build_layer(layer))
            self._layers[layer] = hit
        return hit[1]

    def layers(self) -> Iterator[LayerArch]:
        for layer in range(self.n_layers):
            yield self.layer(layer)

    def points(self) -> dict[str, Any]:
        """Name (alias or canonical) → hook point."""
        return self.model.hook_dict if self.hook_points is None else self.hook_points()

    def run_name(self, name: str, points: dict[str, Any] | None = None) -> str:
        """The name a forward's hook registration knows ``name``'s hook point by (``points``:
        :meth:`points`, when the caller has it; a bridge builds it anew on every call)."""
        point = (self.points() if points is None else points)[name]
        return getattr(point, "name", None) or name

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def has_pos_embed_part(self) -> bool:
        """Learned positions added to the residual stream (a part of the upstream basis)."""
        return self.positional == "standard"

    @property
    def W_E(self) -> Float[Tensor, "vocab d_model"]:
        return self.model.W_E.detach() if self.embed_weight is None else self.embed_weight()

    @property
    def W_U(self) -> Float[Tensor, "d_model vocab"]:
        return self.model.W_U.detach()

    @property
    def b_U(self) -> Float[Tensor, "vocab"]:
        return self.model.b_U.detach()

    def capped_logits(self, logits: Tensor) -> Tensor:
        """The model's output softcap (Gemma-2) applied to raw logits; identity without one."""
        if self.logits_softcap is None:
            return logits
        return self.logits_softcap * torch.tanh(logits / self.logits_softcap)
