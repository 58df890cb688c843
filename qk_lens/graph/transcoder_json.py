"""Transcoder graphs as Neuronpedia / circuit-tracer graph JSON, both ways (docs/transcoders.md §8).

Export: circuit-tracer's node and link fields, plus head loadings on every link,
``qk_tracing_results`` on the most influential targets and ``qk_only_nodes`` for the QK
contributors that are not graph nodes. Import: a graph JSON of the same model, prompt and
transcoders becomes a :class:`TranscoderGraph` whose edges are recomputed here (the file's own
weights are kept beside them), so its head loadings and QK attributions follow.
"""

from __future__ import annotations

import json
import re
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qk_lens.capture import prompt_to_tokens
from qk_lens.files import write_text
from qk_lens.graph.checkpoints import LogitReadouts, LogitSpec
from qk_lens.graph.export import qk_record
from qk_lens.graph.neuronpedia_schema import validate_neuronpedia
from qk_lens.graph.nodes import embedding_id, error_id, feature_id
from qk_lens.graph.transcoder_build import TranscoderNodes, transcoder_loadings
from qk_lens.graph.transcoder_result import TranscoderGraph, TranscoderLoadings
from qk_lens.graph.transcoder_sweep import Sweep
from qk_lens.state import capture_tokens, require_attached, state_of

FEATURE_TYPE = "cross layer transcoder"  # circuit-tracer's type for every transcoder feature
ERROR_TYPE = "mlp reconstruction error"
_FEATURE_ID = re.compile(r"^(\d+)_(\d+)_(\d+)$")


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's ``feature`` field of a feature node: the Cantor pairing of (layer, id)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def _qk_part_id(kind: str, layer: int, head: int, pos: int, feature: int, tokens: list[int]) -> str:
    if kind == "feature":
        return feature_id(layer, feature, pos)
    if kind == "error":
        return error_id(layer, pos)
    if kind == "token embedding":
        return embedding_id(tokens[pos], pos)
    if kind == "positional embedding":
        return f"P_{pos}"
    if kind == "head":
        return f"L{layer}H{head}@{pos}"
    if kind == "attention bias out":
        return f"{layer}_bias_attn_bO_{pos}"
    if kind == "attention bias":
        return f"{layer}_qkbias_{pos}"
    if kind == "transcoder bias":
        return f"{layer}_bias_tc_bD_{pos}"
    if kind == "transcoder skip":
        return f"{layer}_skip_{pos}"
    return f"{layer}_{kind.replace(' ', '_')}_{pos}"


_QK_ONLY_TYPES = {
    "feature": FEATURE_TYPE, "error": ERROR_TYPE, "token embedding": "embedding",
    "positional embedding": "embedding", "head": "attention head", "attention bias out": "bias",
    "attention bias": "bias", "transcoder bias": "bias", "transcoder skip": "skip",
}  # fmt: skip


