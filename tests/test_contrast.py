"""Contrasts, inhibitors, components and groups: every decomposition sums exactly to its target.

Targets come from the model's own numbers: ``model_raw_score`` / ``model_score`` (hooks) and the
captured pattern, never from the decomposition itself; on bridges also the bridge's own
``hook_attn_scores`` from a forward of its own.

Every test runs on TransformerBridge models (both stacks) and, on stack (a), on the
HookedTransformer variants of tests/archs.py.
"""

import math

import numpy as np
import pytest
import torch

from qk_lens import toy
from qk_lens.arch import arch_of
from qk_lens.atlas.probes import pattern_scores, strongest
from qk_lens.attribution.contrast import (
    components,
    contrast,
    contrast_attribution,
    contrast_row,
    group_terms,
    inhibitors,
)
from qk_lens.demo import parse_token_label
from qk_lens.toy.data import RepeatSpec, repeated_batch
from qk_lens.toy.tokenizer import SPECIALS, WORDS
from tests.models import is_bridge_name, needs_hooked
from tests.saes import attached_with_sae

torch.set_num_threads(1)
N_TOK = 14
Q = 12


def hooked(*cases):
    """HookedTransformer variants: stack (a) only."""
    return [pytest.param(*c, marks=needs_hooked) for c in cases]


def attached(name: str, dtype: torch.dtype = torch.float64):
    return attached_with_sae(name, dtype, N_TOK)


def softcap_of(model) -> float | None:
    """The attention softcap from the model's config (None without one)."""
    cap = model.cfg.attn_scores_soft_cap
    return float(cap) if cap and cap > 0 else None


def bridge_scores(name, model, tokens, layer, head):
    """A bridge's own ``hook_attn_scores`` row at ``Q`` (after softcap), from its own forward;
    None for a HookedTransformer (whose hooks ``model_raw_score`` already reads)."""
    if not is_bridge_name(name):
        return None
    with torch.no_grad(), arch_of(model).exact_forward():
        _, cache = model.run_with_cache(tokens[None])
    return cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, Q].double()


def capped(model, raw: float) -> float:
    cap = softcap_of(model)
    return raw if cap is None else cap * math.tanh(raw / cap)


def tol(dtype, a):
    return 1e-12 if dtype == torch.float64 else 1e-4 * a.scale


CASES = hooked(
    ("gpt2", torch.float64, "dictionary"),
    ("llama", torch.float64, "dictionary"),
    ("gemma2", torch.float64, "upstream"),  # softcap, local window
    ("alibi", torch.float64, "dictionary"),
    ("gemma3", torch.float32, "dictionary"),
) + [
    ("GPT2LMHeadModel", torch.float64, "dictionary"),
    ("GPTNeoXForCausalLM", torch.float64, "upstream"),  # parallel attention + MLP, partial rotary
    ("LlamaForCausalLM", torch.float64, "dictionary"),  # GQA, attention biases
    ("Gemma2ForCausalLM", torch.float64, "upstream"),  # softcap, local window, post norms
    ("Qwen3ForCausalLM", torch.float32, "dictionary"),  # qk-norm
    ("Gemma3ForCausalLM", torch.float32, "dictionary"),  # qk-norm, local window
]


@pytest.mark.parametrize(("name", "dtype", "basis"), CASES)
def test_contrast_terms_sum_to_the_models_score_difference(name, dtype, basis):
    model, tokens, layer = attached(name, dtype)
    row = model.qk_attribution(tokens, layer, 1, Q, None, key_basis=basis)
    k, k2 = row.k_positions[-1], row.k_positions[0]
    c = contrast_row(row, k, other=k2)
    want = row[k].model_raw_score - row[k2].model_raw_score
    assert abs(c.difference - want) <= tol(dtype, row[k])
    own = bridge_scores(name, model, tokens, layer, 1)
    if own is not None:  # the raw scores read are the bridge's own
        for p in (k, k2):
            got = capped(model, row[p].model_raw_score)
            assert abs(got - float(own[p])) <= 1e-9 + tol(dtype, row[p]), (p, got, own[p])
    c.check()
    # groups net out: a group's difference is its marginal at k minus its marginal at k'
    kg = c.key_groups
    assert np.allclose(kg.difference.sum(), c.difference, atol=1e-6)
    assert np.allclose(kg.at_key.sum(), row[k].score, atol=1e-6)
    assert np.allclose(kg.at_other.sum(), row[k2].score, atol=1e-6)
    # the same parts appear at both keys as one group (bias, error / embeddings, heads)
    assert len(kg) < len(row[k].key_meta["kind"]) + len(row[k2].key_meta["kind"])
    assert len(c.top(5)) == 5 and c.top(3, "neg").term.max() <= 0
    assert len(c.frame()) == c.terms.numel()


