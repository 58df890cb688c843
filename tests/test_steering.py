"""QK-only steering: the model's own score change equals the attribution's bilinear prediction.

Measured = the model's ``hook_attn_scores`` (raw, pre-softcap) with the intervention, against
predicted = (s − 1) × the feature's marginal in an independent ``model.qk_attribution``; on the
bundled toy model, the induction story survives the causal test.

Every test of a steering feature runs on TransformerBridge models (both stacks) and, on stack
(a), on the HookedTransformer variants of tests/archs.py. A bridge cannot give each query head
its own copy of a grouped key for a run: key-side steering of a GQA bridge edits the shared key
and holds the group's other heads at their clean patterns, checked below against a twin bridge
with one key per query head.
"""

import re

import pytest
import torch

import qk_lens
from qk_lens import toy
from qk_lens.arch import arch_of
from qk_lens.atlas.probes import pattern_scores, strongest
from qk_lens.demo import parse_token_label
from qk_lens.steering import steer_qk, steer_qk_sweep, steer_resid
from qk_lens.toy.data import RepeatSpec, repeated_batch
from qk_lens.toy.tokenizer import SPECIALS, WORDS
from tests.bridges import BRIDGE_NAMES, GQA_BRIDGES, make_bridge
from tests.models import BRIDGE_CORE, hooks_of, is_bridge_name, make_any, make_tokens, needs_hooked
from tests.saes import attached_with_sae, make_sae

torch.set_num_threads(1)
F64, F32 = torch.float64, torch.float32
N_TOK = 14
# GPT-2 style, NeoX (partial rotary), Llama (GQA + NTK rotary), Gemma-2 (GQA, softcap, local
# window), Gemma-3 (qk-norm), ALiBi
ARCHS = ["gpt2", "neox", "llama", "gemma2", "gemma3", "alibi"]


def hooked(*names):
    """HookedTransformer variants: stack (a) only."""
    return [pytest.param(n, marks=needs_hooked) for n in names]


def hooked_cases(*cases):
    return [pytest.param(*c, marks=needs_hooked) for c in cases]


def attached(name: str, dtype: torch.dtype = F64):
    return attached_with_sae(name, dtype, N_TOK)


def steerable(name: str, side: str, dtype: torch.dtype = F64):
    """The model to steer ``side`` of (a GQA bridge's key side included: its shared key is
    edited and the group's other heads held at their clean patterns)."""
    return attached(name, dtype)


def recorder(names):
    """(list of (name, activation) in call order, fwd_hooks recording under the names given:
    a bridge calls its hooks by their canonical names)."""
    seen = []

    def rec(name):
        def hook(t, hook):
            seen.append((name, t.detach().clone()))

        return hook

    return seen, [(n, rec(n)) for n in names]


def clean_forward(model, tokens):
    """A forward as qk_lens runs it (a bridge: its own norm path, as its capture)."""
    with torch.no_grad(), arch_of(model).exact_forward():
        model(tokens[None])


def active_features(model, tokens, layer, pos, n=2):
    """The n features with the largest |coefficient| at ``pos``."""
    a = model.qk_attribution(tokens, layer, 0, pos, pos)
    km = a.key_parts
    km = km[km.kind == "feature"]
    return [int(f) for f in km.reindex(km.activation.abs().sort_values().index[::-1]).feature[:n]]


def marginal(attr, side, feature):
    m = attr.key_marginals() if side == "key" else attr.query_marginals()
    return float(m[(m.kind == "feature") & (m.feature == feature)].marginal.sum())


