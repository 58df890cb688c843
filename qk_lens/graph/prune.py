"""Pruning as circuit-tracer does it: node influence on the logits, then edge influence, then
nodes left without edges, on the graph's per-layer blocks (no dense n_nodes² matrix)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor


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

    keep, kept = drop_dangling(keep, [edges[tl] for tl in sorted(edges)], ~always_keep, is_feature)
    return keep, kept, influence


def drop_dangling(
    keep: Bool[Tensor, "n_nodes"],
    edges: list[tuple[Tensor, Tensor]],
    needs_out: Bool[Tensor, "n_nodes"],
    is_feature: Bool[Tensor, "n_nodes"],
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """circuit-tracer's last pruning step: repeatedly drop the nodes in ``needs_out`` without an
    outgoing kept edge and the features without an incoming one (``edges``: (target, source)
    node-index pairs), until nothing changes. Returns the node mask and the edges kept."""
    while True:
        edges = [(r[ok], c[ok]) for r, c in edges for ok in [keep[r] & keep[c]]]
        has_out = torch.zeros_like(keep)
        has_in = torch.zeros_like(keep)
        for r, c in edges:
            has_out[c] = True
            has_in[r] = True
        new_keep = keep & ~(needs_out & ~has_out) & ~(is_feature & ~has_in)
        if torch.equal(new_keep, keep):
            return keep, edges
        keep = new_keep
