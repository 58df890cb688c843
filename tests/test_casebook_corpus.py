"""The casebook grammar: deterministic, every word in the vocabulary, answers right by the
tables, and what is held out never in training (checked on 3,000 training documents)."""

from __future__ import annotations

import pytest

from qk_lens.toy.casebook_corpus import (
    ANTONYMS,
    CAPITALS,
    CASES,
    COLORS,
    HELD_OUT_NAMES,
    TITLES,
    Grammar,
    color_check,
    held_out_items,
    held_out_objects,
    held_out_question,
    held_out_sums,
    sum_check,
    training_documents,
    vocabulary,
)

N_DOCS = 3000
OPPOSITE_OF = {**dict(ANTONYMS), **{b: a for a, b in ANTONYMS}}


@pytest.fixture(scope="module")
def training_items():
    """Items drawn by the training stream's grammar (the seed the casebook recipe uses)."""
    g = Grammar(1)
    return {case: [g.item(case) for _ in range(1500)] for case in CASES}


def test_same_seed_same_text_other_seed_other_text():
    a = [d.words for d, _ in zip(training_documents(7, 64), range(20), strict=False)]
    b = [d.words for d, _ in zip(training_documents(7, 64), range(20), strict=False)]
    c = [d.words for d, _ in zip(training_documents(8, 64), range(20), strict=False)]
    assert a == b and a != c
    assert all(len(w) == 63 for w in a)  # BOS makes 64


def test_every_word_is_in_the_vocabulary_once():
    vocab = vocabulary()
    assert len(set(vocab)) == len(vocab)
    words = set(vocab)
    for d, _ in zip(training_documents(3, 64), range(N_DOCS), strict=False):
        assert set(d.words) <= words
        assert len(d.words) == len(d.answers) == len(d.roles)
    for case in CASES:
        for it in held_out_items(case, 200):
            assert set(it.words) <= words


def _truth(item) -> str:
    """The answer recomputed from the tables, written apart from the grammar."""
    w = item.words
    if item.case == "antonyms":
        asked = w[item.marks["source"]]
        return {**dict(ANTONYMS), **{b: a for a, b in ANTONYMS}}[asked]
    if item.case == "multiple-choice":
        country = dict(CAPITALS)[w[item.marks["city"]]]
        options = [w[item.marks[f"option{j}"]] for j in range(3)]
        return "abc"[options.index(country)]
    if item.case == "correctness":  # held-out checks may follow a sentence: read the marks
        return "yes" if dict(COLORS)[w[item.marks["object"]]] == w[item.marks["source"]] else "no"
    if item.case == "arithmetic":
        p = item.marks["operand"]  # the second operand
        a, b, c = int(w[p - 2]), int(w[p]), int(w[item.marks["source"]])
        return "yes" if a + b == c else "no"
    # induction: the name after the last earlier occurrence of the final title
    title = w[-2]
    earlier = [i for i in range(len(w) - 2) if w[i] == title]
    return w[earlier[-1] + 1]