@pytest.mark.parametrize("name", hooked(*ARCHS) + BRIDGE_NAMES)
@pytest.mark.parametrize("side", ["key", "query"])
def test_score_change_equals_scale_minus_one_times_marginal(name, side):
    model, tokens, layer = steerable(name, side)
    heads = [0, 3]  # under GQA (2 kv heads) these sit in different groups
    pos = 9
    feats = active_features(model, tokens, layer, pos)
    scales = {feats[0]: 0.0, feats[1]: 2.5}
    r = steer_qk(model, tokens, layer, heads, side, scales, positions=[pos])
    assert r.check() < 1e-12  # measured vs the module's own prediction
    pairs = [(q, pos) for q in (9, 11, 13)] if side == "key" else [(pos, k) for k in (0, 6, 9)]
    n = 0
    for i, h in enumerate(heads):
        for q, k in pairs:
            if torch.isneginf(r.scores_before[i, q, k]):
                continue  # outside Gemma's local window
            attr = model.qk_attribution(tokens, layer, h, q, k)
            want = sum((s - 1) * marginal(attr, side, f) for f, s in scales.items())
            got = float(r.scores_after[i, q, k] - r.scores_before[i, q, k])
            assert abs(got - want) <= 1e-10, (h, q, k, got, want)
            assert abs(float(r.scores_before[i, q, k]) - attr.model_raw_score) <= 1e-10
            n += 1
    assert n >= len(heads)  # a local window still leaves each head a pair
    # nothing else moves: keys (queries) at other positions keep their scores
    untouched = r.measured_change.clone()
    if side == "key":
        untouched[:, :, pos] = 0
    else:
        untouched[:, pos, :] = 0
    # (the steered forward recomputes them in other matrix shapes: equal to float64 rounding)
    assert float(untouched.nan_to_num().abs().max()) <= 1e-12
    if is_bridge_name(name):  # the clean scores are the bridge's own (its hook: after softcap)
        cache = hooks_of(model, tokens)
        final = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, heads]
        cap = model.cfg.attn_scores_soft_cap
        raw = r.scores_before
        want = cap * torch.tanh(raw / cap) if cap and cap > 0 else raw
        live = ~torch.isneginf(raw)
        assert live.sum() >= len(heads) * N_TOK
        assert torch.allclose(want[live], final[live], atol=1e-10, rtol=0)


def ungrouped_twin(model, name: str):
    """The GQA bridge ``model`` rebuilt with one key/value head per query head, each a copy of
    its group's (the same function), with the same dictionary."""
    twin = make_bridge(name, F64, num_key_value_heads=model.cfg.n_heads)
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    d_head = model.cfg.d_head
    src = model.original_model.state_dict()
    with torch.no_grad():
        for key, p in twin.original_model.state_dict().items():
            w = src[key]
            # k_proj / v_proj, also listed under the bridge's names k / v (the same tensors)
            if re.search(r"\.(k|v)(_proj)?\.", key) and key.endswith((".weight", ".bias")):
                w = w.reshape(-1, d_head, *w.shape[1:]).repeat_interleave(group, dim=0)
                w = w.reshape(p.shape)
            p.copy_(w)
    twin = qk_lens.attach(twin)
    layer = model.cfg.n_layers - 1
    twin.add_dictionary(model.qk_dictionaries[layer].sae)
    return twin


@pytest.mark.parametrize("name", GQA_BRIDGES)
def test_key_side_of_gqa_bridge_heads_is_their_ungrouped_run(name):
    """A bridge cannot give each query head its own key for a run; qk_lens edits the shared key
    and holds the group's other heads at their clean patterns. That must be exactly the run of
    the same model with its keys ungrouped (a twin with one key/value head per query head)."""
    model, tokens, layer = attached(name)
    twin = ungrouped_twin(model, name)
    torch.testing.assert_close(
        twin.qk_capture(tokens).logits(), model.qk_capture(tokens).logits(), rtol=0, atol=1e-10
    )
    f = active_features(model, tokens, layer, 9, n=1)[0]
    for heads in (0, [0, 1], [0, 3]):  # one head, a whole group, one head of each group
        got = steer_qk(model, tokens, layer, heads, "key", {f: 0.0}, positions=[9])
        want = steer_qk(twin, tokens, layer, heads, "key", {f: 0.0}, positions=[9])
        assert got.check() < 1e-9
        assert got.measured_change.nan_to_num().abs().max() > 1e-4  # the edit acted
        for field in ("scores_after", "patterns_after", "logits_after", "loss_after"):
            a, b = getattr(got, field), getattr(want, field)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9, equal_nan=True, msg=field)
    sweep = steer_qk_sweep(model, tokens, layer, 0, f, [0.0, 2.0], side="key", positions=9)
    twin_sweep = steer_qk_sweep(twin, tokens, layer, 0, f, [0.0, 2.0], side="key", positions=9)
    for a, b in zip(sweep.items, twin_sweep.items, strict=True):
        torch.testing.assert_close(a.logits_after, b.logits_after, rtol=0, atol=1e-9)
    assert steer_qk(model, tokens, layer, 0, "query", {f: 0.0}, positions=[9]).check() < 1e-12
    assert steer_resid(model, tokens, layer, [f], positions=[9]).check() < 1e-12


