"""Checkpointed attribution graphs, head loadings, files and the Neuronpedia export.

Every number is checked against something computed another way: edges against autograd through
the real TransformerLens blocks (patterns and norm scales frozen by hooks), per-head loadings
against autograd with one head's value input split off, readouts against the SAE's own
``hook_sae_acts_pre`` and the model's own logits, influence against circuit-tracer's dense
power series.

Each test runs on HookedTransformer test models (``tests/archs.py``, stack (a) only) and on
TransformerBridge models (``tests/bridges.py``, both stacks). A bridge's reference hooks come
from a forward as qk_lens runs it (``exact_forward``); its autograd references run the whole
bridge with hooks. The attention-only checks (an exact graph: no MLP remainder) use the bundled
toy model rebuilt as a bridge, whose MLPs output exactly zero.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import qk_lens
from qk_lens.arch import arch_of
from qk_lens.graph import Graph, attribution_graph, head_loadings
from tests.bridges import BRIDGE_NAMES, make_bridge
from tests.models import BRIDGE_CORE, is_bridge_name, make_any, make_tokens, needs_hooked
from tests.saes import make_sae

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

F64, F32 = torch.float64, torch.float32
INVARIANT_ARCHS = ["gpt2", "llama", "neox", "gemma2", "attn_only"]
# The bundled toy model (2 attention layers, LayerNorm) as a TransformerBridge (a GPT-2 rebuild
# whose MLPs output exactly zero): the attention-only bridge.
TOY_BRIDGE = "toy-attn2-ln-bridge"
PARALLEL = ("neox", "GPTNeoXForCausalLM")  # the MLP reads resid_pre: no head → MLP path


def hooked(*names: str) -> list:
    """HookedTransformer variants of tests/archs.py, skipped where TransformerLens has none."""
    return [pytest.param(n, marks=needs_hooked) for n in names]


ATTN_ONLY = [*hooked("attn_only"), TOY_BRIDGE]


def is_bridge(name: str) -> bool:
    return name == TOY_BRIDGE or is_bridge_name(name)


def is_bridge_model(model) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TransformerLens 3 before bridges
        return False
    return isinstance(model, TransformerBridge)


def make(name: str, dtype: torch.dtype = F64, seed: int = 0):
    """A model: a HookedTransformer variant, a bridge of a Hugging Face class, or the toy bridge."""
    if name == TOY_BRIDGE:
        from qk_lens import toy

        return toy.load("attn2-ln", dictionaries=False, dtype=dtype, bridge=True)
    return make_any(name, dtype, seed=seed)


def with_dicts(
    name,
    dtype: torch.dtype = F64,
    arch: str = "topk",
    layers: list[int] | None = None,
    seed: int = 0,
    **sae_kwargs,
):
    """``name`` (or a model) attached, with a random SAE on the residual stream of each layer."""
    m = qk_lens.attach(make(name, dtype, seed=seed) if isinstance(name, str) else name)
    dt = "float64" if dtype == F64 else "float32"
    for layer in range(m.cfg.n_layers) if layers is None else layers:
        sae = make_sae(
            arch, dt, hook=f"blocks.{layer}.hook_resid_pre", seed=10 + layer,
            d_in=m.cfg.d_model, d_sae=48, **sae_kwargs,
        )  # fmt: skip
        m.add_dictionary(sae)
    return m


def run_cache(m, tokens: torch.Tensor):
    """(logits, cache) of the model's own forward, as qk_lens runs it (a bridge: its exact norm
    path; a HookedTransformer: its plain forward)."""
    with torch.no_grad(), arch_of(m).exact_forward():
        return m.run_with_cache(tokens[None])


def incoming_sums(g: Graph) -> np.ndarray:
    sums = np.zeros(g.n_nodes)
    np.add.at(sums, g.edge_target.numpy(), g.edge_weight.double().numpy())
    return sums


def sae_pre(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE's own pre-activations (as its encode computes them) for rows x: SAELens's
    ``hook_sae_acts_pre``, or (qk_lens's reader, stack (b)) SAELens's formulas written out."""
    if hasattr(sae, "run_with_cache"):
        _, cache = sae.run_with_cache(x.to(sae.dtype))
        pre = cache["hook_sae_acts_pre"]
    else:
        cfg, x = sae.cfg, x.to(sae.dtype)
        if cfg.normalize_activations == "constant_norm_rescale":
            x = x * cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
        elif cfg.normalize_activations == "layer_norm":
            x = x - x.mean(-1, keepdim=True)
            x = x / (x.std(-1, keepdim=True) + 1e-5)
        if cfg.apply_b_dec_to_input:
            x = x - sae.b_dec
        if cfg.architecture() == "gated":  # the magnitude path
            pre = x @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
        else:
            pre = x @ sae.W_enc + sae.b_enc
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        pre = pre * sae.W_dec.norm(dim=-1)
    return pre


