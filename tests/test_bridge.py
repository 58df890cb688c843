"""TransformerBridge models (Hugging Face weights wrapped by TransformerLens): every feature read
through the bridge adapter, exact against the bridge's own hooks.

The bridge runs Hugging Face's RMSNorm through float32; qk_lens runs its forwards with the
bridge's own norm path (``exact_forward``), so the reference hooks below come from that forward.
"""

import math

import pytest
import torch

import qk_lens
from qk_lens.arch import arch_of
from qk_lens.bases import DictionaryBasis, UpstreamBasis
from tests.bridges import BRIDGE_NAMES, HAVE_SAE_LENS, attached_bridge, make_bridge
from tests.models import hooks_of

torch.set_num_threads(1)
F64, F32 = torch.float64, torch.float32
Q = 9  # the last position of the 10-token prompt
# Beside TransformerLens 4 (no SAELens) the dictionaries are qk_lens's reader of SAELens's format.
BASES = ["dictionary", "upstream"]


def make_sae(*args, **kwargs):
    from tests.saes import make_sae

    return make_sae(*args, **kwargs)


def model_score(model, cache, layer, head, q, k):
    """What the bridge's hook holds: the score after softcap (Gemma-2), before the mask."""
    return float(cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, q, k])


def softcapped(model, layer, raw):
    cap = arch_of(model).layer(layer).softcap
    return raw if cap is None else cap * math.tanh(raw / cap)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_terms_sum_to_the_bridge_score_float64(name, basis):
    model, tokens, layer = attached_bridge(name)
    cache = hooks_of(model, tokens)
    n = 0
    for head in range(model.cfg.n_heads):
        for a in model.qk_attribution(tokens, layer, head, Q, basis=basis):
            want = model_score(model, cache, layer, head, Q, a.k_pos)
            got = softcapped(model, layer, float(a.terms.sum()))
            assert abs(got - want) <= 1e-9, (head, a.k_pos, got, want)
            n += 1
    assert n >= model.cfg.n_heads * 4  # a sliding window still leaves 4 keys per query


@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_terms_sum_to_the_bridge_score_float32(name):
    model, tokens, layer = attached_bridge(name, F32)
    cache = hooks_of(model, tokens)
    for head in range(model.cfg.n_heads):
        for a in model.qk_attribution(tokens, layer, head, Q, basis=BASES[0]):
            want = model_score(model, cache, layer, head, Q, a.k_pos)
            got = softcapped(model, layer, float(a.terms.double().sum()))
            assert abs(got - want) <= 1e-4 * a.scale, (head, a.k_pos, got, want, a.scale)
            a.check()


@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_bases_sum_to_the_bridge_residual(name):
    model, tokens, layer = attached_bridge(name)
    cache = hooks_of(model, tokens)
    resid = cache[f"blocks.{layer}.hook_resid_pre"][0]
    cap = model.qk_capture(tokens)
    positions = torch.arange(len(tokens))
    for basis in (UpstreamBasis(), DictionaryBasis(model.qk_dictionaries[layer])):
        pb = basis.parts(model, cap, layer, positions)
        total = (pb.vectors * pb.valid[..., None]).sum(1)
        assert torch.allclose(total, resid, atol=1e-10, rtol=0), type(basis).__name__


@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_capture_logits_are_the_bridge_logits(name):
    model, tokens, _ = attached_bridge(name)
    with torch.no_grad(), arch_of(model).exact_forward():
        want = model(tokens[None], return_type="logits")[0]
    assert torch.equal(model.qk_capture(tokens).logits(), want)


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_table_rows_sum_to_the_bridge_scores(name):
    model, tokens, layer = attached_bridge(name)
    cache = hooks_of(model, tokens)
    table = model.qk_attribution_table(tokens, layer, top_k=4, basis=BASES[0])
    sums = table.groupby(["head", "q_pos", "k_pos"])["term"].sum()
    for (head, q, k), total in sums.items():
        want = model_score(model, cache, layer, head, q, k)
        assert abs(softcapped(model, layer, total) - want) <= 1e-9, (head, q, k)


@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_steering_on_bridges(name):
    """Query side, key side (GQA: the shared key edited, the group's other heads held at their
    clean patterns; see tests/test_steering.py) and residual edits on every bridge."""
    model, tokens, layer = attached_bridge(name)
    a = model.qk_attribution(tokens, layer, 0, Q, Q)
    feature = int(a.key_parts[a.key_parts.kind == "feature"].feature.iloc[0])
    assert model.steer_qk(tokens, layer, 0, "query", {feature: 0.0}, positions=[Q]).check() < 1e-9
    assert model.steer_resid(tokens, layer, [feature], positions=[Q]).check() < 1e-9
    r = model.steer_qk(tokens, layer, 0, "key", {feature: 0.0}, positions=[Q])
    assert r.check() < 1e-9


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "GPTNeoXForCausalLM", "Gemma2ForCausalLM"])
def test_graph_and_head_loadings_on_bridges(name):
    model = qk_lens.attach(make_bridge(name))
    for layer in (0, 1):
        sae = make_sae(
            "topk", hook=f"blocks.{layer}.hook_resid_pre", d_in=64, d_sae=256, seed=3 + layer
        )
        model.add_dictionary(sae)
    tokens = torch.randint(0, 100, (10,), generator=torch.Generator().manual_seed(5))
    graph = model.attribution_graph(tokens)
    loadings = model.head_loadings(graph)
    assert graph.n_edges > 0 and loadings.check() < 1e-10
    e = int(loadings.heads.abs().sum(1).argmax())
    loadings.qk_attribution(e).check()


