"""The bundled casebook model: held-out accuracy per case, exact attributions on a model with
MLPs (SAE and transcoder bases, against the model's hooks), and each case study end to end —
steering flips the answer on >= 80% of 50 held-out prompts — as a HookedTransformer (stack (a))
and as a TransformerBridge (both stacks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qk_lens import toy
from qk_lens.casebook import (
    BY_ANSWER_CASES,
    FLIP_ANSWER,
    FLIP_MIN,
    REVERSE_ANSWER,
    STEER_SCALE,
    recency_split,
    run_case,
    separating_heads,
)
from qk_lens.toy.casebook_corpus import (
    CASES,
    COLOR_WORDS,
    COLORS,
    LETTERS,
    held_out_items,
    held_out_objects,
    held_out_sums,
)

torch.set_num_threads(2)
HOOKED = toy.hooked_transformer_available()
KINDS = ["hooked", "bridge"] if HOOKED else ["bridge"]
# the case studies take a while: each stack runs them on its own model class (stack (a) the
# HookedTransformer, stack (b) the bridge); accuracy and exactness run on both classes
STUDY_KIND = "hooked" if HOOKED else "bridge"


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return toy.load("casebook", bridge=request.param == "bridge")


@pytest.fixture(scope="module")
def study_model():
    return toy.load("casebook", bridge=STUDY_KIND == "bridge")


# Held-out accuracy below the 95% on the shipped model (docs/casebook.md §4); strict, so
# a model that reaches it makes the test fail until the case leaves this set. Empty since recipe
# G (every case at 1.000).
BELOW_TARGET: set[str] = set()
_ACCURACY: dict = {}


def _accuracy(model, case: str) -> float:
    """Accuracy on 500 held-out items, each run alone through the tokenizer (the recorded figure
    came from one padded batch of token ids)."""
    key = (id(model), case)
    if key not in _ACCURACY:
        right = 0
        with torch.no_grad():
            for it in held_out_items(case, 500):
                logits = model(it.prompt)[0, -1]
                right += model.tokenizer.decode([int(logits.argmax())]) == it.answer
        _ACCURACY[key] = right / 500
    return _ACCURACY[key]


@pytest.mark.parametrize("case", CASES)
def test_recorded_accuracy_is_measured(model, case):
    recorded = model.toy.config["metrics"]["held_out_accuracy"][case]
    acc = _accuracy(model, case)
    assert abs(acc - recorded) <= 0.004, (acc, recorded)  # float32 kernels may flip one item


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason="below 95% (docs/casebook.md)"))
        if c in BELOW_TARGET
        else c
        for c in CASES
    ],
)
def test_held_out_accuracy_reaches_95_percent(model, case):
    assert _accuracy(model, case) >= 0.95, f"{case}: {_accuracy(model, case):.3f}"


def test_recorded_check_margins_are_measured(model):
    """The recorded yes − no margins of the held-out checks (config.json), recomputed prompt by
    prompt through the tokenizer (the recorded ones came from one batch of token ids)."""
    recorded = model.toy.config["metrics"]["check_margins"]
    yes, no = model.to_single_token("yes"), model.to_single_token("no")

    def margin(prompt: str) -> float:
        with torch.no_grad():
            logits = model(prompt)[0, -1]
        return float(logits[yes] - logits[no])

    colors = recorded["colors"]["held_out_true"]
    assert sorted(colors) == sorted(held_out_objects())
    for obj, true in COLORS:
        if obj in colors:
            got = margin(f"the color of the {obj} is {true} ?")
            assert abs(got - colors[obj]) <= 0.02, (obj, got, colors[obj])
    sums = recorded["sums"]["held_out_true"]
    assert sorted(sums) == sorted(f"{a} + {b}" for a, b in held_out_sums())
    for a, b in held_out_sums():
        got = margin(f"{a} + {b} = {a + b} ?")
        assert abs(got - sums[f"{a} + {b}"]) <= 0.02, (a, b, got)
    # the checked objects' and sums' figures are means over the same kind of prompt
    chk = [margin(f"the color of the {o} is {t} ?") for o, t in COLORS if o not in colors]
    assert abs(sum(chk) / len(chk) - recorded["colors"]["checked_true_mean"]) <= 0.02
    if HOOKED:  # the training script (HookedTransformer's stack) still measures the same
        from qk_lens.toy.recipes import RECIPES
        from qk_lens.toy.train import check_margins

        again = check_margins(model, RECIPES["casebook"])
        assert again.keys() == recorded.keys()
        for kind in again:
            for key, value in recorded[kind]["held_out_true"].items():
                assert abs(again[kind]["held_out_true"][key] - value) <= 0.02, (kind, key)


def test_attributions_are_exact_on_the_mlp_model(model):
    """Dictionary, upstream and transcoder bases sum to the model's own score (its hooks)."""
    prompt = held_out_items("multiple-choice", 1)[0].prompt
    q = model.to_tokens(prompt).shape[1] - 1
    for basis in ("dictionary", "upstream", "transcoders"):
        for layer in range(model.cfg.n_layers):
            attr = model.qk_attribution(prompt, layer, 1, q, 11, basis=basis)
            attr.check()  # float32: 1e-4 of the score's scale, else CompletenessError
            assert torch.isfinite(attr.terms).all()