# ------------------------------------------------------------------------------ invariant
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", [*hooked(*INVARIANT_ARCHS), *BRIDGE_CORE, TOY_BRIDGE])
def test_loadings_sum_to_edges(name, dtype):
    m = with_dicts(name, dtype)
    g = attribution_graph(m, make_tokens(m, 16)[0], prune_graph=False)
    assert g.n_edges > 100 and bool(torch.isfinite(g.edge_weight).all())
    tol = 1e-12 if dtype == F64 else 1e-5
    hl = {tm: head_loadings(m, g, through_mlp=tm) for tm in (True, False)}
    for loadings in hl.values():
        assert loadings.check() <= tol
        w = g.edge_weight.double()
        big = w.abs() > 1e-3 * w.abs().max()  # plainly relative, where there is no cancellation
        rel = (loadings.total.double() - w).abs()[big] / w.abs()[big]
        assert float(rel.max()) <= (1e-10 if dtype == F64 else 1e-4)
    a, b = hl[True], hl[False]
    torch.testing.assert_close(a.residual, b.residual)
    # The two modes move the head → MLP path between `heads` and `mlp`, nothing else.
    torch.testing.assert_close(a.mlp + a.heads.sum(1), b.mlp + b.heads.sum(1))
    if name in ("attn_only", TOY_BRIDGE):
        assert float(a.mlp.abs().max()) == 0.0
        torch.testing.assert_close(a.heads, b.heads)
    elif name in PARALLEL:  # parallel block: no head → MLP path
        torch.testing.assert_close(a.heads, b.heads)
    elif name == "gpt2" or is_bridge(name):  # a sequential MLP after the heads
        assert not torch.allclose(a.heads, b.heads)


# ------------------------------------------------------------------------------ autograd
def _frozen_block_grad(m, cache, layer: int, readout):
    """d readout / d resid_pre of block ``layer``, through the real block with its patterns and
    norm scales replaced by the cached values (so they are constants)."""
    frozen = [
        f"blocks.{layer}.{h}"
        for h in ("ln1.hook_scale", "ln1_post.hook_scale", "ln2.hook_scale",
                  "ln2_post.hook_scale", "attn.hook_pattern")
    ] + ["ln_final.hook_scale"]  # fmt: skip
    hooks = [(n, lambda t, hook, v=cache[n]: v.detach()) for n in frozen if n in cache.cache_dict]
    x = cache[f"blocks.{layer}.hook_resid_pre"].detach().clone().requires_grad_(True)
    with m.hooks(fwd_hooks=hooks):
        y = m.blocks[layer](x)
        r = readout(y[0])
    (grad,) = torch.autograd.grad(r, x)
    return grad[0]


