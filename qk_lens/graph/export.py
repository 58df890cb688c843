"""Export a graph to the JSON the circuit-tracer / Neuronpedia attribution-graph frontend reads.

The file has the frontend's four top-level keys — ``metadata`` (slug, scan, prompt_tokens, prompt,
node_threshold, schema_version, info, generation_settings, pruning_settings and, when every
dictionary has a Neuronpedia id like ``gpt2-small/8-res-jb``, ``feature_details.
neuronpedia_source_set``), ``qParams``, ``nodes`` (node_id, feature, layer, ctx_idx,
feature_type, jsNodeId, clerp, influence, activation, token_prob, is_target_logit) and ``links``
(source, target, weight) — with node ids as circuit-tracer writes them: ``{layer}_{feature}_{pos}``
for features, ``{layer}_-1_{pos}`` for errors, ``E_{token}_{pos}`` for embeddings and
``{n_layers+1}_{token}_{pos}`` for logits (``{a}-{b}`` for a logit difference). Feature nodes use
the frontend's ``"cross layer transcoder"`` type (here: a residual SAE feature of layer ``layer``),
errors ``"mlp reconstruction error"`` (here: the residual SAE's error). ``layer`` is the
dictionary's layer, or the numeric prefix of its Neuronpedia id when it has one (an SAE on
``blocks.12.hook_resid_post`` serves layer 13 but is ``12-…`` on Neuronpedia), so that the
frontend fetches the right feature pages.

Extra fields (the frontend ignores keys it does not know):

* ``metadata.qk_lens``: ``readout``, ``through_mlp``, ``bias_nodes``, ``n_heads`` and this list.
* every node: ``qk_lens_kind`` (feature, error, bias, error+bias, embedding, logit), ``label``
  (the dictionary's label), ``readout`` and ``offset`` for targets (readout = Σ incoming edges +
  offset exactly for attention-only models, before pruning).
* ``bias_nodes="merge"`` (default): the dictionary bias at (layer, pos) is folded into that
  position's error node (both are the structural, non-feature part of the residual; links and
  loadings add), so the file uses only the frontend's node types. ``"separate"`` keeps them as
  ``feature_type: "dictionary bias"`` nodes with id ``{layer}_-2_{pos}``; ``"drop"`` omits them.
* every link crossing an attention layer: ``head_loadings`` = ``{"layer": L, "residual": r,
  "mlp": m, "heads": [h_0, …, h_{H−1}]}`` with ``r + m + Σ heads = weight``
  (:mod:`qk_lens.loadings`; ``through_mlp`` says whether heads include their path through the MLP).
* target nodes (the most influential ``qk_max_targets`` features/logits): ``qk_tracing_results``
  in the shape Neuronpedia's attention-tracing view reads — ``pair_wise_contributors``
  ``[[q_node_id, k_node_id, term], …]``, ``top_q_marginal_contributors`` and
  ``top_k_marginal_contributors`` ``[[node_id, value], …]`` — for the incoming (edge, head) with
  the largest |loading|, plus ``layer``, ``head``, ``q_pos``, ``k_pos``, ``source``, ``loading``,
  ``score``, ``prob`` and ``labels`` (id → label for the QK parts, which need not be graph nodes:
  the query/key parts live on layer L's dictionary at the target's and the source's position);
  and ``qk_lens_heads``: that record for each of the ``qk_heads_per_target`` strongest pairs.
  QK part ids: dictionary features and errors as above, ``{L}_-2_{pos}`` for the dictionary
  bias (always apart from the error here), ``{L}_qkbias_{pos}`` for the
  attention bias (ln1.b·W + b_Q/b_K), ``E_{token}_{pos}`` / ``P_{pos}`` for upstream embeddings,
  ``L{l}H{h}@{pos}`` for upstream heads, ``M{l}@{pos}`` for MLPs.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qk_lens.files import write_text
from qk_lens.graph.loadings import head_loadings
from qk_lens.graph.nodes import bias_id, embedding_id, error_id, feature_id
from qk_lens.graph.result import Graph

__all__ = ["save_neuronpedia", "to_neuronpedia"]

BIAS_MODES = ("merge", "separate", "drop")


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def to_neuronpedia(
    graph: Graph,
    model: Any = None,
    loadings: Any = None,
    *,
    slug: str = "qk-lens-graph",
    scan: str | None = None,
    through_mlp: bool = True,
    bias_nodes: str = "merge",
    qk_max_targets: int = 20,
    qk_heads_per_target: int = 2,
    qk_top_k: int = 10,
) -> dict[str, Any]:
    """The graph as a Neuronpedia / circuit-tracer graph dict (see the module docstring).

    With ``model`` (the graph's model), head loadings are computed (unless ``loadings`` is given)
    and QK tracing results attached; without it, the plain graph is exported.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a qk_lens Graph, got {type(graph).__name__}")
    if bias_nodes not in BIAS_MODES:
        raise ValueError(f"bias_nodes must be one of {BIAS_MODES}, got {bias_nodes!r}")
    for name, v in (
        ("qk_max_targets", qk_max_targets),
        ("qk_heads_per_target", qk_heads_per_target),
        ("qk_top_k", qk_top_k),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if loadings is None and model is not None:
        loadings = head_loadings(model, graph, through_mlp=through_mlp)
    if loadings is not None and loadings.graph is not graph:
        raise ValueError("loadings were computed for another graph")

    meta = graph.metadata
    nodes = graph.nodes
    n_layers = int(meta.get("model", {}).get("n_layers", nodes["layer"].max()))
    layer_map = _layer_map(meta.get("dictionaries", {}))
    export_id = _export_ids(nodes, bias_nodes, layer_map)
    out_nodes = _nodes(graph, export_id, n_layers, bias_nodes, layer_map)
    links = _links(graph, loadings, export_id)
    if loadings is not None and model is not None and qk_max_targets and qk_heads_per_target:
        _attach_qk(
            graph, model, loadings, out_nodes, export_id, layer_map,
            qk_max_targets, qk_heads_per_target, qk_top_k,
        )  # fmt: skip

    metadata: dict[str, Any] = {
        "slug": slug,
        "scan": scan or meta.get("model_name", "unknown"),
        "prompt_tokens": list(meta.get("str_tokens", [])),
        "prompt": meta.get("prompt") or "".join(meta.get("str_tokens", [])),
        "node_threshold": meta.get("node_threshold"),
        "schema_version": 1,
        "info": {
            "description": "Checkpointed attribution graph (residual SAEs at every layer) with "
            "head loadings and QK attributions, made by qk_lens.",
            "generator": {"name": "qk_lens", "version": _version()},
        },
        "generation_settings": {
            "max_n_logits": meta.get("max_n_logits"),
            "desired_logit_prob": meta.get("desired_logit_prob"),
            "max_feature_nodes": meta.get("max_feature_nodes"),
        },
        "pruning_settings": {
            "node_threshold": meta.get("node_threshold"),
            "edge_threshold": meta.get("edge_threshold"),
        },
        "qk_lens": {
            "readout": meta.get("readout"),
            "through_mlp": None if loadings is None else bool(loadings.through_mlp),
            "bias_nodes": bias_nodes,
            "n_heads": None if loadings is None else loadings.n_heads,
            "extra_fields": {
                "nodes": [
                    "qk_lens_kind",
                    "label",
                    "readout",
                    "offset",
                    "qk_tracing_results",
                    "qk_lens_heads",
                ],
                "links": ["head_loadings"],
            },
        },  # fmt: skip
    }
    source_set = _source_set(meta.get("dictionaries", {}))
    if source_set:
        metadata["feature_details"] = {"neuronpedia_source_set": source_set}
    return {
        "metadata": metadata,
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": out_nodes,
        "links": links,
    }  # fmt: skip


def save_neuronpedia(
    graph: Graph, path: str | PathLike[str], model: Any = None, **kwargs: Any
) -> Path:
    """Write :func:`to_neuronpedia`'s dict as JSON to ``path``; returns the path."""
    path = Path(path)
    data = to_neuronpedia(graph, model, **kwargs)
    write_text(path, json.dumps(data, ensure_ascii=False, allow_nan=False))
    return path


# ----------------------------------------------------------------------------- nodes
def _layer_map(dictionaries: dict[str, Any]) -> dict[int, int]:
    """Dictionary layer → the layer Neuronpedia files its features under.

    An SAE on ``blocks.12.hook_resid_post`` serves layer 13 here but is ``12-…`` on Neuronpedia;
    with a Neuronpedia id, its numeric prefix is used so the frontend fetches the right features.
    """
    out = {}
    for key, info in dictionaries.items():
        npid = info.get("neuronpedia_id") or ""
        m = re.match(r"^[^/]+/(\d+)-", npid)
        out[int(key)] = int(m.group(1)) if m else int(key)
    return out


def _export_ids(nodes: pd.DataFrame, bias_nodes: str, layer_map: dict[int, int]) -> np.ndarray:
    """Each node's id in the file (None: dropped); merged biases take their error node's id."""
    ids = nodes["node_id"].to_numpy().astype(object).copy()
    kind = nodes["kind"].to_numpy()
    lay, pos, feat = (nodes[c].to_numpy() for c in ("layer", "position", "feature"))
    for i in np.nonzero(np.isin(kind, ("feature", "error", "bias")))[0]:
        L, p = layer_map.get(int(lay[i]), int(lay[i])), int(pos[i])
        if kind[i] == "feature":
            ids[i] = feature_id(L, int(feat[i]), p)
        elif kind[i] == "error" or bias_nodes == "merge":
            ids[i] = error_id(L, p)
        else:
            ids[i] = None if bias_nodes == "drop" else bias_id(L, p)
    return ids


def _nodes(
    graph: Graph,
    export_id: np.ndarray,
    n_layers: int,
    bias_nodes: str,
    layer_map: dict[int, int],
) -> list[dict]:
    nodes = graph.nodes
    toks = graph.metadata.get("str_tokens", [])
    out: dict[str, dict] = {}
    top_logit = None
    logits = nodes[nodes["kind"] == "logit"]
    if len(logits):
        top_logit = logits["prob"].astype(float).idxmax()
    for i, row in enumerate(nodes.itertuples(index=False)):
        nid = export_id[i]
        if nid is None:
            continue
        kind, pos = row.kind, int(row.position)
        layer = layer_map.get(int(row.layer), int(row.layer))
        tok = toks[pos] if pos < len(toks) else ""
        base = {
            "node_id": nid,
            "ctx_idx": pos,
            "influence": _num(row.cumulative_influence),
            "activation": _num(row.activation),
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "qk_lens_kind": kind,
            "label": row.label,
        }
        if kind == "feature":
            base.update(
                feature=int(row.feature), layer=str(layer), feature_type="cross layer transcoder",
                jsNodeId=f"{layer}_{int(row.feature)}-0", clerp=row.label,
            )  # fmt: skip
        elif kind in ("error", "bias") and (kind == "error" or bias_nodes == "merge"):
            if nid in out:  # the error and the bias of one (layer, pos), merged
                prev = out[nid]
                prev["qk_lens_kind"] = "error+bias"
                prev["influence"] = _max(prev["influence"], base["influence"])
                continue
            base.update(
                feature=-1, layer=str(layer), feature_type="mlp reconstruction error",
                jsNodeId=f"{layer}_-1-{pos}", clerp=f'Err: L{layer} dictionary "{tok}"',
            )  # fmt: skip
        elif kind == "bias":
            base.update(
                feature=-2, layer=str(layer), feature_type="dictionary bias",
                jsNodeId=f"{layer}_-2-{pos}", clerp=f"Bias: L{layer} dictionary",
            )  # fmt: skip
        elif kind == "embedding":
            base.update(
                feature=pos, layer="E", feature_type="embedding",
                jsNodeId=f"E_{int(row.feature)}-{pos}", clerp=f'Emb: "{tok}"',
            )  # fmt: skip
        else:  # logit
            prob = float(row.prob)
            base.update(
                feature=int(row.feature), layer=str(n_layers + 1), feature_type="logit",
                jsNodeId=f"L_{int(row.feature)}-{pos}", clerp=f"{row.label} (p={prob:.3f})",
                token_prob=prob, is_target_logit=bool(nodes.index[i] == top_logit),
            )  # fmt: skip
        if not math.isnan(float(row.readout)):
            base["readout"] = float(row.readout)
            base["offset"] = float(row.offset)
        out[nid] = base
    return list(out.values())


def _max(a: float | None, b: float | None) -> float | None:
    vals = [v for v in (a, b) if v is not None]
    return max(vals) if vals else None


# ----------------------------------------------------------------------------- links
def _links(graph: Graph, loadings: Any, export_id: np.ndarray) -> list[dict]:
    src = export_id[graph.edge_source.numpy()]
    tgt = export_id[graph.edge_target.numpy()]
    weight = graph.edge_weight.double().numpy()
    layer = graph.edge_layers().numpy()
    parts = None
    if loadings is not None:
        parts = np.concatenate(
            [
                loadings.residual.double().numpy()[:, None],
                loadings.mlp.double().numpy()[:, None],
                loadings.heads.double().numpy(),
            ],
            axis=1,
        )
    merged: dict[tuple[str, str], int] = {}
    out: list[dict] = []
    for e in range(len(weight)):
        if src[e] is None or tgt[e] is None:
            continue
        key = (src[e], tgt[e])
        if key in merged:  # error + bias of the same position into the same target: they add
            link = out[merged[key]]
            link["weight"] += float(weight[e])
            if parts is not None and "head_loadings" in link:
                hl = link["head_loadings"]
                hl["residual"] += float(parts[e, 0])
                hl["mlp"] += float(parts[e, 1])
                hl["heads"] = [a + float(b) for a, b in zip(hl["heads"], parts[e, 2:], strict=True)]
            continue
        link: dict[str, Any] = {"source": src[e], "target": tgt[e], "weight": float(weight[e])}
        if parts is not None and layer[e] >= 0:
            link["head_loadings"] = {
                "layer": int(layer[e]),
                "residual": float(parts[e, 0]),
                "mlp": float(parts[e, 1]),
                "heads": [float(v) for v in parts[e, 2:]],
            }
        merged[key] = len(out)
        out.append(link)
    return out


# ----------------------------------------------------------------------------- QK tracing
def _part_id(kind: str, layer: int, head: int, pos: int, feature: int, tokens: list[int],
             layer_map: dict[int, int]) -> str:  # fmt: skip
    mapped = layer_map.get(layer, layer)
    if kind == "feature":
        return feature_id(mapped, feature, pos)
    if kind == "error":
        return error_id(mapped, pos)
    if kind == "dictionary bias":  # kept apart from the error even when nodes are merged
        return bias_id(mapped, pos)
    if kind == "attention bias":
        return f"{layer}_qkbias_{pos}"
    if kind == "token embedding":
        return embedding_id(tokens[pos], pos)
    if kind == "positional embedding":
        return f"P_{pos}"
    if kind == "head":
        return f"L{layer}H{head}@{pos}"
    if kind == "mlp":
        return f"M{layer}@{pos}"
    return f"{kind.replace(' ', '_')}@{pos}"


def qk_record(
    attr: Any, part_id: Callable[[str, int, int, int, int], str], top_k: int
) -> dict[str, Any]:
    """A QK attribution as Neuronpedia's ``qk_tracing_results``: the top pair-wise terms and the
    top query-side / key-side marginals, each part named by ``part_id(kind, layer, head, pos,
    feature)``; plus the score, the pattern and the parts' labels."""

    def ids(meta: dict) -> list[str]:
        return [
            part_id(str(k), int(lay), int(h), int(p), int(f))
            for k, lay, h, p, f in zip(
                meta["kind"], meta["layer"], meta["head"], meta["position"], meta["feature"],
                strict=True,
            )
        ]  # fmt: skip

    q_ids, k_ids = ids(attr.query_meta), ids(attr.key_meta)
    labels = {i: str(lab) for i, lab in zip(q_ids, attr.query_meta["label"], strict=True)}
    labels.update({i: str(lab) for i, lab in zip(k_ids, attr.key_meta["label"], strict=True)})
    terms = attr.terms.double()
    flat = terms.reshape(-1)
    k = min(top_k, flat.numel())
    idx = flat.abs().topk(k).indices.tolist()
    n_k = terms.shape[1]
    pairs = [[q_ids[i // n_k], k_ids[i % n_k], float(flat[i])] for i in idx]
    q_marg, k_marg = terms.sum(1), terms.sum(0)
    q_top = q_marg.abs().topk(min(top_k, len(q_marg))).indices.tolist()
    k_top = k_marg.abs().topk(min(top_k, len(k_marg))).indices.tolist()
    used = {p for pair in pairs for p in pair[:2]} | {q_ids[i] for i in q_top}
    used |= {k_ids[i] for i in k_top}
    return {
        "pair_wise_contributors": pairs,
        "top_q_marginal_contributors": [[q_ids[i], float(q_marg[i])] for i in q_top],
        "top_k_marginal_contributors": [[k_ids[i], float(k_marg[i])] for i in k_top],
        "score": float(attr.score),
        "prob": float(attr.prob),
        "labels": {i: labels[i] for i in sorted(used)},
    }


def _attach_qk(
    graph: Graph,
    model: Any,
    loadings: Any,
    out_nodes: list[dict],
    export_id: np.ndarray,
    layer_map: dict[int, int],
    max_targets: int,
    per_target: int,
    top_k: int,
) -> None:
    """QK tracing results for the strongest (edge, head) pairs into the top targets."""
    nodes = graph.nodes
    by_id = {n["node_id"]: n for n in out_nodes}
    tokens = graph.tokens.tolist()
    crossing = (loadings.layer >= 0).numpy()
    targets = graph.edge_target.numpy()
    heads_abs = loadings.heads.abs().double().numpy()
    is_target = nodes["kind"].isin(["feature", "logit"]).to_numpy()
    has_in = np.zeros(len(nodes), dtype=bool)
    has_in[targets[crossing]] = True
    cand = np.nonzero(is_target & has_in)[0]
    infl = nodes["influence"].to_numpy()[cand]
    logit_first = nodes["kind"].to_numpy()[cand] == "logit"
    order = cand[np.lexsort((-infl, ~logit_first))][:max_targets]
    for t in order:
        e_idx = np.nonzero((targets == t) & crossing)[0]
        flat = heads_abs[e_idx]  # [edges, heads]
        best = np.argsort(-flat.reshape(-1), kind="stable")[:per_target]
        records = []
        for b in best:
            e, h = int(e_idx[b // flat.shape[1]]), int(b % flat.shape[1])
            if flat.reshape(-1)[b] == 0:
                continue
            attr = graph.qk_attribution(model, e, h)
            rec = qk_record(
                attr,
                lambda k, lay, h, p, f: _part_id(k, lay, h, p, f, tokens, layer_map),
                top_k,
            )
            w = float(graph.edge_weight[e])
            loading = float(loadings.heads[e, h])
            rec.update(
                layer=int(loadings.layer[e]), head=h, q_pos=int(attr.q_pos),
                k_pos=int(attr.k_pos), source=export_id[int(graph.edge_source[e])],
                loading=loading, share=loading / w if w != 0 else None,
            )  # fmt: skip
            records.append(rec)
        node = by_id.get(export_id[t])
        if records and node is not None:
            node["qk_tracing_results"] = records[0]
            node["qk_lens_heads"] = records


def _source_set(dictionaries: dict[str, Any]) -> str | None:
    """``res-jb`` from Neuronpedia ids like ``gpt2-small/8-res-jb``, if all layers agree."""
    sets = set()
    for info in dictionaries.values():
        npid = info.get("neuronpedia_id")
        if not npid or "/" not in npid:
            return None
        sets.add(re.sub(r"^\d+-", "", npid.split("/", 1)[1]))
    return sets.pop() if len(sets) == 1 else None


def _version() -> str:
    try:
        return importlib.metadata.version("qk_lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"
