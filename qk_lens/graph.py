"""Checkpointed attribution graphs: every edge crosses exactly one attention layer (DESIGN.md §4).

Dictionaries sit on the residual stream entering every layer ("checkpointing", Kamath, Ameisen et
al. 2025). With ``x_K = blocks.K.hook_resid_pre`` (``x_n`` = the last ``hook_resid_post``),
block ``K−1`` maps ``x_{K−1} → x_K``. Nodes:

* ``feature``: an active feature of the layer-K dictionary at a position (its vector is
  ``coefficient · W_dec[feature]``);
* ``error`` and ``bias``: the dictionary error and the dictionary bias at each (layer, position) —
  with the features they sum exactly to ``x_K[p]``;
* ``embedding``: ``x_0[p]`` (token plus positional embedding, after any embedding norm). It feeds
  the layer-0 features, or is itself the layer-0 basis when layer 0 has no dictionary;
* ``logit``: a target readout of ``x_n`` at one position (a token's logit or a logit difference).

Every target (feature of layer K, or logit) has a *readout* ``r_t(x_K) = w_t · x_K[p_t] + c_t``:
the SAE's own pre-activation (``readout="encoder"``, default: encoder column, with gated /
rescaled / runtime-normalized SAEs folded at the frozen point) or the paper's ``a_t · d_t``
(``readout="decoder"``); for logits, ``ln_final`` frozen at ``p_t`` and the mean-centred unembedding
column (``logit − mean logit``, before any output softcap). An edge is the gradient of the target's
readout through block ``K−1`` — attention patterns and every norm scale frozen at the captured
values, the MLP linearized at the actual point — times the source vector::

    edge(s→t) = [p_s = p_t] · (w_t + J_tᵀw_t) · v_s  +  Σ_h A_h[p_t, p_s] · lin_{p_s}ᵀ(W_V[h] W_O[h] postᵀ u_t) · v_s

with ``J_t`` the frozen-norm MLP Jacobian at ``resid_mid[p_t]`` and ``u_t = w_t + J_tᵀw_t`` (NeoX /
GPT-J parallel blocks: the MLP reads ``x_{K−1}``, so ``u_t = w_t``). For attention-only models
this is exact: ``readout_t = Σ_s edge(s→t) + offset_t`` where ``offset_t`` (a nodes column) holds
the target's readout constant plus the attention biases read through the same frozen map. With
MLPs, ``readout − Σ edges − offset`` is the MLP's linearization remainder.

Edges for all (target, source) pairs of adjacent layers come from batched matmuls chunked over
targets (one batched MLP backward per chunk); pruning follows circuit-tracer (normalized |A|,
influence on the logits weighted by their probabilities, ``node_threshold`` / ``edge_threshold``
cumulative-influence cuts), on per-layer blocks rather than one dense n_nodes² matrix.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities.activation_functions import softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from qk_lens.attention import compute_dtype, linearize_norm, norm_kind
from qk_lens.bases import DictionaryBasis
from qk_lens.capture import Capture, prompt_to_tokens

__all__ = ["NODE_KINDS", "READOUTS", "Graph", "attribution_graph"]

NODE_KINDS = ("feature", "error", "bias", "embedding", "logit")
READOUTS = ("encoder", "decoder")
FORMAT = "qk_lens.graph"
FORMAT_VERSION = 1
_META_KEY = "qk_lens_graph"
_NODE_FLOAT_COLUMNS = (
    "activation",
    "coefficient",
    "readout",
    "offset",
    "prob",
    "weight",
    "influence",
    "cumulative_influence",
)
_NODE_INT_COLUMNS = ("layer", "position", "feature", "feature_b")
_NODE_STR_COLUMNS = ("node_id", "kind", "token", "label")
NODE_COLUMNS = list(_NODE_STR_COLUMNS[:2]) + [
    "layer",
    "position",
    "feature",
    "feature_b",
    "token",
    "label",
    *_NODE_FLOAT_COLUMNS,
]


# ============================================================================ node ids
# The same ids as circuit-tracer / Neuronpedia graph JSON, so that exports need no remapping.
def feature_id(layer: int, feature: int, pos: int) -> str:
    return f"{layer}_{feature}_{pos}"


def error_id(layer: int, pos: int) -> str:
    return f"{layer}_-1_{pos}"


def bias_id(layer: int, pos: int) -> str:
    return f"{layer}_-2_{pos}"


def embedding_id(token: int, pos: int) -> str:
    return f"E_{token}_{pos}"


def logit_id(n_layers: int, token: int, pos: int, token_b: int = -1) -> str:
    # circuit-tracer puts logits at layer n_layers + 1; a difference gets "a-b" in the id
    tok = f"{token}" if token_b < 0 else f"{token}-{token_b}"
    return f"{n_layers + 1}_{tok}_{pos}"


# ============================================================================ frozen norms
@dataclass
class FrozenNorm:
    """A TransformerLens norm with its scale frozen: linear in its input, plus its bias."""

    kind: str  # LN, LNPre, RMS, RMSPre, none
    weight: Float[Tensor, "d"] | None
    bias: Float[Tensor, "d"] | None
    eps: float

    @classmethod
    def of(cls, module: Any, dtype: torch.dtype) -> FrozenNorm:
        kind = norm_kind(module)
        w = module.w.detach().to(dtype) if kind in ("LN", "RMS") else None
        b = module.b.detach().to(dtype) if kind == "LN" else None
        return cls(kind, w, b, float(getattr(module, "eps", 1e-5)))

    @property
    def centers(self) -> bool:
        return self.kind in ("LN", "LNPre")

    def scale(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n"]:
        """The scale the norm computes at ``x`` (TransformerLens's formula), to be frozen."""
        if self.kind == "none":
            return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        xc = x - x.mean(-1, keepdim=True) if self.centers else x
        return (xc.pow(2).mean(-1) + self.eps).sqrt()

    def forward(self, x: Float[Tensor, "n d"], scale: Float[Tensor, "n"]) -> Float[Tensor, "n d"]:
        out = linearize_norm(x, scale, self.kind, self.weight)
        return out if self.bias is None else out + self.bias

    def transpose(
        self, g: Float[Tensor, "... d"], scale: Float[Tensor, "..."] | None = None
    ) -> Float[Tensor, "... d"]:
        """The adjoint of the frozen linear part: centre(g ⊙ w) / scale (centring is symmetric)."""
        out = g if self.weight is None else g * self.weight
        if self.centers:
            out = out - out.mean(-1, keepdim=True)
        if scale is not None:
            out = out / scale[..., None]
        return out


# ============================================================================ node sets
@dataclass
class NodeSet:
    """The nodes of one residual layer (or the embeddings, or the logits), with their vectors.

    ``vectors`` are the source vectors (they sum to ``x_K[p]`` over the nodes at ``p``); feature
    nodes come first, so ``n_features`` rows are the layer's targets.
    """

    layer: int
    ids: list[str]
    kind: np.ndarray
    positions: Int[Tensor, "n"]
    feature: np.ndarray
    activation: np.ndarray
    coefficient: np.ndarray
    label: list[str]
    vectors: Float[Tensor, "n d_model"] | None
    n_features: int
    feature_b: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Targets:
    """Readouts of the targets of one layer: ``r_t = w_t · x[p_t] + const_t``."""

    readout: Float[Tensor, "n d_model"]
    const: Float[Tensor, "n"]
    positions: Int[Tensor, "n"]
    value: Float[Tensor, "n"]


# ============================================================================ one block
class BlockMaps:
    """Block L with its attention patterns and every norm scale frozen (from the capture)."""

    def __init__(self, model: Any, cap: Capture, layer: int, dtype: torch.dtype) -> None:
        cfg = model.cfg
        block = model.blocks[layer]
        attn = block.attn
        dev = _cap_device(cap)
        T = cap.n_tokens
        self.layer = layer
        self.dtype = dtype
        self.n_heads = cfg.n_heads
        self.pattern: Float[Tensor, "head q k"] = cap.pattern(layer).to(dev, dtype)
        # Causal (not bidirectional) attention: a query never reads later keys.
        self.causal = (attn._attention_dir_override or cfg.attention_dir) == "causal"
        self.attn_pre = FrozenNorm.of(block.ln1, dtype)
        if self.attn_pre.kind == "none":
            self.key_scale = torch.ones(T, dtype=dtype, device=dev)
        else:
            s = cap.layer_act(layer, "ln1.hook_scale")
            self.key_scale = s.reshape(T, -1)[:, 0].to(dev, dtype)  # split-qkv adds a head axis
        self.attn_post: FrozenNorm | None = None
        if cfg.use_normalization_before_and_after:
            self.attn_post = FrozenNorm.of(block.ln1_post, dtype)
            self.post_scale = cap.layer_act(layer, "ln1_post.hook_scale").reshape(T, -1)[:, 0]
            self.post_scale = self.post_scale.to(dev, dtype)
        self.W_V: Float[Tensor, "head d_model d_head"] = attn.W_V.detach().to(dev, dtype)
        self.W_O: Float[Tensor, "head d_head d_model"] = attn.W_O.detach().to(dev, dtype)
        self.b_V: Float[Tensor, "head d_head"] = attn.b_V.detach().to(dev, dtype)
        self.b_O: Float[Tensor, "d_model"] = attn.b_O.detach().to(dev, dtype)
        self._bias_out: Tensor | None = None
        self._gram: Tensor | None = None
        # lin_kᵀ(W_V r) = centre(w_ln1 ⊙ W_V r) / σ_k: fold w_ln1 and the centring into W_V once.
        self.W_V_in: Float[Tensor, "head d_model d_head"] = self.attn_pre.transpose(
            self.W_V.transpose(1, 2)
        ).transpose(1, 2)
        if cfg.attn_only:
            self.mlp_mode = None
        else:
            self.mlp_mode = "parallel" if cfg.parallel_attn_mlp else "sequential"
            self.mlp = block.mlp
            mdt = _param_dtype(block.mlp)
            resid = cap.layer_act(layer, "hook_resid_pre")
            # The MLP's input exactly as the forward formed it (same op, same dtype).
            mid = (
                resid
                if self.mlp_mode == "parallel"
                else resid + cap.layer_act(layer, "hook_attn_out")
            )
            self.mlp_in = mid.detach().to(dev, mdt)
            self.mlp_pre = FrozenNorm.of(block.ln2, mdt)
            self.mlp_post = (
                FrozenNorm.of(block.ln2_post, mdt)
                if cfg.use_normalization_before_and_after
                else None
            )

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
        """A_h[p_t, k] / σ_ln1[k]: the frozen pattern row of each target, per key position."""
        rows = self.pattern[:, positions, :].permute(1, 0, 2)
        return rows / self.key_scale[None, None, :]

    def bias_out(self, positions: Int[Tensor, "n"]) -> Float[Tensor, "n d_model"]:
        """The attention biases' share of attn_out at each position (ln1.b, b_V, b_O, post-norm b)."""
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


def _cap_device(cap: Capture) -> torch.device:
    for t in cap.acts.values():
        return t.device
    return torch.device("cpu")


def _param_dtype(module: Any) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


# ============================================================================ the checkpoints
class Checkpoints:
    """Everything one graph (or its head loadings) reads: nodes, readouts and frozen blocks.

    Built from the model's cached capture of the prompt; no extra forward pass.
    """

    def __init__(self, model: Any, prompt: Any, readout: str = "encoder") -> None:
        check_model(model)
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.model = model
        self.readout = readout
        cfg = model.cfg
        self.n_layers = cfg.n_layers
        self.dicts = check_dictionaries(model)
        self.tokens = prompt_to_tokens(model, prompt)
        self.cap = model.qk_capture(self.tokens)
        self.T = self.cap.n_tokens
        self.dtype = compute_dtype(model)
        self.device = _cap_device(self.cap)
        self.str_tokens = self.cap.str_tokens or [str(t) for t in self.tokens.tolist()]
        self._nodes: dict[int, NodeSet] = {}
        self._decomp: dict[int, Any] = {}
        self._blocks: dict[int, BlockMaps] = {}

    # ------------------------------------------------------------------ layout
    @property
    def has_layer0(self) -> bool:
        return 0 in self.dicts

    @property
    def source_layers(self) -> list[int]:
        """-1 (embeddings) then every dictionary layer, ascending."""
        return [-1, *sorted(self.dicts)]

    @property
    def target_layers(self) -> list[int]:
        """Layers whose nodes have incoming edges: the dictionary layers fed by a block or the
        embeddings, and ``n_layers`` (logits)."""
        first = 0 if self.has_layer0 else 1
        return list(range(first, self.n_layers + 1))

    def source_of(self, target_layer: int) -> int:
        """The node layer feeding ``target_layer`` (-1: the embeddings)."""
        if target_layer == 0 or (target_layer == 1 and not self.has_layer0):
            return -1
        return target_layer - 1

    @staticmethod
    def crossed(target_layer: int) -> int:
        """The attention layer an edge into ``target_layer`` crosses (-1: none)."""
        return target_layer - 1

    # ------------------------------------------------------------------ residuals
    def resid(self, layer: int) -> Float[Tensor, "pos d_model"]:
        """x_K: the residual entering block K; x_n is the last block's output."""
        if layer < self.n_layers:
            return self.cap.layer_act(layer, "hook_resid_pre").to(self.dtype)
        last = self.n_layers - 1
        # Same additions, in the same order and dtype, as the block's forward.
        x = self.cap.layer_act(last, "hook_resid_pre") + self.cap.layer_act(last, "hook_attn_out")
        if not self.model.cfg.attn_only:
            x = x + self.cap.layer_act(last, "hook_mlp_out")
        return x.to(self.dtype)

    # ------------------------------------------------------------------ nodes
    def nodes(self, layer: int) -> NodeSet:
        if layer not in self._nodes:
            self._nodes[layer] = self._embedding_nodes() if layer == -1 else self._dict_nodes(layer)
        return self._nodes[layer]

    def _embedding_nodes(self) -> NodeSet:
        toks = self.tokens.tolist()
        T = self.T
        return NodeSet(
            layer=-1,
            ids=[embedding_id(t, p) for p, t in enumerate(toks)],
            kind=np.full(T, "embedding", dtype=object),
            positions=torch.arange(T),
            feature=np.asarray(toks, dtype=np.int64),
            activation=np.full(T, np.nan),
            coefficient=np.full(T, np.nan),
            label=list(self.str_tokens),
            vectors=self.resid(0).to(self.device),
            n_features=0,
        )

    def decomposition(self, layer: int) -> Any:
        if layer not in self._decomp:
            basis = DictionaryBasis(self.dicts[layer])
            x = self.resid(layer)
            # The basis's cache is shared with qk_attribution on this capture: same numbers.
            self._decomp[layer] = basis._decompose(self.cap, layer, x, torch.arange(self.T))
        return self._decomp[layer]

    def _dict_nodes(self, layer: int) -> NodeSet:
        d = self.dicts[layer]
        dec = self.decomposition(layer)
        T = self.T
        active = dec.feature_ids >= 0
        pos_f, slot_f = torch.nonzero(active, as_tuple=True)  # position-major order
        fids = dec.feature_ids[pos_f, slot_f]
        coeffs = dec.coeffs[pos_f, slot_f].to(self.device)
        W_dec = d.decoder(self.dtype, self.device)
        feat_vecs = coeffs[:, None] * W_dec[fids.to(self.device)]
        vectors = torch.cat([feat_vecs, dec.error.to(self.device), dec.bias.to(self.device)])
        pos_f, fids = pos_f.cpu(), fids.cpu()  # metadata lives on the CPU
        n_f = len(fids)
        fid_np = fids.numpy()
        pos_np = pos_f.numpy()
        ids = [
            feature_id(layer, f, p) for f, p in zip(fid_np.tolist(), pos_np.tolist(), strict=True)
        ]
        ids += [error_id(layer, p) for p in range(T)] + [bias_id(layer, p) for p in range(T)]
        kind = np.array(["feature"] * n_f + ["error"] * T + ["bias"] * T, dtype=object)
        labels = [d.label(int(f)) for f in fid_np]
        labels += [f"{d.name} error"] * T + [f"{d.name} bias"] * T
        nan = np.full(2 * T, np.nan)
        return NodeSet(
            layer=layer,
            ids=ids,
            kind=kind,
            positions=torch.cat([pos_f, torch.arange(T), torch.arange(T)]),
            feature=np.concatenate([fid_np, np.full(2 * T, -1)]).astype(np.int64),
            activation=np.concatenate(
                [dec.activations.cpu()[pos_f, slot_f.cpu()].double().numpy(), nan]
            ),
            coefficient=np.concatenate(
                [dec.coeffs.cpu()[pos_f, slot_f.cpu()].double().numpy(), nan]
            ),
            label=labels,
            vectors=vectors,
            n_features=n_f,
        )

    # ------------------------------------------------------------------ readouts
    def feature_targets(self, layer: int) -> Targets:
        """The readouts of layer ``layer``'s active features."""
        ns = self.nodes(layer)
        n = ns.n_features
        pos = ns.positions[:n].to(self.device)
        fids = torch.as_tensor(ns.feature[:n])
        x = self.resid(layer).to(self.device)[pos]
        d = self.dicts[layer]
        if self.readout == "decoder":
            W = ns.vectors[:n].clone()  # a_t · d_t, the paper's target vector
            const = torch.zeros(n, dtype=self.dtype, device=self.device)
        else:
            W, const = encoder_readout(d, fids, x, self.dtype)
        value = (W * x).sum(-1) + const
        return Targets(W, const, pos, value)

    def block(self, layer: int) -> BlockMaps:
        if layer not in self._blocks:
            self._blocks[layer] = BlockMaps(self.model, self.cap, layer, self.dtype)
        return self._blocks[layer]

    # ------------------------------------------------------------------ logits
    def final_logits(self, pos: int) -> Float[Tensor, "vocab"]:
        """The raw (pre-softcap) logits at ``pos``, from the capture: no second forward."""
        x = self.resid(self.n_layers).to(self.device)[pos]
        norm = self._final_norm()
        h = norm.forward(x[None], norm.scale(x[None]))[0]
        W_U, b_U = self._unembed()
        return h @ W_U + b_U

    def _final_norm(self) -> FrozenNorm:
        ln = getattr(self.model, "ln_final", None)
        return (
            FrozenNorm.of(ln, self.dtype) if ln is not None else FrozenNorm("none", None, None, 0)
        )

    def _unembed(self) -> tuple[Float[Tensor, "d_model vocab"], Float[Tensor, "vocab"]]:
        W_U = self.model.W_U.detach().to(self.device, self.dtype)
        b_U = self.model.b_U.detach().to(self.device, self.dtype)
        return W_U, b_U

    def logit_targets(self, specs: list[tuple[int, int]], pos: int) -> Targets:
        """Readouts of demeaned logits (or logit differences, ``b >= 0``) at ``pos``."""
        norm = self._final_norm()
        x = self.resid(self.n_layers).to(self.device)[pos]
        scale = norm.scale(x[None])
        W_U, b_U = self._unembed()
        # Mean-centred columns (logit − mean logit), only for the targets' tokens.
        mean_col, mean_b = W_U.mean(1), b_U.mean()
        a = torch.tensor([s[0] for s in specs], device=self.device)
        b = torch.tensor([max(s[1], 0) for s in specs], device=self.device)
        is_diff = torch.tensor([s[1] >= 0 for s in specs], device=self.device)
        # A difference a − b cancels the means; a single logit subtracts them.
        cols = W_U[:, a].T - torch.where(is_diff[:, None], W_U[:, b].T, mean_col[None])
        consts = b_U[a] - torch.where(is_diff, b_U[b], mean_b)
        readout = norm.transpose(cols, scale.expand(len(specs)))
        if norm.bias is not None:
            consts = consts + cols @ norm.bias
        positions = torch.full((len(specs),), pos, dtype=torch.long, device=self.device)
        value = (readout * x).sum(-1) + consts
        return Targets(readout, consts, positions, value)

    # ------------------------------------------------------------------ edges
    def edge_block(
        self, target_layer: int, targets: Targets, batch_size: int = 256
    ) -> tuple[Float[Tensor, "n_target n_source"], Float[Tensor, "n_target"]]:
        """All edges into ``target_layer``'s targets from the layer below (dense), and each
        target's offset: its readout constant plus the attention biases read through the same
        frozen map, so that for attention-only models readout = Σ edges + offset exactly."""
        src = self.nodes(self.source_of(target_layer))
        L = self.crossed(target_layer)
        n_t, n_s = len(targets.positions), len(src)
        if L < 0:  # embeddings → layer-0 features: the readout itself, same position only
            E = torch.zeros(n_t, n_s, dtype=self.dtype, device=self.device)
            pos = targets.positions
            E[torch.arange(n_t), pos] = (targets.readout * src.vectors[pos]).sum(-1)
            return E, targets.const.clone()
        bm = self.block(L)
        V_pad, flat = pad_by_position(src.vectors, src.positions.to(self.device), self.T)
        out = torch.empty(n_t, n_s, dtype=self.dtype, device=self.device)
        offset = torch.empty(n_t, dtype=self.dtype, device=self.device)
        for lo in range(0, n_t, batch_size):
            sl = slice(lo, min(n_t, lo + batch_size))
            w, pos = targets.readout[sl], targets.positions[sl]
            u_mlp, u_head = bm.cotangents(w, pos)
            z = bm.head_z(u_head, pos)  # [n, head, d_model]
            # Keys after the chunk's last target have zero attention (causal): skip them.
            K = int(pos.max()) + 1 if bm.causal else self.T
            alpha = bm.alpha(pos)[:, :, :K]
            # G_t[k] = Σ_h A_h[p_t, k] / σ_k · z_{t,h}: the readout's gradient at key position k
            G = einops.einsum(alpha, z, "n head k, n head d_model -> k n d_model")
            G[pos, torch.arange(len(pos), device=self.device)] += w + u_mlp  # residual + MLP
            E_pad = torch.bmm(G, V_pad[:K].transpose(1, 2))  # [k, n, slot]
            E_pad = E_pad.permute(1, 0, 2).reshape(len(pos), -1)
            row = torch.zeros(
                len(pos), V_pad.shape[0] * V_pad.shape[1], dtype=self.dtype, device=self.device
            )
            row[:, : E_pad.shape[1]] = E_pad
            out[sl] = row[:, flat]
            offset[sl] = targets.const[sl] + (u_head * bm.bias_out(pos)).sum(-1)
        return out, offset


def pad_by_position(
    vectors: Float[Tensor, "n d"], positions: Int[Tensor, "n"], n_pos: int
) -> tuple[Float[Tensor, "pos slot d"], Int[Tensor, "n"]]:
    """Group rows by position into a padded [pos, slot, d] tensor; ``flat`` maps each row to its
    index in the flattened (pos, slot) axis."""
    counts = torch.bincount(positions, minlength=n_pos)
    S = max(int(counts.max()), 1) if len(positions) else 1
    order = torch.argsort(positions, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(positions)
    rank[order] = torch.arange(len(positions), device=positions.device) - starts[positions[order]]
    flat = positions * S + rank
    V = vectors.new_zeros(n_pos * S, vectors.shape[1])
    V[flat] = vectors
    return V.reshape(n_pos, S, -1), flat


def encoder_readout(
    d: Any, fids: Int[Tensor, "n"], x: Float[Tensor, "n d_model"], dtype: torch.dtype
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n"]]:
    """(w_t, c_t) with ``w_t · x + c_t`` = the SAE's pre-activation of feature t at that token.

    Standard/topk/abstopk/jumprelu: ``W_enc`` column and ``b_enc − b_dec·W_enc`` (b_dec only when
    applied to the input); gated: the magnitude path (``W_enc·exp(r_mag)``, ``b_mag``); TopK with
    ``rescale_acts_by_decoder_norm``: times ‖W_dec_t‖. Runtime normalization is frozen at the
    token: ``constant_norm_rescale`` scales by √d_in/‖x‖, ``layer_norm`` centres and divides by
    (std + 1e-5).
    """
    sae, cfg = d.sae, d.sae.cfg
    arch = cfg.architecture()
    dev = x.device
    if arch == "matching_pursuit":
        raise ValueError(
            f"the SAE on {d.hook_name!r} is a matching_pursuit SAE: its encoder is iterative, so no "
            "feature has a linear pre-activation to read; use readout='decoder'"
        )
    idx = fids.to(sae.W_enc.device)

    def p(t: Tensor) -> Tensor:
        return t.detach()[..., idx].to(dev, dtype)

    W = p(sae.W_enc).T  # [n, d_in]
    if arch == "gated":
        W = W * p(sae.r_mag).exp()[:, None]
        b = p(sae.b_mag)
    else:
        b = p(sae.b_enc)
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        norms = sae.W_dec.detach()[idx].norm(dim=-1).to(dev, dtype)
        W, b = W * norms[:, None], b * norms
    if cfg.apply_b_dec_to_input:
        b = b - W @ sae.b_dec.detach().to(dev, dtype)
    mode = cfg.normalize_activations
    if mode == "constant_norm_rescale":
        W = W * (math.sqrt(cfg.d_in) / x.norm(dim=-1))[:, None]
    elif mode == "layer_norm":
        std = (x - x.mean(-1, keepdim=True)).std(dim=-1)
        W = (W - W.mean(-1, keepdim=True)) / (std + 1e-5)[:, None]
    elif mode != "none":
        raise ValueError(
            f"the SAE on {d.hook_name!r} has normalize_activations={mode!r}; fold it first"
        )
    return W, b


# ============================================================================ validation
def check_model(model: Any) -> None:
    from qk_lens.mixin import QKLensMixin

    if not isinstance(model, QKLensMixin):
        raise TypeError(
            f"model must be a qk_lens-attached HookedTransformer (qk_lens.attach(model)), got "
            f"{type(model).__name__}"
        )
    cfg = model.cfg
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise ValueError(
            f"{cfg.original_architecture} is a post-norm architecture (ln1/ln2 normalize the "
            "attention/MLP outputs); attribution graphs support pre-norm blocks only"
        )
    if getattr(cfg, "num_experts", None):
        raise ValueError("mixture-of-experts MLPs are not supported by attribution graphs")


def check_dictionaries(model: Any) -> dict[int, Any]:
    """The dictionaries by layer; every layer 1..n−1 needs one on the residual stream."""
    n = model.cfg.n_layers
    dicts = dict(model.qk_dictionaries)
    missing = [layer for layer in range(1, n) if layer not in dicts]
    if missing:
        have = sorted(dicts) or "none"
        raise ValueError(
            f"attribution graphs need a residual-stream dictionary at every layer 1..{n - 1} "
            f"(layer 0 is optional: without one, the embeddings are its basis); missing: "
            f"{missing} (layers with one: {have}). Checkpointing makes each edge cross exactly "
            "one attention layer, so that its head loadings are well defined: without a "
            "dictionary at layer L, edges would run through chains of heads in two layers. Add "
            "one with model.add_dictionary(sae) for an SAE on blocks.L.hook_resid_pre."
        )
    for layer, d in dicts.items():
        if d.space != "resid":
            raise ValueError(
                f"the dictionary for layer {layer} reads {d.hook_name!r} (after ln1), not the "
                "residual stream; graph edges need source vectors that sum to the residual: use "
                f"an SAE on blocks.{layer}.hook_resid_pre"
            )
    return dicts


def _as_index(name: str, value: Any) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


# ============================================================================ targets
@dataclass
class LogitSpec:
    token: int
    token_b: int  # -1 unless a logit difference
    label: str
    prob: float
    weight: float


def resolve_targets(
    model: Any,
    ctx: Checkpoints,
    targets: Any,
    pos: int,
    max_n_logits: int,
    desired_logit_prob: float,
) -> list[LogitSpec]:
    """Target specs: the top predictions (circuit-tracer's rule) or the user's tokens/differences."""
    logits = ctx.final_logits(pos)
    cap = model.cfg.output_logits_soft_cap
    shown = cap * torch.tanh(logits / cap) if softcap_enabled(cap) else logits
    probs = torch.softmax(shown.double(), -1).cpu()
    V = probs.shape[0]

    def name(t: int) -> str:
        if model.tokenizer is not None:
            return model.tokenizer.decode([t])
        return str(t)

    def tok(v: Any) -> int:
        if isinstance(v, str):
            if model.tokenizer is None:
                raise ValueError(f"target {v!r} is a string but the model has no tokenizer")
            try:
                return int(model.to_single_token(v))
            except (AssertionError, ValueError, KeyError) as e:
                raise ValueError(f"target {v!r} is not a single token ({e})") from None
        t = _as_index("target token", v)
        if not 0 <= t < V:
            raise ValueError(f"target token {t} is outside the vocabulary [0, {V})")
        return t

    if targets is None:
        if isinstance(max_n_logits, bool) or not isinstance(max_n_logits, int) or max_n_logits < 1:
            raise ValueError(f"max_n_logits must be a positive int, got {max_n_logits!r}")
        desired = _check_fraction("desired_logit_prob", desired_logit_prob)
        top_p, top_i = probs.topk(min(max_n_logits, V))
        n = int((top_p.cumsum(0) < desired).sum()) + 1
        n = min(n, len(top_i))
        return [
            LogitSpec(int(i), -1, f'Output "{name(int(i))}"', float(p), float(p))
            for p, i in zip(top_p[:n].tolist(), top_i[:n].tolist(), strict=True)
        ]
    items = targets if isinstance(targets, list) else [targets]
    if not items:
        raise ValueError("targets is an empty list; give tokens, (a, b) pairs, or None")
    out = []
    for item in items:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"a logit-difference target is a pair (a, b), got {item!r}")
            a, b = tok(item[0]), tok(item[1])
            if a == b:
                raise ValueError(f"logit-difference target {item!r} compares a token with itself")
            label = f'"{name(a)}" − "{name(b)}"'
            out.append(LogitSpec(a, b, label, float(probs[a] - probs[b]), 1.0))
        else:
            a = tok(item)
            out.append(LogitSpec(a, -1, f'Output "{name(a)}"', float(probs[a]), float(probs[a])))
    return out


# ============================================================================ pruning
def normalize_rows(block: Float[Tensor, "t s"]) -> Float[Tensor, "t s"]:
    """|A| with each row summing to 1 (circuit-tracer's normalize_matrix)."""
    a = block.abs()
    return a.div_(a.sum(1, keepdim=True).clamp(min=1e-10))


def find_threshold(scores: Float[Tensor, "n"], threshold: float) -> float:
    """The score above which the kept entries hold ``threshold`` of the total (circuit-tracer)."""
    if scores.numel() == 0:
        return 0.0
    s = torch.sort(scores.double(), descending=True).values
    total = s.sum()
    if total <= 0:
        return 0.0
    cum = torch.cumsum(s, 0) / total
    i = min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype))), len(s) - 1)
    return float(s[i])