@pytest.mark.parametrize(
    "name", hooked("llama") + ["GPTNeoXForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"]
)
def test_float32_within_contract(name):
    model, tokens, layer = steerable(name, "key", F32)
    feats = active_features(model, tokens, layer, 9)
    r = steer_qk(model, tokens, layer, [1, 2], "key", {feats[0]: -1.0, feats[1]: 3.0})
    r.check()
    assert r.max_error() > 0  # float32 rounds: a check that could not fail would pass at 0
    model, tokens, layer = steerable(name, "query", F32)
    feats = active_features(model, tokens, layer, 9)
    r = steer_qk(model, tokens, layer, 1, "query", {feats[0]: 0.0})
    r.check()
    assert r.measured_change.nan_to_num().abs().max() > 1e-3  # it did move


@needs_hooked
def test_gqa_other_heads_and_values_untouched():
    """Only the chosen query head's key moves, not its kv group's other heads; values never
    (HookedTransformer's ungroup switch; a bridge refuses, see above)."""
    model, tokens, layer = attached("llama")
    names = [f"blocks.{layer}.attn.hook_attn_scores", f"blocks.{layer}.attn.hook_v"]
    feats = active_features(model, tokens, layer, 9)  # captures the prompt: its one forward
    seen, hooks = recorder(names)
    with model.hooks(fwd_hooks=hooks):
        model(tokens[None])  # a clean forward to compare with (steering reads the capture)
        r = steer_qk(model, tokens, layer, 0, "key", {feats[0]: 0.0}, positions=[9])
    assert len(seen) == 4  # the clean forward here and the steered one: no second clean run
    clean = dict(seen[:2])
    steered = dict(seen[2:])
    s0, s1 = clean[names[0]][0], steered[names[0]][0]
    assert not torch.equal(s0[0], s1[0])  # head 0 moved
    # head 1 shares head 0's kv group: untouched (to float64 rounding: other matrix shapes)
    torch.testing.assert_close(s1[1:], s0[1:], rtol=0, atol=1e-12)
    # the steered run gives each query head its own copy of its group's values (same numbers)
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    torch.testing.assert_close(
        steered[names[1]], clean[names[1]].repeat_interleave(group, dim=2), rtol=0, atol=1e-12
    )
    assert not model.cfg.ungroup_grouped_query_attention  # the switch is restored
    assert r.check() < 1e-12


@pytest.mark.parametrize("name", GQA_BRIDGES)
def test_gqa_bridge_query_steering_leaves_its_group_and_values(name):
    """Steering one query head of a GQA bridge: its kv group's other head and the values keep
    their clean numbers, and the steered run is the only forward."""
    model, tokens, layer = attached(name)
    names = [f"blocks.{layer}.attn.hook_attn_scores", f"blocks.{layer}.attn.hook_v"]
    feats = active_features(model, tokens, layer, 9)  # captures the prompt: its one forward
    seen, hooks = recorder(names)
    with model.hooks(fwd_hooks=hooks):
        clean_forward(model, tokens)
        r = steer_qk(model, tokens, layer, 0, "query", {feats[0]: 0.0}, positions=[9])
    assert len(seen) == 4  # the clean forward here and the steered one: no second clean run
    clean, steered = dict(seen[:2]), dict(seen[2:])
    s0, s1 = clean[names[0]][0], steered[names[0]][0]
    assert not torch.equal(s0[0, 9], s1[0, 9])  # head 0's query at 9 moved
    assert torch.equal(s0[0, :9], s1[0, :9]) and torch.equal(s0[0, 10:], s1[0, 10:])
    assert torch.equal(s0[1:], s1[1:])  # head 1 shares head 0's kv group: untouched
    assert torch.equal(clean[names[1]], steered[names[1]])  # values stay grouped, unchanged
    assert r.check() < 1e-12


