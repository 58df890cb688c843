"""qk_attribution_table against the model's scores and against the explicit term matrices, on
HookedTransformer variants (stack (a)) and TransformerBridge models (both stacks).

The scores come from the model, not from qk_lens: HookedTransformer variants from the
hand-written reference (tests/archs.py::reference_scores), bridges from their own
``hook_attn_scores`` (run as qk_lens runs them, ``arch_of(model).exact_forward()``) and, under
the Gemma-2 softcap, their own ``hook_rot_q``/``hook_rot_k``.
"""

import numpy as np
import pytest
import torch

import qk_lens
from tests.models import (
    BRIDGE_CORE,
    HOOKED,
    bridge_scores,
    hooks_of,
    is_bridge_name,
    make_any,
    make_tokens,
)
from tests.saes import make_sae

torch.set_num_threads(1)
N_TOK = 14
NAMES = (["gpt2", "llama", "gemma2", "alibi"] if HOOKED else []) + BRIDGE_CORE


@pytest.fixture(scope="module", params=NAMES)
def setup(request):
    name = request.param
    model = qk_lens.attach(make_any(name))
    layer = model.cfg.n_layers - 1
    sae = make_sae("topk", hook=f"blocks.{layer}.hook_resid_pre", d_in=model.cfg.d_model, d_sae=150)
    model.add_dictionary(sae)
    tokens = make_tokens(model, N_TOK)[0]
    cache = hooks_of(model, tokens)
    if is_bridge_name(name):
        raw, final, _ = bridge_scores(model, cache, layer)
    else:
        from tests.archs import reference_scores

        raw, final = (t.detach() for t in reference_scores(model, cache, layer))
    if model.cfg.positional_embedding_type == "alibi":
        raw = torch.where(final.isfinite(), final, raw)  # ALiBi is part of the attributed score
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
    return model, tokens, layer, raw, final, pattern


def test_every_unmasked_pair_scores_and_sums(setup):
    model, tokens, layer, raw, final, _ = setup
    table = model.qk_attribution_table(tokens, layer, top_k=5)
    pairs = table.groupby(["head", "q_pos", "k_pos"])
    expected = {
        (h, q, k)
        for h in range(model.cfg.n_heads)
        for q in range(N_TOK)
        for k in range(N_TOK)
        if torch.isfinite(final[h, q, k])
    }
    assert len(expected) >= model.cfg.n_heads * N_TOK
    assert set(pairs.groups) == expected
    agg = pairs.agg(total=("term", "sum"), score=("score", "first"), ms=("model_score", "first"))
    h, q, k = (np.array(x) for x in zip(*agg.index, strict=True))
    assert np.allclose(agg.score.to_numpy(), raw[h, q, k].numpy(), atol=1e-9, rtol=0)
    assert np.allclose(agg.ms.to_numpy(), final[h, q, k].numpy(), atol=1e-9, rtol=0)
    assert np.allclose(agg.total.to_numpy(), agg.score.to_numpy(), atol=1e-9, rtol=0)


def test_listed_terms_are_the_largest_of_the_explicit_matrix(setup):
    model, tokens, layer, _, _, _ = setup
    table = model.qk_attribution_table(tokens, layer, heads=[1, 2], top_k=6)
    assert set(table["head"].unique()) == {1, 2}
    for h, q, k in [(1, 13, 2), (2, 9, 9), (1, 5, 0)]:
        if (h, q, k) not in set(zip(table["head"], table.q_pos, table.k_pos, strict=True)):
            continue
        rows = table[
            (table["head"] == h) & (table.q_pos == q) & (table.k_pos == k) & (table["rank"] >= 0)
        ]
        a = model.qk_attribution(tokens, layer, h, q, k)
        t = a.terms.reshape(-1)
        best = t[t.abs().argsort(descending=True)[:6]]
        assert np.allclose(rows.term.to_numpy(), best.numpy(), atol=1e-12)
        assert list(rows.q_label) == list(a.top(6).q_label)
        assert list(rows.k_label) == list(a.top(6).k_label)