@pytest.mark.parametrize(("name", "dtype", "basis"), CASES)
def test_mean_contrast_and_log_prob_identity(name, dtype, basis):
    model, tokens, layer = attached(name, dtype)
    row = model.qk_attribution(tokens, layer, 2, Q, None, key_basis=basis)
    cap = model.qk_capture(tokens)
    pattern = cap.pattern(layer)[2, Q].double()[row.k_positions]
    pattern = pattern / pattern.sum()
    own = bridge_scores(name, model, tokens, layer, 2)
    if own is None:
        p = pattern  # the model's own pattern
    else:
        # Hugging Face's Llama and Gemma attention take the softmax in float32 whatever the
        # dtype: p is the float64 softmax of the bridge's own scores; its pattern agrees to that
        p = own[row.k_positions].softmax(0)
        assert torch.allclose(pattern, p, atol=1e-6, rtol=0)
    k = row.k_positions[-2]
    i = row.k_positions.index(k)
    m = contrast_row(row, k, relative_to="mean")
    raw = torch.tensor([a.model_raw_score for a in row], dtype=torch.float64)
    want = float(raw[i] - (p * raw).sum())
    loose = 1e-9 if dtype == torch.float64 else 1e-4 * max(a.scale for a in row)
    assert abs(m.difference - want) <= loose
    m.check()
    # log p(k) = (s̃(k) − E_p[s̃]) − H(p), against the model's own pattern (scores)
    assert abs(m.log_prob - math.log(float(p[i]))) < (1e-9 if dtype == torch.float64 else 1e-5)
    if softcap_of(model) is None:
        assert abs(m.difference - m.entropy - m.log_prob) <= loose
    capped = contrast_row(row, k, relative_to="mean", capped=True)
    capped.check()
    assert abs(capped.difference - capped.entropy - capped.log_prob) <= loose