def _frozen_bridge_grads(m, cache, tokens, layer: int, readouts, heads=None, mlp=None):
    """A bridge's d readout / d resid_pre of block ``layer``, one batch row per readout: the whole
    bridge runs on copies of the prompt with its block-``layer`` input swapped for a leaf and every
    pattern and norm scale replaced by the cached value. A readout reads its row of the next
    block's resid_pre, or after the last block of the logits before any output softcap
    (``unembed.hook_out``). Per row, ``heads``: only these heads' outputs (``attn.hook_z``) carry
    gradient (None: all); ``mlp``: whether the MLP output carries gradient. [row, pos, d_model]"""
    B = len(readouts)
    heads = [None] * B if heads is None else heads
    mlp = [True] * B if mlp is None else mlp
    resid = cache[f"blocks.{layer}.hook_resid_pre"].detach()
    x = resid.expand(B, *resid.shape[1:]).clone().requires_grad_(True)
    hooks = [
        (n, lambda t, hook, v=cache[n]: v.detach().expand(B, *v.shape[1:]))
        for n in cache.cache_dict
        if n.endswith(".hook_scale") or n.endswith("attn.hook_pattern")
    ]
    hooks.append((f"blocks.{layer}.hook_resid_pre", lambda t, hook: x))
    keep = torch.ones(B, m.cfg.n_heads, dtype=torch.bool)
    for row, hs in enumerate(heads):
        if hs is not None:
            keep[row] = False
            keep[row, hs] = True
    keep_mlp = torch.tensor(mlp)

    def only_kept_heads(z, hook):  # z: [batch, pos, head, d_head]
        return torch.where(keep[:, None, :, None], z, z.detach())

    def only_kept_mlp(out, hook):
        return torch.where(keep_mlp[:, None, None], out, out.detach())

    hooks.append((f"blocks.{layer}.attn.hook_z", only_kept_heads))
    hooks.append((f"blocks.{layer}.hook_mlp_out", only_kept_mlp))
    last = layer == m.cfg.n_layers - 1
    seen = {}
    hooks.append(
        ("unembed.hook_out" if last else f"blocks.{layer + 1}.hook_resid_pre",
         lambda t, hook: seen.setdefault("y", t))
    )  # fmt: skip
    with m.hooks(fwd_hooks=hooks), arch_of(m).exact_forward():
        m(tokens[None].expand(B, -1))
    total = sum(readout(seen["y"][row]) for row, readout in enumerate(readouts))
    (grad,) = torch.autograd.grad(total, x)
    return grad


def _source_vectors(m, cache, layer: int) -> dict[str, torch.Tensor]:
    """Node id -> source vector, straight from the SAE (features c·W_dec, bias, error)."""
    sae = m.qk_dictionaries[layer].sae
    x = cache[f"blocks.{layer}.hook_resid_pre"][0]
    acts = sae.encode(x)
    recon = sae.decode(acts)
    out = {}
    for p in range(x.shape[0]):
        for f in torch.nonzero(acts[p])[:, 0].tolist():
            out[f"{layer}_{f}_{p}"] = acts[p, f] * sae.W_dec[f]
        out[f"{layer}_-1_{p}"] = x[p] - recon[p]
        out[f"{layer}_-2_{p}"] = sae.b_dec.detach()
    return out