def test_min_prob_filters_pairs(setup):
    """Only pairs the model itself (its hook_pattern) attends to with probability ≥ 0.3."""
    model, tokens, layer, _, _, pattern = setup
    table = model.qk_attribution_table(tokens, layer, top_k=3, min_prob=0.3)
    assert (table.prob >= 0.3).all()
    h, q, k = (torch.as_tensor(table[c].to_numpy()) for c in ("head", "q_pos", "k_pos"))
    assert np.allclose(table.prob.to_numpy(), pattern[h, q, k].numpy(), atol=1e-9, rtol=0)
    n_expected = int(((pattern >= 0.3) & (pattern > 0)).sum())
    assert n_expected > 0
    assert table.groupby(["head", "q_pos", "k_pos"]).ngroups == n_expected


def test_bad_table_arguments(setup):
    model, tokens, layer, _, _, _ = setup
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        model.qk_attribution_table(tokens, layer, top_k=0)
    with pytest.raises(ValueError, match=r"min_prob must lie in \[0, 1\]"):
        model.qk_attribution_table(tokens, layer, min_prob=1.5)
    with pytest.raises(ValueError, match="head=9 is out of range"):
        model.qk_attribution_table(tokens, layer, heads=[9])


def test_chunks_and_progress_change_nothing(setup, capsys):
    """chunk_size (query positions per selection call) and the progress bar are bookkeeping: the
    table is the same, and the bar counts every pair."""
    import pandas as pd

    model, tokens, layer, _, _, _ = setup
    whole = model.qk_attribution_table(tokens, layer, top_k=4)
    chunked = model.qk_attribution_table(tokens, layer, top_k=4, chunk_size=3, progress=True)
    pd.testing.assert_frame_equal(whole, chunked)
    n_pairs = whole.groupby(["head", "q_pos", "k_pos"]).ngroups
    assert f"{n_pairs}/{n_pairs}" in capsys.readouterr().err


def test_streamed_chunks_are_the_table(setup):
    """qk_attribution_table_chunks (what `qk-lens run` streams to Parquet) yields the table's
    rows chunk by chunk, each chunk's pairs summing to their scores."""
    import pandas as pd

    from qk_lens.attribution import qk_attribution_table_chunks

    model, tokens, layer, raw, _, _ = setup
    whole = model.qk_attribution_table(tokens, layer, top_k=4, min_prob=0.02)
    chunks = list(
        qk_attribution_table_chunks(model, tokens, layer, top_k=4, min_prob=0.02, chunk_size=5)
    )
    assert len(chunks) >= 2
    for c in chunks:
        assert c.q_pos.max() - c.q_pos.min() < 5
        sums = c.groupby(["head", "q_pos", "k_pos"]).term.sum()
        for (h, q, k), s in sums.items():
            assert abs(s - float(raw[h, q, k])) <= 1e-4 * max(1.0, abs(float(raw[h, q, k])))
    pd.testing.assert_frame_equal(
        pd.concat(chunks, ignore_index=True), whole, check_categorical=False
    )


def test_capture_scope_records_only_its_layers(setup):
    """Inside capture_scope, captures hold those layers' [head, q, k] tensors only; the table of
    such a layer is unchanged and another layer's pattern is a clear KeyError."""
    import pandas as pd

    from qk_lens.state import capture

    model, tokens, layer, _, _, _ = setup
    whole = model.qk_attribution_table(tokens, layer, top_k=4)
    model.clear_qk_cache()
    with qk_lens.capture_scope(model, [layer]):
        scoped = model.qk_attribution_table(tokens, layer, top_k=4)
        cap = capture(model, tokens)
        recorded = {n for n in cap.acts if n.endswith("attn.hook_pattern")}
        assert recorded == {f"blocks.{layer}.attn.hook_pattern"}
        if layer > 0:
            with pytest.raises(KeyError, match="capture_scope"):
                cap.pattern(0)
    pd.testing.assert_frame_equal(scoped, whole)
    assert capture(model, tokens).has("blocks.0.attn.hook_pattern")  # outside: all layers again
    with pytest.raises(ValueError, match="layer"):
        with qk_lens.capture_scope(model, [99]):
            pass