@pytest.mark.parametrize("name", hooked(("gpt2",)) + ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_contrast_attribution_needs_a_source(name):
    model, tokens, layer = attached(name)
    a = model.qk_attribution(tokens, layer, 0, Q, 5)
    b = model.qk_attribution(tokens, layer, 0, Q, 7)
    assert contrast_attribution(a, b).check() <= 1e-12
    c = contrast_attribution(a, 7, model=model, prompt=tokens)
    assert torch.allclose(c.terms, contrast(a, b).terms)
    m = contrast_attribution(a, relative_to="mean", model=model, prompt=tokens)
    assert m.other == "mean" and m.check() <= 1e-12
    assert a.source is not None  # model.qk_attribution records where it came from
    source, a.source = a.source, None
    with pytest.raises(ValueError, match="does not know its model and prompt"):
        contrast_attribution(a, 7)
    a.source = source
    assert contrast_attribution(a, relative_to="mean").check() <= 1e-12
    with pytest.raises(ValueError, match="exactly one of"):
        contrast_attribution(a)
    other_q = model.qk_attribution(tokens, layer, 0, Q - 1, 5)
    with pytest.raises(ValueError, match="must share layer, head and query"):
        contrast(a, other_q)
    up = model.qk_attribution(tokens, layer, 0, Q, 7, query_basis="upstream")
    with pytest.raises(ValueError, match="different query parts"):
        contrast(a, up)
    partial = model.qk_attribution(tokens, layer, 0, Q, [3, 5])
    with pytest.raises(ValueError, match="compute the row over every key"):
        contrast_row(partial, 5, relative_to="mean")
    with pytest.raises(ValueError, match="relative_to must be 'mean'"):
        contrast_row(partial, 5, relative_to="max")


@pytest.mark.parametrize(
    "name",
    hooked(("gpt2",), ("gemma2",)) + ["GPT2LMHeadModel", "Gemma2ForCausalLM", "Qwen3ForCausalLM"],
)
def test_inhibitors_are_exact_counterfactuals(name):
    model, tokens, layer = attached(name)
    row = model.qk_attribution(tokens, layer, 3, Q, None)
    target = row.k_positions[-1]
    inh = inhibitors(row, k_pos=target, top=6)
    assert len(inh) == 6 and (inh.term < 0).all() and (inh.k_pos != target).all()
    assert inh.delta_log_p_target.is_monotonic_increasing  # the most protective first
    final = torch.tensor([a.model_score for a in row], dtype=torch.float64)
    own = bridge_scores(name, model, tokens, layer, 3)
    if own is not None:  # the scores read are the bridge's own
        assert torch.allclose(final, own[row.k_positions], atol=1e-9, rtol=0)
    assert final.isfinite().all()
    cap = softcap_of(model)
    for r in inh.head(3).itertuples():
        j = row.k_positions.index(r.k_pos)
        raw = row[r.k_pos].score - r.term  # the competitor without that term
        new = final.clone()
        new[j] = cap * math.tanh(raw / cap) if cap else raw
        p_new = new.softmax(0)
        i = row.k_positions.index(target)
        assert abs(float(p_new[i]) - r.target_prob_without) < 1e-12
        assert abs(float(p_new[j]) - r.competitor_prob_without) < 1e-12
        assert r.q_label is not None and r.k_kind is not None
    for level in ("key", "query"):
        df = inhibitors(row, k_pos=target, top=4, level=level)
        assert len(df) == 4 and (df.term < 0).all()
    with pytest.raises(ValueError, match="level must be"):
        inhibitors(row, level="pair")


@pytest.mark.parametrize(("name", "dtype", "basis"), CASES)
def test_components_sum_to_the_score(name, dtype, basis):
    model, tokens, layer = attached(name, dtype)
    a = model.qk_attribution(tokens, layer, 1, Q, 6, key_basis=basis)
    full = components(a)
    assert abs(float(full.score_contributions.sum()) - a.score) <= tol(dtype, a)
    assert torch.allclose(
        full.reconstruct(), a.terms.double(), atol=1e-5 if dtype == torch.float32 else 1e-12
    )
    assert (full.query_loadings.sum(0) >= -1e-9).all()  # sign convention
    top2 = components(a, rank=2)
    assert top2.rank == 2 and torch.equal(top2.strengths, full.strengths[:2])
    assert abs(float(top2.explained()[-1]) - float(full.explained()[1])) < 1e-9
    df = top2.frame()
    assert list(df.component) == [0, 1] and df.energy_share.between(0, 1).all()
    assert len(top2.query_parts(0, k=3)) == 3 and len(top2.key_parts(1, k=2)) == 2
    # a contrast distils the same way
    row = model.qk_attribution(tokens, layer, 1, Q, None, key_basis=basis)
    c = contrast_row(row, 6, relative_to="mean")
    assert abs(float(c.components().score_contributions.sum()) - c.difference) <= 10 * tol(dtype, a)
    assert abs(c.group("kind", "kind").score - c.difference) <= 10 * tol(dtype, a)
    with pytest.raises(ValueError, match="rank must be"):
        components(a, rank=0)
    with pytest.raises(TypeError, match="expected a QKAttribution"):
        components(row)


@pytest.mark.parametrize("name", hooked(("gpt2",)) + ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_groups_sum_to_the_score(name):
    model, tokens, layer = attached(name)
    a = model.qk_attribution(tokens, layer, 1, Q, 6)
    g = group_terms(a, "kind", "kind")
    assert abs(g.score - a.score) < 1e-12
    assert set(g.query_groups) <= {"feature", "dictionary bias", "error", "attention bias"}
    assert g.matrix().shape == (len(g.query_groups), len(g.key_groups))
    feats = [int(f) for f in a.key_meta["feature"] if f >= 0]
    mine = group_terms(a, key_by={"mine": feats[:2]})
    assert "mine" in mine.key_groups and abs(mine.score - a.score) < 1e-12
    mine_counts = dict(zip(mine.key_groups, mine.key_counts, strict=True))
    assert mine_counts["mine"] == 2
    by_fn = group_terms(a, query_by=lambda r: r["kind"] == "feature", key_by="feature")
    assert set(by_fn.query_groups) == {"True", "False"} and abs(by_fn.score - a.score) < 1e-12
    top = g.top(3)
    assert list(top.columns[:3]) == ["q_group", "k_group", "term"]
    with pytest.raises(ValueError, match="query_by must be"):
        group_terms(a, query_by="colour")
    with pytest.raises(TypeError, match="list of feature ids or labels"):
        group_terms(a, key_by={"mine": 3})


@pytest.mark.parametrize(
    "bridge",
    [pytest.param(False, marks=needs_hooked, id="hooked"), pytest.param(True, id="bridge")],
)
def test_toy_induction_contrast_names_previous_token_feature(bridge):
    """Why the induction target and not the mean key: query 'A' × key 'previous token = A'
    (the bundled toy as a HookedTransformer and as a TransformerBridge)."""
    model = toy.load("attn2-ln", bridge=bridge)
    word_ids = torch.arange(len(SPECIALS), len(SPECIALS) + len(WORDS))
    batch = repeated_batch(1, word_ids, 0, torch.Generator().manual_seed(5), RepeatSpec(n_ctx=32))
    tokens = batch.tokens[0]
    rep = torch.nonzero(batch.induction_target[0] >= 0)[:, 0]
    q = int(rep[len(rep) // 2])
    k = int(batch.induction_target[0, q])
    a_tok = model.to_str_tokens(tokens)[q]
    layer, head, _ = strongest(pattern_scores(model, n=16, seed=99), "induction", [1])
    row = model.qk_attribution(tokens, layer, head, q, None)
    m = contrast_row(row, k, relative_to="mean")
    m.check()
    top = m.key_marginals().iloc[0]
    assert parse_token_label(top.label) == ("previous token", a_tok)
    comp = components(row[k], rank=2)
    assert float(comp.explained()[-1]) > 0.5  # a couple of components carry most of the score
    inh = inhibitors(row, k_pos=k, top=3)  # removing a competitor's negative term hurts k
    assert len(inh) == 3 and (inh.target_prob_without <= row[k].prob + 1e-6).all()
