"""The methods qk_lens adds to models and results delegate to the modules that implement them."""

from __future__ import annotations

import pytest
import torch

from qk_lens import toy
from qk_lens.demo import choose_pair


@pytest.fixture(scope="module")
def setup():
    model = toy.load("attn2-ln")
    prompt = "owl cat jay fox elk hen owl cat jay fox elk hen"
    tokens = model.to_tokens(prompt)[0].tolist()
    q, k = choose_pair(tokens, q_pos=9)
    return model, prompt, q, k


def test_attr_contrast_uses_its_source(setup):
    model, prompt, q, k = setup
    a = model.qk_attribution(prompt, 1, 0, q, k)
    other = model.qk_attribution(prompt, 1, 0, q, 2)
    c = a.contrast(2)  # fetches key 2 of the same row through the model that made `a`
    assert float(c.terms.sum()) == pytest.approx(a.score - other.score, abs=1e-4 * a.scale)
    row = model.qk_attribution(prompt, 1, 0, q)
    assert float(row.contrast(k, 2).terms.sum()) == pytest.approx(a.score - other.score, abs=1e-4)
    comp = a.components(rank=2)
    full = a.components()
    assert float(full.score_contributions.sum()) == pytest.approx(a.score, abs=1e-4 * a.scale)
    assert len(comp.score_contributions) == 2
    g = a.group()
    assert float(g.terms.sum()) == pytest.approx(a.score, abs=1e-4 * a.scale)
    assert len(row.inhibitors(k, top=3)) <= 3


def test_model_steer_methods(setup):
    model, prompt, q, k = setup
    a = model.qk_attribution(prompt, 1, 0, q, k)
    top = a.top(1).iloc[0]
    feat = int(top["k_feature"])
    r = model.steer_qk(prompt, 1, 0, "key", {feat: 0.0}, positions=[k])
    r.check()
    measured = float(r.measured_change[0, q, k])
    marg = a.key_marginals()
    predicted = -float(
        marg[(marg["feature"] == feat) & (marg["kind"] == "feature")]["marginal"].sum()
    )
    assert measured == pytest.approx(predicted, abs=1e-4 * a.scale)
    sweep = model.steer_qk_sweep(prompt, 1, 0, {feat: 1.0}, [0.0, 1.0], positions=[k])
    assert len(sweep.frame()) == 2
    res = model.steer_resid(prompt, 1, [feat], positions=[k], heads=[0])
    res.check()
    assert torch.isfinite(torch.as_tensor(res.live_change)[0, q, k])  # masked pairs are NaN


def test_model_graph_methods(setup):
    model, prompt, q, k = setup
    g = model.attribution_graph(prompt)
    hl = model.head_loadings(g)
    hl.check()
    assert len(hl.residual) == len(g.edge_weight) > 0
    total = hl.residual + hl.mlp + hl.heads.sum(-1)
    assert torch.allclose(total, g.edge_weight.to(total.dtype), rtol=1e-4, atol=1e-5)
