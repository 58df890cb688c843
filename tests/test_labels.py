"""Feature labels: automatic labels from probe data, label files, and the Dictionary wiring.

Labels on synthetic data and label files need no model and run on both stacks; the Dictionary
wiring runs on a HookedTransformer (stack (a)) and on TransformerBridge models (both stacks).
"""

import json
import re

import pytest
import torch

import qk_lens
import qk_lens.labels
from qk_lens.labels import (
    LABEL_KINDS,
    FeatureLabel,
    LabelSet,
    _token_names,
    label_dictionary,
    label_features,
    load_labels,
)
from tests.models import BRIDGE_CORE, make_any, needs_hooked
from tests.saes import make_sae

torch.set_num_threads(1)

VOCAB = 10
NAMES = [f"t{i}" for i in range(VOCAB)]
N_SEQ, SEQ = 12, 12


def probe(n_seq: int = N_SEQ, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0):
    """Random token sequences flattened to (tokens, prev_tokens, positions), built by hand."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, vocab, (n_seq, seq), generator=g)
    tokens, prev, pos = [], [], []
    for s in seqs.tolist():
        for p, t in enumerate(s):
            tokens.append(t)
            prev.append(s[p - 1] if p > 0 else -1)
            pos.append(p)
    return torch.tensor(tokens), torch.tensor(prev), torch.tensor(pos)


@pytest.fixture(scope="module")
def synthetic():
    """Probe data and activations whose labels are known by construction."""
    tokens, prev, pos = probe()
    n = len(tokens)
    g = torch.Generator().manual_seed(1)
    mag = 0.2 + 2 * torch.rand(n, 7, generator=g, dtype=torch.float64)
    acts = torch.zeros(n, 7, dtype=torch.float64)
    acts[:, 0] = torch.where(tokens == 3, mag[:, 0], 0.0)  # current token = t3
    acts[:, 1] = torch.where(prev == 5, mag[:, 1], 0.0)  # previous token = t5
    acts[:, 2] = torch.where(pos == 7, mag[:, 2], 0.0)  # position = 7
    noise = torch.rand(n, generator=g) < 0.4
    acts[:, 3] = torch.where(noise, mag[:, 3], 0.0)  # unclear
    # feature 4 never fires: dead
    # feature 5: every other occurrence of token 3, plus one occurrence of token 4
    threes = (tokens == 3).nonzero().squeeze(-1)
    fired = threes[::2]
    acts[fired, 5] = mag[fired, 5]
    four = int((tokens == 4).nonzero()[0])
    acts[four, 5] = 0.7
    acts[:, 6] = -mag[:, 6]  # only negative: inactive everywhere, so dead
    # The data must make the descriptions distinguishable.
    assert len(threes) >= 6 and (prev == 5).sum() >= 6 and (pos == 7).sum() == N_SEQ
    expected5 = {
        "precision": float(mag[fired, 5].sum() / (mag[fired, 5].sum() + 0.7)),
        "recall": len(fired) / len(threes),
    }
    return acts, tokens, prev, pos, expected5


def test_synthetic_labels(synthetic):
    acts, tokens, prev, pos, expected5 = synthetic
    ls = label_features(acts, tokens, prev, pos, NAMES, criterion="f1")
    assert len(ls) == 7
    assert [lab.label for lab in ls.labels[:5]] == [
        "current token = t3",
        "previous token = t5",
        "position = 7",
        "unclear",
        "dead",
    ]
    assert [lab.kind for lab in ls.labels] == [
        "current token",
        "previous token",
        "position",
        "unclear",
        "dead",
        "current token",
        "dead",
    ]
    assert [lab.value for lab in ls.labels] == ["t3", "t5", 7, None, None, "t3", None]
    for f in range(3):
        lab = ls[f]
        assert lab.score == pytest.approx(1.0, abs=1e-12)
        assert lab.precision == pytest.approx(1.0, abs=1e-12)
        assert lab.recall == pytest.approx(1.0, abs=1e-12)
    assert ls[0].n_active == int((tokens == 3).sum())
    assert ls[1].n_active == int((prev == 5).sum())
    assert ls[2].n_active == N_SEQ

    noise = ls[3]
    assert noise.value is None and 0 < noise.score < 0.5 and noise.n_active > 0

    for f in (4, 6):
        assert ls[f] == FeatureLabel(f, "dead", "dead", None, 0.0, 0.0, 0.0, 0)

    half = ls[5]
    p, r = expected5["precision"], expected5["recall"]
    assert r == pytest.approx(0.5, abs=0.1)
    assert half.precision == pytest.approx(p, rel=1e-12)
    assert half.recall == pytest.approx(r, rel=1e-12)
    assert half.score == pytest.approx(2 * p * r / (p + r), rel=1e-12)
    assert half.n_active == int((acts[:, 5] > 0).sum())


def test_precision_criterion_labels_split_features(synthetic):
    """A feature firing on half the occurrences of t3 is still about t3 (the default criterion)."""
    acts, tokens, prev, pos, expected5 = synthetic
    ls = label_features(acts, tokens, prev, pos, NAMES)
    half = ls[5]
    assert half.label == "current token = t3"
    assert half.score == pytest.approx(expected5["precision"], rel=1e-12)
    assert half.recall == pytest.approx(expected5["recall"], rel=1e-12)
    f1 = label_features(acts, tokens, prev, pos, NAMES, min_score=0.8, criterion="f1")[5]
    assert f1.kind == "unclear"  # the same feature under F1 is too incomplete a match
    # exact features score 1 either way
    assert [ls[f].label for f in range(3)] == [
        "current token = t3",
        "previous token = t5",
        "position = 7",
    ]
    with pytest.raises(ValueError, match="criterion"):
        label_features(acts, tokens, prev, pos, NAMES, criterion="recall")


def test_unclear_keeps_best_fit_and_min_score_decides(synthetic):
    acts, tokens, prev, pos, expected5 = synthetic
    strict = label_features(acts, tokens, prev, pos, NAMES, min_score=0.9, criterion="f1")
    loose = label_features(acts, tokens, prev, pos, NAMES, min_score=0.0, criterion="f1")
    assert strict[5].label == "unclear" and strict[5].value is None
    assert loose[5].label == "current token = t3"
    # unclear keeps how close the best description came
    for key in ("score", "precision", "recall", "n_active"):
        assert getattr(strict[5], key) == getattr(loose[5], key)
    assert loose[3].kind in ("current token", "previous token", "position")
    assert loose[4].kind == "dead"


def test_ties_follow_kind_order():
    # Feature 0 fires exactly on position 0, and token 9 occurs only at position 0.
    tokens = torch.tensor([9, 1, 2, 9, 2, 1])
    prev = torch.tensor([-1, 9, 1, -1, 9, 2])
    pos = torch.tensor([0, 1, 2, 0, 1, 2])
    acts = torch.tensor([[1.0], [0.0], [0.0], [2.0], [0.0], [0.0]])
    default = label_features(acts, tokens, prev, pos, NAMES)[0]
    assert (default.label, default.score) == ("current token = t9", 1.0)
    pos_first = label_features(
        acts, tokens, prev, pos, NAMES, kinds=("position", "current token", "previous token")
    )[0]
    assert (pos_first.label, pos_first.value, pos_first.score) == ("position = 0", 0, 1.0)
    only_prev = label_features(acts, tokens, prev, pos, NAMES, kinds=("previous token",))[0]
    assert only_prev.kind == "unclear"  # position 0 has no previous token to describe it
    assert only_prev.score == 0.0


def test_ties_within_a_kind_go_to_the_smallest_value():
    # Tokens 4 and 2 (positions 0 and 1) fit equally well: F1 = 2/3 for each.
    tokens = torch.tensor([4, 2, 1, 1])
    prev = torch.tensor([-1, 4, 2, 1])
    pos = torch.arange(4)
    acts = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    lab = label_features(acts, tokens, prev, pos, NAMES, criterion="f1")[0]
    assert (lab.label, lab.score) == ("current token = t2", pytest.approx(2 / 3))
    lab = label_features(acts, tokens, prev, pos, NAMES, kinds=("position",))[0]
    assert (lab.label, lab.precision, lab.recall) == ("position = 0", 0.5, 1.0)


def reference_labels(acts, tokens, prev, pos, names, min_score, kinds, criterion):
    """Slow explicit-loop version of label_features: (label, kind, value, score, p, r, n_active)."""
    columns = {"current token": tokens.tolist(), "previous token": prev.tolist()}
    columns["position"] = pos.tolist()
    n_tok, d_sae = acts.shape
    out = []
    for f in range(d_sae):
        a = [max(float(acts[t, f]), 0.0) for t in range(n_tok)]
        total = sum(a)
        n_active = sum(1 for x in a if x > 0)
        if n_active == 0:
            out.append(("dead", "dead", None, 0.0, 0.0, 0.0, 0))
            continue
        best = None
        for kind in kinds:
            col = columns[kind]
            for v in sorted({x for x in col if x >= 0}):
                holds = [t for t in range(n_tok) if col[t] == v]
                p = sum(a[t] for t in holds) / total
                r = sum(1 for t in holds if a[t] > 0) / len(holds)
                if criterion == "f1":
                    s = rank = 2 * p * r / (p + r) if p + r > 0 else 0.0
                else:
                    s, rank = p, p + 1e-3 * r
                if best is None or rank > best[0] + 1e-12:
                    best = (rank, s, p, r, kind, v)
        _, s, p, r, kind, v = best
        if s < min_score:
            out.append(("unclear", "unclear", None, s, p, r, n_active))
        else:
            v = v if kind == "position" else names[v]
            out.append((f"{kind} = {v}", kind, v, s, p, r, n_active))
    return out


@pytest.mark.parametrize("criterion", ["precision", "f1"])
@pytest.mark.parametrize("min_score", [0.0, 0.4])
@pytest.mark.parametrize(
    "kinds",
    [("current token", "previous token", "position"), ("position", "previous token")],
)
def test_matches_slow_reference(min_score, kinds, criterion):
    tokens, prev, pos = probe(n_seq=4, seq=7, vocab=6, seed=3)
    g = torch.Generator().manual_seed(4)
    n = len(tokens)
    acts = torch.randn(n, 24, generator=g) * (torch.rand(n, 24, generator=g) < 0.3)
    acts[:, 0] = torch.where(tokens == 2, 1.5, 0.0)
    acts[:, 1] = torch.where(prev == 4, torch.rand(n, generator=g), 0.0)
    acts[:, 2] = torch.where((pos == 3) & (tokens != 1), 0.5, 0.0)
    acts[:, 3] = 0.0
    acts = acts.float()  # float32 input; float64 inside
    got = label_features(
        acts, tokens, prev, pos, NAMES, min_score=min_score, kinds=kinds, criterion=criterion
    )
    want = reference_labels(acts.double(), tokens, prev, pos, NAMES, min_score, kinds, criterion)
    assert len(got) == len(want)
    for lab, (label, kind, value, s, p, r, n_active) in zip(got.labels, want, strict=True):
        assert (lab.label, lab.kind, lab.value, lab.n_active) == (label, kind, value, n_active)
        assert lab.score == pytest.approx(s, abs=1e-12)
        assert lab.precision == pytest.approx(p, abs=1e-12)
        assert lab.recall == pytest.approx(r, abs=1e-12)


def test_label_features_checks_inputs(synthetic):
    acts, tokens, prev, pos, _ = synthetic
    with pytest.raises(ValueError, match="kinds"):
        label_features(acts, tokens, prev, pos, NAMES, kinds=("token",))
    with pytest.raises(ValueError, match="kinds"):
        label_features(acts, tokens, prev, pos, NAMES, kinds=())
    with pytest.raises(ValueError, match="token id 9 has no name"):
        label_features(acts, tokens, prev, pos, NAMES[:9])
    with pytest.raises(ValueError, match="shape"):
        label_features(acts, tokens[:-1], prev, pos, NAMES)
    with pytest.raises(TypeError, match="integer"):
        label_features(acts, tokens.float(), prev, pos, NAMES)
    with pytest.raises(ValueError, match="min_score"):
        label_features(acts, tokens, prev, pos, NAMES, min_score=1.5)


# ---------------------------------------------------------------------------------------------
# LabelSet
# ---------------------------------------------------------------------------------------------


def test_labelset_views_and_round_trip(synthetic, tmp_path):
    acts, tokens, prev, pos, _ = synthetic
    ls = label_features(acts, tokens, prev, pos, NAMES)
    assert ls.to_dict() == {lab.feature: lab.label for lab in ls.labels}
    assert ls.to_dict()[2] == "position = 7"
    frame = ls.frame()
    assert list(frame.columns) == [
        "feature",
        "label",
        "kind",
        "value",
        "score",
        "precision",
        "recall",
        "n_active",
    ]
    assert len(frame) == 7 and frame.loc[1, "label"] == "previous token = t5"
    assert frame.loc[2, "value"] == 7 and frame.loc[5, "score"] == ls[5].score

    path = tmp_path / "labels.json"
    ls.save(path)
    back = LabelSet.load(path)
    assert back == ls  # every field, floats included
    assert isinstance(back[2].value, int) and isinstance(back[0].value, str)
    assert json.loads(path.read_text())["labels"][5]["precision"] == ls[5].precision


def test_labelset_rejects_misnumbered_labels():
    lab = FeatureLabel(1, "dead", "dead", None, 0.0, 0.0, 0.0, 0)
    with pytest.raises(ValueError, match="feature 1"):
        LabelSet([lab])


def _corruptions(text: str) -> dict[str, str]:
    data = json.loads(text)
    swapped = json.loads(text)
    swapped["labels"][0], swapped["labels"][1] = swapped["labels"][1], swapped["labels"][0]
    bad_score = json.loads(text)
    bad_score["labels"][2]["score"] = 1.5
    missing_field = json.loads(text)
    del missing_field["labels"][0]["recall"]
    bad_kind = json.loads(text)
    bad_kind["labels"][0]["kind"] = "vibes"
    return {
        "truncated": text[: len(text) // 2],
        "list": json.dumps(data["labels"]),
        "no labels": json.dumps({k: v for k, v in data.items() if k != "labels"}),
        "swapped": json.dumps(swapped),
        "bad score": json.dumps(bad_score),
        "missing field": json.dumps(missing_field),
        "bad kind": json.dumps(bad_kind),
    }


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "list",
        "no labels",
        "swapped",
        "bad score",
        "missing field",
        "bad kind",
        "binary",
    ],
)
def test_labelset_load_rejects_corrupt_files(synthetic, tmp_path, case):
    acts, tokens, prev, pos, _ = synthetic
    good = tmp_path / "good.json"
    label_features(acts, tokens, prev, pos, NAMES).save(good)
    bad = tmp_path / f"corrupt {case}.json"
    if case == "binary":
        bad.write_bytes(b"\xff\xfe\x00garbage")
    else:
        bad.write_text(_corruptions(good.read_text())[case])
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        LabelSet.load(bad)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_labels(bad)


def test_labelset_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.json"))):
        LabelSet.load(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------
# load_labels
# ---------------------------------------------------------------------------------------------

NEURONPEDIA = [
    {
        "modelId": "gpt2-small",
        "layer": "1-res-jb",
        "index": "3",
        "description": " the word fox",
        "explanationModelName": "gpt-4o-mini",
        "typeName": "oai_token-act-pair",
    },
    {"modelId": "gpt2-small", "layer": "1-res-jb", "index": 7, "description": "seven"},
    {"modelId": "gpt2-small", "layer": "1-res-jb", "index": "3", "description": "a later one"},
    {"index": "12", "description": "twelve", "typeName": "manual"},
]
NEURONPEDIA_DICT = {3: "the word fox", 7: "seven", 12: "twelve"}


def test_load_labels_mappings_and_labelsets(synthetic):
    assert load_labels({1: "one", "2": "two", " 3 ": 3}) == {1: "one", 2: "two", 3: "3"}
    acts, tokens, prev, pos, _ = synthetic
    ls = label_features(acts, tokens, prev, pos, NAMES)
    assert load_labels(ls) == ls.to_dict()
    with pytest.raises(ValueError, match="'x'"):
        load_labels({"x": "bad"})
    with pytest.raises(ValueError, match="negative"):
        load_labels({-1: "bad"})
    with pytest.raises(ValueError, match="1.5"):
        load_labels({1.5: "bad"})


def test_load_labels_files(synthetic, tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"4": "four", "10": "ten"}))
    assert load_labels(plain) == {4: "four", 10: "ten"}
    assert load_labels(str(plain)) == {4: "four", 10: "ten"}

    acts, tokens, prev, pos, _ = synthetic
    ls = label_features(acts, tokens, prev, pos, NAMES)
    saved = tmp_path / "probe.json"
    ls.save(saved)
    assert load_labels(saved) == ls.to_dict()

    export = tmp_path / "export.json"
    export.write_text(json.dumps(NEURONPEDIA))
    assert load_labels(export) == NEURONPEDIA_DICT  # first explanation of index 3 wins

    lines = "\n".join(json.dumps(e) for e in NEURONPEDIA) + "\n"
    jsonl = tmp_path / "export.jsonl"
    jsonl.write_text(lines)
    assert load_labels(jsonl) == NEURONPEDIA_DICT
    one_line = tmp_path / "one.jsonl"
    one_line.write_text(json.dumps(NEURONPEDIA[1]))
    assert load_labels(one_line) == {7: "seven"}
    misnamed = tmp_path / "lines.json"  # JSON Lines under a .json name
    misnamed.write_text(lines)
    assert load_labels(misnamed) == NEURONPEDIA_DICT

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert load_labels(empty) == {}


@pytest.mark.parametrize("index", ["abc", 1.5, None, "1e3", True])
def test_load_labels_bad_index(tmp_path, index):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([NEURONPEDIA[1], {"index": index, "description": "bad"}]))
    with pytest.raises(ValueError, match=re.escape(json.dumps(index))) as info:
        load_labels(path)
    assert str(path) in str(info.value) and "entry 1" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "not json at all",
        "42",
        '"a string"',
        "[1, 2]",
        '[{"index": 1}]',
        '{"1": {"nested": "object"}}',
        '{"1": "ok"',
    ],
)
def test_load_labels_unknown_format(tmp_path, text):
    path = tmp_path / "weird.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        load_labels(path)
    assert "Neuronpedia" in str(info.value) and "JSON Lines" in str(info.value)


def test_load_labels_missing_file_and_wrong_types(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.json"))):
        load_labels(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="int"):
        load_labels(42)
    with pytest.raises(TypeError, match="list"):
        load_labels(NEURONPEDIA)


def test_load_labels_checks_range():
    assert load_labels({4: "x"}, d_sae=5) == {4: "x"}
    with pytest.raises(ValueError, match=r"feature 5 .*d_sae=5"):
        load_labels({5: "x", 2: "y"}, d_sae=5)


# ---------------------------------------------------------------------------------------------
# Dictionary integration
# ---------------------------------------------------------------------------------------------

D_SAE = 40


# A HookedTransformer (stack (a)) and the bridges covering each wiring difference.
DICTIONARY_MODELS = [pytest.param("gpt2", marks=needs_hooked), *BRIDGE_CORE]


@pytest.fixture(scope="module", params=DICTIONARY_MODELS)
def model(request):
    return qk_lens.attach(make_any(request.param, torch.float32))


@pytest.fixture
def sae():
    return make_sae(
        "standard", dtype="float32", hook="blocks.1.hook_resid_pre", d_in=64, d_sae=D_SAE
    )


def test_add_dictionary_reads_label_files(model, sae, tmp_path):
    export = tmp_path / "export.json"
    export.write_text(json.dumps(NEURONPEDIA))
    d = model.add_dictionary(sae, labels=export)
    assert model.qk_dictionaries[1] is d
    assert model.qk_dictionaries[1].label(3) == "the word fox"
    assert d.label(7) == "seven" and d.label(12) == "twelve" and d.label(0) == ""

    d.set_labels({5: "five"})
    assert d.labels == {5: "five"}
    d.set_labels(None)
    assert d.labels == {}
    d.set_labels(str(export))
    assert d.labels == NEURONPEDIA_DICT

    with pytest.raises(ValueError, match=rf"feature {D_SAE}\b.*d_sae={D_SAE}"):
        d.set_labels({D_SAE: "too far"})
    assert d.labels == NEURONPEDIA_DICT  # a refused set leaves the labels alone
    with pytest.raises(ValueError, match=rf"feature {D_SAE + 3}\b.*d_sae={D_SAE}"):
        model.add_dictionary(sae, labels={1: "ok", D_SAE + 3: "too far"})
    with pytest.raises(TypeError, match="int"):
        model.add_dictionary(sae, labels=42)
    assert model.add_dictionary(sae, labels={"2": "two"}).label(2) == "two"


def test_label_dictionary(model, sae, monkeypatch):
    d = model.add_dictionary(sae)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 16), generator=g)
    seen = {}

    def spy(acts, tokens, prev_tokens, positions, token_names, **kw):
        seen.update(acts=acts, tokens=tokens, prev=prev_tokens, pos=positions, names=token_names)
        return label_features(acts, tokens, prev_tokens, positions, token_names, **kw)

    monkeypatch.setattr(qk_lens.labels, "label_features", spy)
    ls = label_dictionary(model, d, tokens, batch_size=2)
    assert isinstance(ls, LabelSet) and len(ls) == D_SAE
    assert all(lab.kind in LABEL_KINDS for lab in ls.labels)
    assert all(0.0 <= lab.score <= 1.0 for lab in ls.labels)
    d.set_labels(ls)
    assert d.labels == ls.to_dict()

    # Same as labelling by hand: one full forward of the model as it runs by default (a bridge:
    # Hugging Face's norms), the SAE's encode, hand-built prev/positions.
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        acts = sae.encode(cache["blocks.1.hook_resid_pre"].reshape(-1, 64))
    flat, prev, pos = [], [], []
    for row in tokens.tolist():
        for p, t in enumerate(row):
            flat.append(t)
            prev.append(row[p - 1] if p else -1)
            pos.append(p)
    names = [str(i) for i in range(model.cfg.d_vocab)]
    assert seen["tokens"].tolist() == flat and seen["names"] == names
    assert seen["prev"].tolist() == prev and seen["pos"].tolist() == pos
    torch.testing.assert_close(seen["acts"], acts, rtol=1e-5, atol=1e-5)
    assert (acts > 0).any() and torch.isfinite(acts).all()  # something to label, no NaN
    want = label_features(acts, torch.tensor(flat), torch.tensor(prev), torch.tensor(pos), names)
    for got, exp in zip(ls.labels, want.labels, strict=True):
        assert (got.label, got.kind, got.value, got.n_active) == (
            exp.label,
            exp.kind,
            exp.value,
            exp.n_active,
        )
        assert got.score == pytest.approx(exp.score, abs=1e-5)


def test_token_names_use_the_tokenizer():
    class Tokenizer:
        def __len__(self):
            return 4

        def convert_ids_to_tokens(self, ids):
            return [f"<{i}>" if i != 2 else None for i in ids]

    class Model:
        tokenizer = Tokenizer()

    assert _token_names(Model(), 6) == ["<0>", "<1>", "2", "<3>", "4", "5"]


def test_role_labels():
    """A caller's per-token roles compete as ``role = <name>``: a feature that fires on one role
    across many tokens gets it; token features keep their token labels; tokens without a role
    count for no role (precision is over the feature's whole activation)."""
    tokens, prev, pos = probe()
    n = len(tokens)
    g = torch.Generator().manual_seed(3)
    roles = torch.full((n,), -1)
    asked = torch.randperm(n, generator=g)[: n // 6]
    roles[asked] = 1  # "asked word", on many different tokens
    roles[torch.randperm(n, generator=g)[: n // 6]] = 0
    roles[asked] = 1
    acts = torch.zeros(n, 3, dtype=torch.float64)
    acts[:, 0] = (roles == 1).double() * (1 + torch.rand(n, generator=g, dtype=torch.float64))
    acts[:, 1] = (tokens == 3).double()
    half = (roles == 0).nonzero().squeeze(-1)
    acts[half, 2] = 1.0
    acts[(roles == -1).nonzero().squeeze(-1)[: len(half)], 2] = 1.0  # half its mass: no role
    names = ["other role", "asked word"]
    ls = label_features(acts, tokens, prev, pos, NAMES, roles=roles, role_names=names)
    assert ls[0].label == "role = asked word" and ls[0].kind == "role"
    assert ls[0].precision == pytest.approx(1.0) and ls[0].recall == pytest.approx(1.0)
    assert ls[1].label == "current token = t3"
    # half of feature 2's mass is on tokens with no role: its role's precision is 0.5
    assert ls[2].label == "role = other role"
    assert ls[2].precision == pytest.approx(0.5) and ls[2].recall == pytest.approx(1.0)
    # without roles the kind is refused by name; roles need their names and matching shape
    with pytest.raises(ValueError, match="'role' needs roles="):
        label_features(acts, tokens, prev, pos, NAMES, kinds=["role"])
    with pytest.raises(TypeError, match="role_names"):
        label_features(acts, tokens, prev, pos, NAMES, roles=roles)
    with pytest.raises(ValueError, match="role id 1 has no name"):
        label_features(acts, tokens, prev, pos, NAMES, roles=roles, role_names=["one"])
    with pytest.raises(ValueError, match="roles must have shape"):
        label_features(acts, tokens, prev, pos, NAMES, roles=roles[:-1], role_names=names)


def test_role_labels_save_and_load(tmp_path):
    tokens, prev, pos = probe()
    roles = torch.where(tokens == 2, 0, -1)
    acts = (roles == 0).double()[:, None]
    ls = label_features(acts, tokens, prev, pos, NAMES, roles=roles, role_names=["two"],
                        kinds=["role"])  # fmt: skip
    assert ls[0].label == "role = two"
    back = LabelSet.load(ls.save(tmp_path / "labels.json"))
    assert back[0] == ls[0]


def test_token_class_labels():
    """Classes of words describe features that nothing narrower does (``token class = <name>``):
    a feature spread over a class's words gets the class (no single token holds half its mass);
    a word in two classes counts for the first; a feature mostly on one word keeps that word."""
    tokens, prev, pos = probe()
    n = len(tokens)
    g = torch.Generator().manual_seed(5)
    classes = {"low": ["t0", "t1", "t2", "t3"], "high": ["t3", "t4", "t5"]}
    acts = torch.zeros(n, 5, dtype=torch.float64)
    in_low = torch.isin(tokens, torch.tensor([0, 1, 2, 3]))
    acts[:, 0] = in_low.double() * (1 + torch.rand(n, generator=g, dtype=torch.float64))
    acts[:, 1] = (tokens == 5).double()
    # t3 belongs to "low" first: a feature on t3, t4, t5 evenly has 2/3 of its mass on "high"
    acts[:, 2] = torch.isin(tokens, torch.tensor([3, 4, 5])).double()
    acts[:, 3] = 0.0  # dead
    # 95% of its mass on t0, 5% on t1: the class's precision is 1, but the word describes it
    on_0, on_1 = (tokens == 0).double(), (tokens == 1).double()
    acts[:, 4] = 0.95 * on_0 / on_0.sum() + 0.05 * on_1 / on_1.sum()
    ls = label_features(acts, tokens, prev, pos, NAMES, token_classes=classes)
    assert ls[0].label == "token class = low" and ls[0].kind == "token class"
    assert ls[0].precision == pytest.approx(1.0) and ls[0].recall == pytest.approx(1.0)
    assert ls[1].label == "current token = t5"
    on_3, on_45 = float(acts[tokens == 3, 2].sum()), float(acts[tokens != 3, 2].sum())
    assert ls[2].label == "token class = high"
    assert ls[2].precision == pytest.approx(on_45 / (on_3 + on_45))
    assert ls[3].label == "dead"
    assert ls[4].label == "current token = t0" and ls[4].precision == pytest.approx(0.95)
    # without the classes the spread feature is unclear (its best word holds under half)
    plain = label_features(acts, tokens, prev, pos, NAMES)
    assert plain[0].label == "unclear" and plain[0].precision < 0.5
    # the class kind is refused by name without classes; classes must name tokens
    with pytest.raises(ValueError, match="'token class' needs token_classes="):
        label_features(acts, tokens, prev, pos, NAMES, kinds=["token class"])
    with pytest.raises(ValueError, match=r"token_classes\['low'\] has words that are no token"):
        label_features(acts, tokens, prev, pos, NAMES, token_classes={"low": ["t0", "zzz"]})
    with pytest.raises(TypeError, match="must be a list of words"):
        label_features(acts, tokens, prev, pos, NAMES, token_classes={"low": "t0"})
    with pytest.raises(TypeError, match="token_classes must be a non-empty dict"):
        label_features(acts, tokens, prev, pos, NAMES, token_classes={})
    with pytest.raises(ValueError, match=r"token_classes\['low'\] is empty"):
        label_features(acts, tokens, prev, pos, NAMES, token_classes={"low": []})
    # any iterable of words (a generator too) is read once, whole
    gen = label_features(acts, tokens, prev, pos, NAMES,
                         token_classes={"low": (f"t{i}" for i in range(4))})  # fmt: skip
    assert gen[0].label == "token class = low"
