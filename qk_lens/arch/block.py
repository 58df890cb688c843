"""One block with its attention patterns and every norm scale frozen: the linear maps an
attribution graph differentiates through (docs/graphs.md).

The value/output path (attn_in at the key's frozen σ, W_V, W_O, the attn_out norm) and the MLP
(run live at the captured point, its norms frozen) are read from the block's
:class:`~qk_lens.arch.layer.LayerArch`; the patterns and scales from the capture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch.layer import LayerArch

if TYPE_CHECKING:
    from qk_lens.capture import Capture


def _scale_at(cap: Capture, layer: int, hook: str, T: int) -> Tensor:
    return cap.layer_act(layer, hook).reshape(T, -1)[:, 0]  # split-qkv adds a head axis


class BlockMaps:
    """Block L with its attention patterns and every norm scale frozen (from the capture)."""

    def __init__(
        self, arch: LayerArch, cap: Capture, dtype: torch.dtype, device: torch.device
    ) -> None:
        layer = arch.layer
        T = cap.n_tokens
        self.arch = arch
        self.layer = layer
        self.dtype = dtype
        self.n_heads = arch.n_heads
        self.causal = arch.causal  # a causal query never reads later keys
        self.pattern: Float[Tensor, "head q k"] = cap.pattern(layer).to(device, dtype)
        self.attn_pre = arch.attn_in.to(dtype, device)
        if self.attn_pre.is_identity:
            self.key_scale = torch.ones(T, dtype=dtype, device=device)
        else:
            self.key_scale = _scale_at(cap, layer, self.attn_pre.scale_hook, T).to(device, dtype)
        self.attn_post = None if arch.attn_out is None else arch.attn_out.to(dtype, device)
        if self.attn_post is not None:
            post = _scale_at(cap, layer, self.attn_post.scale_hook, T)
            self.post_scale = post.to(device, dtype)
        self.W_V: Float[Tensor, "head d_model d_head"] = arch.per_query_head(arch.W_V).to(
            device, dtype
        )
        self.W_O: Float[Tensor, "head d_head d_model"] = arch.W_O.to(device, dtype)
        self.b_V: Float[Tensor, "head d_head"] = arch.per_query_head(arch.b_V).to(device, dtype)
        self.b_O: Float[Tensor, "d_model"] = arch.b_O.to(device, dtype)
        self._bias_out: Tensor | None = None
        self._gram: Tensor | None = None
        # lin_kᵀ(W_V r) = centre(w ⊙ W_V r) / σ_k: fold the gain and the centring into W_V once.
        self.W_V_in: Float[Tensor, "head d_model d_head"] = self.attn_pre.transpose(
            self.W_V.transpose(1, 2)
        ).transpose(1, 2)
        self.mlp_mode = arch.mlp_mode
        if self.mlp_mode is not None:
            self.mlp = arch.mlp
            resid = cap.layer_act(layer, arch.hooks.resid_pre)
            # The MLP's input exactly as the forward formed it (same op, same dtype).
            mid = (
                resid
                if self.mlp_mode == "parallel"
                else resid + cap.layer_act(layer, arch.hooks.attn_out)
            )
            self.mlp_pre = arch.mlp_in
            self.mlp_post = arch.mlp_out
            mdt = next((p.dtype for p in self.mlp.parameters()), mid.dtype)
            self.mlp_in = mid.detach().to(device, mdt)

    # ------------------------------------------------------------------ MLP
    def _mlp_frozen(self, rows: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        h = self.mlp_pre.forward(rows, self.mlp_pre.scale(rows.detach()))
        out = self.mlp(h[None])[0]
        if self.mlp_post is not None:
            out = self.mlp_post.forward(out, self.mlp_post.scale(out.detach()))
        return out

    def mlp_vjp(
        self, w: Float[Tensor, "n d_model"], positions: Int[Tensor, "n"]
    ) -> Float[Tensor, "n d_model"]:
        """J_tᵀ w_t for every target: the frozen-norm MLP runs forward once per position, then
        one batched backward takes every target's cotangent at its own position.

        Targets are packed into ``[rank, pos, d_model]`` cotangents (rank = the target's index
        among those at its position), so the forward is shared by all targets at a position and
        the backward costs about one row per target (targets sorted by position pack best).
        """
        if self.mlp_mode is None or len(positions) == 0:
            return torch.zeros_like(w)
        # Only the positions these targets sit at; local = each target's row among them.
        uniq, local = torch.unique(positions, return_inverse=True)
        counts = torch.bincount(local, minlength=len(uniq))
        order = torch.argsort(local, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(local)
        rank[order] = torch.arange(len(local), device=local.device) - starts[local[order]]
        rows = self.mlp_in[uniq].clone().requires_grad_(True)
        cot = rows.new_zeros(int(counts.max()), len(uniq), rows.shape[1])
        cot[rank, local] = w.to(rows.dtype)
        with torch.enable_grad():
            out = self._mlp_frozen(rows)
            try:
                (g,) = torch.autograd.grad(out, rows, grad_outputs=cot, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one backward per rank
                g = torch.stack(
                    [torch.autograd.grad(out, rows, c, retain_graph=True)[0] for c in cot]
                )
        return g[rank, local].detach().to(self.dtype)

    def cotangents(
        self, w: Float[Tensor, "n d_model"], positions: Int[Tensor, "n"]
    ) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n d_model"]]:
        """(u_mlp, u_head): J_tᵀw_t, and the cotangent at the attention output (w_t + J_tᵀw_t
        when the MLP reads the attention output, w_t in parallel blocks)."""
        u_mlp = self.mlp_vjp(w, positions)
        return u_mlp, (w + u_mlp if self.mlp_mode == "sequential" else w)

    # ------------------------------------------------------------------ attention
    def head_r(
        self, u: Float[Tensor, "n d_model"], positions: Int[Tensor, "n"]
    ) -> Float[Tensor, "n head d_head"]:
        """W_O[h] postᵀ u per head: the cotangent in each head's value space."""
        o = u
        if self.attn_post is not None:
            o = self.attn_post.transpose(u, self.post_scale[positions])
        return einops.einsum(o, self.W_O, "n d_model, head d_head d_model -> n head d_head")

    def head_z(
        self, u: Float[Tensor, "n d_model"], positions: Int[Tensor, "n"]
    ) -> Float[Tensor, "n head d_model"]:
        """lin_ᵀ(W_V[h] W_O[h] postᵀ u) per head, before the source position's 1/σ."""
        r = self.head_r(u, positions)
        return einops.einsum(r, self.W_V_in, "n head d_head, head d_model d_head -> n head d_model")

    def source_y(self, v: Float[Tensor, "m d_model"]) -> Float[Tensor, "m head d_head"]:
        """Sources in each head's value space (before 1/σ): z_h · v = r_h · y_h."""
        return einops.einsum(v, self.W_V_in, "m d_model, head d_model d_head -> m head d_head")

    @property
    def gram(self) -> Float[Tensor, "head d_head d_head"]:
        """W_V_inᵀ W_V_in per head: ‖z_h‖² = r_hᵀ gram_h r_h without forming z."""
        if self._gram is None:
            self._gram = einops.einsum(
                self.W_V_in, self.W_V_in, "head d_model e, head d_model f -> head e f"
            )
        return self._gram

    def alpha(self, positions: Int[Tensor, "n"]) -> Float[Tensor, "n head k"]:
        """A_h[p_t, k] / σ_attn_in[k]: the frozen pattern row of each target, per key position."""
        rows = self.pattern[:, positions, :].permute(1, 0, 2)
        return rows / self.key_scale[None, None, :]

    def bias_out(self, positions: Int[Tensor, "n"]) -> Float[Tensor, "n d_model"]:
        """The attention biases' share of attn_out at each position (norm bias, b_V, b_O, post
        norm bias)."""
        if self._bias_out is None:
            vb = self.b_V
            if self.attn_pre.bias is not None:
                vb = vb + einops.einsum(
                    self.attn_pre.bias, self.W_V, "d_model, head d_model d_head -> head d_head"
                )
            per_head = einops.einsum(
                vb, self.W_O, "head d_head, head d_head d_model -> head d_model"
            )
            row_sum = self.pattern.sum(-1)  # [head, q]: 1 up to rounding
            out = einops.einsum(row_sum, per_head, "head q, head d_model -> q d_model") + self.b_O
            if self.attn_post is not None:
                out = self.attn_post.forward(out, self.post_scale)
            self._bias_out = out
        return self._bias_out[positions]