@pytest.fixture(scope="module")
def studies(study_model):
    return {case: run_case(study_model, case, n_flip=50) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_case_study_runs_and_its_numbers_are_the_models(study_model, studies, case):
    """Every step runs on a held-out prompt the model answers, and what it reports is measured:
    the loadings sum to the edges, the steering's predicted score changes equal the measured
    ones, the QK attribution sums to the model's score, each flip is the steered forward's top
    prediction, and the report renders."""
    study = studies[case]
    assert study.prediction == study.item.answer
    study.loadings.check()  # head loadings + residual + MLP parts sum to every edge
    study.steering.check()
    study.attribution.check()
    e = study.edge_info
    assert e["source_pos"] < e["target_pos"] == study.q_pos
    assert study.k_pos == e["source_pos"]
    # the edge is the cross-position one that matters most to the answer: recomputed here with
    # a groupby over the graph's edges (the pipeline uses a bincount)
    ed = study.graph.edges.copy()
    ed["carried"] = study.loadings.heads.sum((1, 2)).double().abs().numpy()
    ed["into"] = ed.groupby("target_index")["weight"].transform(lambda w: w.abs().sum())
    nodes = study.graph.nodes
    ed["reach"] = [nodes["influence"].iloc[t] + nodes["weight"].iloc[t] for t in ed["target_index"]]
    cross = ed[ed["source_pos"] < ed["target_pos"]]
    best = (cross["carried"] / cross["into"] * cross["reach"]).idxmax()
    assert best == study.edge
    f = study.flips
    assert len(f) == 50 and f["answered"].sum() >= 25
    assert (f["flipped"] == (f["answered"] & (f["after"] != f["answer"]))).all()
    # the split by the right answer, counted here row by row
    by = study.flips_by_answer().set_index("answer")
    counts: dict[str, list[int]] = {}
    for answer, answered, flipped in zip(f["answer"], f["answered"], f["flipped"], strict=True):
        c = counts.setdefault(answer, [0, 0, 0])
        c[0], c[1], c[2] = c[0] + 1, c[1] + int(answered), c[2] + int(flipped)
    assert sorted(counts) == sorted(by.index)
    for answer, (prompts, answered, flipped) in counts.items():
        assert (by.loc[answer, "prompts"], by.loc[answer, "answered"]) == (prompts, answered)
        assert by.loc[answer, "flipped"] == flipped
    if case in BY_ANSWER_CASES:
        assert "by the right answer" in study.summary()
    if case in FLIP_ANSWER:  # a check: its prompt and its 50 are true statements, as the paper's
        assert study.item.answer == FLIP_ANSWER[case] == "yes"
        assert (f["answer"] == "yes").all()
        r = study.reverse_flips
        assert REVERSE_ANSWER[case] == "no"
        assert len(r) == 50 and (r["answer"] == "no").all()
        assert (r["flipped"] == (r["answered"] & (r["after"] != r["answer"]))).all()
        assert "false statements" in study.summary()
    else:
        assert study.reverse_flips is None
    # one flip recomputed by hand: the pair picked from the attribution's terms here, the edit
    # through model.steer_qk
    row = f[f["layer"] >= 0].iloc[0]
    tokens = study_model.to_tokens(row["prompt"])
    layer, head, q, k = (int(row[c]) for c in ("layer", "head", "q_pos", "k_pos"))
    attr = study_model.qk_attribution(tokens, layer, head, q, k)
    terms = attr.terms.double()
    kind_q, kind_k = attr.query_meta["kind"], attr.key_meta["kind"]
    best_term, best_feature = 0.0, None
    for j in range(terms.shape[1]):
        if kind_k[j] != "feature" or float(terms[:, j].sum()) <= 0:
            continue
        for i in range(terms.shape[0]):
            if kind_q[i] == "feature" and float(terms[i, j]) > best_term:
                best_term, best_feature = float(terms[i, j]), int(attr.key_meta["feature"][j])
    assert best_feature == int(row["k_feature"])
    heads = [int(h) for h in row["steer_heads"].split(",")]
    st = study_model.steer_qk(
        tokens, layer, heads, side="key", features={(best_feature, k): STEER_SCALE},
        freeze_other_patterns=True,
    ).summary()  # fmt: skip
    assert st["top_after"] == row["after"] and st["top_before"] == row["before"]
    assert study.report().to_html().count("<table") >= 4
    assert study.verdict().startswith("Confirmed" if study.confirmed else "Not confirmed")


# The bar: every check passes, steering flips >= 80% of 50 held-out answers. The shipped
# model reaches it on induction and antonyms (docs/casebook.md §5); strict, so a model that
# reaches it on another case makes the test fail until that case leaves this set.
NOT_CONFIRMED = {"multiple-choice", "correctness", "arithmetic"}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason="docs/casebook.md §5"))
        if c in NOT_CONFIRMED
        else c
        for c in CASES
    ],
)
def test_case_study_confirmed(studies, case):
    study = studies[case]
    assert study.confirmed and study.flip_rate >= FLIP_MIN, study.verdict()