@pytest.mark.parametrize("name", [*hooked("gpt2", "llama", "neox", "gemma2"), *BRIDGE_NAMES])
def test_edges_match_autograd_through_the_real_blocks(name):
    m = with_dicts(name, F64)
    bridge = is_bridge(name)
    toks = make_tokens(m, 10, seed=1)[0]
    g = attribution_graph(m, toks, prune_graph=False)
    _, cache = run_cache(m, toks)
    nodes, edges = g.nodes, g.edges
    checked = 0
    for tl in (1, 2):  # layer-1 features (block 0) and logits (block 1)
        L = tl - 1
        vec = _source_vectors(m, cache, L)
        targets = nodes[nodes["layer"] == tl].head(3)
        readouts = []
        for _, row in targets.iterrows():
            p = int(row["position"])
            if tl == 1:
                sae = m.qk_dictionaries[1].sae
                f = int(row["feature"])

                def readout(y, p=p, f=f, sae=sae):
                    return (y[p] - sae.b_dec) @ sae.W_enc[:, f] + sae.b_enc[f]
            elif bridge:  # y: the bridge's logits before any softcap
                v = int(row["feature"])

                def readout(y, p=p, v=v):
                    return y[p, v] - y[p].mean()
            else:
                v = int(row["feature"])

                def readout(y, p=p, v=v):
                    logits = m.unembed(m.ln_final(y[None]))[0, p]
                    return logits[v] - logits.mean()

            readouts.append(readout)
        if bridge:
            grads = _frozen_bridge_grads(m, cache, toks, L, readouts)
        else:
            grads = [_frozen_block_grad(m, cache, L, r) for r in readouts]
        for t, grad in zip(targets.index, grads, strict=True):
            inc = edges[edges["target_index"] == t]
            assert len(inc) > 0
            for e in inc.itertuples():
                ref = float(grad[int(e.source_pos)] @ vec[e.source])
                assert e.weight == pytest.approx(ref, rel=1e-9, abs=1e-11), (e.source, e.target)
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("name", [*hooked("gpt2"), *BRIDGE_CORE])
def test_head_loadings_match_autograd_per_head(name):
    """Split each head's value input off and differentiate through it alone — the head's path
    directly and through the MLP = the through_mlp=True loading. HookedTransformer: its own
    use_split_qkv_input. A bridge: only head h's ``hook_z`` carries gradient, minus the run in
    which no head does; that run's gradient, without and with the MLP, gives the residual and
    MLP loadings."""
    m = with_dicts(name, F64)
    toks = make_tokens(m, 10, seed=2)[0]
    g = attribution_graph(m, toks, prune_graph=False)
    hl = head_loadings(m, g, through_mlp=True)
    hd = head_loadings(m, g, through_mlp=False)
    bridge = is_bridge(name)
    if not bridge:
        m.set_use_split_qkv_input(True)
    _, cache = run_cache(m, toks)
    L, sae = 0, m.qk_dictionaries[1].sae
    vec = _source_vectors(m, cache, L)
    nodes, edges = g.nodes, g.edges
    target = nodes[(nodes["layer"] == 1) & (nodes["position"] == 7)].iloc[0]
    p, f, t = int(target["position"]), int(target["feature"]), int(target.name)
    inc = edges[edges["target_index"] == t]
    assert len(inc) > 10

    def readout(y):
        return (y[p] - sae.b_dec) @ sae.W_enc[:, f]

    def loading(grad, e):
        return float(grad[int(e.source_pos)] @ vec[e.source])

    H = m.cfg.n_heads
    if bridge:  # rows: (no head, each head) without the MLP, then the same with it
        rows = [([], False), *(([h], False) for h in range(H)), ([], True)]
        rows += [([h], True) for h in range(H)]
        heads, mlp = zip(*rows, strict=True)
        grads = _frozen_bridge_grads(m, cache, toks, L, [readout] * len(rows), heads, mlp)
        no_head = {False: grads[0], True: grads[H + 1]}
        per_head = {False: grads[1 : H + 1] - grads[0], True: grads[H + 2 :] - grads[H + 1]}
        for e in inc.itertuples():
            residual, with_mlp = loading(no_head[False], e), loading(no_head[True], e)
            assert float(hl.residual[e.Index]) == pytest.approx(residual, rel=1e-9, abs=1e-11)
            want = with_mlp - residual
            assert float(hl.mlp[e.Index]) == pytest.approx(want, rel=1e-9, abs=1e-11)
    x = cache[f"blocks.{L}.hook_resid_pre"].detach()
    frozen = [f"blocks.{L}.{h}" for h in ("ln1.hook_scale", "ln2.hook_scale", "attn.hook_pattern")]
    n_nonzero = 0
    for h in range(H):
        for with_mlp, loads in ((True, hl), (False, hd)):
            if bridge:
                grad = per_head[with_mlp][h]
            else:
                leaf = x.clone().requires_grad_(True)

                def split_v(t_, hook, h=h, leaf=leaf):
                    out = t_.detach().clone()
                    out[:, :, h] = leaf  # only head h's value input depends on the leaf
                    return out

                hooks = [(n, lambda t_, hook, v=cache[n]: v.detach()) for n in frozen]
                hooks.append((f"blocks.{L}.hook_v_input", split_v))
                if not with_mlp:  # the direct path only: no gradient through the MLP
                    hooks.append((f"blocks.{L}.hook_mlp_out", lambda t_, hook: t_.detach()))
                with m.hooks(fwd_hooks=hooks):
                    y = m.blocks[L](x)
                (grad,) = torch.autograd.grad(readout(y[0]), leaf)
                grad = grad[0]
            for e in inc.itertuples():
                ref = loading(grad, e)
                got = float(loads.heads[e.Index, h])
                assert got == pytest.approx(ref, rel=1e-9, abs=1e-11)
                n_nonzero += abs(ref) > 1e-6
    assert n_nonzero > 10
    if not bridge:
        m.set_use_split_qkv_input(False)