@pytest.mark.parametrize(
    ("name", "side"),
    hooked_cases(("gemma3", "key"))
    + [(n, s) for n in ("Qwen3ForCausalLM", "Gemma3ForCausalLM") for s in ("key", "query")],
)
def test_qk_norm_live_is_not_bilinear_frozen_is(name, side):
    model, tokens, layer = steerable(name, side)
    feats = active_features(model, tokens, layer, 9)
    frozen = steer_qk(model, tokens, layer, 1, side, {feats[0]: 4.0}, positions=[9])
    live = steer_qk(model, tokens, layer, 1, side, {feats[0]: 4.0}, positions=[9], qk_norm="live")
    assert frozen.check() < 1e-12
    assert live.max_error() > 1e-6
    with pytest.raises(AssertionError, match="differ from the prediction"):
        live.check()


@pytest.mark.parametrize(
    ("name", "side"),
    hooked_cases(("gpt2", "key"))
    + [("GPT2LMHeadModel", "key"), ("LlamaForCausalLM", "query"), ("Gemma2ForCausalLM", "query")],
)
def test_freeze_other_patterns_holds_every_other_head(name, side):
    """With the hydra control, a later head mixes values with its clean pattern; without, its live one."""
    model = qk_lens.attach(make_any(name, F64))
    sae = make_sae("topk", hook="blocks.0.hook_resid_pre", d_in=64, d_sae=256, seed=4)
    model.add_dictionary(sae)
    tokens = make_tokens(model, N_TOK)[0]
    feats = active_features(model, tokens, 0, 9)
    names = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    names += ["blocks.1.attn.hook_v", "blocks.1.attn.hook_z"]
    group = model.cfg.n_heads // (getattr(model.cfg, "n_key_value_heads", None) or 4)
    for freeze in (False, True):
        seen, hooks = recorder(names)
        with model.hooks(fwd_hooks=hooks):
            clean_forward(model, tokens)  # to compare with (steering reads the capture)
            r = steer_qk(model, tokens, 0, 2, side, {feats[0]: 5.0}, freeze_other_patterns=freeze)
        got = {n: [t for m, t in seen if m == n] for n in names}
        assert all(len(got[n]) == 2 for n in names)
        (c0, s0), (c1, s1) = got[names[0]], got[names[1]]
        v, z = got[names[2]][1], got[names[3]][1]  # the steered run's values and mix
        assert not torch.equal(c0[0, 2], s0[0, 2])  # the steered head moves either way
        others = [h for h in range(4) if h != 2]
        assert torch.equal(c0[0, others], s0[0, others])  # same layer: untouched anyway
        assert not torch.allclose(c1, s1)  # layer 1 would attend differently ...
        used = c1 if freeze else s1  # ... but with the control it keeps its clean pattern
        want = torch.einsum("bhqk,bkhd->bqhd", used, v.repeat_interleave(group, dim=2))
        assert torch.allclose(z, want, atol=1e-12, rtol=0)
        r.check()


@pytest.mark.parametrize("name", hooked("gpt2", "llama", "gemma2") + BRIDGE_CORE)
def test_resid_deletion_frozen_exact_live_reported(name):
    model, tokens, layer = attached(name)
    f = active_features(model, tokens, layer, 9, n=1)[0]
    r = steer_resid(model, tokens, layer, [f], positions=[9])
    assert r.check() < 1e-12
    # the frozen-norm identity in attribution terms, q and k both at the deleted position
    attr = model.qk_attribution(tokens, layer, 1, 9, 9)
    qi = [i for i, x in enumerate(attr.query_meta["feature"]) if x == f]
    ki = [i for i, x in enumerate(attr.key_meta["feature"]) if x == f]
    want = (
        -marginal(attr, "query", f) - marginal(attr, "key", f) + float(attr.terms[qi][:, ki].sum())
    )
    assert abs(float(r.predicted_change[1, 9, 9]) - want) < 1e-10
    frame = r.frame()
    assert {"predicted_change", "frozen_change", "live_change"} <= set(frame.columns)
    agree = r.agreement()
    assert agree["n_pairs"] == len(frame) and agree["relative_error"] >= 0
    assert float((r.live_change - r.predicted_change).nan_to_num().abs().max()) > 1e-9


