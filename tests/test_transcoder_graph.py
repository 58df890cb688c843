"""Transcoder attribution graphs and their head loadings, against autograd through the model's
own forward: attention patterns and norm scales frozen by hooks, every MLP output replaced by a
constant plus the skip connection's live path, sources injected where they write."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from qk_lens.arch import arch_of
from qk_lens.graph import transcoder_graph, transcoder_loadings
from tests.models import HOOKED, hooks_of, make_tokens
from tests.test_transcoders import model_of, random_transcoders

needs_hooked = pytest.mark.skipif(not HOOKED, reason="hooks of HookedTransformer (stack (a))")
N_TOK = 10
CASES = [
    ("gpt2", "skip-jumprelu", "resid_mid"),
    ("gpt2", "clt", "normalized"),
    ("llama", "relu", "normalized"),
    ("llama", "clt-jumprelu", "resid_mid"),
    ("gemma2", "relu", "normalized"),
    ("gemma2", "clt", "normalized"),
    ("llama", "skip-jumprelu", "resid_mid"),
    ("gemma2", "skip-jumprelu", "resid_mid"),
]


def _frozen_grads(model, tokens, tc, split, readout, keep_heads=None, skip=True):
    """Gradients of ``readout(cache)`` w.r.t. an injection at each layer's MLP output
    (``[layer, pos, d_model]``) and at the embeddings (``[pos, d_model]``), through the model's
    forward with patterns and scales frozen. ``keep_heads``: (layer, head) pairs whose pattern
    stays; every other head's is zeroed (None: all stay)."""
    n, T, d = model.cfg.n_layers, len(tokens), model.cfg.d_model
    cache = hooks_of(model, tokens)
    delta = torch.zeros(n, T, d, dtype=torch.float64, requires_grad=True)
    delta_e = torch.zeros(T, d, dtype=torch.float64, requires_grad=True)
    saved: dict[str, torch.Tensor] = {}
    hooks = []

    # each hook by the name it was registered under (a bridge's hook.name is its canonical one)
    def pattern(x, hook, name):
        layer = int(name.split(".")[1])
        p = cache[name].detach().clone()
        if keep_heads is not None:
            mask = torch.zeros(p.shape[1], dtype=torch.bool)
            for lyr, h in keep_heads:
                if lyr == layer:
                    mask[h] = True
            p[:, ~mask] = 0
        return p

    def scale(x, hook, name):  # the scale of the unedited forward, not of this one
        return cache[name].detach().clone()

    def save(x, hook, name):
        saved[name] = x
        return x

    def mlp_out(x, hook, name):
        k = int(name.split(".")[1])
        out = x.detach() + delta[k]
        if skip and tc.has_skip:
            assert tc.input_point == "resid_mid"
            s = saved[f"blocks.{k}.hook_resid_mid"] @ tc.W_skip[k]
            if tc.output_point == "raw" and hasattr(model.blocks[k], "ln2_post"):
                # the MLP's raw output passes Gemma's post-MLP norm at its own (frozen) scale
                post = model.blocks[k].ln2_post
                s = s * post.w / cache[f"blocks.{k}.ln2_post.hook_scale"]
            out = out + s - s.detach()
        return out

    for name in cache.keys():
        if name.endswith("attn.hook_pattern"):
            hooks.append((name, partial(pattern, name=name)))
        elif name.endswith("hook_scale") and ("ln" in name):
            hooks.append((name, partial(scale, name=name)))
        elif name.endswith(("hook_resid_mid", "ln2.hook_normalized", "ln_final.hook_normalized",
                            "unembed.hook_out")):  # fmt: skip
            hooks.append((name, partial(save, name=name)))
        elif name.endswith("hook_mlp_out"):
            hooks.append((name, partial(mlp_out, name=name)))
    hooks.append(("blocks.0.hook_resid_pre", lambda x, hook: x + delta_e))
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks), arch_of(model).exact_forward():
        logits = model(tokens[None])[0]
        r = readout(saved, logits)
        g, ge = torch.autograd.grad(r, (delta, delta_e), allow_unused=True)
    return g, ge


tc_model: list = [None]  # the model the logit readouts unembed with


