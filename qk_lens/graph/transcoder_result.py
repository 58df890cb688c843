"""A transcoder attribution graph and its head loadings as results (docs/transcoders.md §6–8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch import arch_of
from qk_lens.attribution import CompletenessError, QKAttribution, qk_attribution
from qk_lens.checks import as_int
from qk_lens.transcoders import Transcoders, TranscoderSplit


@dataclass
class TranscoderGraph:
    """A pruned transcoder attribution graph.

    ``nodes``: node_id (``{layer}_{feature}_{pos}``, errors ``{layer}_-1_{pos}`` (circuit-tracer's
    ``0_{layer}_{pos}`` can equal a layer-0 feature's id), ``E_{token}_{pos}``, logits
    ``{n+1}_{token}_{pos}``), kind (feature,
    error, embedding, logit), layer, position, feature (token id for embeddings and logits),
    feature_b, label, activation, prob and weight (logits), readout (a target's pre-activation
    or demeaned logit), influence, cumulative_influence, token. ``edge_source`` /
    ``edge_target`` index ``nodes``; ``edge_weight`` is the direct effect of the source's write
    on the target's readout through the frozen replacement model.
    """

    nodes: pd.DataFrame
    edge_source: Int[Tensor, "edge"]
    edge_target: Int[Tensor, "edge"]
    edge_weight: Float[Tensor, "edge"]
    tokens: Int[Tensor, "pos"]
    metadata: dict[str, Any] = field(default_factory=dict)
    # the Transcoders it was built with (loadings and exports use them by default)
    transcoders: Any = field(default=None, repr=False, compare=False)

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
        kinds = ", ".join(
            f"{counts.get(k, 0)} {k}" for k in ("feature", "error", "embedding", "logit")
        )
        return (
            f"TranscoderGraph({self.metadata.get('transcoders', '?')}, {len(self.tokens)} tokens, "
            f"{self.n_nodes} nodes ({kinds}), {self.n_edges} edges)"
        )

    @property
    def edges(self) -> pd.DataFrame:
        """One row per edge: source, target (node ids), their positions and layers, weight."""
        nd = self.nodes
        s, t = self.edge_source.numpy(), self.edge_target.numpy()
        return pd.DataFrame(
            {
                "source": nd["node_id"].to_numpy()[s],
                "target": nd["node_id"].to_numpy()[t],
                "source_index": s,
                "target_index": t,
                "source_layer": nd["layer"].to_numpy()[s],
                "target_layer": nd["layer"].to_numpy()[t],
                "source_pos": nd["position"].to_numpy()[s],
                "target_pos": nd["position"].to_numpy()[t],
                "weight": self.edge_weight.double().numpy(),
            }
        )

    def edge_index(self, edge: Any) -> int:
        """An edge by index, or by (source id, target id)."""
        if isinstance(edge, tuple):
            ids = self.nodes["node_id"].to_numpy()
            s, t = edge
            hit = np.nonzero(
                (ids[self.edge_source.numpy()] == s) & (ids[self.edge_target.numpy()] == t)
            )[0]
            if len(hit) == 0:
                raise ValueError(f"no edge {s} → {t} in this graph")
            return int(hit[0])
        e = as_int("edge", edge)
        if not 0 <= e < self.n_edges:
            raise ValueError(f"edge {e} is outside [0, {self.n_edges})")
        return e

    # ------------------------------------------------------------------ checks
    def check_model(self, model: Any) -> None:
        """ValueError unless ``model`` is the model (shape) and tokens this graph was built on."""
        arch = arch_of(model)
        want = {"n_layers": arch.n_layers, "n_heads": arch.n_heads, "d_model": arch.d_model,
                "d_vocab": arch.d_vocab}  # fmt: skip
        for key, value in want.items():
            if self.metadata.get(key) != value:
                raise ValueError(
                    f"the graph was built on a model with {key}={self.metadata.get(key)}, this "
                    f"model has {key}={value}"
                )

    def check_transcoders(self, tc: Transcoders) -> None:
        """ValueError unless ``tc`` are the transcoders the graph was built with."""
        want = self.metadata.get("transcoder_digest")
        got = tc.digest()
        if want is None:
            return
        if len(want) != len(got) or not np.allclose(want, got, rtol=1e-6, atol=1e-9):
            raise ValueError(
                f"the graph was built with other transcoders ({self.metadata.get('transcoders')!r}"
                f", {len(want) // 2} layers) than the model's ({tc.name!r}, {tc.n_layers} layers)"
            )

    def check_activations(self, split: TranscoderSplit) -> None:
        """ValueError unless every feature node is active on the model with its activation."""
        f = self.nodes[self.nodes["kind"] == "feature"]
        if f.empty:
            return
        key = {(int(a), int(b), int(c)): float(v) for a, b, c, v in zip(
            split.feat_layer.tolist(), split.feat_pos.tolist(), split.feat_id.tolist(),
            split.feat_act.double().tolist(), strict=True)}  # fmt: skip
        for r in f.itertuples():
            got = key.get((int(r.layer), int(r.position), int(r.feature)))
            if got is None or abs(got - float(r.activation)) > 1e-4 * max(1.0, abs(got)):
                raise ValueError(
                    f"feature node {r.node_id} (activation {r.activation:.6g}) is "
                    + ("not active" if got is None else f"active at {got:.6g}")
                    + " with these transcoders on this model and prompt: the graph was built "
                    "with other transcoders, another model or another prompt"
                )


@dataclass
class TranscoderLoadings:
    """Each edge of a :class:`TranscoderGraph` split by the heads its paths cross.

    ``residual [edge]``: the identity path (same position, no head, no skip); ``mlp [edge]``:
    paths through skip connections and no head; ``heads [edge, layer, head]``: paths whose only
    head hop is that head (for an edge across positions: the head moving p_s → p_t, so its QK
    attribution at (q = p_t, k = p_s) says why); ``multi_head [edge]``: paths with two or more
    head hops. ``edge`` is the same edge recomputed in the hop-by-hop sweep; ``one_hop`` that
    sweep's one-hop total (equal to Σ heads, computed apart).
    """

    graph: TranscoderGraph = field(repr=False)
    residual: Float[Tensor, "edge"]
    mlp: Float[Tensor, "edge"]
    heads: Float[Tensor, "edge layer head"]
    multi_head: Float[Tensor, "edge"]
    edge: Float[Tensor, "edge"] = field(repr=False)
    one_hop: Float[Tensor, "edge"] = field(repr=False)
    _model: Any = field(default=None, repr=False, compare=False)

    @property
    def total(self) -> Float[Tensor, "edge"]:
        return self.residual + self.mlp + self.heads.sum((1, 2)) + self.multi_head

    def errors(self) -> Float[Tensor, "edge"]:
        """|Σ parts − edge| and |Σ heads − one-hop sweep| per edge, relative to Σ |parts|."""
        w = self.graph.edge_weight.to(self.residual.dtype)
        scale = (
            self.residual.abs() + self.mlp.abs() + self.heads.abs().sum((1, 2))
            + self.multi_head.abs() + w.abs()
        ).clamp(min=torch.finfo(w.dtype).tiny)  # fmt: skip
        a = (self.total - w).abs() / scale
        b = (self.heads.sum((1, 2)) - self.one_hop).abs() / scale
        return torch.maximum(a, b)

    def check(self, tolerance: float | None = None) -> float:
        """Raise :class:`~qk_lens.CompletenessError` unless the parts sum to every edge (and the
        heads to the one-hop sweep): 1e-10 in float64, 1e-4 in float32 (relative)."""
        tol = tolerance
        if tol is None:
            tol = 1e-10 if self.residual.dtype == torch.float64 else 1e-4
        err = self.errors()
        worst = float(err.max()) if len(err) else 0.0
        if not worst <= tol:  # NaN fails
            e = int(err.argmax())
            raise CompletenessError(
                f"edge {e}: parts sum to {float(self.total[e]):.9g}, the edge is "
                f"{float(self.graph.edge_weight[e]):.9g} (relative error {worst:.3g} > {tol:g})"
            )
        return worst

    def frame(self, min_abs: float = 0.0) -> pd.DataFrame:
        """One row per (edge, layer, head) with |loading| > ``min_abs``, plus the edge's
        residual, mlp and multi_head parts."""
        e, lyr, h = torch.nonzero(self.heads.abs() > min_abs, as_tuple=True)
        ed = self.graph.edges
        out = ed.iloc[e.numpy()].reset_index(drop=True)
        out.insert(0, "edge", e.numpy())
        out["layer"] = lyr.numpy()
        out["head"] = h.numpy()
        out["loading"] = self.heads[e, lyr, h].double().numpy()
        out["share"] = out["loading"] / out["weight"].where(out["weight"] != 0)
        return out

    def top_heads(self, edge: Any, top_k: int = 3) -> pd.DataFrame:
        """The (layer, head) pairs carrying most of one edge, by |loading|."""
        e = self.graph.edge_index(edge)
        flat = self.heads[e].reshape(-1)
        H = self.heads.shape[2]
        idx = flat.abs().argsort(descending=True)[:top_k].tolist()
        w = float(self.graph.edge_weight[e])
        return pd.DataFrame(
            {
                "layer": [i // H for i in idx],
                "head": [i % H for i in idx],
                "loading": [float(flat[i]) for i in idx],
                "share": [float(flat[i]) / w if w else np.nan for i in idx],
            }
        )

    def qk_attribution(
        self, edge: Any, layer: int | None = None, head: int | None = None, model: Any = None
    ) -> QKAttribution:
        """Why the head fetched it: the QK attribution (transcoder basis) of the (layer, head)
        with the largest |loading| on ``edge`` (or the one given), at (q = target position,
        k = source position)."""
        m = model if model is not None else self._model
        if m is None:
            raise ValueError("pass model=: these loadings keep no model")
        e = self.graph.edge_index(edge)
        if layer is None or head is None:
            top = self.top_heads(e, 1).iloc[0]
            layer, head = int(top["layer"]), int(top["head"])
        nd = self.graph.nodes
        q = int(nd["position"].iloc[int(self.graph.edge_target[e])])
        k = int(nd["position"].iloc[int(self.graph.edge_source[e])])
        basis = self.graph.transcoders if self.graph.transcoders is not None else "transcoders"
        return qk_attribution(m, self.graph.tokens, layer, head, q, k, basis=basis)

    def view(self, model: Any = None, **kwargs: Any) -> Any:
        """The interactive graph view (:func:`qk_lens.graph.graph_view.graph_view`): nodes, the
        strongest links with their head loadings, and the QK attributions of the heads that
        carried the strongest links across positions; ``.save(path)`` or inline in notebooks."""
        from qk_lens.graph.graph_view import graph_view

        return graph_view(self, model if model is not None else self._model, **kwargs)

    def __repr__(self) -> str:
        return f"TranscoderLoadings({self.graph.n_edges} edges, {self.heads.shape[1]}×{self.heads.shape[2]} heads)"
