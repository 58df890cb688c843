"""The model factory in tests/archs.py builds what it claims, and reference_scores is exact."""

import functools
import math

import pytest
import torch

from tests.archs import (
    ARCH_NAMES,
    FOLDED_NAMES,
    GQA_NAMES,
    LOCAL_ATTN_NAMES,
    QK_NORM_NAMES,
    ROTARY_NAMES,
    SOFTCAP_NAMES,
    alibi_bias,
    expected_attn_scale,
    is_local,
    make_model,
    make_tokens,
    reference_qk,
    reference_scores,
    rotary_pairs,
    score_mask,
)

DTYPES = [torch.float64, torch.float32]
SHAPE_NAMES = ["llama32_1b_shape", "gemma2_2b_shape"]
SMALL_NAMES = [n for n in ARCH_NAMES if n not in SHAPE_NAMES]
TOL = {torch.float64: 1e-9, torch.float32: 5e-5}


@functools.cache
def _run(name: str, dtype: torch.dtype):
    """One model + forward per (name, dtype), shared by the tests below. Do not mutate."""
    model = make_model(name, dtype)
    tokens = make_tokens(model)
    logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[1, T, H, d] hook tensor -> [H, T, d]."""
    return t[0].transpose(0, 1)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_config_is_small_and_tokenizer_free(name):
    model, *_ = _run(name, torch.float64)
    cfg = model.cfg
    assert 2 <= cfg.n_layers <= 3
    assert model.tokenizer is None and cfg.tokenizer_name is None
    assert cfg.n_ctx >= 64
    if name in SHAPE_NAMES:
        assert cfg.d_vocab == cfg.d_vocab_out == 128
    else:
        assert 32 <= cfg.d_model <= 64
        assert cfg.d_vocab <= 100
    # the feature groups in archs.py agree with the configs
    assert (name in ROTARY_NAMES) == (cfg.positional_embedding_type == "rotary")
    assert (name in QK_NORM_NAMES) == bool(cfg.use_qk_norm)
    assert (name in LOCAL_ATTN_NAMES) == bool(cfg.use_local_attn)
    assert (name in SOFTCAP_NAMES) == (cfg.attn_scores_soft_cap > 0)
    assert (name in GQA_NAMES) == (cfg.n_key_value_heads is not None)
    if name in FOLDED_NAMES:
        assert cfg.normalization_type in ("LNPre", "RMSPre")


def test_variant_specific_settings():
    cfg = {n: _run(n, torch.float64)[0].cfg for n in ARCH_NAMES}
    assert cfg["gpt2"].normalization_type == "LN"
    assert cfg["gpt2_folded"].normalization_type == "LNPre"
    assert cfg["llama_folded"].normalization_type == "RMSPre"
    assert cfg["gemma2_folded"].normalization_type == "RMSPre"
    for n in ("neox", "gptj"):
        assert cfg[n].parallel_attn_mlp and cfg[n].rotary_dim < cfg[n].d_head
    assert not cfg["neox"].rotary_adjacent_pairs and cfg["gptj"].rotary_adjacent_pairs
    assert cfg["llama"].use_NTK_by_parts_rope and cfg["llama"].gated_mlp
    assert cfg["llama"].n_key_value_heads == 2 and cfg["mqa"].n_key_value_heads == 1
    g2 = cfg["gemma2"]
    assert g2.use_normalization_before_and_after and g2.attn_types == ["local", "global"]
    assert g2.attn_scale != math.sqrt(g2.d_head) and g2.output_logits_soft_cap > 0
    g3 = cfg["gemma3"]
    assert g3.rotary_base_local != g3.rotary_base and g3.use_normalization_before_and_after
    assert not cfg["qwen3"].use_local_attn
    assert cfg["alibi"].positional_embedding_type == "alibi"
    assert cfg["inverse_layer_idx"].scale_attn_by_inverse_layer_idx
    assert cfg["attn_only"].attn_only
    # the *_shape variants keep the real attention geometry
    ll = cfg["llama32_1b_shape"]
    assert (ll.d_model, ll.n_heads, ll.d_head, ll.n_key_value_heads) == (2048, 32, 64, 8)
    assert (ll.rotary_dim, ll.rotary_base, ll.use_NTK_by_parts_rope) == (64, 500000.0, True)
    assert ll.NTK_by_parts_factor == 32.0 and ll.normalization_type == "RMS"
    gm = cfg["gemma2_2b_shape"]
    assert (gm.d_model, gm.n_heads, gm.d_head, gm.n_key_value_heads) == (2304, 8, 256, 4)
    assert (gm.attn_scale, gm.attn_scores_soft_cap, gm.output_logits_soft_cap) == (16, 50, 30)
    assert gm.attn_types == ["local", "global"] and gm.use_normalization_before_and_after


# --------------------------------------------------------------------------------------------
# Builds, runs, hooks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_builds_runs_and_caches_hooks(name, dtype):
    model, tokens, logits, cache = _run(name, dtype)
    cfg = model.cfg
    T = tokens.shape[1]
    assert all(p.dtype == dtype for p in model.parameters())
    assert logits.shape == (1, T, cfg.d_vocab_out) and torch.isfinite(logits).all()
    H, n_kv = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
    for L in range(cfg.n_layers):
        a = f"blocks.{L}.attn."
        assert cache[a + "hook_attn_scores"].shape == (1, H, T, T)
        pattern = cache[a + "hook_pattern"]
        assert pattern.shape == (1, H, T, T)
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
        assert cache[a + "hook_q"].shape == (1, T, H, cfg.d_head)
        assert cache[a + "hook_k"].shape == (1, T, n_kv, cfg.d_head)
        assert cache[f"blocks.{L}.ln1.hook_scale"].shape == (1, T, 1)
        assert cache[f"blocks.{L}.hook_resid_pre"].shape == (1, T, cfg.d_model)
        if name in ROTARY_NAMES:
            assert cache[a + "hook_rot_q"].shape == (1, T, H, cfg.d_head)
            assert cache[a + "hook_rot_k"].shape == (1, T, n_kv, cfg.d_head)
        else:
            assert a + "hook_rot_q" not in cache
        if name in QK_NORM_NAMES:
            assert cache[a + "q_norm.hook_scale"].shape == (T * H, 1)
            assert cache[a + "k_norm.hook_scale"].shape == (T * n_kv, 1)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_biases_and_norm_weights_are_randomized(name):
    model, *_ = _run(name, torch.float64)
    n_checked = 0
    for pname, p in model.named_parameters():
        leaf = pname.rsplit(".", 1)[-1]
        if leaf == "w":
            assert (p - 1).abs().max() > 0.05, pname
            n_checked += 1
        elif leaf == "b" or leaf.lstrip("_").startswith("b_"):
            if name in FOLDED_NAMES and leaf.lstrip("_") == "b_V":
                # fold_value_biases moves b_V into b_O
                assert (p == 0).all(), pname
            else:
                assert p.abs().max() > 0.05, pname
            n_checked += 1
    attn = model.blocks[1].attn
    assert attn.b_Q.abs().min() > 0 and attn.b_K.abs().min() > 0
    if name not in FOLDED_NAMES:
        assert (model.blocks[1].ln1.w - 1).abs().max() > 0.05
    if name in QK_NORM_NAMES:
        assert (attn.q_norm.w - 1).abs().max() > 0.05 and (attn.k_norm.w - 1).abs().max() > 0.05
    assert n_checked > 0


@pytest.mark.parametrize("name", ["gpt2", "gemma3", "qwen2", "gpt2_folded"])
def test_make_model_is_deterministic(name):
    state = torch.get_rng_state()
    a = make_model(name).state_dict()
    b = make_model(name).state_dict()
    c = make_model(name, seed=1).state_dict()
    assert torch.equal(state, torch.get_rng_state()), "make_model touched the global RNG"
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("name", [n for n in ARCH_NAMES if n not in FOLDED_NAMES])
def test_float32_and_float64_models_hold_the_same_numbers(name):
    m64, m32 = _run(name, torch.float64)[0], _run(name, torch.float32)[0]
    p32 = dict(m32.named_parameters())
    for pname, p in m64.named_parameters():
        assert torch.equal(p, p32[pname].double()), pname


def test_make_tokens():
    model, *_ = _run("gpt2", torch.float64)
    t = make_tokens(model, 30, seed=3)
    assert t.shape == (1, 30) and t.dtype == torch.long
    assert 0 <= t.min() and t.max() < model.cfg.d_vocab
    assert torch.equal(t, make_tokens(model, 30, seed=3))
    assert not torch.equal(t, make_tokens(model, 30, seed=4))
    for name in LOCAL_ATTN_NAMES:
        m = _run(name, torch.float64)[0]
        assert make_tokens(m).shape[1] > m.cfg.window_size


# --------------------------------------------------------------------------------------------
# The hand-written reference against TransformerLens
# --------------------------------------------------------------------------------------------


def _check_reference(model, cache, tokens, tol):
    cfg = model.cfg
    T = tokens.shape[1]
    H, n_kv = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
    group = H // n_kv
    for L in range(cfg.n_layers):
        a = f"blocks.{L}.attn."
        parts = reference_qk(model, cache, L)
        assert parts["ln1_scale"].shape == (T, 1)
        torch.testing.assert_close(
            parts["ln1_scale"], cache[f"blocks.{L}.ln1.hook_scale"][0], rtol=0, atol=tol
        )
        torch.testing.assert_close(parts["q"], _heads_first(cache[a + "hook_q"]), rtol=0, atol=tol)
        torch.testing.assert_close(
            parts["k_unexpanded"], _heads_first(cache[a + "hook_k"]), rtol=0, atol=tol
        )
        assert torch.equal(parts["k"][::group], parts["k_unexpanded"])
        if cfg.positional_embedding_type == "rotary":
            torch.testing.assert_close(
                parts["q_rot"], _heads_first(cache[a + "hook_rot_q"]), rtol=0, atol=tol
            )
            torch.testing.assert_close(
                parts["k_rot"][::group], _heads_first(cache[a + "hook_rot_k"]), rtol=0, atol=tol
            )

        raw, final = reference_scores(model, cache, L)
        hook = cache[a + "hook_attn_scores"][0]
        assert raw.shape == final.shape == hook.shape == (H, T, T)
        allowed = score_mask(model, L, T)[None].expand(H, T, T)
        # TransformerLens writes -inf (its IGNORE buffer) at masked entries
        assert torch.isneginf(hook[~allowed]).all()
        assert torch.isneginf(final[~allowed]).all() and torch.isnan(raw[~allowed]).all()
        assert torch.isfinite(hook[allowed]).all() and torch.isfinite(raw[allowed]).all()
        err = (final[allowed] - hook[allowed]).abs().max().item()
        assert err <= tol, f"layer {L}: |reference - hook_attn_scores| = {err:.3g}"
        torch.testing.assert_close(
            torch.softmax(final, -1), cache[a + "hook_pattern"][0], rtol=0, atol=tol
        )


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_reference_scores_match_hook_float64(name):
    model, tokens, _, cache = _run(name, torch.float64)
    _check_reference(model, cache, tokens, TOL[torch.float64])


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_reference_scores_match_hook_float32(name):
    model, tokens, _, cache = _run(name, torch.float32)
    _check_reference(model, cache, tokens, TOL[torch.float32])


@pytest.mark.parametrize("name", [n for n in ARCH_NAMES if n not in FOLDED_NAMES])
def test_float32_scores_are_close_to_float64(name):
    m64, _, _, c64 = _run(name, torch.float64)
    _, _, _, c32 = _run(name, torch.float32)
    for L in range(m64.cfg.n_layers):
        s64 = c64[f"blocks.{L}.attn.hook_attn_scores"]
        s32 = c32[f"blocks.{L}.attn.hook_attn_scores"].double()
        ok = torch.isfinite(s64)
        assert torch.equal(ok, torch.isfinite(s32))
        assert (s64[ok] - s32[ok]).abs().max() < 1e-4


@pytest.mark.parametrize(
    "name, mutation",
    [
        ("neox", "pairing"),
        ("gptj", "pairing"),
        ("gemma2", "softcap"),
        ("gemma2", "window"),
        ("qwen2", "b_K"),
        ("gpt2", "ln1.b"),
        ("qwen3", "k_norm"),
        ("inverse_layer_idx", "scale"),
    ],
)
def test_reference_has_teeth(name, mutation):
    """Breaking one ingredient of the reference must break the agreement (negative control)."""
    model = make_model(name)
    tokens = make_tokens(model)
    _, cache = model.run_with_cache(tokens)
    L = 0 if mutation == "window" else 1
    hook = cache[f"blocks.{L}.attn.hook_attn_scores"][0]
    cfg, attn = model.cfg, model.blocks[L].attn
    with torch.no_grad():
        if mutation == "pairing":
            cfg.rotary_adjacent_pairs = not cfg.rotary_adjacent_pairs
        elif mutation == "softcap":
            cfg.attn_scores_soft_cap = -1.0
        elif mutation == "window":
            cfg.window_size += 2
        elif mutation == "b_K":
            attn._b_K.zero_()
        elif mutation == "ln1.b":
            model.blocks[L].ln1.b.zero_()
        elif mutation == "k_norm":
            attn.k_norm.w.fill_(1.0)
        elif mutation == "scale":
            cfg.scale_attn_by_inverse_layer_idx = False
    _, final = reference_scores(model, cache, L)
    both = torch.isfinite(final) & torch.isfinite(hook)
    mismatch = (torch.isfinite(final) != torch.isfinite(hook)).any()
    assert mismatch or (final[both] - hook[both]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# The features each variant exists for actually bite
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_attn_scale(name):
    model, *_ = _run(name, torch.float64)
    for L in range(model.cfg.n_layers):
        assert model.blocks[L].attn.attn_scale == pytest.approx(expected_attn_scale(model, L))
    if name == "gemma2":
        assert expected_attn_scale(model, 0) == 2.0
    if name == "inverse_layer_idx":
        assert [expected_attn_scale(model, L) for L in range(3)] == [4.0, 8.0, 12.0]


@pytest.mark.parametrize("name", [n for n in SOFTCAP_NAMES if n not in SHAPE_NAMES])
def test_softcap_is_visibly_nonlinear(name):
    model, tokens, _, cache = _run(name, torch.float64)
    cap = model.cfg.attn_scores_soft_cap
    for L in range(model.cfg.n_layers):
        raw, final = reference_scores(model, cache, L)
        ok = torch.isfinite(final)
        assert final[ok].abs().max() < cap
        assert (raw[ok] - final[ok]).abs().max() > 1.0, "softcap barely changes the scores"


@pytest.mark.parametrize("name", LOCAL_ATTN_NAMES)
def test_local_window_masks_causal_entries(name):
    model, tokens, _, cache = _run(name, torch.float64)
    T, w = tokens.shape[1], model.cfg.window_size
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    far = (j <= i) & (i - j >= w)
    assert far.any()
    kinds = []
    for L in range(model.cfg.n_layers):
        hook = cache[f"blocks.{L}.attn.hook_attn_scores"][0]
        assert model.blocks[L].attn.attn_type == ("local" if is_local(model, L) else "global")
        kinds.append(model.blocks[L].attn.attn_type)
        if is_local(model, L):
            assert torch.isneginf(hook[:, far]).all()
        else:
            assert torch.isfinite(hook[:, far]).all()
    assert kinds == ["local", "global"]


def _rotary_angles(model, layer: int, n_pos: int) -> torch.Tensor:
    """Textbook angles [n_pos, rotary_dim/2], float64, incl. NTK-by-parts and local bases."""
    cfg = model.cfg
    rd = cfg.rotary_dim
    local = is_local(model, layer)
    base = (
        cfg.rotary_base_local if (local and cfg.rotary_base_local is not None) else cfg.rotary_base
    )
    inv = float(base) ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    if cfg.use_NTK_by_parts_rope:  # Llama-3 (HF _compute_llama3_parameters)
        f, lo, hi = (
            cfg.NTK_by_parts_factor,
            cfg.NTK_by_parts_low_freq_factor,
            cfg.NTK_by_parts_high_freq_factor,
        )
        old = cfg.NTK_original_ctx_len
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        inv = torch.where(
            wavelen < old / hi,
            inv,
            torch.where(wavelen > old / lo, inv / f, (1 - smooth) * inv / f + smooth * inv),
        )
    elif cfg.rotary_scaling_factor != 1.0 and not local:
        inv = inv / cfg.rotary_scaling_factor
    return torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", ROTARY_NAMES)
def test_rotary_tables_match_formula(name, dtype):
    model, *_ = _run(name, dtype)
    a, b = rotary_pairs(model)
    for L in range(model.cfg.n_layers):
        attn = model.blocks[L].attn
        cos, sin = attn.rotary_cos.double(), attn.rotary_sin.double()
        assert cos.shape[1] == model.cfg.rotary_dim
        # both members of a pair share one angle
        assert torch.equal(cos[:, a], cos[:, b]) and torch.equal(sin[:, a], sin[:, b])
        ang = _rotary_angles(model, L, cos.shape[0])
        # TransformerLens computes NTK-by-parts inverse frequencies in float32 even for a
        # float64 model (the plain path is float64 there), and process_weights_ round-trips the
        # rotary buffers through float32 along with the weights.
        plain64 = (
            dtype == torch.float64
            and not model.cfg.use_NTK_by_parts_rope
            and name not in FOLDED_NAMES
        )
        tol = 1e-12 if plain64 else 1e-4
        torch.testing.assert_close(cos[:, a], torch.cos(ang), rtol=0, atol=tol)
        torch.testing.assert_close(sin[:, a], torch.sin(ang), rtol=0, atol=tol)
    if name == "gemma3":
        c0, c1 = model.blocks[0].attn.rotary_cos, model.blocks[1].attn.rotary_cos
        assert not torch.allclose(c0, c1)  # local base 1e4 vs global base 1e6 / 8


def test_ntk_by_parts_changes_the_table():
    model, *_ = _run("llama", torch.float64)
    ang = _rotary_angles(model, 0, 64)
    model.cfg.use_NTK_by_parts_rope = False
    try:
        plain = _rotary_angles(model, 0, 64)
    finally:
        model.cfg.use_NTK_by_parts_rope = True
    ratio = (plain[1:] / ang[1:])[0]
    assert ratio[0] == pytest.approx(1.0)  # high frequency kept
    assert 1.0 < ratio[1] < 8.0  # smoothed
    assert ratio[-1] == pytest.approx(8.0)  # low frequency divided by the factor


def test_alibi_bias_and_its_stale_buffer():
    model = make_model("alibi")
    H = model.cfg.n_heads
    _, cache = model.run_with_cache(make_tokens(model, 24))
    buf = model.blocks[0].attn.alibi
    assert torch.equal(buf[:, -24:, :24].double(), alibi_bias(H, 24))
    # The buffer only grows. After a 32-token prompt, TransformerLens slices alibi[:, -24:, :24]
    # from the 32x32 table: every unmasked score in a row shifts by the same constant (so the
    # pattern is unchanged, the scores are not). reference_scores mirrors this.
    model.run_with_cache(make_tokens(model, 32, seed=1))
    _, cache2 = model.run_with_cache(make_tokens(model, 24))
    s1 = cache["blocks.1.attn.hook_attn_scores"]
    s2 = cache2["blocks.1.attn.hook_attn_scores"]
    ok = torch.isfinite(s1)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    shift = (s2 - s1).nan_to_num(0.0, 0.0, 0.0)[0]
    expected = (-8.0 * slopes)[:, None, None].expand_as(shift)
    torch.testing.assert_close(shift[ok[0]], expected[ok[0]], rtol=0, atol=1e-9)
    torch.testing.assert_close(
        cache["blocks.1.attn.hook_pattern"], cache2["blocks.1.attn.hook_pattern"]
    )
    _, final = reference_scores(model, cache2, 1)
    torch.testing.assert_close(final[ok[0]], s2[0][ok[0]], rtol=0, atol=1e-9)


@pytest.mark.parametrize("base", ["gpt2", "llama", "gemma2"])
def test_folded_model_matches_unfolded(base):
    """process_weights_ keeps the function; only to ~1e-6 because TL 3.9 processes in fp32."""
    m0, _, l0, c0 = _run(base, torch.float64)
    m1, _, l1, c1 = _run(base + "_folded", torch.float64)
    for L in range(m0.cfg.n_layers):
        s0 = c0[f"blocks.{L}.attn.hook_attn_scores"]
        s1 = c1[f"blocks.{L}.attn.hook_attn_scores"]
        ok = torch.isfinite(s0)
        assert (s0[ok] - s1[ok]).abs().max() < 1e-5
        torch.testing.assert_close(
            c0[f"blocks.{L}.ln1.hook_scale"], c1[f"blocks.{L}.ln1.hook_scale"], rtol=1e-6, atol=0
        )
    torch.testing.assert_close(l0.log_softmax(-1), l1.log_softmax(-1), rtol=0, atol=1e-5)