@dataclass
class Layout:
    """Where each node layer sits in the global node order, and its target rows."""

    offsets: dict[int, int]  # node layer -> first global index
    sizes: dict[int, int]
    n_targets: dict[int, int]  # node layer -> how many of its first nodes are targets
    source_of: dict[int, int]  # target layer -> node layer feeding it

    def slice(self, layer: int) -> slice:
        return slice(self.offsets[layer], self.offsets[layer] + self.sizes[layer])

    def target_slice(self, layer: int) -> slice:
        return slice(self.offsets[layer], self.offsets[layer] + self.n_targets[layer])

    @property
    def n_nodes(self) -> int:
        return sum(self.sizes.values())


def kept_block(
    block: Tensor, layout: Layout, tl: int, keep: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(sub-block of kept rows × kept columns, their global row indices, column indices)."""
    rows = torch.arange(layout.target_slice(tl).start, layout.target_slice(tl).stop)
    cols = torch.arange(
        layout.slice(layout.source_of[tl]).start, layout.slice(layout.source_of[tl]).stop
    )
    if keep is None:
        return block, rows, cols
    rk, ck = keep[rows], keep[cols]
    sub = block[rk.to(block.device)][:, ck.to(block.device)]
    return sub, rows[rk], cols[ck]


def propagate_influence(
    blocks: dict[int, Tensor], layout: Layout, logit_weights: Tensor, keep: Tensor | None = None
) -> Float[Tensor, "n_nodes"]:
    """w @ (Â + Â² + …) on the layered graph (only ``keep`` nodes, if given): one backward
    sweep over the blocks, since every edge joins adjacent layers."""
    infl = torch.zeros(layout.n_nodes, dtype=torch.float64)
    for tl in sorted(blocks, reverse=True):
        sub, rows, cols = kept_block(blocks[tl], layout, tl, keep)
        cur = infl[rows] + logit_weights[rows]
        if not bool(cur.any()):
            continue
        # (cur / rowsum) @ |A| = cur @ Â without materializing Â
        a = sub.abs()
        scaled = cur.to(a.device, a.dtype) / a.sum(1).clamp(min=1e-10)
        infl[cols] += (scaled @ a).double().cpu()
    return infl


def prune(
    blocks: dict[int, Tensor],
    layout: Layout,
    logit_weights: Tensor,
    always_keep: Bool[Tensor, "n_nodes"],
    is_feature: Bool[Tensor, "n_nodes"],
    node_threshold: float,
    edge_threshold: float,
    max_feature_nodes: int | None,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor]:
    """circuit-tracer's pruning on layered blocks.

    Returns (node mask, kept edges as (target, source) global index pairs per block, node
    influence). Embedding and logit nodes are always kept; feature, error and bias nodes are
    pruned by influence, then edges by edge influence, then nodes left without outgoing (or, for
    features, incoming) edges, until nothing changes.
    """
    influence = propagate_influence(blocks, layout, logit_weights)
    keep = influence >= find_threshold(influence, node_threshold)
    if max_feature_nodes is not None:
        feat = torch.nonzero(keep & is_feature)[:, 0]
        if len(feat) > max_feature_nodes:
            order = torch.argsort(influence[feat], descending=True)
            keep[feat[order[max_feature_nodes:]]] = False
    keep |= always_keep

    pruned_infl = propagate_influence(blocks, layout, logit_weights, keep)
    # Edge scores on the kept sub-blocks only, kept sparse.
    sparse = {}
    for tl, B in blocks.items():
        sub, rows, cols = kept_block(B, layout, tl, keep)
        w = (pruned_infl[rows] + logit_weights[rows]).to(sub.device, sub.dtype)
        score = normalize_rows(sub).mul_(w[:, None])
        r, c = torch.nonzero(score > 0, as_tuple=True)
        sparse[tl] = (rows[r.cpu()], cols[c.cpu()], score[r, c].double().cpu())
    all_scores = torch.cat([v for _, _, v in sparse.values()])
    thr = find_threshold(all_scores, edge_threshold)
    edges = {tl: (r[v >= thr], c[v >= thr]) for tl, (r, c, v) in sparse.items()}

    # Drop nodes without outgoing edges (all but logits) or without incoming ones (features).
    needs_out = ~always_keep
    while True:
        has_out = torch.zeros_like(keep)
        has_in = torch.zeros_like(keep)
        for tl, (r, c) in list(edges.items()):
            ok = keep[r] & keep[c]
            r, c = r[ok], c[ok]
            edges[tl] = (r, c)
            has_out[c] = True
            has_in[r] = True
        new_keep = keep & ~(needs_out & ~has_out) & ~(is_feature & ~has_in)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep, [edges[tl] for tl in sorted(edges)], influence


# ============================================================================ the graph
@dataclass
class Graph:
    """A pruned checkpointed attribution graph: nodes, signed edges, and how it was made.

    ``nodes``: one row per node (columns in ``NODE_COLUMNS``: node_id, kind, layer, position,
    feature (token id for embeddings and logits), feature_b (the subtracted token of a logit
    difference, else −1), token, label, activation, coefficient, readout and offset (targets:
    ``readout = Σ incoming edges + offset`` exactly for attention-only models), prob (logits),
    weight (a logit's weight in the influence), influence and cumulative_influence).
    ``edge_source`` / ``edge_target`` index ``nodes``; ``edge_weight`` is the attribution.
    Every edge into a node at layer K crosses attention layer K−1 (see :meth:`edge_layers`).
    """

    nodes: pd.DataFrame
    edge_source: Int[Tensor, "edge"]
    edge_target: Int[Tensor, "edge"]
    edge_weight: Float[Tensor, "edge"]
    tokens: Int[Tensor, "pos"]
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ basics
    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return int(self.edge_weight.numel())

    @property
    def str_tokens(self) -> list[str]:
        return list(self.metadata.get("str_tokens", []))

    def __repr__(self) -> str:
        counts = self.nodes["kind"].value_counts().to_dict()
        kinds = ", ".join(f"{counts.get(k, 0)} {k}" for k in NODE_KINDS)
        return (
            f"Graph({self.metadata.get('model_name', '?')}, {len(self.tokens)} tokens, "
            f"{self.n_nodes} nodes ({kinds}), {self.n_edges} edges, "
            f"readout={self.metadata.get('readout')!r})"
        )

    def edge_layers(self) -> Int[Tensor, "edge"]:
        """The attention layer each edge crosses (its target's layer − 1; −1: embedding →
        layer-0 feature, no layer crossed)."""
        layer = torch.from_numpy(self.nodes["layer"].to_numpy(np.int64, copy=True))
        return layer[self.edge_target] - 1

    @property
    def edges(self) -> pd.DataFrame:
        """One row per edge: ids, labels, positions, the layer crossed and the weight."""
        n = self.nodes
        s, t = self.edge_source.numpy(), self.edge_target.numpy()
        return pd.DataFrame(
            {
                "source": n["node_id"].to_numpy()[s],
                "target": n["node_id"].to_numpy()[t],
                "weight": self.edge_weight.double().numpy(),
                "layer": self.edge_layers().numpy(),
                "source_pos": n["position"].to_numpy()[s],
                "target_pos": n["position"].to_numpy()[t],
                "source_label": n["label"].to_numpy()[s],
                "target_label": n["label"].to_numpy()[t],
                "source_index": s,
                "target_index": t,
            }
        )

    def node_index(self, node: Any) -> int:
        """Index of a node given by its row index or its node_id."""
        if isinstance(node, str):
            hits = np.nonzero(self.nodes["node_id"].to_numpy() == node)[0]
            if len(hits) == 0:
                raise ValueError(f"no node {node!r} in this graph (ids look like '3_1234_7')")
            return int(hits[0])
        i = _as_index("node", node)
        if not 0 <= i < self.n_nodes:
            raise ValueError(f"node index {i} is outside [0, {self.n_nodes})")
        return i

    def edge_index(self, edge: Any) -> int:
        """Index of an edge given by its index or by (source, target) node ids/indices."""
        if isinstance(edge, tuple):
            if len(edge) != 2:
                raise ValueError(f"an edge is an index or a (source, target) pair, got {edge!r}")
            s, t = self.node_index(edge[0]), self.node_index(edge[1])
            hits = torch.nonzero((self.edge_source == s) & (self.edge_target == t))[:, 0]
            if len(hits) == 0:
                ids = self.nodes["node_id"]
                raise ValueError(
                    f"no edge {ids.iloc[s]!r} → {ids.iloc[t]!r} in this graph (pruned, or not "
                    "between adjacent layers)"
                )
            return int(hits[0])
        i = _as_index("edge", edge)
        if not 0 <= i < self.n_edges:
            raise ValueError(f"edge index {i} is outside [0, {self.n_edges})")
        return i

    def incoming(self, node: Any) -> pd.DataFrame:
        """The edges into ``node``, strongest (|weight|) first."""
        i = self.node_index(node)
        e = self.edges
        e = e[e["target_index"] == i]
        return e.reindex(e["weight"].abs().sort_values(ascending=False).index)

    def outgoing(self, node: Any) -> pd.DataFrame:
        """The edges out of ``node``, strongest (|weight|) first."""
        i = self.node_index(node)
        e = self.edges
        e = e[e["source_index"] == i]
        return e.reindex(e["weight"].abs().sort_values(ascending=False).index)

    def top_edges(self, k: int = 20) -> pd.DataFrame:
        e = self.edges
        return e.reindex(e["weight"].abs().sort_values(ascending=False).index).head(k)

    # ------------------------------------------------------------------ into QK attributions
    def qk_attribution(self, model: Any, edge: Any, head: int) -> Any:
        """The QK attribution of ``head`` at the pair this edge crosses: layer K−1, query = the
        target's position, key = the source's position — why the head fetched what it moved."""
        i = self.edge_index(edge)
        s, t = int(self.edge_source[i]), int(self.edge_target[i])
        layer = int(self.nodes["layer"].iloc[t]) - 1
        if layer < 0:
            raise ValueError(
                f"edge {i} runs from an embedding to a layer-0 feature: it crosses no attention "
                "layer, so no head carried it"
            )
        self.check_model(model)
        q_pos = int(self.nodes["position"].iloc[t])
        k_pos = int(self.nodes["position"].iloc[s])
        basis = "dictionary" if layer in model.qk_dictionaries else "upstream"
        return model.qk_attribution(self.tokens, layer, head, q_pos, k_pos, basis=basis)

    def check_model(self, model: Any) -> None:
        """Raise ValueError unless ``model`` looks like the one this graph was built with."""
        check_model(model)
        want = self.metadata.get("model", {})
        have = model_fingerprint(model)
        bad = {k: (want[k], have.get(k)) for k in want if have.get(k) != want[k]}
        if bad:
            raise ValueError(f"this graph was built with another model: {bad} (graph, model)")
        vocab = model.cfg.d_vocab
        if int(self.tokens.max()) >= vocab:
            raise ValueError(f"the graph's tokens exceed this model's vocabulary ({vocab})")

    # ------------------------------------------------------------------ files (no pickle)
    def save(self, path: str | PathLike[str]) -> Path:
        """Write one safetensors file: edges, tokens and numeric node columns as tensors, the
        string columns and the metadata as JSON in its header."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "edge_source": self.edge_source.to(torch.int64).contiguous(),
            "edge_target": self.edge_target.to(torch.int64).contiguous(),
            "edge_weight": self.edge_weight.contiguous(),
            "tokens": self.tokens.to(torch.int64).contiguous(),
        }
        for c in _NODE_FLOAT_COLUMNS:
            tensors[f"node_{c}"] = torch.tensor(self.nodes[c].to_numpy(np.float64, copy=True))
        for c in _NODE_INT_COLUMNS:
            tensors[f"node_{c}"] = torch.tensor(self.nodes[c].to_numpy(np.int64, copy=True))
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "metadata": self.metadata,
            "nodes": {c: self.nodes[c].astype(str).tolist() for c in _NODE_STR_COLUMNS},
        }
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Graph:
        """Read a file written by :meth:`save`; a corrupt or foreign file raises ValueError."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"graph file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header_json = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        if header_json is None:
            raise ValueError(f"{path} is a safetensors file but not a qk_lens graph (no header)")
        try:
            header = json.loads(header_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: the graph header is not valid JSON ({e})") from None
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} holds format {header.get('format')!r} version {header.get('version')!r}; "
                f"this qk_lens reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        try:
            cols: dict[str, Any] = {c: header["nodes"][c] for c in _NODE_STR_COLUMNS}
            for c in (*_NODE_INT_COLUMNS, *_NODE_FLOAT_COLUMNS):
                cols[c] = tensors[f"node_{c}"].numpy()
            src, tgt = tensors["edge_source"], tensors["edge_target"]
            weight, tokens = tensors["edge_weight"], tensors["tokens"]
        except KeyError as e:
            raise ValueError(f"{path} is missing {e} — the file is truncated or edited") from None
        n = len(cols["node_id"])
        lengths = {c: len(v) for c, v in cols.items()}
        if any(v != n for v in lengths.values()):
            raise ValueError(f"{path}: node columns have different lengths {lengths}")
        if not (len(src) == len(tgt) == len(weight)):
            raise ValueError(f"{path}: edge arrays have different lengths")
        if len(src) and (int(src.min()) < 0 or int(max(src.max(), tgt.max())) >= n):
            raise ValueError(f"{path}: edges point outside the {n} nodes")
        nodes = pd.DataFrame(cols)[NODE_COLUMNS]
        return cls(nodes, src, tgt, weight, tokens, header.get("metadata", {}))


def model_fingerprint(model: Any) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "model_name": str(cfg.model_name),
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "n_heads": int(cfg.n_heads),
        "d_vocab": int(cfg.d_vocab),
    }


# ============================================================================ building
def attribution_graph(
    model: Any,
    prompt: Any,
    targets: Any = None,
    *,
    target_pos: int = -1,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    readout: str = "encoder",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_feature_nodes: int | None = None,
    prune_graph: bool = True,
    batch_size: int = 256,
    progress: bool = False,
) -> Graph:
    """Build the checkpointed attribution graph of ``prompt`` (see the module docstring).

    ``targets``: ``None`` (the top next-token predictions at ``target_pos``: at most
    ``max_n_logits``, until their probabilities reach ``desired_logit_prob``, as circuit-tracer
    does), or a token / list of tokens (ids or strings), where a pair ``(a, b)`` is the logit
    difference ``a − b``. ``readout``: ``"encoder"`` (a target feature's SAE pre-activation) or
    ``"decoder"`` (``a_t·d_t``, the paper's). Pruning keeps the nodes holding ``node_threshold`` of
    the influence on the targets (features capped at ``max_feature_nodes``), then the edges
    holding ``edge_threshold``; ``prune_graph=False`` keeps every node and every nonzero edge.
    ``batch_size`` targets go through each batched backward.
    """
    ctx = Checkpoints(model, prompt, readout)
    T = ctx.T
    pos = _as_index("target_pos", target_pos)
    if not -T <= pos < T:
        raise ValueError(f"target_pos={target_pos} is outside the prompt's {T} tokens")
    pos %= T
    node_threshold = _check_fraction("node_threshold", node_threshold)
    edge_threshold = _check_fraction("edge_threshold", edge_threshold)
    if max_feature_nodes is not None and (
        isinstance(max_feature_nodes, bool)
        or not isinstance(max_feature_nodes, int)
        or max_feature_nodes < 0
    ):
        raise ValueError(
            f"max_feature_nodes must be a non-negative int or None, got {max_feature_nodes!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    specs = resolve_targets(model, ctx, targets, pos, max_n_logits, desired_logit_prob)

    n = ctx.n_layers
    node_layers = ctx.source_layers  # -1, dictionary layers
    sets: dict[int, NodeSet] = {layer: ctx.nodes(layer) for layer in node_layers}
    logit_set = _logit_nodes(ctx, specs, pos)
    sets[n] = logit_set
    offsets, sizes, n_targets, off = {}, {}, {}, 0
    for layer in [*node_layers, n]:
        offsets[layer], sizes[layer] = off, len(sets[layer])
        n_targets[layer] = len(sets[layer]) if layer == n else sets[layer].n_features
        off += sizes[layer]
    layout = Layout(offsets, sizes, n_targets, {tl: ctx.source_of(tl) for tl in ctx.target_layers})

    blocks: dict[int, Tensor] = {}
    readouts: dict[int, tuple[Tensor, Tensor]] = {}  # target layer -> (readout value, offset)
    with torch.no_grad():
        for tl in tqdm(ctx.target_layers, desc="graph edges", disable=not progress):
            if tl == n:
                tg = ctx.logit_targets([(s.token, s.token_b) for s in specs], pos)
            else:
                tg = ctx.feature_targets(tl)
            blocks[tl], offset = ctx.edge_block(tl, tg, batch_size)
            readouts[tl] = (tg.value, offset)

    N = layout.n_nodes
    kind = np.concatenate([sets[layer].kind for layer in [*node_layers, n]])
    logit_w = torch.zeros(N, dtype=torch.float64)
    logit_w[layout.slice(n)] = torch.tensor([s.weight for s in specs], dtype=torch.float64)
    always = torch.as_tensor(np.isin(kind, ("embedding", "logit")))
    is_feature = torch.as_tensor(kind == "feature")
    n_edges_full = int(sum(int((b != 0).sum()) for b in blocks.values()))
    if prune_graph:
        keep, edge_lists, influence = prune(
            blocks, layout, logit_w, always, is_feature, node_threshold, edge_threshold,
            max_feature_nodes,
        )  # fmt: skip
    else:
        influence = propagate_influence(blocks, layout, logit_w)
        keep = torch.ones(N, dtype=torch.bool)
        edge_lists = []
        for tl in sorted(blocks):
            r, c = torch.nonzero(blocks[tl] != 0, as_tuple=True)
            edge_lists.append((r.cpu() + layout.offsets[tl], c.cpu() + offsets[ctx.source_of(tl)]))

    # Edge weights straight from the blocks, then everything renumbered onto the kept nodes.
    src_all, tgt_all, w_all = [], [], []
    for (r, c), tl in zip(edge_lists, sorted(blocks), strict=True):
        B = blocks[tl]
        w = B[(r - layout.offsets[tl]).to(B.device), (c - offsets[ctx.source_of(tl)]).to(B.device)]
        src_all.append(c)
        tgt_all.append(r)
        w_all.append(w.cpu())
    new_index = torch.full((N,), -1, dtype=torch.long)
    new_index[keep] = torch.arange(int(keep.sum()))
    src = new_index[torch.cat(src_all)] if src_all else torch.zeros(0, dtype=torch.long)
    tgt = new_index[torch.cat(tgt_all)] if tgt_all else torch.zeros(0, dtype=torch.long)
    weight = torch.cat(w_all) if w_all else torch.zeros(0, dtype=ctx.dtype)

    frame = _node_frame(ctx, sets, [*node_layers, n], readouts, specs, influence)
    frame = frame[keep.numpy()].reset_index(drop=True)
    metadata = {
        "model_name": str(model.cfg.model_name),
        "model": model_fingerprint(model),
        "prompt": model.to_string(ctx.tokens) if model.tokenizer is not None else None,
        "str_tokens": list(ctx.str_tokens),
        "readout": readout,
        "target_pos": pos,
        "targets": [vars(s) for s in specs],
        "dictionaries": {
            str(layer): {
                "hook_name": d.hook_name,
                "name": d.name,
                "d_sae": d.d_sae,
                "architecture": d.sae.cfg.architecture(),
                "neuronpedia_id": d.sae.cfg.metadata.neuronpedia_id,
            }
            for layer, d in sorted(ctx.dicts.items())
        },
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "max_feature_nodes": max_feature_nodes,
        "pruned": bool(prune_graph),
        "max_n_logits": max_n_logits,
        "desired_logit_prob": desired_logit_prob,
        "n_nodes_full": N,
        "n_edges_full": n_edges_full,
        "dtype": str(ctx.dtype).replace("torch.", ""),
    }
    return Graph(frame, src, tgt, weight, ctx.tokens.clone(), metadata)


def _logit_nodes(ctx: Checkpoints, specs: Sequence[LogitSpec], pos: int) -> NodeSet:
    n = ctx.n_layers
    k = len(specs)
    return NodeSet(
        layer=n,
        ids=[logit_id(n, s.token, pos, s.token_b) for s in specs],
        kind=np.full(k, "logit", dtype=object),
        positions=torch.full((k,), pos, dtype=torch.long),
        feature=np.array([s.token for s in specs], dtype=np.int64),
        activation=np.full(k, np.nan),
        coefficient=np.full(k, np.nan),
        label=[s.label for s in specs],
        vectors=None,
        n_features=k,
        feature_b=np.array([s.token_b for s in specs], dtype=np.int64),
    )


def _node_frame(
    ctx: Checkpoints,
    sets: dict[int, NodeSet],
    order: list[int],
    readouts: dict[int, tuple[Tensor, Tensor]],
    specs: Sequence[LogitSpec],
    influence: Tensor,
) -> pd.DataFrame:
    parts = []
    n = ctx.n_layers
    for layer in order:
        ns = sets[layer]
        k = len(ns)
        readout = np.full(k, np.nan)
        offset = np.full(k, np.nan)
        if layer in readouts:
            value, off = readouts[layer]
            m = ns.n_features
            readout[:m] = value.double().cpu().numpy()
            offset[:m] = off.double().cpu().numpy()
        pos = ns.positions.numpy()
        prob = np.full(k, np.nan)
        weight = np.zeros(k)
        if layer == n:
            prob[:] = [s.prob for s in specs]
            weight[:] = [s.weight for s in specs]
        parts.append(
            pd.DataFrame(
                {
                    "node_id": ns.ids,
                    "kind": ns.kind,
                    "layer": np.full(k, layer, dtype=np.int64),
                    "position": pos.astype(np.int64),
                    "feature": ns.feature,
                    "feature_b": ns.feature_b if ns.feature_b is not None else np.full(k, -1),
                    "token": [ctx.str_tokens[p] for p in pos],
                    "label": ns.label,
                    "activation": ns.activation,
                    "coefficient": ns.coefficient,
                    "readout": readout,
                    "offset": offset,
                    "prob": prob,
                    "weight": weight,
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    infl = influence.numpy()
    frame["influence"] = infl
    s, order_i = torch.sort(influence, descending=True)
    cum = torch.cumsum(s, 0) / s.sum().clamp(min=1e-300)
    cumulative = torch.zeros_like(influence)
    cumulative[order_i] = cum
    frame["cumulative_influence"] = cumulative.numpy()
    return frame[NODE_COLUMNS]