@pytest.mark.parametrize("held_out", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_answers_follow_the_tables(case, held_out, training_items):
    items = held_out_items(case, 300) if held_out else training_items[case]
    for it in items:
        assert it.answer == _truth(it), it
        src = it.words[it.marks["source"]]  # the evidence, found here without the marks
        if case == "induction":
            assert src == it.answer and it.words[it.marks["source"] - 1] == it.words[-2]
        elif case == "antonyms":
            after = {"of", "say"}
            assert it.words[it.marks["source"] - 1] in after and OPPOSITE_OF[src] == it.answer
        elif case == "multiple-choice":
            assert it.words[it.marks["source"] - 2] == it.answer  # "( b ) france"
            assert it.words[-2] == "answer" and it.words[-3] in dict(CAPITALS).values()
        else:
            assert it.marks["source"] == len(it.words) - 3  # the color / sum before "?"
            w = it.words
            if case == "correctness":  # "the color of the OBJECT is COLOR ?"
                m = it.marks["object"]
                assert w[m] in dict(COLORS) and w[m + 1] == "is"
            else:  # "A + B = C ?"
                m = it.marks["operand"]
                assert w[m - 1] == "+" and w[m + 1] == "="
    if case in ("correctness", "arithmetic"):
        yes = sum(it.answer == "yes" for it in items) / len(items)
        assert 0.4 < yes < 0.6  # balanced, so "always no" is not 95%


def test_recency_alone_fails_most_training_stories(training_items):
    """With several names, "the latest name" is right in under half of the stories, so the
    model has to match the title (a grammar where it was right in three in four taught
    recency)."""
    several = [it for it in training_items["induction"] if "name1" in it.marks]
    latest = [it.words[max(p for k, p in it.marks.items() if k.startswith("name"))]
              for it in several]  # fmt: skip
    share = sum(w == it.answer for w, it in zip(latest, several, strict=True)) / len(several)
    assert 0.35 < share < 0.5, share
    # ...and stories with the final title twice remain, for the recency question
    assert 0.1 < sum(it.foil is not None for it in several) / len(several) < 0.3


def test_every_color_is_checked_on_two_training_objects():
    held = set(held_out_objects())
    for color in {c for _, c in COLORS}:
        assert sum(c == color and o not in held for o, c in COLORS) >= 2, color


def test_held_out_names_never_in_a_training_story(training_items):
    for it in training_items["induction"]:
        names = [it.words[p] for k, p in it.marks.items() if k.startswith("name")]
        assert not set(names) & set(HELD_OUT_NAMES)
    for it in held_out_items("induction", 300):
        names = [it.words[p] for k, p in it.marks.items() if k.startswith("name")]
        assert set(names) <= set(HELD_OUT_NAMES)
    # ...but they occur after titles in training filler, so they are not suppressed there
    seen = set()
    for d, _ in zip(training_documents(1, 64), range(N_DOCS), strict=False):
        seen |= {d.words[i + 1] for i in range(len(d.words) - 1) if d.words[i] in TITLES}
    assert set(HELD_OUT_NAMES) <= seen


def test_held_out_checks_and_questions_never_in_training(training_items):
    sums = held_out_sums()
    assert len(sums) == 10
    # a < b, and the reverse is checked in training (a pair held out both ways went unlearned)
    assert all(a < b and (b, a) not in sums for a, b in sums)
    reversed_seen = {(int(it.words[2]), int(it.words[0])) for it in training_items["arithmetic"]}
    assert sums <= reversed_seen
    for it in training_items["arithmetic"]:
        assert (int(it.words[0]), int(it.words[2])) not in sums
    for it in held_out_items("arithmetic", 300):
        p = it.marks["operand"]
        assert (int(it.words[p - 2]), int(it.words[p])) in sums
    objects = held_out_objects()
    assert len(objects) == 5
    for it in training_items["correctness"]:
        assert it.words[4] not in objects
    for it in held_out_items("correctness", 300):
        assert it.words[it.marks["object"]] in objects

    def question(it):
        w = it.words
        return w[it.marks["city"]], [w[it.marks[f"option{j}"]] for j in range(3)]

    for it in training_items["multiple-choice"]:
        assert not held_out_question(*question(it))
    held = [question(it) for it in held_out_items("multiple-choice", 300)]
    assert all(held_out_question(*q) for q in held)
    positions = {q[1].index(dict(CAPITALS)[q[0]]) for q in held}
    assert positions == {0, 1, 2}


def test_held_out_antonyms_never_asked_in_training(training_items):
    def asked(it):
        w, i = it.words, it.marks["source"]
        template = {"of": 0 if w[i + 1] == "is" else 1, "say": 2}[w[i - 1]]
        return w[i], template

    train = {asked(it) for it in training_items["antonyms"]}
    held = {asked(it) for it in held_out_items("antonyms", 300)}
    assert held and not train & held
    assert {w for w, _ in train} == set(OPPOSITE_OF)  # every word is still asked in training


def test_roles_mark_the_evidence():
    for case in CASES:
        for it in held_out_items(case, 50):
            roles = it.roles()
            assert len(roles) == len(it.words)
            assert roles[-1] == f"{case}: the answer"
            assert roles[it.marks["source"]] is not None
            assert roles[-2] is not None  # the question's last word


def test_unknown_case_is_refused():
    with pytest.raises(ValueError, match="unknown case 'color'; cases: induction"):
        Grammar(0).item("color")


def test_single_checks_are_answered_by_the_tables_and_refuse_what_is_not_in_them():
    assert color_check("banana", "yellow").words[-1] == "yes"
    assert color_check("banana", "red").prompt == "the color of the banana is red ?"
    assert color_check("banana", "red").answer == "no"
    assert sum_check(3, 4, 7).answer == "yes" and sum_check(3, 4, 8).answer == "no"
    with pytest.raises(ValueError, match="no color check of 'kiwi' as 'green': objects are"):
        color_check("kiwi", "green")
    with pytest.raises(ValueError, match="no color check of 'banana' as 'teal'"):
        color_check("banana", "teal")
    with pytest.raises(ValueError, match=r"no sum check 3 \+ 10 = 13: operands are 0..9"):
        sum_check(3, 10, 13)


def test_filler_says_runs_twice():
    """Some filler says a run of 4–8 words twice ("aunt sally park hat . aunt sally park hat ."):
    the stream's plain-induction signal, found here by its shape."""
    runs = 0
    for doc, _ in zip(training_documents(0, 64), range(200), strict=False):
        w = doc.words
        for n in range(4, 9):
            for i in range(len(w) - 2 * n - 1):
                if (
                    w[i + n] == "." == w[i + 2 * n + 1]
                    and w[i : i + n] == w[i + n + 1 : i + 2 * n + 1]
                ):
                    runs += 1
    assert runs >= 20, runs


@pytest.mark.parametrize("case", CASES)
def test_held_out_prompts_are_distinct(case):
    items = held_out_items(case, 500, seed=999)
    assert len({it.prompt for it in items}) == 500
    # the first draws of the grammar, duplicates skipped: the same items from a longer draw
    assert [it.words for it in held_out_items(case, 50, seed=999)] == [
        it.words for it in items[:50]
    ]


def test_held_out_checks_follow_sentences_that_do_not_give_them_away():
    g = Grammar(12345, held_out=True)  # seven draws in ten come after a sentence
    drawn = [g.item("correctness") for _ in range(1000)]
    assert 0.65 < sum(len(it.words) > 9 for it in drawn) / 1000 < 0.75
    colors = held_out_items("correctness", 300)
    assert sum(len(it.words) == 9 for it in colors) <= 40  # the bare ones, each once
    assert len({it.words[-6:-2] for it in colors}) >= 35  # nearly all 5 x 8 statements
    for it in colors:
        assert it.words.count(it.words[it.marks["object"]]) == 1  # its color is not stated before
        assert (
            it.words[it.marks["object"] - 4 :]
            == color_check(it.words[it.marks["object"]], it.words[it.marks["source"]]).words
        )
    sums = held_out_items("arithmetic", 300)
    assert sum(len(it.words) == 7 for it in sums) <= 100  # the bare ones, each once
    for it in sums:
        p = it.marks["operand"]
        a, b, c = int(it.words[p - 2]), int(it.words[p]), int(it.words[p + 2])
        assert it.words[p - 2 :] == sum_check(a, b, c).words
        before = it.words[: it.marks["operand"] - 2]
        stated = {(before[i - 1], before[i + 1]) for i, w in enumerate(before) if w == "+"}
        assert not stated & {(str(a), str(b)), (str(b), str(a))}  # nor its sum


def test_held_out_items_refuse_more_distinct_prompts_than_the_grammar_has(monkeypatch):
    import qk_lens.toy.casebook_corpus as corpus

    monkeypatch.setattr(corpus, "HELD_OUT_CONTEXT", 0.0)  # bare checks: 5 objects x 8 colors
    assert len(held_out_items("correctness", 40)) == 40
    with pytest.raises(ValueError, match="only 40 distinct held-out 'correctness' prompts"):
        held_out_items("correctness", 41)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"n must be a positive int, got {bad}"):
            held_out_items("correctness", bad)
