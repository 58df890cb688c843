"""The public API: bad input gives clear errors, results answer questions, captures are reused.

Every test runs on a HookedTransformer (stack (a)) and on TransformerBridge models (both stacks);
HookedTransformer-only features (clip_qkv, HookedQKTransformer) stay on stack (a).
"""

import importlib.util
import json

import numpy as np
import pytest
import torch

import qk_lens
from tests.models import HOOKED, hooks_of, make_any, make_tokens, needs_hooked
from tests.saes import make_sae

torch.set_num_threads(1)
N_TOK = 16
# gpt2-like (learned positions), GQA + rotary, and Gemma-2 (softcap, local layers, pre/post norms)
API_MODELS = [
    pytest.param("gpt2", marks=needs_hooked),
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "Gemma2ForCausalLM",
]
# Layer 0 of each is local with window 4.
LOCAL_MODELS = [
    pytest.param("gemma2", marks=needs_hooked),
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
]


@pytest.fixture(scope="module", params=API_MODELS)
def gpt2(request):
    """(attached model, tokens) with a JumpReLU SAE on layer 1; gpt2 or a bridge."""
    model = qk_lens.attach(make_any(request.param))
    model.add_dictionary(make_sae("jumprelu", hook="blocks.1.hook_resid_pre", d_in=64, d_sae=200))
    tokens = make_tokens(model, N_TOK)[0]
    return model, tokens


@pytest.fixture(scope="module", params=LOCAL_MODELS)
def gemma2(request):
    model = qk_lens.attach(make_any(request.param))
    return model, make_tokens(model, N_TOK)[0]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            {"q_pos": N_TOK},
            ValueError,
            r"q_pos=16 is past the prompt, which has 16 tokens: valid positions are 0\.\.15",
        ),
        ({"q_pos": -N_TOK - 1}, ValueError, "past the prompt"),
        ({"k_pos": N_TOK + 3}, ValueError, r"k_pos=19 is past the prompt"),
        (
            {"q_pos": 4, "k_pos": 9},
            ValueError,
            r"k_pos=9 is masked for q_pos=4 in layer 1: the head can only attend to keys in \[0, 4\]",
        ),
        ({"layer": 2}, ValueError, r"layer=2 is out of range: this model has 2 layers \(0\.\.1\)"),
        ({"layer": -1}, ValueError, "layer=-1 is out of range"),
        (
            {"head": 4},
            ValueError,
            r"head=4 is out of range: this model has 4 heads per layer \(0\.\.3\)",
        ),
        ({"head": 1.0}, TypeError, "head must be an int"),
        ({"q_pos": "3"}, TypeError, "q_pos must be an int"),
        ({"q_pos": torch.tensor([3, 4])}, TypeError, "q_pos must be an int"),
        ({"k_pos": []}, ValueError, "k_pos is an empty list"),
        (
            {"basis": "pca"},
            ValueError,
            r"must be one of \('dictionary', 'upstream', 'transcoders'\)",
        ),
    ],
)
def test_bad_arguments(gpt2, kwargs, exc, match):
    model, tokens = gpt2
    args = {"layer": 1, "head": 0, "q_pos": 10, "k_pos": 2, **kwargs}
    with pytest.raises(exc, match=match):
        model.qk_attribution(tokens, **args)


def test_key_outside_local_window(gemma2):
    model, tokens = gemma2
    # gemma2's layer 0 is local with window 4: from q=10 only keys 7..10 are visible.
    with pytest.raises(ValueError, match=r"keys in \[7, 10\] \(local attention, window 4\)"):
        model.qk_attribution(tokens, 0, 0, 10, 6, basis="upstream")
    row = model.qk_attribution(tokens, 0, 0, 10, None, basis="upstream")
    assert row.k_positions == [7, 8, 9, 10]
    # the model's own pattern agrees: from q=10, layer 0 attends to keys 7..10 only
    pattern = hooks_of(model, tokens)["blocks.0.attn.hook_pattern"][0, 0, 10]
    assert torch.nonzero(pattern).flatten().tolist() == [7, 8, 9, 10]