# ------------------------------------------------------------------------------ exactness
def _check_exact(m, g, cache, logits):
    nodes = g.nodes
    sums = incoming_sums(g) + nodes["offset"].to_numpy()
    for t, row in nodes[nodes["readout"].notna()].iterrows():
        p, layer = int(row["position"]), int(row["layer"])
        if row["kind"] == "logit":
            lg = logits[0, p].double()
            b = int(row["feature_b"])
            want = lg[int(row["feature"])] - (lg[b] if b >= 0 else lg.mean())
        else:
            sae = m.qk_dictionaries[layer].sae
            want = sae_pre(sae, cache[f"blocks.{layer}.hook_resid_pre"][0])[p, int(row["feature"])]
        assert float(row["readout"]) == pytest.approx(float(want), abs=1e-9)
        assert sums[t] == pytest.approx(float(want), abs=1e-9)


@pytest.mark.parametrize(
    "arch,norm,apply_b_dec",
    [
        ("standard", "none", True),
        ("jumprelu", "constant_norm_rescale", False),
        ("gated", "layer_norm", True),
        ("topk_rescale", "none", False),
        ("abstopk", "layer_norm", True),
    ],
)
@pytest.mark.parametrize("name", ATTN_ONLY)
def test_attention_only_edges_reproduce_pre_activations(name, arch, norm, apply_b_dec):
    m = with_dicts(name, F64, arch=arch, norm=norm, apply_b_dec=apply_b_dec)
    toks = make_tokens(m, 12, seed=3)[0]
    a, b = int(toks[3]), int(toks[4]) if int(toks[4]) != int(toks[3]) else int(toks[3]) + 1
    g = attribution_graph(m, toks, targets=[a, (a, b)], prune_graph=False)
    logits, cache = run_cache(m, toks)
    _check_exact(m, g, cache, logits)


@pytest.mark.parametrize("name", ATTN_ONLY)
def test_attention_only_per_head_loadings_are_each_heads_write(name):
    """Σ_s heads[s→t, h] + head h's bias share = w_t · (head h's output at p_t), from hook_z."""
    m = with_dicts(name, F64, arch="standard")
    toks = make_tokens(m, 12, seed=4)[0]
    g = attribution_graph(m, toks, prune_graph=False)
    hl = head_loadings(m, g)
    _, cache = run_cache(m, toks)
    nodes = g.nodes
    sae = m.qk_dictionaries[1].sae
    attn, ln1 = m.blocks[0].attn, m.blocks[0].ln1
    # ln1's bias: a bridge holds Hugging Face's LayerNorm (a GPT-2 block, one value head per head)
    ln1_b = ln1.original_component.bias if is_bridge(name) else ln1.b
    assert attn.W_V.shape[0] == m.cfg.n_heads
    tgt = g.edge_target.numpy()
    n = 0
    for t, row in nodes[(nodes["layer"] == 1) & (nodes["kind"] == "feature")].head(6).iterrows():
        p, f = int(row["position"]), int(row["feature"])
        w = sae.W_enc[:, f].detach()
        z = cache["blocks.0.attn.hook_z"][0, p]  # [head, d_head]
        for h in range(m.cfg.n_heads):
            out_h = z[h] @ attn.W_O[h]
            bias_h = ((ln1_b @ attn.W_V[h] + attn.b_V[h]) @ attn.W_O[h]) * cache[
                "blocks.0.attn.hook_pattern"
            ][0, h, p].sum()
            got = float(hl.heads[tgt == t, h].sum() + w @ bias_h)
            assert got == pytest.approx(float(w @ out_h), abs=1e-9)
            n += 1
    assert n == 6 * m.cfg.n_heads


@pytest.mark.parametrize("name", ATTN_ONLY)
def test_no_layer0_dictionary_uses_embeddings_as_its_basis(name):
    m = with_dicts(name, F64, layers=[1])
    toks = make_tokens(m, 12, seed=5)[0]
    g = attribution_graph(m, toks, prune_graph=False)
    logits, cache = run_cache(m, toks)
    _check_exact(m, g, cache, logits)
    emb = g.nodes["kind"].to_numpy()[g.edge_source.numpy()] == "embedding"
    assert emb.any() and (g.edge_layers().numpy()[emb] == 0).all()
    assert head_loadings(m, g).check() <= 1e-12