def test_recency_split_sums_and_reads_the_model(study_model):
    model = study_model
    from qk_lens.casebook import name_head

    study_head = name_head(model, n=6)[:2]  # the head the study reports
    split = recency_split(model, *study_head, n=8)
    f = split.frame
    # Δ and Δ_swapped are the model's own score differences: read them from the hooks, on the
    # prompt and on the prompt with the two names exchanged (built here)
    row = f.iloc[0]
    words = row["prompt"].split()
    recent = max(i for i, w in enumerate(words) if w == row["recent"])
    older = max(i for i, w in enumerate(words) if w == row["older"])
    swapped = list(words)
    swapped[recent], swapped[older] = words[older], words[recent]
    for text, want in ((words, row["delta"]), (swapped, row["delta_swapped"])):
        _, cache = model.run_with_cache(model.to_tokens(" ".join(text)))
        scores = cache[f"blocks.{study_head[0]}.attn.hook_attn_scores"][0, study_head[1], -1]
        assert float(scores[recent + 1] - scores[older + 1]) == pytest.approx(want, abs=1e-4)
    assert abs(float(split.direct["delta"].sum()) - float(f["delta"].sum())) < 1e-3


def _last(words: list[str], word: str) -> int:
    return len(words) - 1 - words[::-1].index(word)


# query and key positions read off the words (BOS first: "the color of the OBJECT is COLOR ?",
# "A + B = C ?", after a sentence that may hold "is" or "+"): "final" from "?" to the word
# before it, "statement" from the stated value to the object or the second operand
@pytest.mark.parametrize(
    "case, at, query, key",
    [
        ("correctness", "final", lambda w: w.index("?") + 1, lambda w: w.index("?")),
        ("arithmetic", "final", lambda w: w.index("?") + 1, lambda w: w.index("?")),
        ("correctness", "statement", lambda w: _last(w, "is") + 2, lambda w: _last(w, "is")),
        ("arithmetic", "statement", lambda w: _last(w, "=") + 2, lambda w: _last(w, "+") + 2),
    ],
)
def test_separating_heads_read_the_patterns(study_model, case, at, query, key):
    model = study_model
    sep = separating_heads(model, case, n=20, at=at)
    assert len(sep) == model.cfg.n_layers * model.cfg.n_heads
    assert (sep["at"] == at).all()
    top = sep.iloc[0]
    # recompute the top head's mean attention on the true statements from the hooks, at
    items = [it for it in held_out_items(case, 20, seed=555) if it.answer == "yes"]
    att = []
    for it in items:
        _, cache = model.run_with_cache(model.to_tokens(it.prompt))
        pat = cache[f"blocks.{int(top['layer'])}.attn.hook_pattern"][0, int(top["head"])]
        att.append(float(pat[query(list(it.words)), key(list(it.words))]))
    assert top["attn_true"] == pytest.approx(sum(att) / len(att), abs=1e-5)
    with pytest.raises(ValueError, match="correctness and arithmetic"):
        separating_heads(model, "antonyms")
    with pytest.raises(ValueError, match="at must be one of"):
        separating_heads(model, case, at="question")


def test_separating_notes_name_only_heads_that_separate(studies):
    """The notes call a head concordance or discordance only where its attention differs by
    SEPARATION_MIN or more, and say so where no head does."""
    from qk_lens.casebook import SEPARATION_MIN, separating_where

    for case in ("correctness", "arithmetic"):
        study = studies[case]
        for at, sep in study.separating.groupby("at"):
            notes = [
                n for n in study.notes if n.startswith(f"attention {separating_where(case, at)}")
            ]
            big = sep[sep["difference"].abs() >= SEPARATION_MIN]
            if big.empty:
                assert len(notes) == 1 and "no head separates" in notes[0], notes
            else:
                named = [
                    f"L{r.layer}H{r.head} is a {r.kind} head" for r in big.head(2).itertuples()
                ]
                assert len(notes) == len(named) and all(
                    n in note for n, note in zip(named, notes, strict=True)
                ), notes