@pytest.mark.parametrize(
    "prompt, exc, match",
    [
        ("", ValueError, "empty string"),
        ([], ValueError, "no tokens"),
        ("hello", ValueError, "no tokenizer; pass token ids"),
        (torch.zeros(2, 5, dtype=torch.long), ValueError, "batch size 2"),
        (torch.zeros(5), TypeError, "integer token ids"),
        ([1, 2, 500], ValueError, r"token ids must lie in \[0, 100\)"),
        (3.5, TypeError, "prompt must be a str"),
    ],
)
def test_bad_prompts(gpt2, prompt, exc, match):
    model, _ = gpt2
    with pytest.raises(exc, match=match):
        model.qk_attribution(prompt, 1, 0, 0, 0)


def test_missing_dictionary_says_how_to_fix(gpt2):
    model, tokens = gpt2
    with pytest.raises(
        ValueError,
        match=r"no dictionary for layer 0 \(layers with one: \[1\]\).*add_dictionary.*basis='upstream'",
    ):
        model.qk_attribution(tokens, 0, 0, 3, 1)


@pytest.mark.parametrize(
    "sae_kwargs, match",
    [
        ({"hook": "blocks.1.attn.hook_z"}, r"blocks\.1\.hook_resid_pre"),
        ({"hook": "blocks.1.hook_mlp_out"}, r"hook_resid_pre"),
        ({"d_in": 32}, r"32.*64|64.*32"),
        ({"norm": "expected_average_only_in"}, r"fold_activation_norm_scaling_factor"),
        ({"hook": "blocks.1.hook_resid_post"}, "no attention layer"),
    ],
)
def test_dictionary_refusals(gpt2, sae_kwargs, match):
    model, _ = gpt2
    kw = {"hook": "blocks.1.hook_resid_pre", "d_in": 64, "d_sae": 100, **sae_kwargs}
    with pytest.raises(ValueError, match=match):
        model.add_dictionary(make_sae("standard", **kw))


@pytest.mark.skipif(
    importlib.util.find_spec("sae_lens") is None, reason="a SAELens Transcoder (needs SAELens)"
)
def test_transcoder_refused(gpt2):
    from sae_lens.saes import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    model, _ = gpt2
    tc = Transcoder(
        TranscoderConfig(
            d_in=64,
            d_sae=100,
            d_out=64,
            apply_b_dec_to_input=False,
            metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre"),
        )
    )
    with pytest.raises(ValueError, match="transcoder"):
        model.add_dictionary(tc)


def test_not_a_dictionary_refused(gpt2):
    model, _ = gpt2
    with pytest.raises(TypeError, match="dict"):
        model.add_dictionary({"W_dec": 1})


@needs_hooked
def test_clip_qkv_refused_only_when_it_clipped():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tests.archs import make_model, reference_scores

    base = make_model("gpt2")
    cfg = base.cfg.to_dict()
    cfg["clip_qkv"] = 0.05
    model = qk_lens.attach(HookedTransformer(HookedTransformerConfig(**cfg)))
    model.load_state_dict(base.state_dict())
    tokens = make_tokens(model, 8)[0]
    with pytest.raises(
        ValueError, match=r"clip_qkv=0\.05 clipped the query of layer 1 head\(s\) \[0\]"
    ):
        model.qk_attribution(tokens, 1, 0, 5, 2, basis="upstream")
    model.cfg.clip_qkv = 1e6  # never reached: the split is exact again
    model.clear_qk_cache()
    _, cache = model.run_with_cache(tokens[None])
    raw, _ = reference_scores(model, cache, 1)
    a = model.qk_attribution(tokens, 1, 0, 5, 2, basis="upstream")
    assert abs(a.score - float(raw[0, 5, 2])) < 1e-9


