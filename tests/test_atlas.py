"""Head atlas: constructed weights with known answers, a full-matrix reference, the toy models.

Every expected value here comes from somewhere other than qk_lens.atlas: weights built so the
answer is known in closed form, d_vocab × d_vocab / d_model × d_model matrices built and
decomposed directly (fine at vocab 100), TransformerLens's own ``all_composition_scores``, the
existing ``pattern_scores``, explicit loops over cached patterns, and the toy models' training
metrics (written by the training script, not by the atlas).
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components import LayerNorm, LayerNormPre

from qk_lens import toy
from qk_lens.atlas import (
    LABELS,
    SCORE_INFO,
    THRESHOLDS,
    WEIGHT_COLUMNS,
    Composition,
    HeadAtlas,
    effective_rank,
    eigen_skew,
    head_atlas,
)
from qk_lens.atlas.probes import pattern_scores, repeated_random_tokens
from tests.archs import ARCH_NAMES, make_model

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)

F64 = torch.float64


# --------------------------------------------------------------------------- constructed weights
def _orthonormal(gen: torch.Generator, d: int, k: int, avoid_ones: bool) -> torch.Tensor:
    """k orthonormal columns in R^d (orthogonal to the all-ones vector if asked: LN centres)."""
    x = torch.randn(d, k + 1, generator=gen, dtype=F64)
    if avoid_ones:
        x = torch.cat([torch.ones(d, 1, dtype=F64), x], 1)
    q, _ = torch.linalg.qr(x)
    return q[:, 1 : k + 1] if avoid_ones else q[:, :k]


def _constructed(normalization_type: str | None) -> tuple[HookedTransformer, dict[str, int]]:
    """Layer 0: OV = +Π and −Π (Π projects on the embedding subspace); layer 1: W_Q W_Kᵀ = ±B A Bᵀ
    with A symmetric positive definite; W_U = W_Eᵀ (tied)."""
    d_model, d_head, d_vocab, d_emb = 32, 16, 12, 8
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=d_model, n_ctx=16, d_head=d_head, n_heads=3, d_vocab=d_vocab,
        attn_only=True, normalization_type=normalization_type, act_fn=None, dtype=F64,
        init_weights=False, device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(1)
    centred = normalization_type == "LN"
    basis = _orthonormal(gen, d_model, d_emb, centred)  # the embedding subspace
    emb = torch.randn(d_vocab, d_emb, generator=gen, dtype=F64) @ basis.T
    # Norm √d_model per row: LN/RMS leave these embeddings exactly as they are.
    emb = emb / emb.norm(dim=-1, keepdim=True) * math.sqrt(d_model)
    b_qk = _orthonormal(gen, d_model, d_head, centred)
    a = torch.randn(d_head, d_head, generator=gen, dtype=F64)
    spd = a @ a.T + 0.1 * torch.eye(d_head, dtype=F64)
    skew = a - a.T  # A + S still has x·(A+S)x > 0: eigenvalues with positive real parts
    w_v = torch.zeros(d_model, d_head, dtype=F64)
    w_v[:, :d_emb] = basis
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.fill_(1.0)
        model.embed.W_E.copy_(emb)
        model.unembed.W_U.copy_(emb.T)
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        a0.W_V[0], a0.W_O[0] = w_v, w_v.T  # +Π
        a0.W_V[1], a0.W_O[1] = w_v, -w_v.T  # −Π
        a1.W_Q[0], a1.W_K[0] = b_qk @ spd, b_qk  # +B A Bᵀ
        a1.W_Q[1], a1.W_K[1] = -b_qk @ spd, b_qk  # −B A Bᵀ
        a1.W_Q[2], a1.W_K[2] = b_qk @ (spd + skew), b_qk  # positive definite, not symmetric
        a1.W_V[2], a1.W_O[2] = w_v, w_v.T
        a0.W_Q[2], a0.W_K[2] = basis @ torch.randn(d_emb, d_head, generator=gen, dtype=F64), b_qk
    model.eval()
    return model, {"d_emb": d_emb}


@pytest.mark.parametrize("norm", [None, "LN", "RMS"])
def test_constructed_copying_and_skew(norm):
    model, _ = _constructed(norm)
    frame = head_atlas(model, n_probes=2, probe_length=4).frame.set_index("name")
    assert frame.loc["L0H0", "ov_copying"] == pytest.approx(1.0, abs=1e-9)
    assert frame.loc["L0H0", "ov_positive_frac"] == pytest.approx(1.0, abs=1e-9)
    assert frame.loc["L0H1", "ov_copying"] == pytest.approx(-1.0, abs=1e-9)
    assert frame.loc["L0H1", "ov_positive_frac"] == pytest.approx(0.0, abs=1e-9)
    assert frame.loc["L1H0", "qk_skew"] == pytest.approx(1.0, abs=1e-9)
    assert frame.loc["L1H1", "qk_skew"] == pytest.approx(-1.0, abs=1e-9)
    assert 0 < frame.loc["L1H2", "qk_skew"] < 1
    assert frame.loc["L1H2", "qk_positive_frac"] == pytest.approx(1.0, abs=1e-9)
    # OV = Π on an 8-dim subspace: 8 equal singular values → effective rank 8
    assert frame.loc["L0H0", "ov_eff_rank"] == pytest.approx(8.0, abs=1e-6)
    assert "copying" in frame.loc["L0H0", "labels"]
    assert "suppression" in frame.loc["L0H1", "labels"]
    assert "concordance-like" in frame.loc["L1H0", "labels"]
    assert "discordance-like" in frame.loc["L1H1", "labels"]


def test_statistics_helpers():
    lam = torch.tensor([[3.0, 1.0, 0.0], [2.0, -2.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    signed, pos = eigen_skew(lam.to(torch.complex128))
    assert signed[:2].tolist() == pytest.approx([1.0, 0.0])
    assert pos[:2].tolist() == pytest.approx([1.0, 0.5])
    assert torch.isnan(signed[2]) and torch.isnan(pos[2])
    # a complex pair counts its real part: (1 ± 1i) → Re Σλ / Σ|λ| = 2 / (2√2)
    s, _ = eigen_skew(torch.tensor([1 + 1j, 1 - 1j], dtype=torch.complex128))
    assert float(s) == pytest.approx(1 / math.sqrt(2))
    sv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]], dtype=F64)
    assert effective_rank(sv).tolist() == pytest.approx([4.0, 1.0])


# --------------------------------------------------------------------------- full-matrix reference
def _reference(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """Every weight-level score from full d_vocab × d_vocab and d_model × d_model matrices."""
    cfg = model.cfg
    n_layers, n_heads, d = cfg.n_layers, cfg.n_heads, cfg.d_model
    centring = cfg.normalization_type in ("LN", "LNPre")

    def centre(x):
        return x - x.mean(-1, keepdim=True) if centring else x

    def read(layer, x):  # what ln1 of `layer` passes on at a frozen unit scale, bias dropped
        ln = model.blocks[layer].ln1
        if isinstance(ln, (LayerNorm, LayerNormPre)):
            x = x - x.mean(-1, keepdim=True)
        return x * ln.w if hasattr(ln, "w") else x

    def head_maps(layer, head):
        attn = model.blocks[layer].attn
        kv = head // (n_heads // attn._W_K.shape[0]) if hasattr(attn, "_W_K") else head
        w_k = attn._W_K[kv] if hasattr(attn, "_W_K") else attn.W_K[head]
        w_v = attn._W_V[kv] if hasattr(attn, "_W_V") else attn.W_V[head]
        qn = attn.q_norm.w if cfg.use_qk_norm else 1.0
        kn = attn.k_norm.w if cfg.use_qk_norm else 1.0
        post = getattr(model.blocks[layer], "ln1_post", None)
        pw = post.w if post is not None and hasattr(post, "w") else 1.0

        def q(x):
            return read(layer, x) @ attn.W_Q[head] * qn / attn.attn_scale

        def k(x):
            return read(layer, x) @ w_k * kn

        def ov(x):
            return centre(read(layer, x) @ w_v @ attn.W_O[head] * pw)

        return q, k, ov

    x = model.W_E.detach()
    if centring:
        x = x - x.mean(-1, keepdim=True)
    if cfg.normalization_type is not None:
        x = x / (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
    eye = torch.eye(d, dtype=x.dtype)
    fin = model.ln_final

    def logits(o):
        if isinstance(fin, (LayerNorm, LayerNormPre)):
            o = o - o.mean(-1, keepdim=True)
        o = o * fin.w if hasattr(fin, "w") else o
        out = o @ model.W_U.detach()
        return out - out.mean(-1, keepdim=True)  # constant logit shifts are irrelevant

    def stat(matrix):
        lam = torch.linalg.eigvals(matrix)
        return float(lam.real.sum() / lam.abs().sum()), float(
            (lam.abs() * (lam.real > 0)).sum() / lam.abs().sum()
        )

    out = {k: torch.zeros(n_layers, n_heads, dtype=F64) for k in WEIGHT_COLUMNS}
    qk_full, ov_full, ov_maps = {}, {}, {}
    with torch.no_grad():
        for layer in range(n_layers):
            for head in range(n_heads):
                q, k, ov = head_maps(layer, head)
                qk = q(eye) @ k(eye).T  # [d_model, d_model]
                ovm = ov(eye)
                qk_full[layer, head], ov_full[layer, head], ov_maps[layer, head] = qk, ovm, ov
                out["qk_skew"][layer, head], out["qk_positive_frac"][layer, head] = stat(qk)
                copy = stat(logits(ov(x)))  # Ê W_V W_O W_U: d_vocab × d_vocab
                out["ov_copying"][layer, head], out["ov_positive_frac"][layer, head] = copy
                sv_qk = torch.linalg.svdvals(qk)[: cfg.d_head]
                sv_ov = torch.linalg.svdvals(ovm)[: cfg.d_head]
                out["qk_norm"][layer, head] = torch.linalg.matrix_norm(qk)
                out["ov_norm"][layer, head] = torch.linalg.matrix_norm(ovm)
                for key, sv in (("qk_eff_rank", sv_qk), ("ov_eff_rank", sv_ov)):
                    p = sv / sv.sum()
                    out[key][layer, head] = torch.exp(-(p * p.log()).nansum())
                scores = q(x) @ k(x).T  # token × token
                scores = scores - scores.mean(-1, keepdim=True)
                out["same_token"][layer, head] = (
                    scores.diagonal().mean() / scores.pow(2).mean().sqrt()
                )
        comp = {m: torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=F64) for m in "qkv"}
        for (l1, h1), ov1 in ov_full.items():
            for (l2, h2), qk2 in qk_full.items():
                if l1 >= l2:
                    continue
                for m, right in (("q", qk2), ("k", qk2.T), ("v", ov_full[l2, h2])):
                    comp[m][l1, h1, l2, h2] = torch.linalg.matrix_norm(ov1 @ right) / (
                        torch.linalg.matrix_norm(ov1) * torch.linalg.matrix_norm(right)
                    )
    out["comp"] = comp
    out["path"] = lambda a, b: stat(logits(ov_maps[b](ov_maps[a](x))))  # virtual head
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3", "gemma2", "attn_only", "toy"])
def test_weight_scores_match_full_matrices(name):
    # the toy's 40-token vocabulary is smaller than d_model: the other same-token code path
    model = (
        toy.load("attn2-ln", dictionaries=False, dtype=F64)
        if name == "toy"
        else make_model(name, F64, seed=3)
    )
    atlas = head_atlas(model, n_probes=2, probe_length=4)
    ref = _reference(model)
    frame = atlas.frame
    for col in WEIGHT_COLUMNS:
        got = torch.tensor(frame[col].to_numpy(), dtype=F64).reshape(ref[col].shape)
        torch.testing.assert_close(got, ref[col], rtol=1e-7, atol=1e-9, msg=col)
    for m in "qkv":
        torch.testing.assert_close(
            atlas.composition.scores(m), ref["comp"][m], rtol=1e-7, atol=1e-9
        )
    row = atlas.virtual_heads.iloc[0]
    a, b = (row.first_layer, row.first_head), (row.second_layer, row.second_head)
    assert row.copying == pytest.approx(ref["path"](a, b)[0], rel=1e-7, abs=1e-9)
    assert row.positive_frac == pytest.approx(ref["path"](a, b)[1], rel=1e-7, abs=1e-9)


def test_composition_matches_transformer_lens():
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=48, n_ctx=16, d_head=8, n_heads=3, d_vocab=50, attn_only=True,
        normalization_type=None, act_fn=None, dtype=F64, seed=5, device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    atlas = head_atlas(model, n_probes=2, probe_length=4)
    for mode in "QKV":
        torch.testing.assert_close(
            atlas.composition.scores(mode), model.all_composition_scores(mode).double()
        )


def test_fold_invariance():
    """The same weights before and after process_weights_ (fold_ln, centring) give one atlas."""
    for base in ("gpt2", "llama", "gemma2"):
        a = head_atlas(make_model(base, F64), n_probes=2, probe_length=4, composition=True)
        b = head_atlas(make_model(base + "_folded", F64), n_probes=2, probe_length=4)
        cols = [*WEIGHT_COLUMNS, "q_comp", "k_comp", "v_comp"]
        np.testing.assert_allclose(
            a.frame[cols].to_numpy(float), b.frame[cols].to_numpy(float), rtol=1e-5, atol=1e-6
        )


def test_random_rotation_baseline():
    """Monte Carlo: rotate the residual basis between two real heads at random; the score's mean
    and spread match the per-pair baseline the atlas reports (leading order in 1/d)."""
    model = make_model("attn_only", F64, seed=2)
    atlas = head_atlas(model, n_probes=2, probe_length=4)
    gen = torch.Generator().manual_seed(0)
    ov1 = model.OV[0, 1].AB.detach()
    d = model.cfg.d_model
    for low_rank in (False, True):
        qk2 = model.QK[1, 2].AB.detach()
        if low_rank:  # a rank-2 reader: chance composition spreads much more
            u, s, vh = torch.linalg.svd(qk2)
            qk2 = u[:, :2] * s[:2] @ vh[:2]
        sv1 = torch.linalg.svdvals(ov1)
        sv2 = torch.linalg.svdvals(qk2)
        comp = Composition.from_scores(
            {m: torch.zeros(2, 1, 2, 1, dtype=F64) for m in "qkv"},
            torch.stack([sv2, sv2]).reshape(2, 1, -1),
            torch.stack([sv1, sv1]).reshape(2, 1, -1),
            d,
        )
        samples = []
        for _ in range(400):
            rot, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
            m = ov1 @ rot @ qk2
            samples.append(float(m.norm() / (ov1.norm() * qk2.norm())))
        samples = torch.tensor(samples)
        mean, std = (
            float(comp.baseline_mean["q"][0, 0, 1, 0]),
            float(comp.baseline_std["q"][0, 0, 1, 0]),
        )
        assert float(samples.mean()) == pytest.approx(mean, rel=0.05)
        assert float(samples.std()) == pytest.approx(std, rel=0.35)
    assert atlas.composition.d_residual == d - 1  # LN: writes seen in the centred subspace


# --------------------------------------------------------------------------- pattern level
def test_pattern_scores_agree_with_patterns_module():
    model = toy.load("attn2-ln", dictionaries=False)
    atlas = head_atlas(model, n_probes=8, probe_length=12, seed=4, composition=False)
    ref = pattern_scores(model, n=8, length=12, seed=4)
    for col in ("previous_token", "induction", "duplicate_token", "first_token", "self"):
        np.testing.assert_allclose(atlas.frame[col], ref[col], atol=1e-12)


def test_offset_and_entropy_by_explicit_loops():
    model = make_model("neox", torch.float32, seed=1)
    length = 10
    atlas = head_atlas(model, n_probes=3, probe_length=length, seed=7, composition=False)
    tokens = repeated_random_tokens(model, n=3, length=length, seed=7)
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        pat = cache["pattern", layer].double()
        for head in range(model.cfg.n_heads):
            p = pat[:, head]
            ent = [
                float(-(p[b, q, : q + 1] * p[b, q, : q + 1].log()).sum() / math.log(q + 1))
                for b in range(3)
                for q in range(1, length + 1)
            ]
            prof = {
                d: np.mean(
                    [float(p[b, q, q - d]) for b in range(3) for q in range(d + 1, length + 1)]
                )
                for d in range(1, length // 2 + 1)
            }
            best = max(prof, key=prof.get)
            row = atlas.frame.iloc[layer * model.cfg.n_heads + head]
            assert row.entropy == pytest.approx(np.mean(ent), abs=1e-6)
            assert row.offset == best
            assert row.offset_score == pytest.approx(prof[best], abs=1e-6)


def test_prompt_columns():
    model = make_model("gpt2", torch.float32, seed=0)
    prompts = [[5, 6, 7, 5, 6, 7, 8], [1, 2, 3, 4, 9]]
    atlas = head_atlas(model, prompts=prompts, n_probes=2, probe_length=4, composition=False)
    prev, dup = [], []
    for p in prompts:
        _, cache = model.run_with_cache(torch.tensor([p]))
        pat = cache["pattern", 1][0, 2].double()
        prev += [float(pat[q, q - 1]) for q in range(1, len(p))]
        dup += [
            float(sum(pat[q, k] for k in range(1, q) if p[k] == p[q]))
            for q in range(1, len(p))
            if any(p[k] == p[q] for k in range(1, q))
        ]
    row = atlas.frame.set_index("name").loc["L1H2"]
    assert row.prompt_previous_token == pytest.approx(np.mean(prev), abs=1e-6)
    assert row.prompt_duplicate_token == pytest.approx(np.mean(dup), abs=1e-6)
    assert math.isnan(row.prompt_induction) or row.prompt_induction >= 0


# --------------------------------------------------------------------------- the toy models
@pytest.fixture(scope="module", params=toy.NAMES)
def toy_atlas(request):
    model = toy.load(request.param, dictionaries=False)
    return model, head_atlas(model)


def test_toy_models_labelled(toy_atlas):
    """Heads named from the training script's own metrics get the matching atlas labels.

    A retrained toy may split the previous-token role over two layer-0 heads of about equal
    strength; every head within 80% of the strongest counts as a previous-token head."""
    model, atlas = toy_atlas
    metrics = model.toy.metrics
    prev_attn = np.asarray(metrics["previous_token_attention"][0])
    ind_attn = metrics["induction_attention"][1]
    prev_heads = [(0, h) for h in np.flatnonzero(prev_attn >= 0.8 * prev_attn.max()).tolist()]
    ind = (1, int(np.argmax(ind_attn)))
    for head in prev_heads:
        assert "previous-token" in atlas.labels(*head), (head, atlas.evidence(*head))
    for head, value in enumerate(ind_attn):
        if value > 0.5:
            assert "induction" in atlas.labels(1, head), (head, atlas.evidence(1, head))
    assert all(layer == 1 for layer, _ in atlas.heads_with("induction"))
    row = atlas.frame.set_index("name").loc[f"L{ind[0]}H{ind[1]}"]
    assert row.ov_copying > 0.5 and "copying" in row["labels"]
    assert row.k_comp_partner in {f"L{layer}H{head}" for layer, head in prev_heads}
    assert row.k_comp_z > THRESHOLDS["composition_z"]
    partners = atlas.composition.partners(*ind, mode="k", k=1)
    assert (int(partners["layer"][0]), int(partners["head"][0])) in prev_heads


def test_toy_user_prompts():
    """String prompts (the toy tokenizer) give prompt_* columns; a repeat shows induction."""
    model = toy.load("attn2-ln", dictionaries=False)
    prompt = "owl cat jay fox hen elk owl cat jay fox hen elk"
    atlas = head_atlas(model, prompts=[prompt], n_probes=4, composition=False)
    ind = (1, int(np.argmax(model.toy.metrics["induction_attention"][1])))
    row = atlas.frame.iloc[ind[0] * model.cfg.n_heads + ind[1]]
    assert row.prompt_induction > 0.5 and atlas.info["n_prompts"] == 1


# --------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_every_architecture_finite(name):
    model = make_model(name, torch.float32, seed=0)
    atlas = head_atlas(model, n_probes=2, probe_length=6)
    cfg = model.cfg
    assert len(atlas.frame) == cfg.n_layers * cfg.n_heads
    later = atlas.frame[atlas.frame.layer > 0]
    numeric = later.select_dtypes("number")
    assert np.isfinite(numeric.to_numpy(float)).all(), numeric.columns[
        ~np.isfinite(numeric.to_numpy(float)).all(0)
    ].tolist()
    assert atlas.spectra.qk_singular.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head)
    assert atlas.composition.q.shape == (cfg.n_layers, cfg.n_heads) * 2
    assert len(atlas.virtual_heads) == (cfg.n_layers - 1) * cfg.n_heads


# --------------------------------------------------------------------------- API and views
@pytest.fixture(scope="module")
def small_atlas():
    return head_atlas(make_model("gpt2", torch.float32, seed=0), n_probes=4, probe_length=6)


def test_api(small_atlas):
    atlas = small_atlas
    assert isinstance(atlas, HeadAtlas)
    for layer, head in atlas.heads_with("diffuse"):
        assert "diffuse" in atlas.labels(layer, head)
    with pytest.raises(ValueError, match="unknown label"):
        atlas.heads_with("copier")
    with pytest.raises(ValueError, match="out of range"):
        atlas.labels(5, 0)
    strict = atlas.relabel(entropy=2.0)
    assert strict.heads_with("diffuse") == [] and strict.thresholds["entropy"] == 2.0
    with pytest.raises(ValueError, match="unknown thresholds"):
        atlas.relabel(nonsense=1.0)
    assert set(atlas.frame["labels"].explode().dropna()) <= set(LABELS)
    assert (
        list(atlas.top("ov_copying", 3)["ov_copying"])
        == sorted(atlas.frame["ov_copying"], reverse=True)[:3]
    )


def test_validation():
    model = make_model("gpt2", torch.float32, seed=0)
    with pytest.raises(ValueError, match="n_probes"):
        head_atlas(model, n_probes=0)
    with pytest.raises(ValueError, match="probe_length"):
        head_atlas(model, probe_length=500)
    with pytest.raises(TypeError, match="seed"):
        head_atlas(model, seed=1.5)
    with pytest.raises(ValueError, match="no tokenizer"):
        head_atlas(model, prompts="a string")
    with pytest.raises(ValueError, match="unknown thresholds"):
        head_atlas(model, thresholds={"inducton": 0.2})
    with pytest.raises(TypeError, match="HookedTransformer"):
        head_atlas(object())


def test_views_self_contained(small_atlas):
    atlas = small_atlas
    atlas.info["model"] = "<script>alert(1)</script>"
    doc = atlas.to_html()
    assert doc.startswith("<!doctype html>")
    assert "<script" not in doc and "&lt;script&gt;" in doc
    assert not re.search(r"(src|href)\s*=", doc) and "http" not in doc.split("<body>")[1]
    for name in atlas.frame["name"]:
        assert name in doc
    for score in SCORE_INFO:
        if score in atlas.frame.columns:
            assert "qkl-fig" in atlas.heatmap(score)
    with pytest.raises(ValueError, match="unknown score"):
        atlas.heatmap("labels")
    assert "L1H3" in atlas.grid() and atlas._repr_html_().startswith('<div class="qkl">')