@pytest.mark.parametrize("name", ATTN_ONLY)
def test_decoder_readout_is_the_papers_target_vector(name):
    m = with_dicts(name, F64)
    toks = make_tokens(m, 12, seed=6)[0]
    g = attribution_graph(m, toks, readout="decoder", prune_graph=False)
    _, cache = run_cache(m, toks)
    nodes = g.nodes
    sums = incoming_sums(g) + nodes["offset"].to_numpy()
    sae = m.qk_dictionaries[1].sae
    x1 = cache["blocks.1.hook_resid_pre"][0]
    for t, row in nodes[(nodes["layer"] == 1) & (nodes["kind"] == "feature")].head(5).iterrows():
        p, f = int(row["position"]), int(row["feature"])
        want = float(row["coefficient"]) * float(sae.W_dec[f] @ x1[p])  # a_t d_t · x
        assert float(row["readout"]) == pytest.approx(want, abs=1e-9)
        assert sums[t] == pytest.approx(want, abs=1e-9)


# ------------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("name", [*hooked("gpt2"), "Gemma2ForCausalLM"])
def test_influence_matches_dense_power_series_and_pruning_rules(name):
    m = with_dicts(name, F64)
    toks = make_tokens(m, 12, seed=7)[0]
    full = attribution_graph(m, toks, prune_graph=False)
    n = full.n_nodes
    A = torch.zeros(n, n, dtype=F64)
    A[full.edge_target, full.edge_source] = full.edge_weight
    A = A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-10)
    w = torch.as_tensor(full.nodes["weight"].to_numpy())
    infl, cur = torch.zeros(n, dtype=F64), w @ A
    while cur.abs().sum() > 0:  # circuit-tracer's compute_influence
        infl += cur
        cur = cur @ A
    assert np.isfinite(full.nodes["influence"].to_numpy()).all()
    np.testing.assert_allclose(full.nodes["influence"].to_numpy(), infl.numpy(), atol=1e-12)

    g = attribution_graph(m, toks, node_threshold=0.6, edge_threshold=0.9)
    kinds = g.nodes["kind"].to_numpy()
    assert (kinds == "embedding").sum() == len(toks) and (kinds == "logit").sum() >= 1
    assert g.n_nodes < full.n_nodes and g.n_edges < full.n_edges
    src, tgt = g.edge_source.numpy(), g.edge_target.numpy()
    for i, k in enumerate(kinds):
        if k in ("feature", "error", "bias"):
            assert (src == i).any(), "kept node without outgoing edge"
        if k == "feature":
            assert (tgt == i).any(), "kept feature without incoming edge"
    capped = attribution_graph(m, toks, node_threshold=1.0, max_feature_nodes=5)
    assert (capped.nodes["kind"] == "feature").sum() <= 5
    # Kept edges carry the full graph's weights.
    ids = g.nodes["node_id"].to_numpy()
    fe = full.edges.set_index(["source", "target"])["weight"]
    for s, t, wt in zip(ids[src][:50], ids[tgt][:50], g.edge_weight[:50].tolist(), strict=True):
        assert fe.loc[(s, t)] == wt


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kind", [*hooked("hooked"), "bridge"])
def test_missing_dictionary_is_a_clear_error(kind):
    if kind == "bridge":
        three, two = make_bridge("LlamaForCausalLM", num_hidden_layers=3), TOY_BRIDGE
    else:
        three, two = "inverse_layer_idx", "attn_only"
    m = with_dicts(three, F64, layers=[0, 2])  # 3 layers, none at 1
    assert m.cfg.n_layers == 3
    with pytest.raises(ValueError, match=r"missing: \[1\].*Checkpointing"):
        attribution_graph(m, make_tokens(m, 8)[0])
    m = with_dicts(two, F64, layers=[0])
    with pytest.raises(ValueError, match=r"missing: \[1\]"):
        attribution_graph(m, make_tokens(m, 8)[0])


