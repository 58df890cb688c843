"""Checkpointed attribution graphs: every edge crosses exactly one attention layer (docs/graphs.md).

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

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from qk_lens.checks import as_int, check_count, check_fraction
from qk_lens.graph.checkpoints import Checkpoints, LogitSpec, resolve_targets
from qk_lens.graph.nodes import NODE_COLUMNS, NodeSet, logit_id
from qk_lens.graph.prune import Layout, propagate_influence, prune
from qk_lens.graph.result import Graph, model_fingerprint

__all__ = ["attribution_graph"]


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
    pos = as_int("target_pos", target_pos)
    if not -T <= pos < T:
        raise ValueError(f"target_pos={target_pos} is outside the prompt's {T} tokens")
    pos %= T
    node_threshold = check_fraction("node_threshold", node_threshold)
    edge_threshold = check_fraction("edge_threshold", edge_threshold)
    if max_feature_nodes is not None and (
        isinstance(max_feature_nodes, bool)
        or not isinstance(max_feature_nodes, int)
        or max_feature_nodes < 0
    ):
        raise ValueError(
            f"max_feature_nodes must be a non-negative int or None, got {max_feature_nodes!r}"
        )
    batch_size = check_count("batch_size", batch_size)
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
