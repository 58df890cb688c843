"""The replacement model's linear maps, swept backward: how a target's readout reaches every
source of a transcoder graph (docs/transcoders.md §6).

With attention patterns and every norm scale frozen and each MLP replaced by its transcoder
(features and errors are sources, constant; only a skip connection carries a signal through the
MLP), the residual stream is linear in the sources. :class:`Sweep` holds the frozen maps of one
prompt and runs the adjoint from the targets' readouts down to the embeddings, giving
``edge(s → t) = Σ_k ⟨g_t at x_{k+1}[p_s], write_{s,k}⟩`` for every source at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch import arch_of
from qk_lens.capture import Capture
from qk_lens.graph.checkpoints import pad_by_position
from qk_lens.state import block_maps
from qk_lens.transcoders import Transcoders, TranscoderSplit


@dataclass
class Sources:
    """Every source node's writes, grouped by the residual they enter: ``by_layer[k]`` =
    (node indices, positions, vectors) of the writes into ``x_{k+1}`` (``k = −1``: into
    ``x_0``, the embeddings). A CLT feature appears once per layer it writes to."""

    by_layer: dict[int, tuple[Int[Tensor, "m"], Int[Tensor, "m"], Float[Tensor, "m d_model"]]]
    n_nodes: int

    def __post_init__(self) -> None:
        self._padded: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def padded(self, k: int, n_pos: int) -> tuple[Int[Tensor, "m"], Tensor, Int[Tensor, "m"]]:
        """Layer k's writes grouped by position, padded once over all ``n_pos`` positions:
        (node indices, ``[n_pos, slot, d_model]``, each write's index in the flattened
        (pos, slot) axis); a sweep over the first K positions uses ``[:K]``."""
        if k not in self._padded:
            idx, pos, vec = self.by_layer[k]
            V_pad, flat = pad_by_position(vec, pos, n_pos)
            self._padded[k] = (idx, V_pad, flat)
        return self._padded[k]


class Sweep:
    """The frozen replacement model of one prompt: attention adjoints per layer, skip adjoints,
    and target readouts."""

    def __init__(self, model: Any, cap: Capture, transcoders: Transcoders) -> None:
        self.model = model
        self.cap = cap
        self.arch = arch_of(model)
        self.tc = transcoders
        self.split: TranscoderSplit = transcoders.split(model, cap)
        self.n_layers = self.arch.n_layers
        self.T = cap.n_tokens
        self.dtype = self.arch.dtype
        self.parallel = [self.arch.layer(k).mlp_mode == "parallel" for k in range(self.n_layers)]
        self._alpha: dict[int, Tensor] = {}

    def block(self, layer: int) -> Any:
        return block_maps(self.model, self.cap, layer)

    def alpha(self, layer: int) -> Float[Tensor, "q head k"]:
        """A_h[q, k] / σ_attn_in[k] of every query row."""
        if layer not in self._alpha:
            self._alpha[layer] = self.block(layer).alpha(torch.arange(self.T))
        return self._alpha[layer]

    # ------------------------------------------------------------------ adjoints
    def attn_adjoint(self, layer: int, g: Float[Tensor, "n pos d_model"]) -> Tensor:
        """Σ_h (head h's frozen map)ᵀ g: a covector at the attention output → at its input."""
        bm = self.block(layer)
        n, T, d = g.shape
        pos = torch.arange(T).repeat(n)
        r = bm.head_r(g.reshape(n * T, d), pos).reshape(n, T, bm.n_heads, -1)
        # contract the query positions in each head's value space first (d_head < d_model)
        alpha = self.alpha(layer)[:T, :, :T]  # the sweep's positions (causal: the first T)
        y = einops.einsum(alpha, r, "q head k, n q head e -> n k head e")
        return einops.einsum(y, bm.W_V_in, "n k head e, head d_model e -> n k d_model")

    def skip_adjoint(self, layer: int, g: Float[Tensor, "n pos d_model"]) -> Tensor:
        if not self.tc.has_skip:
            return torch.zeros_like(g)
        return self.split.skip_adjoint(layer, g, torch.arange(g.shape[1]))

    # ------------------------------------------------------------------ readouts
    def feature_readouts(
        self, layers: Int[Tensor, "n"], positions: Int[Tensor, "n"], features: Int[Tensor, "n"]
    ) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n"]]:
        """Each feature's pre-activation as ``w · mid_L[p] + c`` (``mid``: what its MLP reads
        before its norm), the norm frozen at its captured scale."""
        n, d = len(layers), self.arch.d_model
        w = torch.empty(n, d, dtype=self.dtype)
        c = torch.empty(n, dtype=self.dtype)
        W_enc = self.tc.weights("W_enc", self.dtype, "cpu")
        b_enc = self.tc.weights("b_enc", self.dtype, "cpu")
        for lyr in layers.unique().tolist():
            m = layers == lyr
            cols = W_enc[lyr][:, features[m]].T  # [n_l, d]
            w[m] = self.split.in_adjoint(lyr, cols, positions[m])
            const = b_enc[lyr][features[m]]
            norm = self.split.in_norm[lyr]
            if self.tc.input_point == "mlp_input" and norm.bias is not None:
                const = const + cols @ norm.bias
            c[m] = const
        return w, c

    def mid(self, layer: int) -> Float[Tensor, "pos d_model"]:
        """What layer ``layer``'s MLP reads before its norm (``resid_mid``, or the block's input
        in parallel blocks)."""
        la = self.arch.layer(layer)
        x = self.cap.layer_act(layer, la.hooks.resid_pre).to(self.dtype)
        if self.parallel[layer]:
            return x
        return x + self.cap.layer_act(layer, la.hooks.attn_out).to(self.dtype)

    def resid(self, layer: int) -> Float[Tensor, "pos d_model"]:
        """x_K, the residual entering block K (x_n: the last block's output)."""
        if layer < self.n_layers:
            return self.cap.layer_act(layer, self.arch.layer(layer).hooks.resid_pre).to(self.dtype)
        last = self.arch.layer(self.n_layers - 1).hooks
        x = self.cap.layer_act(self.n_layers - 1, last.resid_pre)
        x = x + self.cap.layer_act(self.n_layers - 1, last.attn_out)
        return (x + self.cap.layer_act(self.n_layers - 1, last.mlp_out)).to(self.dtype)

    # ------------------------------------------------------------------ the sweep
    def backward(
        self,
        start_layer: Int[Tensor, "n"],
        positions: Int[Tensor, "n"],
        readouts: Float[Tensor, "n d_model"],
        sources: Sources,
        *,
        hops: bool = False,
    ) -> dict[str, Tensor]:
        """Edges from every source into each target (row), in one sweep.

        A target with ``start_layer`` L < n reads ``mid_L`` (its MLP's input before the norm);
        ``L = n`` reads the final residual (logits). Returns ``edges [n, n_sources]``; with
        ``hops``: also ``hop0`` / ``hop1`` / ``hop2`` (the edge split by the number of head hops
        on its paths: none, exactly one, two or more), ``z [n, layer, head, d_model]`` (each
        head's map of the 0-hop covector at the target's position) and ``g0 [n, layer + 1,
        d_model]`` (the 0-hop covector at the target's position entering each layer).
        """
        n, d = len(start_layer), self.arch.d_model
        rows = torch.arange(n)
        causal = all(self.block(k).causal for k in range(self.n_layers))
        # causal: nothing reaches positions after the last target's
        K = (int(positions.max()) + 1 if n else 0) if causal else self.T
        # streams: by hop count (0, 1, ≥2) when asked, else one total
        streams = [torch.zeros(n, K, d, dtype=self.dtype) for _ in range(3 if hops else 1)]
        edges = [torch.zeros(n, sources.n_nodes, dtype=self.dtype) for _ in streams]
        out: dict[str, Tensor] = {}
        if hops:
            z_all = torch.zeros(n, self.n_layers, self.block(0).n_heads, d, dtype=self.dtype)
            g0_all = torch.zeros(n, self.n_layers + 1, d, dtype=self.dtype)

        def inject(at: int, into: Tensor) -> None:
            m = start_layer == at
            if m.any():
                into[rows[m], positions[m]] += readouts[m]

        def collect(k: int) -> None:  # sources written at layer k read the covector at x_{k+1}
            if k not in sources.by_layer:
                return
            idx, V_pad, flat = sources.padded(k, self.T)
            S = V_pad.shape[1]
            keep = flat < K * S  # the writes at the sweep's positions
            V_pad, idx, flat = V_pad[:K], idx[keep], flat[keep]
            for s, e in zip(streams, edges, strict=True):
                # per position: [n, d] · [slot, d]ᵀ, then back to one column per source
                vals = torch.bmm(s.transpose(0, 1), V_pad.transpose(1, 2))  # [K, n, slot]
                vals = vals.transpose(0, 1).reshape(n, -1)[:, flat]
                e.index_add_(1, idx, vals)

        inject(self.n_layers, streams[0])
        if hops:
            inject(self.n_layers, streams[1])
        top = int(start_layer.max()) if n else 0  # nothing to carry above the highest target
        for k in range(min(top, self.n_layers - 1), -1, -1):
            if hops:
                g0_all[:, k + 1] = streams[1][rows, positions]
            collect(k)
            base = [st + self.skip_adjoint(k, st) for st in streams]
            if self.parallel[k]:
                attn_src = streams  # attention and MLP both read x_k
            else:
                for st in base[:2]:
                    inject(k, st)  # the target reads mid_k, after the attention
                attn_src = base
            total = base[0] + self.attn_adjoint(k, attn_src[0])
            if hops:
                # the 0-hop covector sits at the target's position only: its one-hop image is
                # A_h[p_t, ·]/σ · z_h per head, cheap; paths with more hops are the rest
                z = self.block(k).head_z(attn_src[1][rows, positions], positions)
                z_all[:, k] = z
                alpha = self.alpha(k)[positions][:, :, :K]  # [n, head, K]
                one = einops.einsum(alpha, z, "n head k, n head d_model -> n k d_model")
                streams = [total, base[1], base[2] + one]
            else:
                streams = [total]
            if self.parallel[k]:
                for st in streams[:2]:
                    inject(k, st)  # the target reads x_k
        if hops:
            g0_all[:, 0] = streams[1][rows, positions]
        collect(-1)
        out["edges"] = edges[0]
        if hops:
            out.update(hop0=edges[1], hop1=edges[2], hop2=edges[0] - edges[1] - edges[2],
                       z=z_all, g0=g0_all)  # fmt: skip
        return out