def test_atlas_on_a_bridge():
    model = qk_lens.attach(make_bridge("Qwen3ForCausalLM"))
    atlas = model.head_atlas(n_probes=4)
    assert len(atlas.frame) == 8 and atlas.frame["qk_skew"].notna().all()


def test_attach_a_bridge_and_refusals():
    bridge = make_bridge("GPT2LMHeadModel")
    model = qk_lens.attach(bridge)
    assert model is bridge and isinstance(model, qk_lens.QKLensMixin)
    other = make_bridge("GPT2LMHeadModel")
    other.cfg.architecture = "FalconForCausalLM"
    with pytest.raises(TypeError, match="not verified .* 'FalconForCausalLM'.*GPT2LMHeadModel"):
        qk_lens.attach(other).qk_capture(torch.tensor([1, 2, 3]))
    processed = make_bridge("GPT2LMHeadModel", F32)
    processed.enable_compatibility_mode(disable_warnings=True)
    with pytest.raises(ValueError, match="no_processing=True"):
        qk_lens.attach(processed).qk_capture(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_compatibility_mode_without_processing_stays_exact(name):
    """enable_compatibility_mode(no_processing=True): masks become −inf, weights stay raw."""
    model = qk_lens.attach(make_bridge(name))
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    model.add_dictionary(make_sae("topk", hook="blocks.1.hook_resid_pre", d_in=64, d_sae=256))
    tokens = torch.randint(0, 100, (10,), generator=torch.Generator().manual_seed(5))
    cache = hooks_of(model, tokens)
    for head in (0, 3):
        for a in model.qk_attribution(tokens, 1, head, Q, basis=BASES[0]):
            want = model_score(model, cache, 1, head, Q, a.k_pos)
            assert abs(softcapped(model, 1, float(a.terms.sum())) - want) <= 1e-9


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_contrasts_and_inhibitors_on_bridges(name):
    """Why key k and not k′, against the bridge's own scores; inhibitors run on a bridge row."""
    model, tokens, layer = attached_bridge(name)
    cache = hooks_of(model, tokens)
    row = model.qk_attribution(tokens, layer, 1, Q, basis=BASES[0])
    k, other = row.k_positions[-1], row.k_positions[-2]
    c = row.contrast(k, other)
    want = model_score(model, cache, layer, 1, Q, k), model_score(model, cache, layer, 1, Q, other)
    raw = [float(row[p].terms.sum()) for p in (k, other)]
    assert [softcapped(model, layer, r) for r in raw] == pytest.approx(list(want), abs=1e-9)
    assert float(c.terms.sum()) == pytest.approx(raw[0] - raw[1], abs=1e-9)
    c.check()
    assert len(row.inhibitors(top_k=3)) <= 3


@pytest.mark.skipif(not HAVE_SAE_LENS, reason="SAELens's bridge class needs SAELens")
@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "Gemma3ForCausalLM"])
def test_sae_lens_bridge_class(name):
    """SAELens's SAETransformerBridge (hook_dict without the aliases; SAEs spliced in with
    add_sae) attaches like any bridge: exact against its hooks, with and without a spliced SAE,
    and steering runs on it."""
    from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge

    bridge = make_bridge(name)
    bridge.__class__ = SAETransformerBridge  # what SAETransformerBridge.boot_transformers does
    bridge._acts_to_saes, bridge._transcoder_output_hooks = {}, {}
    model = qk_lens.attach(bridge)
    assert isinstance(model, SAETransformerBridge)
    model.add_dictionary(make_sae("topk", hook="blocks.1.hook_resid_pre", d_in=64, d_sae=256))
    tokens = torch.randint(0, 100, (10,), generator=torch.Generator().manual_seed(5))

    def worst() -> float:
        cache = hooks_of(model, tokens)
        return max(
            abs(
                softcapped(model, 1, float(a.terms.sum()))
                - model_score(model, cache, 1, 2, Q, a.k_pos)
            )
            for a in model.qk_attribution(tokens, 1, 2, Q)
        )

    assert worst() <= 1e-9
    # labelling reads the dictionary's hook by its alias, which this class does not list
    labels = qk_lens.label_dictionary(model, model.qk_dictionaries[1], tokens[None].repeat(4, 1))
    assert len(labels) == 256
    a = model.qk_attribution(tokens, 1, 2, Q, 4)
    f = int(a.query_parts[a.query_parts.kind == "feature"].feature.iloc[0])
    model.steer_qk(tokens, 1, 2, "query", {f: 0.0}, positions=[Q]).check()
    before = model.qk_attribution(tokens, 1, 2, Q, 4).score
    model.add_sae(make_sae("topk", hook="blocks.0.hook_resid_post", d_in=64, d_sae=256, seed=9))
    model.clear_qk_cache()
    assert abs(model.qk_attribution(tokens, 1, 2, Q, 4).score - before) > 1e-3  # the splice acts
    assert worst() <= 1e-9