@pytest.mark.parametrize("name", [*hooked("attn_only"), "GPT2LMHeadModel"])
def test_bad_inputs_and_refusals(name):
    m = with_dicts(name, F64)
    toks = make_tokens(m, 8)[0]
    with pytest.raises(ValueError, match="node_threshold"):
        attribution_graph(m, toks, node_threshold=1.5)
    with pytest.raises(ValueError, match="readout"):
        attribution_graph(m, toks, readout="both")
    with pytest.raises(ValueError, match="target_pos"):
        attribution_graph(m, toks, target_pos=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribution_graph(m, toks, targets=[1000])
    with pytest.raises(ValueError, match="itself"):
        attribution_graph(m, toks, targets=[(3, 3)])
    with pytest.raises(TypeError, match="attach"):
        attribution_graph(make_any(name), toks)  # not attached
    mp = with_dicts(name, F64, arch="matching_pursuit")
    with pytest.raises(ValueError, match="readout='decoder'"):
        attribution_graph(mp, toks)
    attribution_graph(mp, toks, readout="decoder")
    g = attribution_graph(m, toks, prune_graph=False)
    emb_edge = int(np.nonzero(g.edge_layers().numpy() == -1)[0][0])
    with pytest.raises(ValueError, match="crosses no attention layer"):
        g.qk_attribution(m, emb_edge, 0)
    with pytest.raises(ValueError, match="no edge"):
        g.edge_index((g.nodes["node_id"].iloc[-1], g.nodes["node_id"].iloc[0]))


@pytest.mark.parametrize("name", [*hooked("attn_only"), "GPT2LMHeadModel"])
def test_ln1_normalized_dictionary_is_refused(name):
    m = qk_lens.attach(make(name, F64))
    d = m.cfg.d_model
    m.add_dictionary(make_sae("topk", hook="blocks.0.hook_resid_pre", d_in=d, d_sae=48))
    m.add_dictionary(make_sae("topk", hook="blocks.1.ln1.hook_normalized", d_in=d, d_sae=48))
    with pytest.raises(ValueError, match="after ln1"):
        attribution_graph(m, make_tokens(m, 8)[0])


# ------------------------------------------------------------------------------ files
@pytest.mark.parametrize("name", [*hooked("gpt2"), "Qwen3ForCausalLM"])
def test_save_load_round_trip_and_corrupt_files(name, tmp_path):
    m = with_dicts(name, F32)
    g = attribution_graph(m, make_tokens(m, 12)[0])
    path = g.save(tmp_path / "g.safetensors")
    h = Graph.load(path)
    pd.testing.assert_frame_equal(g.nodes, h.nodes)
    for a in ("edge_source", "edge_target", "edge_weight", "tokens"):
        assert torch.equal(getattr(g, a), getattr(h, a))
    assert h.metadata == json.loads(json.dumps(g.metadata))
    torch.testing.assert_close(head_loadings(m, h).heads, head_loadings(m, g).heads)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="bad.safetensors"):
        Graph.load(bad)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        Graph.load(trunc)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a qk_lens graph"):
        Graph.load(other)
    with safe_open(str(path), "pt") as fh:
        header = json.loads(fh.metadata()["qk_lens_graph"])
    header["version"] = 99
    tensors = load_file(str(path))
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={"qk_lens_graph": json.dumps(header)})
    with pytest.raises(ValueError, match="version 99"):
        Graph.load(future)
    # A graph from another model (same shapes, other weights) is refused by head_loadings.
    other_model = with_dicts(name, F32, seed=1)
    with pytest.raises(ValueError, match="another model|other dictionaries"):
        head_loadings(other_model, h)


# ------------------------------------------------------------------------------ export
from qk_lens.graph import NEURONPEDIA_SCHEMA  # noqa: E402 (the package's own schema)

TOY_KINDS = [pytest.param(False, marks=needs_hooked, id="hooked"), pytest.param(True, id="bridge")]


@pytest.fixture(scope="module", params=TOY_KINDS)
def toy_graph(request):
    """The toy model (a HookedTransformer, or the same weights as a TransformerBridge), its
    induction prompt and graph."""
    from qk_lens import toy

    m = toy.load("attn2-ln", bridge=request.param)
    assert isinstance(m, qk_lens.QKLensMixin) and is_bridge_model(m) == request.param
    prompt = "owl cat jay fox elk hen owl cat jay fox elk"
    return m, prompt, attribution_graph(m, prompt)