def test_carrying_heads_hold_the_share():
    from qk_lens.casebook import CARRY_SHARE, NothingToSteer, carrying_heads

    assert CARRY_SHARE == 0.9
    # same sign as the top head, largest first, until 90% of that sign's loading
    assert carrying_heads(np.array([0.05, 0.87, 0.09, -0.5]), 1) == [1, 2]
    assert carrying_heads(np.array([0.5, 0.45, 0.05, 0.0]), 0) == [0, 1]
    assert carrying_heads(np.array([-0.2, 0.3, -0.7, 0.1]), 2) == [2, 0]
    assert carrying_heads(np.array([0.0, 1.0, 0.0, 0.0]), 1) == [1]
    # a top head that carries nothing, or a NaN loading, is refused: nothing to steer
    with pytest.raises(NothingToSteer, match="head 0 carries none of the edge"):
        carrying_heads(np.array([0.0, 1.0, 0.0, 0.0]), 0)
    with pytest.raises(NothingToSteer):
        carrying_heads(np.array([np.nan, 1.0, 0.0, 0.0]), 1)


def test_evidence_positions_follow_the_grammar():
    from qk_lens.casebook import evidence_positions

    for item in held_out_items("multiple-choice", 30):
        span = evidence_positions(item)
        words = ("<bos>", *item.words[:-1])
        assert words[span[0]] == item.words[item.marks["source"]]  # the right option's content
        right = LETTERS.index(item.answer)
        if len(span) > 1:  # to the beginning of the next option's content: ( letter )
            assert [words[p] for p in span[1:]] == ["(", LETTERS[right + 1], ")"]
            options = sorted(p + 1 for key, p in item.marks.items() if key.startswith("option"))
            assert span[-1] + 1 in options  # the next option's content
        else:
            assert right == len(LETTERS) - 1 and words[span[0] + 1] == "answer"  # the last
    for case in ("induction", "antonyms"):
        item = held_out_items(case, 1)[0]
        assert evidence_positions(item) == [item.marks["source"] + 1]
    # a check: the statement's two sides, "the color of the OBJECT is COLOR ?", "A + B = C ?"
    for item in held_out_items("correctness", 10):
        words = ("<bos>", *item.words[:-1])
        obj, color = (words[p] for p in evidence_positions(item))
        assert dict(COLORS)[obj] and color in COLOR_WORDS and words[-1] == "?"
        assert words.index(obj) == words.index("of") + 2 and words[-2] == color
    for item in held_out_items("arithmetic", 10):
        words = ("<bos>", *item.words[:-1])
        b, c = evidence_positions(item)
        assert words[b - 1] == "+" and words[c - 1] == "=" and c == len(words) - 2


def test_flip_items_keep_the_grammars_order_and_the_asked_answer():
    from qk_lens.casebook import flip_items

    everything = held_out_items("correctness", 400, seed=777)
    for answer in ("yes", "no"):
        got = flip_items("correctness", 50, seed=777, answer=answer)
        # the first 50 of the grammar's held-out items with that answer, counted by hand
        want, i = [], 0
        while len(want) < 50:
            if everything[i].answer == answer:
                want.append(everything[i])
            i += 1
        assert [it.words for it in got] == [it.words for it in want]
        words = [it.words[-3] for it in got]  # the stated value: statements vary
        assert len(set(words)) > 3
    assert [it.words for it in flip_items("antonyms", 5)] == [
        it.words for it in held_out_items("antonyms", 5, seed=777)
    ]
    with pytest.raises(ValueError, match="items answer 'maybe'.*answers include 'no', 'yes'"):
        flip_items("arithmetic", 5, answer="maybe")
    with pytest.raises(ValueError, match="unknown case 'sums'"):
        flip_items("sums", 5)
    with pytest.raises(TypeError, match="answer must be a string"):
        flip_items("arithmetic", 5, answer=True)


def test_run_case_refuses_unknown_cases(study_model):
    with pytest.raises(ValueError, match="unknown case 'colour'; cases: induction"):
        run_case(study_model, "colour")
    other = held_out_items("antonyms", 1)[0]
    with pytest.raises(ValueError, match="item must be a 'induction' Item.*got 'antonyms'"):
        run_case(study_model, "induction", item=other)


def test_name_head_reads_the_patterns(study_model):
    from qk_lens.casebook import name_head

    layer, head, attn = name_head(study_model, n=6)
    total = 0.0
    items = [it for it in held_out_items("induction", 120, seed=999) if it.foil][:6]
    for it in items:
        _, cache = study_model.run_with_cache(study_model.to_tokens(it.prompt))
        pat = cache[f"blocks.{layer}.attn.hook_pattern"][0, head, -1]
        names = [p + 1 for k, p in it.marks.items() if k.startswith("name")
                 and it.words[p] in (it.answer, it.foil)]  # fmt: skip
        total += float(pat[names].sum())
    assert attn == pytest.approx(total / len(items), abs=1e-5)