@pytest.mark.parametrize(
    ("name", "side"),
    hooked_cases(("neox", "key"))
    + [("GPTNeoXForCausalLM", "key"), ("LlamaForCausalLM", "query"), ("Gemma2ForCausalLM", "key")],
)
def test_sweep_is_batched_steer_qk(name, side):
    model, tokens, layer = steerable(name, side)
    f = active_features(model, tokens, layer, 9, n=1)[0]
    sw = steer_qk_sweep(
        model, tokens, layer, [0, 1], f, [-1.0, 0.0, 1.0, 2.0], side=side, positions=9, batch_size=3
    )
    df = sw.frame()
    assert list(df.scale) == [-1.0, 0.0, 1.0, 2.0] and len(sw) == 4
    assert {"top_after", "top_after_prob", "mean_loss_change", "L1H0 prob"} <= set(df.columns)
    assert df.loc[df.scale == 1.0, "mean_loss_change"].item() == 0.0
    one = steer_qk(model, tokens, layer, [0, 1], side, {f: 2.0}, positions=[9])
    assert torch.allclose(one.scores_after, sw[3].scores_after, atol=1e-12, rtol=0)
    assert not torch.allclose(one.scores_after, sw[2].scores_after, atol=1e-6, rtol=0)
    assert sw.check() < 1e-12
    assert set(sw.predictions(2).columns) == {"rank", "token", "prob", "scale"}


@pytest.mark.parametrize(
    ("name", "side"),
    hooked_cases(("gpt2", "key"))
    + [("GPT2LMHeadModel", "key"), ("LlamaForCausalLM", "key"), ("LlamaForCausalLM", "query")],
)
def test_tables_and_add(name, side):
    model, tokens, layer = steerable(name, side)
    f = active_features(model, tokens, layer, 9, n=1)[0]
    # inject the feature where it may be inactive: still exact (the added part is bilinear too)
    r = steer_qk(model, tokens, layer, 1, side, add={(f, 4): 2.0})
    assert r.check() < 1e-12
    assert r.edits[["feature", "position", "add"]].values.tolist() == [[f, 4, 2.0]]
    fr = r.frame()
    if side == "key":  # queries 4 .. N_TOK - 1 see key 4
        assert (fr.k_pos == 4).all() and len(fr) == N_TOK - 4
    else:  # query 4 sees keys 0 .. 4
        assert (fr.q_pos == 4).all() and len(fr) == 5
    assert float(fr.change.abs().max()) > 1e-3
    assert list(r.predictions(3).index) == [0, 1, 2]
    s = r.logit_diff(5, 7)
    assert abs(s["change"] - (s["after"] - s["before"])) < 1e-12
    assert set(r.attention(12).columns) == {"k_pos", "k_token", "L1H1 before", "L1H1 after"}
    assert "QKSteering(" in repr(r)


