"""Transcoder attribution graphs, as circuit-tracer builds them, and their head loadings
(docs/transcoders.md §6–7).

Nodes: every active transcoder feature (a target and a source), each layer's error at each
position and each position's embedding (sources), the logit targets. Edges: the direct effect of
a source's write on a target's pre-activation (or logit) through the frozen replacement model
(:mod:`qk_lens.graph.transcoder_sweep`). Pruning: circuit-tracer's rule on the rows computed.
"""

from __future__ import annotations

from typing import Any

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from qk_lens.capture import prompt_to_tokens
from qk_lens.checks import as_int, check_count, check_fraction
from qk_lens.graph.checkpoints import LogitReadouts, resolve_targets
from qk_lens.graph.nodes import embedding_id, error_id, feature_id, logit_id
from qk_lens.graph.prune import drop_dangling, find_threshold, normalize_rows
from qk_lens.graph.transcoder_result import TranscoderGraph, TranscoderLoadings
from qk_lens.graph.transcoder_sweep import Sources, Sweep
from qk_lens.state import capture_tokens, require_attached, state_of
from qk_lens.transcoders import Transcoders


class TranscoderNodes:
    """All nodes before pruning, in circuit-tracer's order: features, errors (layer-major),
    embeddings, logits; and every source's writes."""

    def __init__(self, sweep: Sweep, specs: list[Any], target_pos: int, str_tokens: list[str],
                 tokens: list[int]) -> None:  # fmt: skip
        sp = sweep.split
        tc = sweep.tc
        n, T = sweep.n_layers, sweep.T
        F = sp.n_features
        self.n_features = F
        self.n_layers = n
        self.T = T
        f_layer, f_pos, f_id = sp.feat_layer.numpy(), sp.feat_pos.numpy(), sp.feat_id.numpy()
        e_layer, e_pos = np.repeat(np.arange(n), T), np.tile(np.arange(T), n)
        k = len(specs)
        self.frame = pd.DataFrame(
            {
                "node_id": [feature_id(a, c, b) for a, b, c in zip(f_layer, f_pos, f_id, strict=True)]
                + [error_id(a, b) for a, b in zip(e_layer, e_pos, strict=True)]
                + [embedding_id(tokens[p], p) for p in range(T)]
                + [logit_id(n, s.token, target_pos, s.token_b) for s in specs],
                "kind": ["feature"] * F + ["error"] * (n * T) + ["embedding"] * T + ["logit"] * k,
                "layer": np.concatenate([f_layer, e_layer, np.full(T, -1), np.full(k, n)]),
                "position": np.concatenate([f_pos, e_pos, np.arange(T), np.full(k, target_pos)]),
                "feature": np.concatenate(
                    [f_id, np.full(n * T, -1), np.array(tokens), [s.token for s in specs]]
                ),
                "feature_b": np.concatenate([np.full(F + n * T + T, -1), [s.token_b for s in specs]]),
                "label": tc.labels_of(f_layer, f_id) + [f"L{a} error" for a in e_layer]
                + ["embedding"] * T + [s.label for s in specs],
                "activation": np.concatenate(
                    [sp.feat_act.double().numpy(), np.full(n * T + T + k, np.nan)]
                ),
                "prob": np.concatenate([np.full(F + n * T + T, np.nan), [s.prob for s in specs]]),
                "weight": np.concatenate([np.zeros(F + n * T + T), [s.weight for s in specs]]),
            }
        )  # fmt: skip
        self.frame["token"] = [str_tokens[p] for p in self.frame["position"]]
        self.n_sources = F + n * T + T
        # writes by the residual they enter
        by_layer: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        feat_idx = torch.arange(F)
        for out in range(n):
            sel = sp.writing_to(out)
            vec = sp.feature_vectors(sel, out)
            err_idx = torch.arange(F + out * T, F + (out + 1) * T)
            by_layer[out] = (
                torch.cat([feat_idx[sel], err_idx]),
                torch.cat([sp.feat_pos[sel], torch.arange(T)]),
                torch.cat([vec, sp.error[out]]),
            )
        by_layer[-1] = (torch.arange(F + n * T, F + n * T + T), torch.arange(T), sweep.resid(0))
        self.sources = Sources(by_layer, F + n * T + T)
        self.sweep = sweep

    def readouts(
        self, nodes: Int[Tensor, "r"], logit_readout: Any
    ) -> tuple[Int[Tensor, "r"], Int[Tensor, "r"], Float[Tensor, "r d"], Float[Tensor, "r"]]:
        """(start layer, position, readout, constant) of target nodes (features or logits)."""
        fr = self.frame
        kinds = fr["kind"].to_numpy()[nodes.numpy()]
        layers = torch.as_tensor(fr["layer"].to_numpy()[nodes.numpy()], dtype=torch.long)
        pos = torch.as_tensor(fr["position"].to_numpy()[nodes.numpy()], dtype=torch.long)
        feats = torch.as_tensor(fr["feature"].to_numpy()[nodes.numpy()], dtype=torch.long)
        d = self.sweep.arch.d_model
        w = torch.zeros(len(nodes), d, dtype=self.sweep.dtype)
        c = torch.zeros(len(nodes), dtype=self.sweep.dtype)
        is_f = torch.as_tensor(kinds == "feature")
        if is_f.any():
            w[is_f], c[is_f] = self.sweep.feature_readouts(layers[is_f], pos[is_f], feats[is_f])
        is_l = ~is_f
        if is_l.any():
            fb = fr["feature_b"].to_numpy()[nodes.numpy()][is_l.numpy()]
            specs = list(zip(feats[is_l].tolist(), fb.tolist(), strict=True))
            tg = logit_readout.logit_targets(specs, int(pos[is_l][0]))
            w[is_l], c[is_l] = tg.readout.to(w.dtype), tg.const.to(c.dtype)
        return layers, pos, w, c

    def values(self, layers: Tensor, pos: Tensor, w: Tensor, c: Tensor) -> Tensor:
        """Each target's readout at the captured point: pre-activation or demeaned logit."""
        out = torch.empty(len(layers), dtype=w.dtype)
        for lyr in layers.unique().tolist():
            m = layers == lyr
            x = self.sweep.resid(lyr) if lyr == self.n_layers else self.sweep.mid(lyr)
            out[m] = (w[m] * x[pos[m]]).sum(-1) + c[m]
        return out