@needs_hooked
def test_attach_and_class():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tests.archs import make_model

    with pytest.raises(TypeError, match="HookedTransformer"):
        qk_lens.attach(torch.nn.Linear(2, 2))
    base = make_model("attn_only")
    model = qk_lens.attach(base)
    assert model is base and isinstance(model, HookedTransformer)
    assert qk_lens.attach(model) is model
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=10, attn_only=True
    )
    direct = qk_lens.HookedQKTransformer(cfg)
    assert isinstance(direct, qk_lens.QKLensMixin)
    assert direct.qk_attribution([1, 2, 3], 0, 0, 2, 1, basis="upstream").k_pos == 1


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_attach_a_bridge_and_class(name):
    from transformer_lens.model_bridge import TransformerBridge

    with pytest.raises(TypeError, match="TransformerBridge, got Linear"):
        qk_lens.attach(torch.nn.Linear(2, 2))
    base = make_any(name)
    model = qk_lens.attach(base)
    assert model is base and isinstance(model, TransformerBridge)
    assert isinstance(model, qk_lens.QKLensMixin) and qk_lens.attach(model) is model
    tokens = torch.tensor([1, 2, 3])
    a = model.qk_attribution(tokens, 0, 0, 2, 1, basis="upstream")
    want = hooks_of(model, tokens)["blocks.0.attn.hook_attn_scores"][0, 0, 2, 1]
    assert a.k_pos == 1 and abs(float(a.terms.sum()) - float(want)) < 1e-9


@pytest.mark.skipif(HOOKED, reason="TransformerLens 4: HookedQKTransformer is not available")
def test_hooked_qk_transformer_says_what_to_use_instead():
    for make in (qk_lens.HookedQKTransformer, qk_lens.HookedQKTransformer.from_pretrained):
        with pytest.raises(ImportError, match=r"qk_lens\.attach\(TransformerBridge"):
            make("gpt2")


# ----------------------------------------------------------------------------- capture reuse
def test_one_forward_per_prompt_and_invalidation(gpt2):
    model, tokens = gpt2
    calls = []
    hook_point = model.hook_dict["blocks.0.hook_resid_pre"]
    hook_point.add_hook(lambda t, hook: calls.append(1))
    # layer 0's first attention weight (HookedTransformer: W_Q; a bridge: its query projection)
    weight = next(model.blocks[0].attn.parameters())
    try:
        model.clear_qk_cache()
        for q in range(3, 8):
            model.qk_attribution(tokens, 1, 0, q, 0)
        before = model.qk_attribution(tokens, 1, 2, 5, None, basis="upstream")
        model.qk_attribution_table(tokens, 1, heads=[1], top_k=3)
        assert len(calls) == 1
        with torch.no_grad():
            weight[(0,) * weight.ndim] += 1.0  # in-place edit bumps the version counter
        after = model.qk_attribution(tokens, 1, 2, 5, None, basis="upstream")
        assert len(calls) == 2
        assert not torch.equal(after.scores, before.scores)  # the edit reached the forward
    finally:
        hook_point.remove_hooks()
        with torch.no_grad():
            weight[(0,) * weight.ndim] -= 1.0
        model.clear_qk_cache()