@pytest.mark.parametrize("name", hooked("gpt2") + ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_bad_input(name):
    model, tokens, layer = attached(name)
    f = active_features(model, tokens, layer, 9, n=1)[0]
    with pytest.raises(ValueError, match="side must be"):
        steer_qk(model, tokens, layer, 0, "value", {f: 0.0})
    with pytest.raises(ValueError, match="head 7 is out of range"):
        steer_qk(model, tokens, layer, [0, 7], "query", {f: 0.0})
    with pytest.raises(ValueError, match="outside \\[0, 256\\)"):
        steer_qk(model, tokens, layer, 0, "query", {999: 0.0})
    with pytest.raises(ValueError, match="is past the prompt"):
        steer_qk(model, tokens, layer, 0, "query", {f: 0.0}, positions=[40])
    with pytest.raises(ValueError, match="no feature .* has the label"):
        steer_qk(model, tokens, layer, 0, "query", {"no such label": 0.0})
    with pytest.raises(TypeError, match="finite real number"):
        steer_qk(model, tokens, layer, 0, "query", {f: "zero"})
    with pytest.raises(ValueError, match="qk_norm must be"):
        steer_qk(model, tokens, layer, 0, "query", {f: 0.0}, qk_norm="off")
    with pytest.raises(ValueError, match="give features="):
        steer_qk(model, tokens, layer, 0, "query")
    with pytest.raises(ValueError, match="no dictionary for layer 0"):
        steer_qk(model, tokens, 0, 0, "query", {f: 0.0})
    inactive = next(
        i for i in range(256) if i not in set(active_features(model, tokens, layer, 3, 99))
    )
    with pytest.raises(ValueError, match="not active at the steered position"):
        steer_qk(model, tokens, layer, 0, "query", {inactive: 0.0}, positions=[3])
    with pytest.raises(ValueError, match="scales must be a non-empty"):
        steer_qk_sweep(model, tokens, layer, 0, f, [])
    with pytest.raises(TypeError, match="qk_lens attached"):
        steer_qk(make_any(name), tokens, layer, 0, "query", {f: 0.0})


# --------------------------------------------------------------------------- the toy model
@pytest.fixture(
    scope="module",
    params=[pytest.param(False, marks=needs_hooked, id="hooked"), pytest.param(True, id="bridge")],
)
def induction(request):
    """The bundled toy as a HookedTransformer (stack (a)) and as a TransformerBridge."""
    model = toy.load("attn2-ln", bridge=request.param)
    scores = pattern_scores(model, n=16, seed=99)
    layer, head, _ = strongest(scores, "induction", range(1, model.cfg.n_layers))
    model.toy_scores = scores
    word_ids = torch.arange(len(SPECIALS), len(SPECIALS) + len(WORDS))
    batch = repeated_batch(3, word_ids, 0, torch.Generator().manual_seed(5), RepeatSpec(n_ctx=32))
    return model, layer, head, batch


def _case(model, layer, head, batch, i):
    tokens = batch.tokens[i]
    rep = torch.nonzero(batch.induction_target[i] >= 0)[:, 0]
    q = int(rep[len(rep) // 2])
    k = int(batch.induction_target[i, q])
    a_tok = model.to_str_tokens(tokens)[q]
    return tokens, rep, q, k, a_tok


@pytest.mark.parametrize("i", [0, 1, 2])
def test_toy_removing_previous_token_feature_breaks_induction(induction, i):
    model, layer, head, batch = induction
    tokens, rep, q, k, a_tok = _case(model, layer, head, batch, i)
    attr = model.qk_attribution(tokens, layer, head, q, k)
    km = attr.key_parts
    ids = [
        int(f)
        for f, lab in zip(km.feature, km.label, strict=True)
        if parse_token_label(lab) == ("previous token", a_tok)
    ]
    assert ids, f"no 'previous token = {a_tok}' feature active at the induction target"
    r = steer_qk(
        model, tokens, layer, head, "key", dict.fromkeys(ids, 0.0), positions=[k], readout=q
    )
    r.check()
    assert r.patterns_before[0, q, k] > 0.5
    assert r.patterns_after[0, q, k] < 0.05
    # the repeated token's loss rises, if little: attn2-ln has three strong induction heads
    assert float(r.loss_after[q] - r.loss_before[q]) > 0.02
    assert r.loss_change(rep[:-1].tolist()) > 0
    # the other induction heads compensate in part (hydra); steering all of them removes it
    scores = model.toy_scores
    heads = scores[(scores.layer == layer) & (scores.induction > 0.4)]["head"].tolist()
    everyone = steer_qk(model, tokens, layer, heads, "key", dict.fromkeys(ids, 0.0), positions=[k])
    assert float(everyone.loss_after[q] - everyone.loss_before[q]) > 1.0


@pytest.mark.parametrize("i", [0, 1, 2])
def test_toy_scaling_another_previous_token_feature_moves_attention(induction, i):
    model, layer, head, batch = induction
    tokens, _, q, k, a_tok = _case(model, layer, head, batch, i)
    row = model.qk_attribution(tokens, layer, head, q, None)
    best = None  # the other key whose "previous token = B" feature helps this query most
    for a in row:
        if a.k_pos == k:
            continue
        km = a.key_marginals()
        for f, lab, m in zip(km.feature, km.label, km.marginal, strict=True):
            parsed = parse_token_label(lab)
            if parsed and parsed[0] == "previous token" and parsed[1] not in (a_tok, "<bos>"):
                if m > 0 and (best is None or m > best[0]):
                    best = (float(m), a.k_pos, int(f), a.score)
    assert best is not None
    m, k2, f, s2 = best
    scale = 1 + (row[k].score - s2 + 3.0) / m  # predicted: k2 then leads k by 3
    r = steer_qk(model, tokens, layer, head, "key", {(f, k2): scale}, readout=q)
    r.check()
    assert int(r.patterns_before[0, q].argmax()) == k
    assert int(r.patterns_after[0, q].argmax()) == k2
    assert r.patterns_after[0, q, k2] > 0.9