def test_neuronpedia_export_structure(toy_graph, tmp_path):
    import jsonschema

    from qk_lens.graph import save_neuronpedia, to_neuronpedia

    m, _, g = toy_graph
    hl = head_loadings(m, g)
    data = to_neuronpedia(g, m, hl, slug="toy-induction")
    jsonschema.validate(data, NEURONPEDIA_SCHEMA)
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"])
    types = {n["feature_type"] for n in data["nodes"]}
    assert types <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids
        if "head_loadings" in link:
            hlk = link["head_loadings"]
            assert len(hlk["heads"]) == m.cfg.n_heads
            total = hlk["residual"] + hlk["mlp"] + sum(hlk["heads"])
            assert total == pytest.approx(link["weight"], rel=1e-4, abs=1e-5)
    traced = [n for n in data["nodes"] if "qk_tracing_results" in n]
    assert traced and any(n["feature_type"] == "logit" for n in traced)
    for n in traced:
        q = n["qk_tracing_results"]
        assert {"pair_wise_contributors", "top_q_marginal_contributors",
                "top_k_marginal_contributors", "layer", "head", "q_pos", "k_pos"} <= set(q)  # fmt: skip
        for qi, ki, v in q["pair_wise_contributors"]:
            assert isinstance(qi, str) and isinstance(ki, str) and isinstance(v, float)
            assert qi in q["labels"] and ki in q["labels"]
        assert q["q_pos"] == n["ctx_idx"]
    assert data["metadata"]["qk_lens"]["through_mlp"] is True
    sep = to_neuronpedia(g, bias_nodes="separate")  # no model: plain graph, biases apart
    assert any(n["feature_type"] == "dictionary bias" for n in sep["nodes"])
    assert all("head_loadings" not in lk for lk in sep["links"])
    dropped = to_neuronpedia(g, bias_nodes="drop")
    assert all(n["qk_lens_kind"] != "bias" for n in dropped["nodes"])
    path = save_neuronpedia(g, tmp_path / "g.json", m, loadings=hl)
    jsonschema.validate(json.loads(path.read_text()), NEURONPEDIA_SCHEMA)
    with pytest.raises(ValueError, match="bias_nodes"):
        to_neuronpedia(g, bias_nodes="keep")


# ------------------------------------------------------------------------------ the toy model
def test_toy_induction_edge_loading_and_qk_story(toy_graph):
    from qk_lens.atlas.probes import pattern_scores

    m, prompt, g = toy_graph
    words = m.to_str_tokens(prompt)
    q = len(words) - 1  # the repeated 'elk'
    first = words.index(words[q])  # its earlier occurrence
    k = first + 1  # the induction target: the token after it ('hen')
    nxt = words[k]
    nodes = g.nodes
    logits = nodes[nodes["kind"] == "logit"]
    top = logits.loc[logits["prob"].idxmax()]
    assert top["label"] == f'Output "{nxt}"' and top["position"] == q

    inc = g.incoming(top.name)
    e = inc.iloc[0]  # the strongest edge into the prediction
    assert e["source_pos"] == k and e["layer"] == 1
    assert e["source_label"] == f"current token = {nxt}"

    hl = head_loadings(m, g)
    hl.check()
    edge = int(inc.index[0])
    heads = hl.top_heads(edge)
    h = int(heads["head"].iloc[0])
    assert heads["share"].iloc[0] > 0.3
    scores = pattern_scores(m, n=8)
    induction = scores[(scores["layer"] == 1) & (scores["head"] == h)]["induction"].item()
    assert induction > 0.5  # the head carrying the edge is an induction head
    assert float(m.qk_capture(prompt).pattern(1)[h, q, k]) > 0.5

    attr = g.qk_attribution(m, edge, h)
    assert (attr.layer, attr.head, attr.q_pos, attr.k_pos) == (1, h, q, k)
    attr.check()
    best = attr.top(1).iloc[0]
    assert best["q_label"] == f"current token = {words[q]}"
    assert best["k_label"] == f"previous token = {words[q]}"
    assert hl.qk_attribution(edge).head == h  # default: the edge's top head


@pytest.mark.parametrize("bridge", TOY_KINDS)
def test_toy_float64_is_exact(bridge):
    from qk_lens import toy

    m = toy.load("attn2-ln", dtype=F64, bridge=bridge)
    prompt = "owl cat jay fox elk hen owl cat jay fox elk"
    g = attribution_graph(m, prompt, prune_graph=False)
    tokens = m.to_tokens(prompt)[0]
    assert torch.equal(g.tokens, tokens)
    logits, cache = run_cache(m, tokens)
    _check_exact(m, g, cache, logits)
    assert head_loadings(m, g).check() <= 1e-12