def transcoder_to_neuronpedia(
    graph: TranscoderGraph,
    model: Any,
    loadings: TranscoderLoadings | None = None,
    *,
    slug: str = "qk-lens-graph",
    qk_max_targets: int = 10,
    qk_heads_per_target: int = 3,
    qk_top_k: int = 20,
) -> dict[str, Any]:
    """The graph as Neuronpedia graph JSON, with head loadings on every link and the QK tracing
    of the strongest (edge, head) pairs into the ``qk_max_targets`` most influential targets."""
    require_attached(model)
    tc = graph.transcoders if graph.transcoders is not None else state_of(model).transcoders
    hl = loadings if loadings is not None else transcoder_loadings(model, graph)
    nd = graph.nodes
    tokens = graph.tokens.tolist()
    n = int(graph.metadata["n_layers"])
    ids = nd["node_id"].tolist()
    first_logit = True
    out_nodes = []
    for r in nd.itertuples():
        kind, layer, pos, feat = r.kind, int(r.layer), int(r.position), int(r.feature)
        node: dict[str, Any] = {"node_id": r.node_id, "ctx_idx": pos, "clerp": str(r.label),
                                "influence": _num(r.cumulative_influence),
                                "activation": _num(r.activation), "qk_lens_kind": kind}  # fmt: skip
        if kind == "feature":
            node.update(feature=cantor(layer, feat), layer=str(layer), feature_type=FEATURE_TYPE,
                        jsNodeId=f"{layer}_{feat}-0", readout=_num(r.readout))  # fmt: skip
            npid = tc.neuronpedia_id(layer) if tc is not None else None
            if npid:
                node["neuronpedia"] = f"{npid}/{feat}"
        elif kind == "error":
            node.update(feature=None, layer=str(layer), feature_type=ERROR_TYPE,
                        jsNodeId=f"{layer}_-1-{pos}")  # fmt: skip
        elif kind == "embedding":
            node.update(feature=pos, layer="E", feature_type="embedding",
                        jsNodeId=f"E_{tokens[pos]}-{pos}", clerp=str(r.token))  # fmt: skip
        else:
            node.update(feature=feat, layer=str(n + 1), feature_type="logit",
                        jsNodeId=f"L_{feat}-{pos}", token_prob=float(r.prob),
                        is_target_logit=first_logit, readout=_num(r.readout),
                        feature_b=int(r.feature_b))  # a logit difference a − b: b ≥ 0  # fmt: skip
            first_logit = False
        out_nodes.append(node)
    links = []
    heads = hl.heads.double().numpy()
    for e in range(graph.n_edges):
        per_layer = {str(lyr): heads[e, lyr].tolist() for lyr in range(heads.shape[1])
                     if np.any(heads[e, lyr] != 0)}  # fmt: skip
        links.append({
            "source": ids[int(graph.edge_source[e])],
            "target": ids[int(graph.edge_target[e])],
            "weight": float(graph.edge_weight[e]),
            "head_loadings": {"residual": float(hl.residual[e]), "mlp": float(hl.mlp[e]),
                              "multi_head": float(hl.multi_head[e]), "heads": per_layer},
        })  # fmt: skip
    qk_only: dict[str, dict[str, Any]] = {}
    _attach_qk(graph, model, hl, out_nodes, qk_only, qk_max_targets, qk_heads_per_target, qk_top_k)
    md = graph.metadata
    data: dict[str, Any] = {
        "metadata": {
            "slug": slug,
            "scan": md.get("scan"),
            "transcoder_list": [],
            "prompt_tokens": graph.str_tokens,
            "prompt": md.get("prompt") or "".join(graph.str_tokens),
            "node_threshold": md.get("node_threshold"),
            "schema_version": 1,
            "pruning_settings": {
                "node_threshold": md.get("node_threshold"),
                "edge_threshold": md.get("edge_threshold"),
            },  # fmt: skip
            "info": {"generator": {"name": "qk_lens", "url": "https://github.com/qk-lens"}},
            "qk_lens": {
                "graph": "transcoders",
                "transcoders": md.get("transcoders"),
                "n_heads": md.get("n_heads"),
                "n_layers": n,
                "extra_fields": [
                    "qk_lens_kind",
                    "readout",
                    "head_loadings",
                    "qk_lens_heads",
                    "neuronpedia",
                ],
            },  # fmt: skip
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },  # fmt: skip
        "nodes": out_nodes,
        "links": links,
    }
    if qk_only:
        data["qk_only_nodes"] = qk_only
    return data