# ----------------------------------------------------------------------------- result methods
def test_result_methods_are_consistent(gpt2):
    model, tokens = gpt2
    a = model.qk_attribution(tokens, 1, 3, 12, 5)
    terms = a.terms
    top = a.top(7)
    flat = terms.reshape(-1)
    expected = flat[flat.abs().argsort(descending=True)[:7]]
    assert np.allclose(top.term.to_numpy(), expected.numpy())
    r = top.iloc[0]
    qi = a.query_parts.index[
        (a.query_parts.kind == r.q_kind)
        & (a.query_parts.label == r.q_label)
        & (a.query_parts.feature == r.q_feature)
    ][0]
    ki = a.key_parts.index[
        (a.key_parts.kind == r.k_kind)
        & (a.key_parts.label == r.k_label)
        & (a.key_parts.feature == r.k_feature)
    ][0]
    assert float(terms[qi, ki]) == r.term
    assert np.isclose(a.query_marginals().marginal.sum(), a.score)
    assert np.isclose(a.key_marginals().marginal.sum(), a.score)
    cov = a.coverage()
    assert np.isclose(cov["share_of_score"].sum(), 1.0) and np.isclose(
        cov["share_of_abs"].sum(), 1.0
    )
    assert (
        cov.loc["feature × feature", "n_terms"]
        == (a.query_parts.kind == "feature").sum() * (a.key_parts.kind == "feature").sum()
    )
    assert set(top.columns) >= {"q_label", "k_label", "term", "share", "interaction"}
    assert len(a.to_frame()) == terms.numel()
    pos = a.top(5, sign="pos")
    assert (pos.term > 0).all() or len(pos) == 0


def test_check_catches_a_wrong_sum(gpt2):
    model, tokens = gpt2
    a = model.qk_attribution(tokens, 1, 0, 9, 4)
    a.check()
    a.terms = a.terms.clone()
    a.terms[0, 0] += 1e-6
    with pytest.raises(qk_lens.CompletenessError, match="Σ terms"):
        a.check()


def test_save_load_round_trip_and_corruption(gpt2, tmp_path):
    model, tokens = gpt2
    a = model.qk_attribution(tokens, 1, 2, 11, 3)
    a.save(tmp_path / "attr")
    b = qk_lens.QKAttribution.load(tmp_path / "attr")
    assert torch.equal(a.terms, b.terms)
    assert a.query_parts.equals(b.query_parts) and a.key_parts.equals(b.key_parts)
    assert (b.score, b.model_score, b.prob) == (a.score, a.model_score, a.prob)
    b.check()
    (tmp_path / "attr.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not read saved QKAttribution"):
        qk_lens.QKAttribution.load(tmp_path / "attr")
    (tmp_path / "attr.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a saved QKAttribution"):
        qk_lens.QKAttribution.load(tmp_path / "attr")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        qk_lens.QKAttribution.load(tmp_path / "missing")


def test_row_collection(gpt2):
    model, tokens = gpt2
    row = model.qk_attribution(tokens, 1, 1, 6, None)
    assert row.k_positions == list(range(7))
    assert torch.allclose(row.probs, row.pattern[:7].to(torch.float64))
    own = hooks_of(model, tokens)["blocks.1.attn.hook_pattern"][0, 1, 6]
    assert torch.allclose(row.probs, own[:7].double(), rtol=0, atol=1e-12)
    assert float(row.pattern.sum()) == pytest.approx(1.0)
    assert row[6 - N_TOK].k_pos == 6 and row[3].k_pos == 3  # negative = from the prompt's end
    stacked, mask = row.stacked_terms()
    assert torch.allclose((stacked * mask[:, None]).sum((1, 2)), row.scores.to(stacked.dtype))
    sub = model.qk_attribution(tokens, 1, 1, 6, [0, 6])
    # the same key in a smaller batch: equal to float64 rounding
    assert sub.k_positions == [0, 6] and sub[6].score == pytest.approx(row[6].score, rel=1e-12)
    assert len(row.summary()) == 7 and len(row.top(4)) == 4


def test_numpy_and_tensor_positions(gpt2):
    model, tokens = gpt2
    a = model.qk_attribution(tokens, np.int64(1), torch.tensor(2), np.int64(9), torch.tensor([4]))
    b = model.qk_attribution(tokens, 1, 2, 9, 4)
    assert (a.layer, a.head, a.q_pos, a.k_pos) == (1, 2, 9, 4)
    assert torch.equal(a.terms, b.terms)
