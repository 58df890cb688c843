"""Transcoders and CLTs as a QK basis: exact against the models' own hooks, and a transcoder
that *is* the MLP leaves no error (an independent mechanism, not qk_lens's own arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import qk_lens
from qk_lens.transcoders import Transcoders, load_transcoders
from tests.bridges import HAVE_SAE_LENS, make_bridge
from tests.models import HOOKED, bridge_scores, hooks_of, make_tokens

N_TOK = 14
KINDS = ["relu", "skip-jumprelu", "topk", "clt", "clt-jumprelu"]


def random_transcoders(
    d_model: int,
    n_layers: int,
    dtype: torch.dtype,
    kind: str = "relu",
    d_tc: int = 96,
    output_point: str = "mlp_out",
    input_point: str = "mlp_input",
    seed: int = 0,
) -> Transcoders:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    cross = kind.startswith("clt")
    jump = "jumprelu" in kind
    return Transcoders(
        name=f"random-{kind}",
        cross_layer=cross,
        input_point=input_point,
        output_point=output_point,
        W_enc=[r(d_model, d_tc, scale=d_model**-0.5) for _ in range(n_layers)],
        b_enc=[r(d_tc, scale=0.3) for _ in range(n_layers)],
        W_dec=[
            r(d_tc, n_layers - lyr, d_model, scale=0.1) if cross else r(d_tc, d_model, scale=0.1)
            for lyr in range(n_layers)
        ],
        b_dec=[r(d_model, scale=0.1) for _ in range(n_layers)],
        W_skip=[r(d_model, d_model, scale=0.05) for _ in range(n_layers)] if "skip" in kind else None,
        activation="jumprelu" if jump else ("topk" if kind == "topk" else "relu"),
        threshold=[r(d_tc).abs() * 0.3 for _ in range(n_layers)] if jump else None,
        k=8 if kind == "topk" else None,
    )  # fmt: skip


MODELS = (["gpt2", "llama", "gemma2"] if HOOKED else []) + [
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "Gemma2ForCausalLM",
]
_CACHE: dict = {}


def model_of(name: str, dtype: torch.dtype):
    """A 3-layer model (paths through two attention layers), attached; its tokens and hooks."""
    key = (name, dtype)
    if key not in _CACHE:
        if name[0].isupper():
            model = make_bridge(name, dtype, num_hidden_layers=3, **_n_layer(name))
        else:
            from tests.archs import make_model

            model = make_model(name, dtype, n_layers=3, **_hooked_3(name))
        model = qk_lens.attach(model)
        tokens = make_tokens(model, N_TOK)[0]
        _CACHE[key] = (model, tokens, hooks_of(model, tokens))
    return _CACHE[key]


def _hooked_3(name: str) -> dict:
    return {"attn_types": ["local", "global", "local"]} if name == "gemma2" else {}


def _n_layer(name: str) -> dict:
    return {"n_layer": 3} if name == "GPT2LMHeadModel" else {}


def raw_scores(name: str, model, cache, layer: int) -> torch.Tensor:
    """[head, q, k] pre-softcap scores from the model's own hooks."""
    if name[0].isupper():
        return bridge_scores(model, cache, layer)[0]
    from tests.archs import reference_scores

    return reference_scores(model, cache, layer)[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_transcoder_terms_sum_to_the_models_score(name, kind, dtype):
    model, tokens, cache = model_of(name, dtype)
    out = "raw" if "Gemma" in name or name == "gemma2" else "mlp_out"
    tc = random_transcoders(model.cfg.d_model, 3, dtype, kind, output_point=out)
    model.add_transcoders(tc)
    layer = 2
    raw = raw_scores(name, model, cache, layer)
    tol_abs = 1e-9 if dtype == torch.float64 else None
    checked = 0
    for head in (0, model.cfg.n_heads - 1):
        for q in (N_TOK - 1, 7):
            for a in model.qk_attribution(tokens, layer, head, q, None, basis="transcoders"):
                total = float(a.terms.sum())
                ref = float(raw[head, q, a.k_pos])
                assert not math.isnan(total)
                if tol_abs is not None:
                    assert abs(total - ref) <= tol_abs, (total, ref)
                else:
                    assert abs(total - ref) <= 1e-4 * a.scale, (total, ref, a.scale)
                checked += 1
    assert checked > 10
    # the split really uses features from both earlier layers, and the CLT's cross-layer writes
    a = model.qk_attribution(tokens, layer, 0, N_TOK - 1, N_TOK - 3, basis="transcoders")
    kinds = a.key_meta["kind"]
    feat_layers = set(a.key_meta["layer"][kinds == "feature"].tolist())
    assert feat_layers == {0, 1}
    assert "error" in set(kinds) and "transcoder bias" in set(kinds)
    assert ("transcoder skip" in set(kinds)) == ("skip" in kind)


def _relu_mlp_model(name: str):
    """A 3-layer model whose MLPs are plain ReLU MLPs (so a transcoder can equal one)."""
    if name == "GPT2LMHeadModel":
        m = make_bridge(name, torch.float64, n_layer=3, activation_function="relu")
    else:
        from tests.archs import make_model

        m = make_model(
            name, torch.float64, n_layers=3, act_fn="relu", gated_mlp=False, **_hooked_3(name)
        )
    return qk_lens.attach(m)


def _mlp_as_transcoder(model, cross: bool) -> Transcoders:
    """W_in / b_in / W_out / b_out of each MLP as a transcoder (CLT: writing only to its layer)."""
    W_enc, b_enc, W_dec, b_dec = [], [], [], []
    n = model.cfg.n_layers
    for lyr in range(n):
        mlp = model.blocks[lyr].mlp
        if hasattr(mlp, "W_in"):
            wi, bi, wo, bo = mlp.W_in, mlp.b_in, mlp.W_out, mlp.b_out
        else:  # a bridge: Hugging Face GPT-2's Conv1D layers ([in, out] weights)
            hf = mlp.original_component
            wi, bi, wo, bo = hf.c_fc.weight, hf.c_fc.bias, hf.c_proj.weight, hf.c_proj.bias
        W_enc.append(wi.detach().clone())
        b_enc.append(bi.detach().clone())
        dec = wo.detach().clone()
        if cross:  # zero rows for the later layers
            dec = torch.stack([dec, *[torch.zeros_like(dec)] * (n - 1 - lyr)], dim=1)
        W_dec.append(dec)
        b_dec.append(bo.detach().clone())
    out = "raw" if getattr(model.cfg, "use_normalization_before_and_after", False) else "mlp_out"
    return Transcoders(
        "the MLPs", cross, "mlp_input", out, W_enc, b_enc, W_dec, b_dec, zero_positions=0
    )


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("name", (["gpt2", "gemma2"] if HOOKED else []) + ["GPT2LMHeadModel"])
def test_a_transcoder_that_is_the_mlp_has_no_error_and_its_neurons_as_features(name, cross):
    model = _relu_mlp_model(name)
    tokens = make_tokens(model, N_TOK)[0]
    tc = model.add_transcoders(_mlp_as_transcoder(model, cross))
    split = tc.split(model, model.qk_capture(tokens))
    assert split.error.abs().max() < 1e-10
    cache = hooks_of(model, tokens)
    for lyr in range(3):
        post = f"blocks.{lyr}.mlp.hook_post"
        if post in cache:  # the MLP's own neuron activations are the feature activations
            dense = torch.zeros_like(cache[post][0])
            m = split.feat_layer == lyr
            dense[split.feat_pos[m], split.feat_id[m]] = split.feat_act[m]
            assert torch.allclose(dense, cache[post][0], atol=1e-10)
    # and the QK terms still sum: all of each MLP is in its features and bias
    a = model.qk_attribution(tokens, 2, 1, N_TOK - 1, N_TOK - 3, basis="transcoders")
    err = a.key_meta["kind"] == "error"
    assert torch.as_tensor(a.terms)[:, torch.as_tensor(err)].abs().max() < 1e-9
    assert abs(float(a.terms.sum()) - a.model_raw_score) < 1e-9


def test_clt_error_is_the_mlp_output_less_every_write_to_it():
    """A CLT feature read at layer 0 also writes to layers 1 and 2: the later layers' errors
    are their MLP outputs less those writes (computed here from the weights, feature by feature)."""
    model, tokens, cache = model_of(MODELS[0], torch.float64)
    tc = model.add_transcoders(random_transcoders(model.cfg.d_model, 3, torch.float64, "clt"))
    split = tc.split(model, model.qk_capture(tokens))
    assert split.post[2] is None or MODELS[0] == "gemma2"
    for out in range(3):
        expect = cache[f"blocks.{out}.hook_mlp_out"][0] - tc.b_dec[out]
        for j in range(split.n_features):
            src, p, f = (int(split.feat_layer[j]), int(split.feat_pos[j]), int(split.feat_id[j]))
            if src <= out:
                expect[p] -= split.feat_act[j] * tc.W_dec[src][f, out - src]
        if split.post[out] is None:
            assert torch.allclose(split.error[out], expect, atol=1e-10)
    assert (split.feat_layer == 0).any() and (split.feat_pos == 0).sum() == 0  # BOS zeroed


# ---------------------------------------------------------------- circuit-tracer's files
def _write_ct_set(root, tc: Transcoders, with_config=True, missing_layer=None, hooks=None):
    """circuit-tracer's transcoder-set files, written here with its key names (not qk_lens's
    writer): W_enc [d_tc, d_model], W_skip applied as x · W_skipᵀ."""
    root.mkdir()
    paths = []
    for i in range(tc.n_layers):
        if i == missing_layer:
            continue
        t = {
            "W_enc": tc.W_enc[i].T.contiguous(),
            "W_dec": tc.W_dec[i].contiguous(),
            "b_enc": tc.b_enc[i],
            "b_dec": tc.b_dec[i],
        }
        if tc.threshold is not None:
            t["activation_function.threshold"] = tc.threshold[i]
        if tc.W_skip is not None:
            t["W_skip"] = tc.W_skip[i].T.contiguous()
        save_file(t, str(root / f"layer_{i}.safetensors"))
        paths.append(f"layer_{i}.safetensors")
    if with_config:
        inp, out = hooks or ("mlp.hook_in", "hook_mlp_out")
        (root / "config.yaml").write_text(
            "model_kind: transcoder_set\nmodel_name: test\nscan: test-scan\n"
            f"feature_input_hook: {inp}\nfeature_output_hook: {out}\n"
        )


def _write_ct_clt(root, tc: Transcoders):
    root.mkdir()
    for i in range(tc.n_layers):
        enc = {
            f"W_enc_{i}": tc.W_enc[i].T.contiguous(),
            f"b_enc_{i}": tc.b_enc[i],
            f"b_dec_{i}": tc.b_dec[i],
        }
        if tc.threshold is not None:
            enc[f"threshold_{i}"] = tc.threshold[i]
        save_file(enc, str(root / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": tc.W_dec[i].contiguous()}, str(root / f"W_dec_{i}.safetensors"))


@pytest.mark.parametrize("kind", ["relu", "skip-jumprelu", "clt", "clt-jumprelu"])
def test_circuit_tracer_files_load_to_the_same_split(kind, tmp_path):
    model, tokens, _ = model_of(MODELS[0], torch.float64)
    ref = random_transcoders(model.cfg.d_model, 3, torch.float64, kind)
    if kind.startswith("clt"):
        _write_ct_clt(tmp_path / "ct", ref)
        ref.input_point = "resid_mid"  # the CLT defaults: hook_resid_mid → hook_mlp_out
    else:
        _write_ct_set(tmp_path / "ct", ref)
    loaded = model.add_transcoders(tmp_path / "ct")
    assert loaded.cross_layer == kind.startswith("clt")
    assert loaded.activation == ref.activation and loaded.input_point == ref.input_point
    cap = model.qk_capture(tokens)
    a, b = loaded.split(model, cap), ref.split(model, cap)
    assert torch.equal(a.feat_id, b.feat_id) and torch.allclose(a.feat_act, b.feat_act)
    assert torch.allclose(a.error, b.error, atol=1e-12)
    # qk_lens's own writer round-trips too
    loaded.save_circuit_tracer(tmp_path / "again")
    again = load_transcoders(tmp_path / "again", model)
    assert torch.allclose(again.split(model, cap).error, a.error, atol=1e-12)
    with pytest.raises(FileExistsError):
        loaded.save_circuit_tracer(tmp_path / "again")


def test_bad_transcoders_are_clear_errors(tmp_path):
    model, tokens, _ = model_of(MODELS[0], torch.float64)
    d = model.cfg.d_model
    good = random_transcoders(d, 3, torch.float64, "relu")
    _write_ct_set(tmp_path / "gap", good, missing_layer=1)
    with pytest.raises(ValueError, match=r"no layer_\{i\}.safetensors file for layers \[1\]"):
        model.add_transcoders(tmp_path / "gap")
    _write_ct_set(tmp_path / "nocfg", good, with_config=False)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        model.add_transcoders(tmp_path / "nocfg")
    _write_ct_set(tmp_path / "hook", good, hooks=("hook_resid_pre", "hook_mlp_out"))
    with pytest.raises(ValueError, match="input hook 'hook_resid_pre' is not one"):
        model.add_transcoders(tmp_path / "hook")
    with pytest.raises(ValueError, match="2 layers but the model has 3"):
        model.add_transcoders(random_transcoders(d, 2, torch.float64))
    with pytest.raises(ValueError, match="d_model=32 but the model has"):
        model.add_transcoders(random_transcoders(32, 3, torch.float64))
    bad_clt = random_transcoders(d, 3, torch.float64, "clt")
    bad_clt.W_dec[1] = bad_clt.W_dec[1][:, :1]
    _write_ct_clt(tmp_path / "clt", bad_clt)
    with pytest.raises(ValueError, match=r"expected \[d_transcoder, 2, d_model\]"):
        model.add_transcoders(tmp_path / "clt")
    with pytest.raises(TypeError, match="transcoders must be a path"):
        model.add_transcoders(42)
    fresh = qk_lens.attach(make_bridge("GPT2LMHeadModel", torch.float64, n_layer=3))
    with pytest.raises(ValueError, match="no transcoders on this model"):
        fresh.qk_attribution(tokens, 2, 0, 5, 2, basis="transcoders")
    if HOOKED:
        from tests.archs import make_model

        attn_only = qk_lens.attach(make_model("attn_only"))
        with pytest.raises(ValueError, match="attention-only"):
            attn_only.add_transcoders(random_transcoders(attn_only.cfg.d_model, 2, torch.float64))


@pytest.mark.skipif(not HAVE_SAE_LENS, reason="SAELens's transcoder classes")
@pytest.mark.parametrize("cls_name", ["Transcoder", "SkipTranscoder", "JumpReLUTranscoder"])
def test_saelens_transcoders_are_read_with_their_own_encode(cls_name):
    import sae_lens.saes.transcoder as T
    from sae_lens.saes.sae import SAEMetadata

    model, tokens, cache = model_of(MODELS[0], torch.float64)
    d = model.cfg.d_model
    cls = getattr(T, cls_name)
    cfg_cls = getattr(T, f"{cls_name}Config")
    saes = []
    g = torch.Generator().manual_seed(1)
    for lyr in range(3):
        meta = SAEMetadata(
            hook_name=f"blocks.{lyr}.ln2.hook_normalized",
            hook_name_out=f"blocks.{lyr}.hook_mlp_out",
        )
        sae = cls(
            cfg_cls(
                d_in=d, d_sae=64, d_out=d, dtype="float64", metadata=meta,
                apply_b_dec_to_input=False,
            )
        )  # fmt: skip
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
            if hasattr(sae, "threshold"):
                sae.threshold.abs_()
        saes.append(sae)
    tc = model.add_transcoders(list(reversed(saes)))  # any order; layers from the hooks
    assert tc.has_skip == (cls_name == "SkipTranscoder")
    split = tc.split(model, model.qk_capture(tokens))
    for lyr in range(3):  # the MLP output less SAELens's own reconstruction is the error
        x = cache[f"blocks.{lyr}.ln2.hook_normalized"][0]
        recon = saes[lyr](x)
        recon[: tc.zero_positions] = saes[lyr].b_dec + (
            x[:1] @ saes[lyr].W_skip.T if tc.has_skip else 0
        )
        expect = cache[f"blocks.{lyr}.hook_mlp_out"][0] - recon
        assert torch.allclose(split.error[lyr], expect, atol=1e-10)
    a = model.qk_attribution(tokens, 2, 1, N_TOK - 1, N_TOK - 3, basis="transcoders")
    assert abs(float(a.terms.sum()) - a.model_raw_score) < 1e-9
    bad = saes[:1] + saes[2:]
    with pytest.raises(ValueError, match=r"no transcoder for layers \[1\]"):
        model.add_transcoders(bad)


def test_points_activations_and_files_are_checked(tmp_path):
    """Hook names stand for their points; a wrong point, k above the width, thresholds on some
    layers only, a .npz file and a CLT with a skip to save are each a clear error."""
    d = 16
    tc = random_transcoders(d, 2, torch.float32, "relu", input_point="hook_resid_mid",
                            output_point="mlp.hook_out")  # fmt: skip
    assert (tc.input_point, tc.output_point) == ("resid_mid", "raw")
    with pytest.raises(ValueError, match="input_point 'resid_pre' is not one of"):
        random_transcoders(d, 2, torch.float32, input_point="resid_pre")
    with pytest.raises(ValueError, match="TopK k=8 exceeds the 4 features"):
        random_transcoders(d, 2, torch.float32, "topk", d_tc=4)
    good = random_transcoders(d, 2, torch.float32, "skip-jumprelu")
    good.threshold = [good.threshold[0], None]
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(2):
        t = {"W_enc": good.W_enc[i].T.contiguous(), "W_dec": good.W_dec[i], "b_enc": good.b_enc[i],
             "b_dec": good.b_dec[i]}  # fmt: skip
        if i == 0:
            t["activation_function.threshold"] = good.threshold[0]
        save_file(t, str(root / f"layer_{i}.safetensors"))
    (root / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: hook_mlp_out\n"
    )
    with pytest.raises(ValueError, match=r"layers without \[1\]"):
        load_transcoders(root)
    (root / "layer_1.safetensors").rename(root / "layer_1.npz")
    (root / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: hook_mlp_out\ntranscoders: [layer_0.safetensors, layer_1.npz]\n"
    )
    with pytest.raises(ValueError, match=r"\.npz file"):
        load_transcoders(root)
    clt = random_transcoders(d, 2, torch.float32, "clt")
    clt.W_skip = [torch.zeros(d, d), torch.zeros(d, d)]
    with pytest.raises(ValueError, match="CLT files have no skip"):
        clt.save_circuit_tracer(tmp_path / "clt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed"]  # nothing half-written
