"""Head loadings: how much of each graph edge each attention head carried (docs/graphs.md).

An edge into a target at layer K crosses block K−1 and splits exactly by path::

    edge = residual + mlp + Σ_h heads[h]

* ``residual`` = ``[p_s = p_t] · w_t·v_s`` — the skip connection;
* ``heads[h]`` = ``A_h[p_t, p_s] · lin_{p_s}ᵀ(W_V[h] W_O[h] postᵀ u)·v_s``: head h moving the
  source from its position to the target's. With ``through_mlp=True`` (default) ``u = w_t + J_tᵀw_t``:
  the head's write reaches the target directly *and* through the (linearized) MLP. With
  ``through_mlp=False``, ``u = w_t``: the direct path only, the paper's formula
  ``a_s a_t (v_t O_h V_h v_s) · attention_h(p_s, p_t)``;
* ``mlp`` = what reaches the target through the MLP and no head: ``[p_s = p_t] · (J_tᵀw_t)·v_s``
  with ``through_mlp=True``; with ``through_mlp=False`` every path through the MLP, i.e. that
  plus each head's path through the MLP (``edge − residual − Σ direct heads``, computed term by
  term, not as a remainder).

Parallel-attention blocks (NeoX, GPT-J) have no head → MLP path, so both modes agree there.
Every term is computed separately from the edge weight in the graph; :meth:`HeadLoadings.check`
holds their sum to it. From any (edge, head), :meth:`HeadLoadings.qk_attribution` gives the QK
attribution at that layer, head, query = target position, key = source position.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from qk_lens.arch import arch_of
from qk_lens.attribution import CompletenessError, QKAttribution
from qk_lens.checks import check_count, is_real, renamed
from qk_lens.graph.checkpoints import Checkpoints, check_model
from qk_lens.graph.nodes import logit_id
from qk_lens.graph.result import Graph

__all__ = ["HeadLoadings", "head_loadings"]


@dataclass
class HeadLoadings:
    """Per-edge split of a :class:`~qk_lens.graph.Graph`'s edges into residual, MLP and heads.

    Tensors are aligned with ``graph.edge_weight``: ``residual [edge]``, ``mlp [edge]``,
    ``heads [edge, head]``; ``layer [edge]`` is the attention layer each edge crosses (−1 for
    embedding → layer-0 edges, which are all residual).
    """

    graph: Graph = field(repr=False)
    residual: Float[Tensor, "edge"]
    mlp: Float[Tensor, "edge"]
    heads: Float[Tensor, "edge head"]
    layer: Int[Tensor, "edge"]
    through_mlp: bool
    # ‖v_s‖·(Σ_h |A_h|/σ·‖z_h‖ + [p_s = p_t]·(‖w_t‖ + ‖J_tᵀw_t‖)): a Cauchy–Schwarz bound on every
    # dot product behind the edge, hence the size its floating-point rounding scales with.
    scale: Float[Tensor, "edge"] | None = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False, compare=False)

    @property
    def n_heads(self) -> int:
        return int(self.heads.shape[1])

    @property
    def total(self) -> Float[Tensor, "edge"]:
        """residual + mlp + Σ heads: equals the graph's edge weights."""
        return self.residual + self.mlp + self.heads.sum(1)

    def errors(self) -> Float[Tensor, "edge"]:
        """|Σ parts − edge| per edge, relative to :attr:`scale` (the bound on the dot products
        behind it: float rounding of the edge and of its parts is proportional to that, while
        |edge| itself can be far smaller when the terms cancel) or, without it, to Σ|parts|."""
        w = self.graph.edge_weight.to(self.residual.dtype)
        scale = self.residual.abs() + self.mlp.abs() + self.heads.abs().sum(1)
        if self.scale is not None:
            scale = torch.maximum(scale, self.scale)
        return (self.total - w).abs() / scale.clamp(min=torch.finfo(w.dtype).tiny)

    def check(self, tolerance: float | None = None) -> float:
        """Raise :class:`~qk_lens.CompletenessError` unless every edge's parts sum to its weight
        (:meth:`errors` ≤ 1e-5 in float32, 1e-10 in float64). Returns the largest error."""
        if tolerance is None:
            tolerance = 1e-10 if self.residual.dtype == torch.float64 else 1e-5
        if self.residual.numel() == 0:
            return 0.0
        err = self.errors()
        worst = int(err.argmax())
        if not float(err[worst]) <= tolerance:
            e = self.graph.edges.iloc[worst]
            raise CompletenessError(
                f"edge {worst} ({e['source']} → {e['target']}): residual + mlp + Σ heads = "
                f"{float(self.total[worst])!r} but the edge weight is "
                f"{float(self.graph.edge_weight[worst])!r} (relative error {float(err[worst]):.3g},"
                f" tolerance {tolerance:.3g})"
            )
        return float(err.max())

    # ------------------------------------------------------------------ tables
    def frame(self, min_abs: float = 0.0) -> pd.DataFrame:
        """Tidy table: one row per (edge, component) with component ``residual``, ``mlp`` or
        ``head`` (and its ``head`` index); ``share`` = loading / edge weight. Rows with
        |loading| < ``min_abs`` are dropped (the edge's other rows stay)."""
        if not is_real(min_abs) or min_abs < 0:
            raise ValueError(f"min_abs must be a non-negative number, got {min_abs!r}")
        e = self.graph.edges
        E, H = self.heads.shape
        values = torch.cat([self.residual[:, None], self.mlp[:, None], self.heads], 1)
        values = values.double().numpy()
        comp = np.array(["residual", "mlp"] + ["head"] * H, dtype=object)
        head = np.array([-1, -1, *range(H)])
        edge_idx = np.repeat(np.arange(E), H + 2)
        out = pd.DataFrame(
            {
                "edge": edge_idx,
                "source": e["source"].to_numpy()[edge_idx],
                "target": e["target"].to_numpy()[edge_idx],
                "source_label": e["source_label"].to_numpy()[edge_idx],
                "target_label": e["target_label"].to_numpy()[edge_idx],
                "layer": e["layer"].to_numpy()[edge_idx],
                "component": np.tile(comp, E),
                "head": np.tile(head, E),
                "loading": values.reshape(-1),
            }
        )
        weight = e["weight"].to_numpy()[edge_idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            out["share"] = np.where(weight != 0, out["loading"] / weight, np.nan)
        if min_abs > 0:
            out = out[out["loading"].abs() >= min_abs].reset_index(drop=True)
        return out

    @renamed(k="top_k")
    def top_heads(self, edge: Any, top_k: int = 3) -> pd.DataFrame:
        """The ``top_k`` heads with the largest |loading| on ``edge`` (an index or (source,
        target))."""
        k = check_count("top_k", top_k)
        i = self.graph.edge_index(edge)
        row = self.heads[i].double()
        k = min(k, self.n_heads)
        idx = row.abs().topk(k).indices
        w = float(self.graph.edge_weight[i])
        return pd.DataFrame(
            {
                "layer": int(self.layer[i]),
                "head": idx.numpy(),
                "loading": row[idx].numpy(),
                "share": row[idx].numpy() / w if w != 0 else np.nan,
            }
        )

    def head_summary(self) -> pd.DataFrame:
        """Per (layer, head): Σ|loading| over the graph's edges and the edges it tops."""
        crossing = self.layer >= 0
        if not bool(crossing.any()):
            return pd.DataFrame(columns=["layer", "head", "abs_loading", "n_top_edges"])
        h = self.heads[crossing].abs().double()
        lay = self.layer[crossing]
        top = h.argmax(1)
        rows = []
        for L in torch.unique(lay).tolist():
            m = lay == L
            for head in range(self.n_heads):
                rows.append(
                    {
                        "layer": L,
                        "head": head,
                        "abs_loading": float(h[m, head].sum()),
                        "n_top_edges": int((top[m] == head).sum()),
                    }
                )
        out = pd.DataFrame(rows)
        return out.sort_values("abs_loading", ascending=False).reset_index(drop=True)

    # ------------------------------------------------------------------ into QK attributions
    def qk_attribution(
        self, edge: Any, head: int | None = None, model: Any = None
    ) -> QKAttribution:
        """The QK attribution of ``head`` (default: this edge's top head) at layer K−1,
        query = target position, key = source position: what was moved, and why it was fetched."""
        i = self.graph.edge_index(edge)
        if head is None:
            head = int(self.heads[i].abs().argmax())
        if model is None:
            model = self._model() if self._model is not None else None
        if model is None:
            raise ValueError("the model these loadings came from is gone; pass model=")
        return self.graph.qk_attribution(model, i, head)

    def __repr__(self) -> str:
        mode = "through MLP" if self.through_mlp else "direct"
        return (
            f"HeadLoadings({len(self.residual)} edges × {self.n_heads} heads, {mode}, "
            f"dtype={str(self.residual.dtype).replace('torch.', '')})"
        )


def head_loadings(
    model: Any,
    graph: Graph,
    through_mlp: bool = True,
    batch_size: int = 512,
    progress: bool = False,
) -> HeadLoadings:
    """Split every edge of ``graph`` into residual, MLP-only and per-head parts (module docstring).

    Recomputes the frozen quantities from the model's capture of ``graph.tokens`` (one forward,
    cached), checks that the graph's nodes match this model and its dictionaries, then handles
    ``batch_size`` targets at a time: one batched MLP backward, and per-edge dot products.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a qk_lens Graph, got {type(graph).__name__}")
    if not isinstance(through_mlp, bool):
        raise TypeError(f"through_mlp must be True or False, got {through_mlp!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_model(model)
    graph.check_model(model)
    ctx = Checkpoints(model, graph.tokens, graph.metadata.get("readout", "encoder"))
    _check_nodes(ctx, graph)

    E, H = graph.n_edges, arch_of(model).n_heads
    dt, dev = ctx.dtype, ctx.device
    residual = torch.zeros(E, dtype=dt)
    mlp = torch.zeros(E, dtype=dt)
    heads = torch.zeros(E, H, dtype=dt)
    scale = torch.zeros(E, dtype=dt)
    layers = graph.edge_layers()
    nodes = graph.nodes
    node_ids = nodes["node_id"].to_numpy()
    specs = graph.metadata.get("targets", [])
    n = ctx.n_layers

    with torch.no_grad():
        for tl in tqdm(
            sorted(set((layers + 1).tolist())), desc="head loadings", disable=not progress
        ):
            e_idx = torch.nonzero(layers + 1 == tl)[:, 0]
            tg = (
                ctx.logit_targets(
                    [(s["token"], s["token_b"]) for s in specs], graph.metadata["target_pos"]
                )
                if tl == n
                else ctx.feature_targets(tl)
            )
            src_set = ctx.nodes(ctx.source_of(tl))
            s_rows = _lookup(src_set.ids, node_ids[graph.edge_source[e_idx].numpy()])
            t_rows = _lookup(
                _target_ids(ctx, tl, graph), node_ids[graph.edge_target[e_idx].numpy()]
            )
            s_idx = torch.as_tensor(s_rows, device=dev)
            p_s = src_set.positions.to(dev)[s_idx]
            parts = _split(
                ctx, tl, tg, torch.as_tensor(t_rows), s_idx, src_set.vectors, p_s, through_mlp,
                batch_size, H,
            )  # fmt: skip
            for out, part in zip((residual, mlp, heads, scale), parts, strict=True):
                out[e_idx] = part.cpu()
    return HeadLoadings(graph, residual, mlp, heads, layers, through_mlp, scale, weakref.ref(model))


def _target_ids(ctx: Checkpoints, tl: int, graph: Graph) -> list[str]:
    """Node ids of the targets of layer ``tl``, in the row order of its Targets."""
    if tl == ctx.n_layers:
        pos = graph.metadata["target_pos"]
        specs = graph.metadata.get("targets", [])
        return [logit_id(ctx.n_layers, s["token"], pos, s["token_b"]) for s in specs]
    ns = ctx.nodes(tl)
    return ns.ids[: ns.n_features]


def _lookup(ids: list[str], wanted: np.ndarray) -> np.ndarray:
    index = {k: i for i, k in enumerate(ids)}
    try:
        return np.array([index[w] for w in wanted], dtype=np.int64)
    except KeyError as e:
        raise ValueError(
            f"graph node {e.args[0]!r} does not exist for this model and its dictionaries: the "
            "graph was built with other dictionaries (or another model)"
        ) from None


def _check_nodes(ctx: Checkpoints, graph: Graph) -> None:
    """The graph's feature nodes must be active, with the same activation, under this model."""
    nodes = graph.nodes
    feats = nodes[nodes["kind"] == "feature"]
    built = graph.metadata.get("dictionaries", {})
    for key, info in built.items():
        if int(key) not in ctx.dicts:
            raise ValueError(
                f"the graph used a dictionary at layer {key}; the model has none there"
            )
        d = ctx.dicts[int(key)]
        if d.hook_name != info.get("hook_name") or d.d_sae != info.get("d_sae"):
            raise ValueError(
                f"the graph's layer-{key} dictionary was {info.get('hook_name')!r} with d_sae "
                f"{info.get('d_sae')}; the model's is {d.hook_name!r} with d_sae {d.d_sae}"
            )
    for layer, group in feats.groupby("layer"):
        ns = ctx.nodes(int(layer))
        rows = _lookup(ns.ids, group["node_id"].to_numpy())
        act = ns.activation[rows]
        want = group["activation"].to_numpy()
        tol = 1e-4 * np.maximum(1.0, np.abs(want))
        if not np.all(np.abs(act - want) <= tol):
            raise ValueError(
                f"feature activations at layer {layer} differ from the graph's: the graph was "
                "built with another model, dictionary or prompt"
            )


def _split(
    ctx: Checkpoints,
    tl: int,
    tg: Any,
    t_rows: Int[Tensor, "e"],
    s_rows: Int[Tensor, "e"],
    v_all: Float[Tensor, "source d_model"],
    p_s: Int[Tensor, "e"],
    through_mlp: bool,
    batch_size: int,
    H: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(residual, mlp, heads, scale) for the edges of one target layer, chunked over targets."""
    dev, dt = ctx.device, ctx.dtype
    E = len(t_rows)
    residual = torch.zeros(E, dtype=dt, device=dev)
    mlp = torch.zeros(E, dtype=dt, device=dev)
    heads = torch.zeros(E, H, dtype=dt, device=dev)
    scale = torch.zeros(E, dtype=dt, device=dev)
    L = ctx.crossed(tl)
    t_rows = t_rows.to(dev)
    w_all, pos_all = tg.readout, tg.positions
    s_rows = s_rows.to(dev)
    v = v_all[s_rows]
    if L < 0:
        residual[:] = (w_all[t_rows] * v).sum(-1) * (pos_all[t_rows] == p_s)
        scale[:] = w_all[t_rows].norm(dim=-1) * v.norm(dim=-1)
        return residual, mlp, heads, scale
    bm = ctx.block(L)
    # Sources in head value space once per layer (z_h · v = r_h · y_h): per edge we then touch
    # head × d_head numbers instead of head × d_model.
    s_uniq, s_local = torch.unique(s_rows, return_inverse=True)
    y = bm.source_y(v_all[s_uniq])  # [source, head, d_head]
    v_norm = v_all[s_uniq].norm(dim=-1)
    uniq, local = torch.unique(t_rows, return_inverse=True)
    for lo in range(0, len(uniq), batch_size):
        chunk = uniq[lo : lo + batch_size]
        e = torch.nonzero((local >= lo) & (local < lo + len(chunk)))[:, 0]
        if len(e) == 0:
            continue
        j = local[e] - lo  # each edge's target row within the chunk
        w, pos = w_all[chunk], pos_all[chunk]
        u_mlp = bm.mlp_vjp(w, pos)
        r_direct = bm.head_r(w, pos)  # [chunk, head, d_head]
        # Parallel blocks: the MLP never reads the attention output, so no head → MLP path.
        r_mlp = bm.head_r(u_mlp, pos) if bm.mlp_mode == "sequential" else None
        r_sum = r_direct if r_mlp is None else r_direct + r_mlp
        # ‖z_h‖ (the d_model-space vector the edge weight was computed with), via the Gram
        z_norm = einops.einsum(r_sum, bm.gram, r_sum, "n h e, h e f, n h f -> n h").clamp(min=0)
        z_norm = z_norm.sqrt()
        same_norm = w.norm(dim=-1) + u_mlp.norm(dim=-1)
        alpha = bm.alpha(pos)  # A_h[p_t, k] / σ_k
        ps, sl = p_s[e], s_local[e]
        same = (pos[j] == ps).to(dt)
        ve = v[e]
        residual[e] = same * (w[j] * ve).sum(-1)
        mlp_direct = same * (u_mlp[j] * ve).sum(-1)
        a = alpha[j, :, ps]  # [edge, head]
        ye = y[sl]
        direct = a * (r_direct[j] * ye).sum(-1)
        via_mlp = a * (r_mlp[j] * ye).sum(-1) if r_mlp is not None else torch.zeros_like(direct)
        scale[e] = (same * same_norm[j] + (a.abs() * z_norm[j]).sum(1)) * v_norm[sl]
        if through_mlp:
            heads[e] = direct + via_mlp
            mlp[e] = mlp_direct
        else:
            heads[e] = direct
            mlp[e] = mlp_direct + via_mlp.sum(1)
    return residual, mlp, heads, scale