def transcoder_graph(
    model: Any,
    prompt: Any,
    targets: Any = None,
    *,
    transcoders: Transcoders | None = None,
    target_pos: int = -1,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_feature_nodes: int | None = None,
    prune_graph: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> TranscoderGraph:
    """The transcoder attribution graph of ``prompt`` (circuit-tracer's graph, built here).

    ``transcoders``: default the model's (``model.add_transcoders``). Rows are computed for the
    logit targets and the active features: all of them, or, with ``max_feature_nodes``, that many
    chosen by influence on the logits batch by batch (as circuit-tracer does). Pruning keeps the
    nodes holding ``node_threshold`` of the influence, then the edges holding ``edge_threshold``.
    """
    require_attached(model)
    tc = transcoders if transcoders is not None else state_of(model).transcoders
    if tc is None:
        raise ValueError("no transcoders: pass transcoders= or call model.add_transcoders(...)")
    tc.check_model(model)
    tokens = prompt_to_tokens(model, prompt)
    cap = capture_tokens(model, tokens)
    T = cap.n_tokens
    pos = as_int("target_pos", target_pos)
    if not -T <= pos < T:
        raise ValueError(f"target_pos={target_pos} is outside the prompt's {T} tokens")
    pos %= T
    node_threshold = check_fraction("node_threshold", node_threshold)
    edge_threshold = check_fraction("edge_threshold", edge_threshold)
    batch_size = check_count("batch_size", batch_size)
    if max_feature_nodes is not None:
        max_feature_nodes = check_count("max_feature_nodes", max_feature_nodes)
    sweep = Sweep(model, cap, tc)
    logits = LogitReadouts(sweep.arch, sweep.resid(sweep.n_layers), sweep.dtype, "cpu")
    specs = resolve_targets(model, logits, targets, pos, max_n_logits, desired_logit_prob)
    seen = [(s.token, s.token_b) for s in specs]
    if len(set(seen)) != len(seen):
        raise ValueError(f"targets repeat a token or a difference: {seen}")
    str_tokens = cap.str_tokens or [str(t) for t in tokens.tolist()]
    nodes = TranscoderNodes(sweep, specs, pos, str_tokens, tokens.tolist())
    F, S = nodes.n_features, nodes.n_sources
    logit_nodes = torch.arange(S, S + len(specs))
    weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)

    fr_layer = torch.as_tensor(nodes.frame["layer"].to_numpy().copy(), dtype=torch.long)
    fr_pos = torch.as_tensor(nodes.frame["position"].to_numpy().copy(), dtype=torch.long)
    rows: list[Tensor] = []  # computed target rows, as node indices
    blocks: list[Tensor] = []
    values: list[Tensor] = []

    def compute(target_nodes: Tensor, bar: Any) -> None:
        # batches of one layer and nearby positions: each sweep starts at its highest target's
        # layer and spans only the positions up to its last target's
        key = fr_layer[target_nodes] * (T + 1) + fr_pos[target_nodes]
        target_nodes = target_nodes[torch.argsort(key, stable=True)]
        for lo in range(0, len(target_nodes), batch_size):
            chunk = target_nodes[lo : lo + batch_size]
            layers, p, w, c = nodes.readouts(chunk, logits)
            with torch.no_grad():
                out = sweep.backward(layers, p, w, nodes.sources)
            rows.append(chunk)
            blocks.append(out["edges"])
            values.append(nodes.values(layers, p, w, c))
            bar.update(len(chunk))

    # in a causal model nothing at a later position reaches the logits: those features get no row
    causal = all(sweep.block(k).causal for k in range(sweep.n_layers))
    candidates = torch.arange(F)
    if causal:
        candidates = candidates[fr_pos[:F] <= pos]
    n_rows = len(specs) + (
        len(candidates) if max_feature_nodes is None else min(len(candidates), max_feature_nodes)
    )
    with tqdm(total=n_rows, desc="graph rows", disable=not progress) as bar:
        compute(logit_nodes, bar)
        if max_feature_nodes is None or len(candidates) <= max_feature_nodes:
            compute(candidates, bar)
        else:
            done = torch.ones(F, dtype=torch.bool)
            done[candidates] = False  # only candidates are ever picked
            n_done = 0
            while n_done < min(max_feature_nodes, len(candidates)):
                infl = _influence(torch.cat(rows), torch.cat(blocks), logit_nodes, weights, S)
                score = infl[:F].clone()
                score[done] = -1.0
                take = min(batch_size, max_feature_nodes - n_done, int((~done).sum()))
                nxt = torch.argsort(score, descending=True)[:take]
                done[nxt] = True
                n_done += len(nxt)
                compute(nxt, bar)
    row_nodes = torch.cat(rows)
    A = torch.cat(blocks)
    readout = torch.cat(values)
    influence = _influence(row_nodes, A, logit_nodes, weights, S)
    frame = nodes.frame.copy()
    frame["readout"] = np.nan
    frame.loc[row_nodes.numpy(), "readout"] = readout.double().numpy()
    frame["influence"] = influence.numpy()
    s_sorted, order = torch.sort(influence, descending=True)
    cum = torch.zeros_like(influence)
    cum[order] = torch.cumsum(s_sorted, 0) / s_sorted.sum().clamp(min=1e-300)
    frame["cumulative_influence"] = cum.numpy()

    keep, er, ec = _prune(
        A, row_nodes, logit_nodes, weights, frame["kind"].to_numpy(), S,
        node_threshold if prune_graph else 0.0, edge_threshold if prune_graph else 0.0,
        prune_graph,
    )  # fmt: skip
    kept = torch.nonzero(keep)[:, 0]
    new_index = torch.full((len(keep),), -1, dtype=torch.long)
    new_index[kept] = torch.arange(len(kept))
    row_of = torch.full((len(keep),), -1, dtype=torch.long)
    row_of[row_nodes] = torch.arange(len(row_nodes))
    weight = A[row_of[er], ec]
    meta = {
        "model_name": getattr(model.cfg, "model_name", None),
        "n_layers": sweep.n_layers,
        "n_heads": int(model.cfg.n_heads),
        "d_model": int(model.cfg.d_model),
        "d_vocab": int(model.cfg.d_vocab),
        "transcoders": tc.name,
        "transcoder_digest": tc.digest(),
        "scan": tc.scan or tc.name,
        "cross_layer": tc.cross_layer,
        "prompt": prompt if isinstance(prompt, str) else None,
        "str_tokens": str_tokens,
        "target_pos": pos,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "max_feature_nodes": max_feature_nodes,
        "n_nodes_full": len(frame),
        "n_rows": len(row_nodes),
        "dtype": str(sweep.dtype),
    }
    return TranscoderGraph(
        nodes=frame.iloc[kept.numpy()].reset_index(drop=True),
        edge_source=new_index[ec],
        edge_target=new_index[er],
        edge_weight=weight,
        tokens=tokens.clone(),
        metadata=meta,
        transcoders=tc,
    )