def _num(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _attach_qk(
    graph: TranscoderGraph, model: Any, hl: TranscoderLoadings, out_nodes: list[dict],
    qk_only: dict[str, dict], max_targets: int, per_target: int, top_k: int,
) -> None:  # fmt: skip
    nd = graph.nodes
    tokens = graph.tokens.tolist()
    in_graph = set(nd["node_id"])
    src_pos = nd["position"].to_numpy()[graph.edge_source.numpy()]
    tgt = graph.edge_target.numpy()
    crossing = src_pos != nd["position"].to_numpy()[tgt]
    heads_abs = hl.heads.abs().double().numpy()  # [edge, layer, head]
    kinds = nd["kind"].to_numpy()
    cand = np.unique(tgt[crossing])
    # most influential first: smallest cumulative influence (the one measure imports also have)
    cum = nd["cumulative_influence"].to_numpy()[cand]
    cum = np.where(np.isnan(cum), np.inf, cum)
    order = cand[np.lexsort((cum, kinds[cand] != "logit"))][:max_targets]
    for t in order:
        e_idx = np.nonzero((tgt == t) & crossing)[0]
        flat = heads_abs[e_idx].reshape(len(e_idx), -1)
        n_lh = flat.shape[1]
        records = []
        for b in np.argsort(-flat.reshape(-1), kind="stable")[:per_target]:
            if flat.reshape(-1)[b] == 0:
                continue
            e = int(e_idx[b // n_lh])
            lyr, h = divmod(int(b % n_lh), hl.heads.shape[2])
            attr = hl.qk_attribution(e, lyr, h, model=model)

            def part_id(k: str, lay: int, hh: int, p: int, f: int, attr=attr) -> str:
                pid = _qk_part_id(k, lay, hh, p, f, tokens)
                if pid not in in_graph and pid not in qk_only:
                    qk_only[pid] = {"node_id": pid, "jsNodeId": pid, "layer": str(lay),
                                    "ctx_idx": p, "feature_type": _QK_ONLY_TYPES.get(k, k),
                                    "feature": cantor(lay, f) if k == "feature" else None,
                                    "clerp": k}  # fmt: skip
                return pid

            rec = qk_record(attr, part_id, top_k)
            for pid, lab in rec["labels"].items():
                if pid in qk_only and lab:
                    qk_only[pid]["clerp"] = lab
            w = float(graph.edge_weight[e])
            loading = float(hl.heads[e, lyr, h])
            rec.update(layer=lyr, head=h, q_pos=int(attr.q_pos), k_pos=int(attr.k_pos),
                       source=str(nd["node_id"].iloc[int(graph.edge_source[e])]),
                       loading=loading, share=loading / w if w != 0 else None)  # fmt: skip
            records.append(rec)
        if records:
            out_nodes[int(t)]["qk_tracing_results"] = records[0]
            out_nodes[int(t)]["qk_lens_heads"] = records


def save_transcoder_neuronpedia(
    graph: TranscoderGraph, model: Any, path: str | PathLike[str], **kwargs: Any
) -> Path:
    """Write :func:`transcoder_to_neuronpedia` to ``path`` (whole or absent), validated against
    the frontend's fields where ``jsonschema`` is installed."""
    data = transcoder_to_neuronpedia(graph, model, **kwargs)
    try:
        validate_neuronpedia(data)
    except ImportError:  # jsonschema is a development dependency: the file is still complete
        pass
    return write_text(path, json.dumps(data))


def load_graph_json(
    model: Any,
    source: str | PathLike[str] | dict[str, Any],
    tokens: Any = None,
    activation_rtol: float = 1e-2,
    transcoders: Any = None,
) -> TranscoderGraph:
    """A circuit-tracer / Neuronpedia graph JSON of this model's transcoders on its prompt, as a
    :class:`TranscoderGraph`: the same nodes and links, each edge recomputed here (the file's
    weights in ``metadata["json_weight"]``). Refused, with what differs: another prompt (its
    tokens), another model (its logit layer, its layer count), other transcoders (a feature that
    is not active, or active at another value beyond ``activation_rtol``). ``tokens``: the
    prompt's token ids, for a model without a tokenizer (default: the model's tokens of the
    file's ``prompt``)."""
    require_attached(model)
    tc = transcoders if transcoders is not None else state_of(model).transcoders
    if tc is None:
        raise ValueError("no transcoders: pass transcoders= or call model.add_transcoders(...)")
    tc.check_model(model)
    where = str(source) if not isinstance(source, dict) else "the graph JSON"
    data = source if isinstance(source, dict) else json.loads(Path(source).read_text("utf-8"))
    for key in ("metadata", "nodes", "links"):
        if key not in data:
            raise ValueError(f"{where}: no {key!r}: not a graph JSON")
    md = data["metadata"]
    tokens = prompt_to_tokens(model, md.get("prompt", "") if tokens is None else tokens)
    cap = capture_tokens(model, tokens)
    str_tokens = cap.str_tokens or [str(t) for t in tokens.tolist()]
    given = md.get("prompt_tokens")
    if given is not None and cap.str_tokens and list(given) != list(str_tokens):
        i = next((j for j, (a, b) in enumerate(zip(given, str_tokens, strict=False)) if a != b),
                 min(len(given), len(str_tokens)))  # fmt: skip
        raise ValueError(
            f"{where}: its prompt_tokens differ from this model's tokens of its prompt at position "
            f"{i} ({given[i] if i < len(given) else None!r} vs "
            f"{str_tokens[i] if i < len(str_tokens) else None!r}): another tokenizer or prompt"
        )
    sweep = Sweep(model, cap, tc)
    n = sweep.n_layers
    logit_nodes = [nd for nd in data["nodes"] if nd.get("feature_type") == "logit"]
    if not logit_nodes:
        raise ValueError(f"{where}: no logit nodes")
    for nd in logit_nodes:
        if str(nd["layer"]) != str(n + 1):
            raise ValueError(
                f"{where}: logit node {nd['node_id']} is at layer {nd['layer']}; this model's "
                f"logits are at layer {n + 1} ({n} layers): a graph of another model"
            )
    pos = int(logit_nodes[0]["ctx_idx"])

    def token_b(
        nd: dict[str, Any],
    ) -> int:  # a logit difference: qk_lens's field, or "a-b" in the id
        if nd.get("feature_b") is not None:
            return int(nd["feature_b"])
        m = re.match(r"^\d+_(\d+)-(\d+)_\d+$", str(nd["node_id"]))
        return int(m.group(2)) if m else -1

    specs = [LogitSpec(int(nd["feature"]), token_b(nd), str(nd.get("clerp", "")),
                       float(nd.get("token_prob", 0.0)),
                       1.0 if token_b(nd) >= 0 else float(nd.get("token_prob", 0.0)))
             for nd in logit_nodes]  # fmt: skip
    full = TranscoderNodes(sweep, specs, pos, str_tokens, tokens.tolist())
    fr = full.frame
    key_of = {
        (k, int(lay), int(p), int(f), *([int(b)] if k == "logit" else [])): i
        for i, (k, lay, p, f, b) in enumerate(zip(fr["kind"], fr["layer"], fr["position"],
                                                  fr["feature"], fr["feature_b"], strict=True))
    }  # fmt: skip
    # circuit-tracer's error ids 0_{layer}_{pos} can equal a layer-0 feature's id: an id names
    # every node that has it, and each link takes the pair whose edge is the file's weight
    index: dict[str, list[int]] = {}
    acts = fr["activation"].to_numpy()
    for nd in data["nodes"]:
        ft, nid, p = nd.get("feature_type"), nd["node_id"], int(nd["ctx_idx"])
        if ft == "logit":
            key = ("logit", n, p, int(nd["feature"]), token_b(nd))
        elif ft == "embedding":
            m = re.match(r"^E_(-?\d+)_(\d+)$", nid)
            if m is None or int(m.group(1)) != int(tokens[p]):
                raise ValueError(
                    f"{where}: embedding node {nid} names another token at position {p} than this "
                    f"prompt's ({int(tokens[p])}): another prompt"
                )
            key = ("embedding", -1, p, int(tokens[p]))
        elif ft == ERROR_TYPE:
            key = ("error", int(nd["layer"]), p, -1)
        elif "transcoder" in str(ft):
            m = _FEATURE_ID.match(nid)
            if m is None:
                raise ValueError(f"{where}: feature node id {nid!r} is not LAYER_FEATURE_POS")
            key = ("feature", int(m.group(1)), int(m.group(3)), int(m.group(2)))
        else:
            raise ValueError(f"{where}: node {nid} has feature_type {ft!r}, not one qk_lens reads")
        i = key_of.get(key)
        if i is None:
            what = "not active" if key[0] == "feature" else "not a node of this model"
            raise ValueError(
                f"{where}: node {nid} ({ft}) is {what} with these transcoders on this model and "
                "prompt: a graph of other transcoders, another model or another prompt"
            )
        a = nd.get("activation")
        if key[0] == "feature" and a is not None:
            if abs(acts[i] - float(a)) > activation_rtol * max(1.0, abs(acts[i])):
                raise ValueError(
                    f"{where}: feature node {nid} has activation {float(a):.6g} in the file and "
                    f"{acts[i]:.6g} here: other transcoders, another model or another prompt"
                )
        index.setdefault(nid, []).append(i)
    for link in data["links"]:
        for end in ("source", "target"):
            if link[end] not in index:
                raise ValueError(f"{where}: link {end} {link[end]!r} is not a node of the file")
    targets_all = sorted({i for link in data["links"] for i in index[link["target"]]
                          if fr["kind"].iloc[i] in ("feature", "logit")})  # fmt: skip
    rows = torch.tensor(targets_all, dtype=torch.long)
    readouts = np.full(len(fr), np.nan)
    row_edges: dict[int, torch.Tensor] = {}
    logits = LogitReadouts(sweep.arch, sweep.resid(n), sweep.dtype, "cpu")
    for lo in range(0, len(rows), 64):
        chunk = rows[lo : lo + 64]
        layers, p, w, c = full.readouts(chunk, logits)
        with torch.no_grad():
            edges = sweep.backward(layers, p, w, full.sources)["edges"]
        readouts[chunk.numpy()] = full.values(layers, p, w, c).double().numpy()
        for j, r in enumerate(chunk.tolist()):
            row_edges[r] = edges[j]
    src, tgt, json_w, wts = [], [], [], []
    for link in data["links"]:
        jw = float(link["weight"])
        pairs = [(float(row_edges[t][s]), s, t) for t in index[link["target"]]
                 if t in row_edges for s in index[link["source"]]]  # fmt: skip
        if not pairs:
            raise ValueError(f"{where}: link target {link['target']!r} is not a feature or logit")
        w_best, s_best, t_best = min(pairs, key=lambda x: abs(x[0] - jw))
        src.append(s_best)
        tgt.append(t_best)
        json_w.append(jw)
        wts.append(w_best)
    src_t, tgt_t = torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long)
    weight = torch.tensor(wts, dtype=sweep.dtype)
    kept = np.array(sorted({i for ids in index.values() for i in ids}))
    readable = torch.tensor(
        [i for i in kept.tolist() if fr["kind"].iloc[i] in ("feature", "logit")], dtype=torch.long
    )
    if len(readable):  # every target's readout, with incoming links or not
        layers, p, w, c = full.readouts(readable, logits)
        readouts[readable.numpy()] = full.values(layers, p, w, c).double().numpy()
    new = np.full(len(fr), -1)
    new[kept] = np.arange(len(kept))
    frame = fr.iloc[kept].reset_index(drop=True)
    frame["readout"] = readouts[kept]
    infl = {nd["node_id"]: nd.get("influence") for nd in data["nodes"]}
    # the file's "influence" is circuit-tracer's cumulative influence (smaller: more influential)
    frame["influence"] = np.nan
    frame["cumulative_influence"] = [
        np.nan if infl.get(i) is None else float(infl[i]) for i in frame["node_id"]
    ]
    jw = np.array(json_w)
    diff = np.abs(weight.double().numpy() - jw) / np.maximum(np.abs(jw), 1e-12)
    meta = {
        "model_name": getattr(model.cfg, "model_name", None), "n_layers": n,
        "n_heads": int(model.cfg.n_heads), "d_model": int(model.cfg.d_model),
        "d_vocab": int(model.cfg.d_vocab), "transcoders": tc.name,
        "transcoder_digest": tc.digest(), "scan": md.get("scan"), "prompt": md.get("prompt"),
        "str_tokens": str_tokens, "target_pos": pos,
        "node_threshold": md.get("node_threshold"), "edge_threshold": None,
        "imported_from": where, "json_weight": json_w,
        "json_max_rel_diff": float(diff.max()) if len(diff) else 0.0, "dtype": str(sweep.dtype),
    }  # fmt: skip
    return TranscoderGraph(
        nodes=frame,
        edge_source=torch.as_tensor(new[src_t.numpy()], dtype=torch.long),
        edge_target=torch.as_tensor(new[tgt_t.numpy()], dtype=torch.long),
        edge_weight=weight,
        tokens=tokens.clone(),
        metadata=meta,
        transcoders=tc,
    )