def _readout(tc, node):
    kind, layer, pos, feat = node.kind, int(node.layer), int(node.position), int(node.feature)
    if kind == "logit":  # raw logits (before any output softcap), from ln_final's own hook

        def logit(saved, logits, model=tc_model[0]):
            if "unembed.hook_out" in saved:  # a bridge: its logits before any softcap
                raw = saved["unembed.hook_out"][0, pos]
                return raw[feat] - raw.mean()
            lf = model.ln_final
            h = saved["ln_final.hook_normalized"][0, pos] * lf.w
            if hasattr(lf, "b"):
                h = h + lf.b
            raw = h @ model.W_U + model.b_U
            return raw[feat] - raw.mean()

        return logit
    hook = {"resid_mid": "hook_resid_mid", "normalized": "ln2.hook_normalized"}[tc.input_point]

    def r(saved, logits):
        x = saved[f"blocks.{layer}.{hook}"][0, pos]
        return x @ tc.W_enc[layer][:, feat] + tc.b_enc[layer][feat]

    return r


def _writes(model, tc, split, node, cache):
    """{layer: residual-space vector} a source node writes, from the weights (and the model's
    own post-MLP norm scale)."""
    kind, layer, pos = node.kind, int(node.layer), int(node.position)
    if kind == "embedding":
        return {-1: cache["blocks.0.hook_resid_pre"][0, pos]}
    if kind == "error":
        return {layer: split.error[layer][pos]}
    a = float(node.activation)
    out = {}
    for k in tc.output_layers(layer):
        row = tc.W_dec[layer][int(node.feature)]
        v = a * (row[k - layer] if tc.cross_layer else row)
        if split.post[k] is not None:  # Gemma's post-MLP RMS norm at the model's own scale
            v = v * model.blocks[k].ln2_post.w / cache[f"blocks.{k}.ln2_post.hook_scale"][0, pos]
        out[k] = v
    return out


def _edge(g, ge, writes, pos):
    return sum(float((ge if k < 0 else g[k])[pos] @ v) for k, v in writes.items())


@pytest.mark.parametrize(
    ("name", "kind", "point"),
    [pytest.param(*c, marks=needs_hooked) for c in CASES]
    + [("GPT2LMHeadModel", "skip-jumprelu", "resid_mid"), ("LlamaForCausalLM", "clt", "normalized"),
       ("Gemma2ForCausalLM", "relu", "normalized")],
)  # fmt: skip
def test_edges_and_head_loadings_match_autograd(name, kind, point):
    model, _, _ = model_of(name, torch.float64)
    out = "raw" if name == "gemma2" else "mlp_out"  # bridges: what the block adds, as is
    tc = model.add_transcoders(
        random_transcoders(model.cfg.d_model, 3, torch.float64, kind, d_tc=24,
                           output_point=out, input_point=point)
    )  # fmt: skip
    tc_model[0] = model
    tokens = make_tokens(model, N_TOK, seed=4)[0]
    g = transcoder_graph(model, tokens, prune_graph=False, max_n_logits=2)
    hl = transcoder_loadings(model, g)
    assert hl.check() < 1e-10
    split = tc.split(model, model.qk_capture(tokens))
    cache = hooks_of(model, tokens)
    nodes, edges = g.nodes, g.edges
    # the last position's targets at every layer, and the logits
    picks = []
    for lyr in range(1, 4):
        kind_ = "logit" if lyr == 3 else "feature"
        sel = nodes[(nodes["kind"] == kind_) & (nodes["layer"] == lyr)]
        sel = sel[sel["position"] == sel["position"].max()]
        picks += list(sel.index[:2])
    checked = heads_checked = 0
    for t in picks:
        tnode = nodes.loc[t]
        readout = _readout(tc, tnode)
        g_full, ge_full = _frozen_grads(model, tokens, tc, split, readout)
        inc = edges[edges["target_index"] == t]
        assert len(inc) > 0
        # the readout itself: the pre-activation (or demeaned logit) the graph recorded
        for e in inc.itertuples():
            src = nodes.loc[e.source_index]
            ref = _edge(g_full, ge_full, _writes(model, tc, split, src, cache), int(src.position))
            assert e.weight == pytest.approx(ref, rel=1e-9, abs=1e-11), (e.source, e.target)
            checked += 1
        # heads: (only head (l, h)) − (no head); residual: no head and no skip
        g0, ge0 = _frozen_grads(model, tokens, tc, split, readout, keep_heads=[])
        g00, ge00 = _frozen_grads(model, tokens, tc, split, readout, keep_heads=[], skip=False)
        cross = inc[inc["source_pos"] != inc["target_pos"]].head(6)
        for e in inc.head(6).itertuples():
            src = nodes.loc[e.source_index]
            w = _writes(model, tc, split, src, cache)
            p = int(src.position)
            zero = _edge(g0, ge0, w, p)
            resid = _edge(g00, ge00, w, p)
            assert float(hl.residual[e.Index]) == pytest.approx(resid, rel=1e-9, abs=1e-11)
            assert float(hl.mlp[e.Index]) == pytest.approx(zero - resid, rel=1e-9, abs=1e-11)
        for e in cross.itertuples():
            src = nodes.loc[e.source_index]
            w = _writes(model, tc, split, src, cache)
            p = int(src.position)
            flat = hl.heads[e.Index].abs().reshape(-1)
            for i in flat.argsort(descending=True)[:2].tolist():
                lyr, h = divmod(i, model.cfg.n_heads)
                gh, geh = _frozen_grads(model, tokens, tc, split, readout, keep_heads=[(lyr, h)])
                ref = _edge(gh, geh, w, p) - _edge(g0, ge0, w, p)
                got = float(hl.heads[e.Index, lyr, h])
                assert got == pytest.approx(ref, rel=1e-8, abs=1e-11), (e.source, e.target, lyr, h)
                heads_checked += 1
    assert checked > 30 and heads_checked > 4
    # an edge across positions: its heads say where to look, and the QK attribution explains
    far = edges[(edges["source_pos"] < edges["target_pos"])].index[0]
    attr = hl.qk_attribution(int(far))
    assert attr.q_pos == int(edges.loc[far, "target_pos"])
    assert attr.k_pos == int(edges.loc[far, "source_pos"])
    assert abs(float(attr.terms.sum()) - attr.model_raw_score) < 1e-9


