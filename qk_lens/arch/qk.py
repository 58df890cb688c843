"""Per-layer frozen affine maps from the residual stream into a head's query and key spaces.

With every norm scale frozen at its captured value, the map part ↦ (that part's share of the
query or key) is linear, so the parts of any split of the residual map to parts of the query /
key that sum to the model's own. The steps, in the model's order (docs/contract.md §3):
attn_in norm (frozen σ) → W_Q / W_K (+ the bias, once per position) → qk-norm (frozen) →
rotary at the part's own position → log-n and 1/attn_scale (query side). Non-bilinear extras
(softcap, ALiBi, clip_qkv) are reported or refused, never hidden.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from qk_lens.arch.layer import LayerArch

if TYPE_CHECKING:
    from qk_lens.capture import Capture

Side = Literal["query", "key"]
SIDES = ("query", "key")
# A part's ``space`` says what its vector sums to: "resid" (the residual, before attn_in),
# "normalized" (ln1's output before its gain: a dictionary on ln1.hook_normalized, already
# centred and divided by σ), or "attn_input" (added after the norm: shortformer positions).


class LayerQK:
    """The frozen query/key maps of one attention layer, for one capture."""

    def __init__(self, arch: LayerArch, cap: Capture) -> None:
        self.arch = arch
        self.cap = cap
        self.layer = arch.layer
        self.dtype = arch.dtype
        self.n_heads = arch.n_heads
        self.n_kv = arch.n_kv
        self.d_head = arch.d_head
        self.softcap = arch.softcap
        self._ln_scale: Tensor | None = None
        # per (side, heads), kept for the capture's later calls
        self._weights: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._biases: dict[tuple, Tensor] = {}
        self._read: dict[tuple, Tensor] = {}

    # ----------------------------------------------------------------- masks and positions
    def key_allowed(
        self, q_pos: Int[Tensor, "nq"], k_pos: Int[Tensor, "nk"]
    ) -> Bool[Tensor, "nq nk"]:
        return self.arch.key_allowed(q_pos, k_pos)

    def describe_mask(self, q: int) -> str:
        return self.arch.describe_mask(q, self.cap.n_tokens)

    # ----------------------------------------------------------------- the linear maps
    def frozen_scale(self, positions: Int[Tensor, "n"], space: str) -> Float[Tensor, "n"] | None:
        """What attn_in divides a part at each position by (None: nothing), for ``space``."""
        if space != "resid" or self.arch.attn_in.is_identity:
            return None
        if self._ln_scale is None:
            scale = self.cap.layer_act(self.layer, self.arch.attn_in.scale_hook)
            # [pos] (split-qkv inputs add a head axis with equal scales)
            self._ln_scale = scale.reshape(scale.shape[0], -1)[:, 0].to(self.dtype)
        return self._ln_scale[positions]

    def project(
        self,
        side: Side,
        vectors: Float[Tensor, "n d_model"],
        positions: Int[Tensor, "n"],
        heads: Int[Tensor, "h"],
        space: str = "resid",
    ) -> Float[Tensor, "h n d_head"]:
        """Parts (each at its own position) → their parts of the head's q (÷ attn_scale) or k."""
        return self.finish(
            side, self.pre_rotary(side, vectors, positions, heads, space), positions, heads
        )

    def pre_rotary_rows(
        self,
        side: Side,
        rows: Float[Tensor, "n d_model"],
        heads: Int[Tensor, "h"],
        space: str,
    ) -> Float[Tensor, "h n d_head"]:
        """:meth:`pre_rotary` of position-free rows, before the per-position 1/σ: a part at
        position p that is c · row has pre-rotary value c / frozen_scale(p) times this."""
        if space not in ("resid", "normalized"):
            raise ValueError(f"rows in space {space!r} have no position-free projection")
        return self._through_w(side, rows, heads, space)

    def pre_rotary(
        self,
        side: Side,
        vectors: Float[Tensor, "n d_model"],
        positions: Int[Tensor, "n"],
        heads: Int[Tensor, "h"],
        space: str = "resid",
    ) -> Float[Tensor, "h n d_head"]:
        """The parts' share of ``hook_q`` / ``hook_k``: attn_in at its frozen scale, then W_Q /
        W_K (no bias; qk-norm, rotary and scaling come after, in :meth:`finish`)."""
        out = self._through_w(side, vectors, heads, space)
        scale = self.frozen_scale(positions, space)
        # σ is per position, so dividing after W is the same map on d_head columns, not d_model
        return out if scale is None else out / scale[None, :, None]

    def head_weights(self, side: Side, heads: Int[Tensor, "h"]) -> tuple[Tensor, Tensor]:
        """(W, b) of these heads on ``side`` (kept: calls on the same heads reuse them)."""
        key = (side, *heads.tolist())
        if key not in self._weights:
            self._weights[key] = self.arch.head_weights(side, heads)
        return self._weights[key]

    def read_weights(
        self, side: Side, heads: Int[Tensor, "h"], space: str
    ) -> Float[Tensor, "h d_model d_head"]:
        """The map a part in ``space`` goes through at unit scale: attn_in's centring and gain
        folded into W (``FrozenNorm.fold_read``), so a projection is one product per side."""
        key = (side, space, *heads.tolist())
        if key not in self._read:
            W, _ = self.head_weights(side, heads)
            norm = self.arch.attn_in
            W = W.to(self.dtype)
            if space != "attn_input":  # attn_input parts are added after the norm
                # ln1.hook_normalized parts are already centred and divided by σ: the gain is left
                W = norm.fold_read(W, centered_already=space == "normalized")
            self._read[key] = W
        return self._read[key]

    def _through_w(self, side: Side, x: Tensor, heads: Int[Tensor, "h"], space: str) -> Tensor:
        W = self.read_weights(side, heads, space)
        return einops.einsum(x.to(self.dtype), W, "n d_model, h d_model d_head -> h n d_head")

    def project_bias(
        self, side: Side, positions: Int[Tensor, "n"], heads: Int[Tensor, "h"]
    ) -> Float[Tensor, "h n d_head"]:
        """The attention-bias part at each position: norm bias · W + b_Q/b_K, then the same
        frozen steps."""
        key = (side, *heads.tolist())
        if key not in self._biases:
            W, b = self.head_weights(side, heads)
            norm_b = self.arch.attn_in.bias
            if norm_b is not None:
                b = b + einops.einsum(norm_b, W, "d_model, h d_model d_head -> h d_head")
            self._biases[key] = b
        pre = self._biases[key][:, None, :].expand(-1, len(positions), -1)
        return self.finish(side, pre.clone(), positions, heads)

    def qk_norm_scale(
        self, side: Side, positions: Int[Tensor, "n"], heads: Int[Tensor, "h"]
    ) -> Float[Tensor, "h n 1"]:
        qn = self.arch.qk_norm
        hook = qn.q_scale_hook if side == "query" else qn.k_scale_hook
        scale = self.cap.layer_act(self.layer, hook).to(self.dtype)
        T = self.cap.n_tokens
        if qn.kind == "full":
            per_pos = scale.reshape(T)  # one scale per position over all heads
            return per_pos[positions][None, :, None].expand(len(heads), -1, -1)
        n = self.n_heads if side == "query" else self.n_kv
        idx = heads if side == "query" else self.arch.kv_heads(heads)
        if qn.scale_layout == "head_pos":
            per = scale.reshape(n, T).T  # [head, pos, 1] at the hook
        else:
            per = scale.reshape(T, n)  # flattened [batch·pos·head, 1] at the hook
        return per[positions][:, idx].T[:, :, None]

    def qk_norm_weight(self, side: Side, heads: Int[Tensor, "h"]) -> Float[Tensor, "h d_head"]:
        qn = self.arch.qk_norm
        w = qn.q_weight if side == "query" else qn.k_weight
        if w is None:
            return torch.ones(len(heads), self.d_head, dtype=self.dtype)
        if qn.kind == "full":
            idx = heads if side == "query" else self.arch.kv_heads(heads)
            return w.reshape(-1, self.d_head)[idx]
        return w[None, :].expand(len(heads), -1)

    def finish(
        self,
        side: Side,
        pre: Float[Tensor, "h n d_head"],
        positions: Int[Tensor, "n"],
        heads: Int[Tensor, "h"],
    ) -> Float[Tensor, "h n d_head"]:
        """Pre-rotary parts → their share of the query (÷ attn_scale) or key: qk-norm at its
        frozen scale, rotary at each part's position, log-n and the score scale."""
        out = pre
        if self.arch.qk_norm is not None:
            out = (
                out
                / self.qk_norm_scale(side, positions, heads)
                * self.qk_norm_weight(side, heads)[:, None]
            )
        if self.arch.rotary is not None:
            out = self.arch.rotary.apply(out, positions, self.cap)
        if side == "query":
            if self.arch.logn_length is not None:
                factor = self.arch.logn_factor(positions, self.cap.n_tokens)
                out = out * factor[None, :, None]
            out = out / self.arch.attn_scale
        return out

    # ----------------------------------------------------------------- extras
    def alibi_terms(
        self, heads: Int[Tensor, "h"], q_pos: Int[Tensor, "nq"], k_pos: Int[Tensor, "nk"]
    ) -> Float[Tensor, "h nq nk"]:
        """The ALiBi bias the model added (zeros without ALiBi)."""
        if self.arch.alibi is None:
            return torch.zeros(len(heads), len(q_pos), len(k_pos), dtype=self.dtype)
        table = self.arch.alibi(self.cap.n_tokens).to(self.dtype)
        return table[heads][:, q_pos][:, :, k_pos]

    def check_clip(self, side: Side, positions: Int[Tensor, "n"], heads: Int[Tensor, "h"]) -> None:
        """clip_qkv is not linear: refuse when it clipped a query/key this explanation uses."""
        clip = self.arch.clip
        if clip is None:
            return
        hooks = self.arch.hooks
        raw = self.cap.layer_act(self.layer, hooks.q if side == "query" else hooks.k)
        idx = heads if side == "query" else self.arch.kv_heads(heads)
        vals = raw.to(self.dtype)[positions][:, idx]  # [pos, head, d_head]
        if self.arch.qk_norm is not None:
            scale = self.qk_norm_scale(side, positions, heads).permute(1, 0, 2)
            vals = vals / scale * self.qk_norm_weight(side, heads)[None]
        if (vals.abs() > clip).any():
            where = positions.tolist() if len(positions) <= 8 else f"{len(positions)} positions"
            raise ValueError(
                f"clip_qkv={clip} clipped the {side} of layer {self.layer} head(s) "
                f"{heads.tolist()} at position(s) {where}; clipping is not linear, so the score "
                "cannot be split exactly there"
            )

    def raw_scores(self, acts: dict[str, Tensor] | None = None) -> Float[Tensor, "... head q k"]:
        """The model's own pre-softcap score (q·k/scale + ALiBi), from hooks: the capture's
        (``acts=None``, ``[head, q, k]``, cached) or a batched run's (``[batch, head, q, k]``,
        keyed by full hook names). Masked entries stay as the model masked them."""
        if acts is None:
            key = ("raw_scores", self.layer)
            if key not in self.cap.derived:
                acts1 = {n: t[None] for n, t in self._layer_acts().items()}
                self.cap.derived[key] = self.raw_scores(acts1)[0]
            return self.cap.derived[key]
        hooks, L = self.arch.hooks, self.layer
        final = acts[f"blocks.{L}.{hooks.scores}"].to(self.dtype)
        # Masked entries as −inf whatever the model stored there (−inf, or finfo.min).
        T = final.shape[-1]
        masked = ~self.arch.key_allowed(torch.arange(T), torch.arange(T)).to(final.device)
        if self.softcap is None:
            return final.masked_fill(masked, float("-inf"))
        rot_q = f"blocks.{L}.{hooks.rot_q}" if hooks.rot_q else None
        if self.arch.rotary is not None and rot_q in acts:
            q = acts[rot_q].to(self.dtype)  # [batch, q, head, d]
            k = acts[f"blocks.{L}.{hooks.rot_k}"].to(self.dtype)
            if self.arch.logn_length is not None:
                T = q.shape[1]
                q = q * self.arch.logn_factor(torch.arange(T), T)[None, :, None, None]
            k = torch.repeat_interleave(k, q.shape[2] // k.shape[2], dim=2)
            raw = einops.einsum(q, k, "b q h d, b k h d -> b h q k") / self.arch.attn_scale
            return raw.masked_fill(masked, float("-inf"))
        cap = self.softcap
        raw = cap * torch.atanh((final / cap).clamp(-1 + 1e-15, 1 - 1e-15))
        return raw.masked_fill(masked, float("-inf"))

    def score_hooks(self) -> list[str]:
        """Full names of the hooks :meth:`raw_scores` reads from a run."""
        hooks, L = self.arch.hooks, self.layer
        names = [f"blocks.{L}.{hooks.scores}", f"blocks.{L}.{hooks.pattern}"]
        if self.softcap is not None and self.arch.rotary is not None and hooks.rot_q:
            names += [f"blocks.{L}.{hooks.rot_q}", f"blocks.{L}.{hooks.rot_k}"]
        return names

    def _layer_acts(self) -> dict[str, Tensor]:
        return {n: self.cap.get(n) for n in self.score_hooks() if self.cap.has(n)}