def _influence(
    row_nodes: Tensor, A: Tensor, logit_nodes: Tensor, weights: Tensor, n_sources: int
) -> Float[Tensor, "n_nodes"]:
    """circuit-tracer's node influence I = w (Â + Â² + …) on the computed rows (Â: |A| with
    rows normalized); nodes without a row pass nothing on."""
    n_nodes = n_sources + len(logit_nodes)
    An = normalize_rows(A.double())
    row_of = torch.full((n_nodes,), -1, dtype=torch.long)
    row_of[row_nodes] = torch.arange(len(row_nodes))
    cur = torch.zeros(len(row_nodes), dtype=torch.float64)
    cur[row_of[logit_nodes]] = weights
    total = torch.zeros(n_nodes, dtype=torch.float64)
    for _ in range(4 * n_nodes + 10):  # a DAG: ends after at most its depth
        step = torch.zeros(n_nodes, dtype=torch.float64)
        step[:n_sources] = cur @ An
        if not step.any():
            break
        total += step
        has_row = row_of >= 0
        cur = torch.zeros(len(row_nodes), dtype=torch.float64)
        cur[row_of[has_row]] = step[has_row]
    return total


def _prune(
    A: Tensor, row_nodes: Tensor, logit_nodes: Tensor, weights: Tensor, kinds: np.ndarray,
    n_sources: int, node_threshold: float, edge_threshold: float, prune: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(node mask, kept edges' target and source node indices): circuit-tracer's rules."""
    n_nodes = n_sources + len(logit_nodes)
    kind = np.asarray(kinds)
    always = torch.as_tensor((kind == "embedding") | (kind == "logit"))
    is_feature = torch.as_tensor(kind == "feature")
    if not prune:
        keep = torch.ones(n_nodes, dtype=torch.bool)
        r, c = torch.nonzero(A != 0, as_tuple=True)
        return keep, row_nodes[r], c
    infl = _influence(row_nodes, A, logit_nodes, weights, n_sources)
    keep = (infl >= find_threshold(infl, node_threshold)) | always
    sub = A.clone()
    sub[~keep[row_nodes]] = 0
    sub[:, ~keep[:n_sources]] = 0
    pruned_infl = _influence(row_nodes, sub, logit_nodes, weights, n_sources)
    w = torch.zeros(n_nodes, dtype=torch.float64)
    w[logit_nodes] = weights
    score = normalize_rows(sub.double()) * (pruned_infl[row_nodes] + w[row_nodes])[:, None]
    r, c = torch.nonzero(score > 0, as_tuple=True)
    vals = score[r, c]
    ok = vals >= find_threshold(vals, edge_threshold)
    er, ec = row_nodes[r[ok]], c[ok]
    keep, [(er, ec)] = drop_dangling(keep, [(er, ec)], ~always, is_feature)
    return keep, er, ec


def transcoder_loadings(
    model: Any, graph: TranscoderGraph, batch_size: int = 32, transcoders: Transcoders | None = None
) -> TranscoderLoadings:
    """Every edge of ``graph`` split by the attention heads its paths cross (docs/transcoders.md §7):
    ``residual`` (same position, no head, no skip), ``mlp`` (no head, through skip connections),
    ``heads[edge, layer, head]`` (paths whose only head hop is that head) and ``multi_head``
    (paths with two or more head hops), each computed directly, for all edges in batched sweeps."""
    require_attached(model)
    tc = transcoders or graph.transcoders or state_of(model).transcoders
    if tc is None:
        raise ValueError("no transcoders: pass transcoders= or call model.add_transcoders(...)")
    graph.check_model(model)
    graph.check_transcoders(tc)
    cap = capture_tokens(model, graph.tokens)
    sweep = Sweep(model, cap, tc)
    graph.check_activations(sweep.split)
    logits = LogitReadouts(sweep.arch, sweep.resid(sweep.n_layers), sweep.dtype, "cpu")
    from qk_lens.graph.checkpoints import LogitSpec  # the logit rows' specs

    nd = graph.nodes
    lg = nd[nd["kind"] == "logit"]
    specs = [
        LogitSpec(int(r.feature), int(r.feature_b), str(r.label), float(r.prob), float(r.weight))
        for r in lg.itertuples()
    ]
    full = TranscoderNodes(
        sweep, specs, int(graph.metadata["target_pos"]), graph.str_tokens, graph.tokens.tolist()
    )
    index = {nid: i for i, nid in enumerate(full.frame["node_id"])}
    g_ids = nd["node_id"].to_numpy()
    src_full = torch.tensor([index[g_ids[i]] for i in graph.edge_source.tolist()], dtype=torch.long)
    tgt_full = torch.tensor([index[g_ids[i]] for i in graph.edge_target.tolist()], dtype=torch.long)
    n, H, E = sweep.n_layers, int(model.cfg.n_heads), graph.n_edges
    dt = sweep.dtype
    residual = torch.zeros(E, dtype=dt)
    mlp = torch.zeros(E, dtype=dt)
    heads = torch.zeros(E, n, H, dtype=dt)
    multi = torch.zeros(E, dtype=dt)
    one_hop = torch.zeros(E, dtype=dt)
    edge = torch.zeros(E, dtype=dt)
    f_pos = full.frame["position"].to_numpy()
    used = torch.unique(src_full)
    fwd = _forward0(sweep, full, used)  # [n_used, n + 1, d]: 0-hop states at each x_l
    col = torch.full((full.n_sources,), -1, dtype=torch.long)
    col[used] = torch.arange(len(used))
    targets = torch.unique(tgt_full)
    # batches of one layer and nearby positions, as the graph's rows
    key = torch.as_tensor(full.frame["layer"].to_numpy()[targets.numpy()] * (sweep.T + 1)
                          + f_pos[targets.numpy()])  # fmt: skip
    targets = targets[torch.argsort(key, stable=True)]
    slot = torch.full((full.n_sources + len(full.frame),), -1, dtype=torch.long)
    for lo in range(0, len(targets), batch_size):
        chunk = targets[lo : lo + batch_size]
        layers, p, w, _ = full.readouts(chunk, logits)
        with torch.no_grad():
            out = sweep.backward(layers, p, w, full.sources, hops=True)
        slot[chunk] = torch.arange(len(chunk))
        sel = torch.nonzero(torch.isin(tgt_full, chunk))[:, 0]
        r, c = slot[tgt_full[sel]], src_full[sel]
        edge[sel] = out["edges"][r, c]
        zero_hop = out["hop0"][r, c]
        one_hop[sel] = out["hop1"][r, c]
        multi[sel] = out["hop2"][r, c]
        same = torch.as_tensor(f_pos[c.numpy()]) == p[r]
        resid_part = _residual(full, w[r], c, layers[r], same)
        residual[sel] = resid_part
        mlp[sel] = zero_hop - resid_part
        # heads: A_h[p_t, p_s]/σ · ⟨z_{t,l,h}, forward-0(s) at x_l⟩, one product per layer for
        # the chunk's targets × the sources their edges come from
        ps = torch.as_tensor(f_pos[c.numpy()], dtype=torch.long)
        srcs = torch.unique(c)
        at = torch.full((full.n_sources,), -1, dtype=torch.long)
        at[srcs] = torch.arange(len(srcs))
        for lyr in range(n):
            zz = out["z"][:, lyr]  # [chunk, head, d]
            if not zz.any():
                continue
            prod = einops.einsum(zz, fwd[col[srcs], lyr], "t head d, s d -> t s head")
            alpha = sweep.alpha(lyr)[p[r], :, ps]  # [m, head]
            heads[sel, lyr] = prod[r, at[c]] * alpha
    return TranscoderLoadings(graph, residual, mlp, heads, multi, edge, one_hop, _model=model)


def _residual(
    full: TranscoderNodes, w: Tensor, cols: Tensor, start: Tensor, same: Tensor
) -> Float[Tensor, "m"]:
    """⟨w_t, Σ writes of s before the target's layer⟩ at the same position: the identity path."""
    out = torch.zeros(len(cols), dtype=w.dtype)
    for k, (idx, _, vec) in full.sources.by_layer.items():
        lookup = torch.full((full.n_sources,), -1, dtype=torch.long)
        lookup[idx] = torch.arange(len(idx))
        j = lookup[cols]
        ok = same & (j >= 0) & (k < start)
        if ok.any():
            out[ok] += (w[ok] * vec[j[ok]]).sum(-1)
    return out


def _forward0(
    sweep: Sweep, full: TranscoderNodes, used: Int[Tensor, "m"]
) -> Float[Tensor, "m layer d_model"]:
    """The sources ``used``' states at x_l (l = 0..n) along 0-hop paths: each one's writes before
    l, carried up through the skip connections at its own position."""
    n, d = sweep.n_layers, sweep.arch.d_model
    row = torch.full((full.n_sources,), -1, dtype=torch.long)
    row[used] = torch.arange(len(used))
    pos_of = torch.tensor(full.frame["position"].to_numpy()[used.numpy()], dtype=torch.long)
    state = torch.zeros(len(used), n + 1, d, dtype=sweep.dtype)
    cur = torch.zeros(len(used), d, dtype=sweep.dtype)

    def add(k: int) -> None:
        idx, _, vec = full.sources.by_layer[k]
        j = row[idx]
        ok = j >= 0
        cur.index_add_(0, j[ok], vec[ok])

    add(-1)
    state[:, 0] = cur
    for k in range(n):
        # x_k → x_{k+1}: the skip of block k reads mid_k = x_k along a 0-hop path
        if sweep.tc.has_skip:
            cur += sweep.split.skip_linear(k, cur, pos_of)
        add(k)
        state[:, k + 1] = cur
    return state