BRIDGE_CASES = [("GPT2LMHeadModel", "skip-jumprelu"), ("LlamaForCausalLM", "clt"),
                ("Gemma2ForCausalLM", "relu")]  # fmt: skip


@pytest.mark.parametrize(("name", "kind"), BRIDGE_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bridge_graphs_loadings_and_pruning(name, kind, dtype):
    """On TransformerBridge models (both stacks): every edge's parts sum to it and the heads to
    the one-hop sweep; the pruned graph keeps the logits and embeddings; a far edge's QK
    attribution sums to the bridge's score."""
    model, _, _ = model_of(name, dtype)
    out = "raw" if "Gemma" in name else "mlp_out"
    tc = model.add_transcoders(
        random_transcoders(model.cfg.d_model, 3, dtype, kind, d_tc=24, output_point=out,
                           input_point="resid_mid" if "skip" in kind else "mlp_input")
    )  # fmt: skip
    tokens = make_tokens(model, N_TOK, seed=5)[0]
    full = transcoder_graph(model, tokens, prune_graph=False, max_n_logits=2)
    pruned = transcoder_graph(model, tokens, max_n_logits=2, node_threshold=0.6, edge_threshold=0.9)
    assert pruned.n_edges < full.n_edges and pruned.n_nodes < full.n_nodes
    kinds = pruned.nodes["kind"].value_counts()
    assert kinds["logit"] == 2 and kinds["embedding"] == N_TOK
    # every kept edge is the same edge of the full graph
    fe = full.edges.set_index(["source", "target"])["weight"]
    pe = pruned.edges.set_index(["source", "target"])["weight"]
    assert (fe.loc[pe.index] - pe).abs().max() == 0
    for g in (full, pruned):
        hl = transcoder_loadings(model, g)
        hl.check()
    e = int(pruned.edges.query("source_pos < target_pos").index[0])
    attr = hl.qk_attribution(e)
    tol = 1e-9 if dtype == torch.float64 else 1e-4 * attr.scale
    assert abs(float(attr.terms.sum()) - attr.model_raw_score) <= tol
    if tc.has_skip:
        assert hl.mlp.abs().max() > 0
    # a graph refuses other transcoders (activations differ)
    other = random_transcoders(model.cfg.d_model, 3, dtype, kind, d_tc=24, output_point=out,
                               input_point=tc.input_point, seed=9)  # fmt: skip
    with pytest.raises(ValueError, match="built with other transcoders"):
        transcoder_loadings(model, pruned, transcoders=other)
    # the graph keeps its own: another set on the model does not change its loadings
    model.add_transcoders(other)
    again = transcoder_loadings(model, pruned)
    assert torch.equal(again.heads, transcoder_loadings(model, pruned, transcoders=tc).heads)
    model.add_transcoders(tc)


def _circuit_tracer_json(g, n_layers):
    """The graph as circuit-tracer's create_graph_files writes it (its Node conventions: error
    ids 0_{layer}_{pos}, feature = Cantor pairing, logits at layer n + 1), written here by hand
    from the graph's node table (not by qk_lens's exporter)."""
    nd = g.nodes
    ids, nodes = [], []
    for r in nd.itertuples():
        lay, pos, f = int(r.layer), int(r.position), int(r.feature)
        if r.kind == "feature":
            nid = f"{lay}_{f}_{pos}"
            node = dict(node_id=nid, feature=(lay + f) * (lay + f + 1) // 2 + f, layer=str(lay),
                        ctx_idx=pos, feature_type="cross layer transcoder",
                        jsNodeId=f"{lay}_{f}-0", activation=float(r.activation))  # fmt: skip
        elif r.kind == "error":
            nid = f"0_{lay}_{pos}"
            node = dict(node_id=nid, feature=-1, layer=str(lay), ctx_idx=pos,
                        feature_type="mlp reconstruction error", jsNodeId=f"{lay}_{pos}-0")  # fmt: skip
        elif r.kind == "embedding":
            nid = f"E_{f}_{pos}"
            node = dict(node_id=nid, feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                        jsNodeId=f"E_{f}-{pos}")  # fmt: skip
        else:
            nid = f"{n_layers + 1}_{f}_{pos}"
            node = dict(node_id=nid, feature=f, layer=str(n_layers + 1), ctx_idx=pos,
                        feature_type="logit", jsNodeId=f"L_{f}-{pos}", token_prob=float(r.prob),
                        is_target_logit=False)  # fmt: skip
        node.update(clerp="", influence=float(r.cumulative_influence))
        ids.append(nid)
        nodes.append(node)
    links = [
        {"source": ids[s], "target": ids[t], "weight": float(w)}
        for s, t, w in zip(g.edge_source.tolist(), g.edge_target.tolist(),
                           g.edge_weight.tolist(), strict=True)
    ]  # fmt: skip
    meta = dict(slug="t", scan="test-scan", transcoder_list=[], prompt_tokens=g.str_tokens,
                prompt=" ".join(g.str_tokens), node_threshold=0.8, schema_version=1)  # fmt: skip
    qp = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    return {"metadata": meta, "qParams": qp, "nodes": nodes, "links": links}


def test_circuit_tracer_graph_json_round_trip(tmp_path):
    """A circuit-tracer-format transcoder set and graph JSON written here: load → loadings →
    QK → export, and the export validates against the frontend's fields."""
    import json

    from qk_lens.graph import load_graph_json, save_transcoder_neuronpedia, validate_neuronpedia

    model, _, _ = model_of("GPT2LMHeadModel", torch.float64)
    ref = random_transcoders(model.cfg.d_model, 3, torch.float64, "clt", d_tc=24)
    ref.save_circuit_tracer(tmp_path / "clt")
    tc = model.add_transcoders(tmp_path / "clt")
    tokens = make_tokens(model, 9, seed=6)[0]
    g = transcoder_graph(model, tokens, max_n_logits=2, node_threshold=0.95, edge_threshold=0.95)
    assert (g.nodes["kind"] == "feature").sum() > 0
    data = _circuit_tracer_json(g, 3)
    if True:  # (the model has no tokenizer: the file's prompt is given as its token ids)
        (tmp_path / "graph.json").write_text(json.dumps(data))
        back = load_graph_json(model, tmp_path / "graph.json", tokens=tokens)
        assert back.n_edges == g.n_edges and back.n_nodes == g.n_nodes
        assert back.metadata["json_max_rel_diff"] < 1e-9  # the file's weights, recomputed
        hl = transcoder_loadings(model, back)
        hl.check()
        e = int(back.edges.query("source_pos < target_pos").index[0])
        attr = hl.qk_attribution(e)
        assert abs(float(attr.terms.sum()) - attr.model_raw_score) < 1e-9
        tc.neuronpedia_ids = [f"llama-test/{lyr}-clt" for lyr in range(3)]
        path = save_transcoder_neuronpedia(back, model, tmp_path / "out.json", loadings=hl)
        out = json.loads(path.read_text())
        validate_neuronpedia(out)
        feats = [n for n in out["nodes"] if n["feature_type"] == "cross layer transcoder"]
        assert all(
            n["neuronpedia"] == f"llama-test/{n['layer']}-clt/{n['node_id'].split('_')[1]}"
            for n in feats
        )
        traced = [n for n in out["nodes"] if "qk_tracing_results" in n]
        assert traced and out["qk_only_nodes"]
        for link in out["links"]:
            parts = link["head_loadings"]
            total = (
                parts["residual"]
                + parts["mlp"]
                + parts["multi_head"]
                + sum(sum(v) for v in parts["heads"].values())
            )
            assert total == pytest.approx(link["weight"], rel=1e-9, abs=1e-12)
        rec = traced[0]["qk_tracing_results"]
        ids = {n["node_id"] for n in out["nodes"]} | set(out["qk_only_nodes"])
        assert all(q in ids and k in ids for q, k, _ in rec["pair_wise_contributors"])
        # the export reads back too, to the same edges
        again = load_graph_json(model, out, tokens=tokens)
        assert torch.allclose(again.edge_weight, back.edge_weight)
        # refusals: another prompt, another model's logits, other transcoders
        bad = json.loads(json.dumps(data))
        bad["nodes"][[n["feature_type"] for n in bad["nodes"]].index("embedding")]["node_id"] = (
            "E_99_0"
        )
        with pytest.raises(ValueError, match="another prompt"):
            load_graph_json(model, bad, tokens=tokens)
        bad = json.loads(json.dumps(data))
        for n in bad["nodes"]:
            if n["feature_type"] == "logit":
                n["layer"] = "13"
        with pytest.raises(ValueError, match="another model"):
            load_graph_json(model, bad, tokens=tokens)
        model.add_transcoders(random_transcoders(model.cfg.d_model, 3, torch.float64, "clt",
                                                 d_tc=24, seed=11))  # fmt: skip
        with pytest.raises(ValueError, match="not active|activation"):
            load_graph_json(model, data, tokens=tokens)
    model.add_transcoders(tc)


def test_logit_differences_survive_the_json_and_targets_do_not_repeat(tmp_path):
    import json

    from qk_lens.graph import load_graph_json, transcoder_to_neuronpedia

    model, _, _ = model_of("GPT2LMHeadModel", torch.float64)
    tc = model.add_transcoders(random_transcoders(model.cfg.d_model, 3, torch.float64, "relu"))
    tokens = make_tokens(model, 8, seed=8)[0]
    g = transcoder_graph(model, tokens, targets=[(3, 5), 7], node_threshold=0.9)
    data = json.loads(json.dumps(transcoder_to_neuronpedia(g, model)))
    back = load_graph_json(model, data, tokens=tokens)
    lg = g.nodes[g.nodes["kind"] == "logit"].sort_values("node_id")
    lb = back.nodes[back.nodes["kind"] == "logit"].sort_values("node_id")
    assert lb["feature_b"].tolist() == lg["feature_b"].tolist() == [5, -1]
    assert lb["readout"].to_numpy() == pytest.approx(lg["readout"].to_numpy(), rel=1e-12)
    assert back.metadata["json_max_rel_diff"] < 1e-9
    # imported influence is the file's cumulative one, and QK tracing still picks targets
    assert back.nodes["influence"].isna().all() and back.nodes["cumulative_influence"].notna().any()
    with pytest.raises(ValueError, match="targets repeat"):
        transcoder_graph(model, tokens, targets=[7, 7])
    assert tc is model.qk_transcoders
