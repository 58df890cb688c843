"""The data of the interactive graph view of a transcoder graph: its nodes, its strongest links
with their head loadings, and the QK attributions of the heads that carried the strongest
links across positions. Computed here; :mod:`qk_lens.views.graph_view` lays it out."""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qk_lens.checks import check_count
from qk_lens.display import render
from qk_lens.files import write_text

if TYPE_CHECKING:
    from qk_lens.graph.transcoder_result import TranscoderLoadings


def _f(x: float) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else float(f"{x:.6g}")


@dataclass
class GraphView:
    """A transcoder graph as one self-contained interactive page (see :meth:`payload`)."""

    data: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        return self.data

    def html(self) -> str:
        return render("graph_view", self.data)

    def save(self, path: str | PathLike[str]) -> Path:
        return write_text(path, self.html())

    def _repr_html_(self) -> str:
        return render("graph_view", self.data, fragment=True)

    def __repr__(self) -> str:
        d = self.data
        return (
            f"GraphView({len(d['nodes'])} nodes, {len(d['links'])} of {d['n_edges']} links shown, "
            f"{len(d['qk'])} QK attributions)"
        )


def graph_view(
    loadings: TranscoderLoadings,
    model: Any = None,
    max_links: int = 2000,
    qk_edges: int = 12,
    qk_top_k: int = 8,
    heads_per_link: int = 5,
    title: str | None = None,
) -> GraphView:
    """The view of ``loadings.graph``: every node, the ``max_links`` strongest links (by
    |weight|) each with its residual / mlp / multi-head parts and its ``heads_per_link`` largest
    head loadings, and for the ``qk_edges`` strongest links across positions the QK attribution
    (top ``qk_top_k`` terms) of the head with the largest |loading| at (target, source)."""
    max_links = check_count("max_links", max_links)
    g = loadings.graph
    nd = g.nodes
    w = g.edge_weight.double()
    order = torch.argsort(w.abs(), descending=True)[:max_links]
    src_pos = nd["position"].to_numpy()[g.edge_source.numpy()]
    tgt_pos = nd["position"].to_numpy()[g.edge_target.numpy()]
    crossing = [int(e) for e in order.tolist() if src_pos[e] != tgt_pos[e]][:qk_edges]
    qk: list[list[Any]] = []
    qk_of: dict[int, int] = {}
    for e in crossing:
        attr = loadings.qk_attribution(e, model=model)
        top = attr.top(qk_top_k)
        terms = [
            [str(r.q_label), str(r.k_label), _f(r.term), _f(r.term / attr.score) if attr.score else None]
            for r in top.itertuples()
        ]  # fmt: skip
        qk_of[e] = len(qk)
        qk.append(
            [attr.layer, attr.head, attr.q_pos, attr.k_pos, _f(attr.score), _f(attr.prob), terms]
        )
    H = loadings.heads.shape[2]
    links = []
    for e in order.tolist():
        flat = loadings.heads[e].reshape(-1).double()
        top_h = torch.argsort(flat.abs(), descending=True)[:heads_per_link].tolist()
        heads = [[i // H, i % H, _f(flat[i])] for i in top_h if flat[i] != 0]
        links.append([
            int(g.edge_source[e]), int(g.edge_target[e]), _f(w[e]), _f(loadings.residual[e]),
            _f(loadings.mlp[e]), _f(loadings.multi_head[e]), heads, qk_of.get(e, -1),
        ])  # fmt: skip
    nodes = [
        [str(r.node_id), str(r.kind), int(r.layer), int(r.position), str(r.label),
         _f(r.activation), _f(r.influence)]
        for r in nd.itertuples()
    ]  # fmt: skip
    md = g.metadata
    return GraphView({
        "title": title or f"Transcoder graph ({md.get('transcoders')})",
        "tokens": g.str_tokens, "n_layers": int(md["n_layers"]), "n_edges": g.n_edges,
        "nodes": nodes, "links": links, "qk": qk,
    })  # fmt: skip
