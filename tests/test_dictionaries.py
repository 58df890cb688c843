"""qk_lens.dictionaries: exact SAE decompositions checked against SAELens's own forward."""

import re

import pytest
import torch

from qk_lens.dictionaries import Decomposition, Dictionary
from tests.saes import ARCHS, HAVE_SAE_LENS, randomize_
from tests.saes import make_sae as _make_sae

if HAVE_SAE_LENS:
    from sae_lens.saes import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedTrainingSAE,
        GatedTrainingSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TemporalSAE,
        TemporalSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
        Transcoder,
        TranscoderConfig,
    )
    from sae_lens.saes.sae import SAEMetadata
# Beside TransformerLens 4 (no SAELens) the SAEs are qk_lens's reader of SAELens's format and
# the model is a TransformerBridge; SAELens's own classes are tested on stack (a).
needs_sae_lens = pytest.mark.skipif(not HAVE_SAE_LENS, reason="needs SAELens (TransformerLens 3)")
torch.set_num_threads(2)

D_MODEL, D_SAE, N_TOK = 16, 40, 9
HOOK = "blocks.1.hook_resid_pre"
NORMS = ["none", "constant_norm_rescale", "layer_norm"]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def tiny_model(**overrides):
    """A 2-layer model with d_model 16: a HookedTransformer, or (TransformerLens 4) the same
    shape as a GPT-2 bridge (rotary: a Llama bridge)."""
    torch.manual_seed(0)
    if not HAVE_SAE_LENS:
        from tests.bridges import tiny_bridge

        return tiny_bridge(
            rotary=overrides.get("positional_embedding_type") == "rotary",
            dtype=overrides.get("dtype", torch.float32),
        )
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(
        n_layers=2,
        d_model=D_MODEL,
        n_ctx=16,
        d_head=4,
        n_heads=4,
        d_vocab=20,
        act_fn="gelu",
        normalization_type="LN",
    )
    return HookedTransformer(HookedTransformerConfig(**{**cfg, **overrides}))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def make_sae(
    arch: str = "standard",
    dtype: str = "float64",
    norm: str = "none",
    apply_b_dec: bool = True,
    hook: str = HOOK,
    seed: int = 0,
    **metadata,
):
    return _make_sae(arch, dtype, norm, apply_b_dec, hook, seed, D_MODEL, D_SAE, **metadata)


def make_x(dtype: torch.dtype, seed: int = 1, n_tok: int = N_TOK) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n_tok, D_MODEL, generator=g, dtype=torch.float64) + 0.7
    return x.to(dtype)


def tol(dtype: torch.dtype, scale: torch.Tensor) -> dict[str, float]:
    if dtype == torch.float64:
        return {"rtol": 0.0, "atol": 1e-10}
    return {"rtol": 0.0, "atol": 1e-5 * float(scale.abs().max())}


def linear_part(d: Decomposition, w_dec: torch.Tensor) -> torch.Tensor:
    """sum_j coeffs[t, j] * W_dec[ids[t, j]], over the returned (sparse) entries only."""
    rows = w_dec[d.feature_ids.clamp(min=0)]
    return torch.einsum("tk,tkd->td", d.coeffs, rows)


def check_decomposition(dic: Dictionary, x: torch.Tensor) -> Decomposition:
    """Everything an exact decomposition promises, against SAELens's own forward."""
    sae = dic.sae
    with torch.no_grad():
        ref_acts = sae.encode(x)
        ref_acts = ref_acts.to_dense() if ref_acts.is_sparse else ref_acts
        ref_recon = sae.decode(ref_acts)
        ref_forward = sae(x)
    torch.testing.assert_close(ref_forward, ref_recon, **tol(x.dtype, ref_recon))

    d = dic.decompose(x)
    n_tok = x.shape[0]
    n_active = (ref_acts != 0).sum(-1)
    k = max(int(n_active.max()), 1)
    for t in (d.feature_ids, d.coeffs, d.activations):
        assert t.shape == (n_tok, k)
    for t in (d.bias, d.error):
        assert t.shape == x.shape
    for t in (d.coeffs, d.activations, d.bias, d.error):
        assert t.dtype == x.dtype and t.device == x.device
    assert d.feature_ids.dtype == torch.int64

    # active ids are exactly encode(x) != 0; padding is -1 / 0.0 and trails
    pad = d.feature_ids < 0
    assert torch.equal((~pad).sum(-1), n_active)
    assert torch.equal(pad, torch.arange(k) >= n_active[:, None])
    mask = torch.zeros(n_tok, dic.d_sae + 1, dtype=torch.bool)  # padding lands in the extra column
    mask.scatter_(1, torch.where(pad, dic.d_sae, d.feature_ids), True)
    assert torch.equal(mask[:, :-1], ref_acts != 0)
    assert torch.all(d.coeffs[pad] == 0) and torch.all(d.activations[pad] == 0)
    gathered = ref_acts.gather(1, d.feature_ids.clamp(min=0)).to(x.dtype)
    torch.testing.assert_close(d.activations[~pad], gathered[~pad], rtol=0, atol=0)
    # rows sorted by |coeff| descending
    assert torch.all(d.coeffs.abs()[:, :-1] >= d.coeffs.abs()[:, 1:])

    # sum c_i W_dec[i] + bias is the SAE's reconstruction, and adding the error gives x back
    w_dec = dic.decoder(x.dtype, x.device)
    recon = linear_part(d, w_dec) + d.bias
    torch.testing.assert_close(recon, ref_recon.to(x.dtype), **tol(x.dtype, ref_recon))
    exact = {
        "rtol": 0.0,
        "atol": (1e-12 if x.dtype == torch.float64 else 2e-6)
        * max(float(x.abs().max()), float(recon.abs().max())),
    }
    torch.testing.assert_close(recon + d.error, x, **exact)
    torch.testing.assert_close(d.error, x - ref_recon.to(x.dtype), **tol(x.dtype, ref_recon))
    # the SAE is left without stale normalization state
    for attr in ("x_norm_coeff", "ln_mu", "ln_std"):
        assert attr not in vars(sae)
    return d


def expected_scale_and_bias(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token coefficient factor and bias, computed here from the SAELens formulas."""
    xs = x.to(sae.W_dec.dtype)
    b_dec = sae.b_dec.detach()
    if sae.cfg.architecture() == "matching_pursuit" and not sae.cfg.apply_b_dec_to_input:
        b_dec = torch.zeros_like(b_dec)
    mode = sae.cfg.normalize_activations
    if mode == "constant_norm_rescale":
        s = xs.norm(dim=-1, keepdim=True) / sae.cfg.d_in**0.5
        return s, b_dec * s
    if mode == "layer_norm":
        s = xs.std(dim=-1, keepdim=True)  # unbiased, and no eps on the way back
        return s, b_dec * s + xs.mean(dim=-1, keepdim=True)
    return torch.ones(x.shape[0], 1, dtype=xs.dtype), b_dec.expand(x.shape[0], -1)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_decomposition(model, arch, norm, apply_b_dec, dtype):
    sae = make_sae(arch, dtype, norm, apply_b_dec)
    dic = Dictionary.from_sae(sae, model)
    assert (dic.layer, dic.space, dic.hook_name) == (1, "resid", HOOK)
    x = make_x(DTYPES[dtype])
    d = check_decomposition(dic, x)

    # the coefficients and bias are the SAELens factors, not just something that sums right
    scale, bias = expected_scale_and_bias(sae, x)
    feat = torch.ones(D_SAE, dtype=scale.dtype)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        feat = 1 / sae.W_dec.detach().norm(dim=-1)
    pad = d.feature_ids < 0
    want = d.activations.to(scale.dtype) * scale * feat[d.feature_ids.clamp(min=0)]
    t = {"rtol": 1e-12, "atol": 1e-12} if dtype == "float64" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(d.coeffs[~pad].to(want.dtype), want[~pad], **t)
    torch.testing.assert_close(d.bias.to(bias.dtype), bias, **t)
    if norm == "none" and not arch.endswith("rescale"):
        assert torch.equal(d.coeffs, d.activations)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("sae_dtype", "x_dtype"), [("float32", "float64"), ("float64", "float32")])
def test_mixed_dtypes(model, sae_dtype, x_dtype, norm):
    sae = make_sae("topk_rescale", sae_dtype, norm)
    dic = Dictionary.from_sae(sae, model)
    x = make_x(DTYPES[x_dtype])
    d = dic.decompose(x)
    assert d.coeffs.dtype == d.bias.dtype == d.error.dtype == DTYPES[x_dtype]
    w_dec = dic.decoder(x.dtype, x.device)
    assert w_dec.dtype == x.dtype
    recon = linear_part(d, w_dec) + d.bias
    exact = 1e-12 if x_dtype == "float64" else 2e-6
    torch.testing.assert_close(recon + d.error, x, rtol=0, atol=exact * float(x.abs().max()))
    with torch.no_grad():
        ref = sae(x).to(x.dtype)
    torch.testing.assert_close(recon, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@needs_sae_lens
@pytest.mark.parametrize(
    ("cls", "cfg_cls", "extra"),
    [
        (StandardTrainingSAE, StandardTrainingSAEConfig, {}),
        (GatedTrainingSAE, GatedTrainingSAEConfig, {}),
        (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {}),
        (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": 5, "use_sparse_activations": True}),
    ]
    if HAVE_SAE_LENS
    else [],
)
def test_training_classes(model, cls, cfg_cls, extra):
    cfg = cfg_cls(
        d_in=D_MODEL,
        d_sae=D_SAE,
        dtype="float64",
        normalize_activations="layer_norm",
        metadata=SAEMetadata(hook_name=HOOK),
        **extra,
    )
    sae = cls(cfg)
    randomize_(sae)
    check_decomposition(Dictionary.from_sae(sae, model), make_x(torch.float64))


def test_rows_without_active_features(model):
    sae = make_sae("jumprelu")
    with torch.no_grad():
        sae.threshold.fill_(1e6)
    d = check_decomposition(Dictionary.from_sae(sae, model), make_x(torch.float64))
    assert d.feature_ids.shape == (N_TOK, 1) and torch.all(d.feature_ids == -1)
    torch.testing.assert_close(d.error, make_x(torch.float64) - d.bias, rtol=0, atol=0)


def test_empty_input(model):
    dic = Dictionary.from_sae(make_sae("standard"), model)
    d = dic.decompose(torch.zeros(0, D_MODEL, dtype=torch.float64))
    assert d.feature_ids.shape == d.coeffs.shape == (0, 1)
    assert d.error.shape == (0, D_MODEL)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_pending_normalization_state_is_preserved(model, norm):
    # a caller mid-way through encode -> decode must get its own factors back, not ours
    sae = make_sae("standard", norm=norm)
    dic = Dictionary.from_sae(sae, model)
    x1, x2 = make_x(torch.float64, seed=1), 3 * make_x(torch.float64, seed=2)
    with torch.no_grad():
        want = sae.decode(sae.encode(x1))
        acts = sae.encode(x1)
        dic.decompose(x2)
        got = sae.decode(acts)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("hook", "layer", "space"),
    [
        ("blocks.0.hook_resid_pre", 0, "resid"),
        ("blocks.1.hook_resid_pre", 1, "resid"),
        ("blocks.0.hook_resid_post", 1, "resid"),
        ("blocks.0.ln1.hook_normalized", 0, "normalized"),
        ("blocks.1.ln1.hook_normalized", 1, "normalized"),
    ],
)
def test_layer_inference(model, hook, layer, space):
    sae = make_sae(hook=hook)
    dic = Dictionary.from_sae(sae, model)
    assert (dic.layer, dic.space, dic.hook_name) == (layer, space, hook)
    assert Dictionary.from_sae(sae, model, layer=layer).layer == layer


def test_hook_embed_depends_on_positional_embeddings(model):
    sae = make_sae(hook="hook_embed")
    with pytest.raises(ValueError, match=r"positional embeddings.*blocks\.0\.hook_resid_pre"):
        Dictionary.from_sae(sae, model)
    rotary = tiny_model(positional_embedding_type="rotary", rotary_dim=4)
    dic = Dictionary.from_sae(sae, rotary)
    assert (dic.layer, dic.space) == (0, "resid")


def test_name_labels_and_decoder_cache(model):
    sae = make_sae("standard", dtype="float32")
    dic = Dictionary.from_sae(sae, model, labels={3: "three"})
    assert dic.name == HOOK
    assert dic.d_sae == D_SAE
    assert dic.label(3) == "three" and dic.label(4) == ""
    named = Dictionary.from_sae(make_sae(neuronpedia_id="tiny/1-res"), model)
    assert named.name == "tiny/1-res" and named.labels == {}

    w64 = dic.decoder(torch.float64, "cpu")
    assert w64.dtype == torch.float64 and w64 is dic.decoder(torch.float64, torch.device("cpu"))
    torch.testing.assert_close(w64, sae.W_dec.detach().double(), rtol=0, atol=0)
    assert dic.decoder(torch.float32, "cpu").data_ptr() == sae.W_dec.data_ptr()
    assert not dic.decoder(torch.float64, "cpu").requires_grad


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.1.attn.hook_z",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_mid",
    ],
)
def test_refuses_non_residual_hooks(model, hook):
    with pytest.raises(
        ValueError,
        match=re.escape("use an SAE on blocks.1.hook_resid_pre or blocks.0.hook_resid_post"),
    ):
        Dictionary.from_sae(make_sae(hook=hook), model)
    with pytest.raises(ValueError, match=re.escape("blocks.0.hook_resid_pre.")):
        Dictionary.from_sae(make_sae(hook=hook), model, layer=0)


@needs_sae_lens
def test_refuses_hook_z_reshaping(model):
    cfg = StandardSAEConfig(
        d_in=D_MODEL,
        d_sae=D_SAE,
        reshape_activations="hook_z",
        metadata=SAEMetadata(hook_name="blocks.1.attn.hook_z"),
    )
    with pytest.raises(ValueError, match=r"hook_z.*blocks\.1\.hook_resid_pre"):
        Dictionary.from_sae(StandardSAE(cfg), model)


@needs_sae_lens
@pytest.mark.parametrize(
    ("cls", "cfg_cls"),
    [
        (Transcoder, TranscoderConfig),
        (SkipTranscoder, SkipTranscoderConfig),
        (JumpReLUTranscoder, JumpReLUTranscoderConfig),
        (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
    ]
    if HAVE_SAE_LENS
    else [],
)
def test_refuses_transcoders(model, cls, cfg_cls):
    cfg = cfg_cls(
        d_in=D_MODEL,
        d_sae=D_SAE,
        d_out=D_MODEL,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"
        ),
    )
    msg = r"transcoder.*blocks\.1\.ln2\.hook_normalized.*blocks\.1\.hook_resid_pre or blocks\.0\.hook_resid_post"
    with pytest.raises(ValueError, match=msg):
        Dictionary.from_sae(cls(cfg), model)


@needs_sae_lens
def test_refuses_temporal(model):
    cfg = TemporalSAEConfig(
        d_in=D_MODEL,
        d_sae=D_SAE,
        n_heads=2,
        bottleneck_factor=2,
        kval_topk=4,
        metadata=SAEMetadata(hook_name=HOOK),
    )
    with pytest.raises(ValueError, match=r"temporal SAE.*blocks\.1\.hook_resid_pre"):
        Dictionary.from_sae(TemporalSAE(cfg), model)


@needs_sae_lens
def test_refuses_batchtopk_training_sae(model):
    cfg = BatchTopKTrainingSAEConfig(
        d_in=D_MODEL, d_sae=D_SAE, k=4, metadata=SAEMetadata(hook_name=HOOK)
    )
    with pytest.raises(ValueError, match=r"'batchtopk'.*save_inference_model"):
        Dictionary.from_sae(BatchTopKTrainingSAE(cfg), model)


@needs_sae_lens
def test_refuses_unknown_architecture(model):
    class OddConfig(StandardSAEConfig):
        @classmethod
        def architecture(cls) -> str:
            return "odd"

    class OddSAE(StandardSAE):
        pass

    sae = OddSAE(OddConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK)))
    with pytest.raises(ValueError, match=r"architecture 'odd'.*standard, gated, jumprelu, topk"):
        Dictionary.from_sae(sae, model)


def test_refuses_wrong_d_in(model):
    with pytest.raises(ValueError, match=r"d_in=8.*d_model=16"):
        Dictionary.from_sae(_make_sae("standard", hook=HOOK, d_in=8, d_sae=D_SAE), model)


def test_refuses_layers_out_of_range(model):
    with pytest.raises(ValueError, match=re.escape("layer 2 is outside [0, 2)")):
        Dictionary.from_sae(make_sae(), model, layer=2)
    with pytest.raises(ValueError, match=re.escape("attention layer 5, outside [0, 2)")):
        Dictionary.from_sae(make_sae(hook="blocks.5.hook_resid_pre"), model)
    with pytest.raises(
        ValueError,
        match=r"last block.*no attention layer.*blocks\.1\.hook_resid_pre or blocks\.0\.hook_resid_post",
    ):
        Dictionary.from_sae(make_sae(hook="blocks.1.hook_resid_post"), model)


def test_refuses_layer_disagreement(model):
    with pytest.raises(ValueError, match=r"layer=0.*blocks\.1\.hook_resid_pre.*attention layer 1"):
        Dictionary.from_sae(make_sae(), model, layer=0)
    with pytest.raises(ValueError, match=r"layer=0.*blocks\.0\.hook_resid_post.*attention layer 1"):
        Dictionary.from_sae(make_sae(hook="blocks.0.hook_resid_post"), model, layer=0)


def test_refuses_bad_types(model):
    with pytest.raises(TypeError, match=r"sae_lens\.SAE.*Linear"):
        Dictionary.from_sae(torch.nn.Linear(2, 2), model)
    with pytest.raises(TypeError, match=r"cfg\.n_layers.*dict"):
        Dictionary.from_sae(make_sae(), {})
    nameless = make_sae()
    nameless.cfg.metadata = type(nameless.cfg.metadata)()
    with pytest.raises(ValueError, match=r"no cfg\.metadata\.hook_name"):
        Dictionary.from_sae(nameless, model)


def test_decompose_validates_x(model):
    dic = Dictionary.from_sae(make_sae(), model)
    with pytest.raises(ValueError, match=r"d_in=16.*\(9, 8\)"):
        dic.decompose(torch.zeros(9, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"n_tok, d_in=16"):
        dic.decompose(torch.zeros(D_MODEL, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        dic.decompose(torch.zeros(2, D_MODEL, dtype=torch.int64))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "matching_pursuit"])
def test_norm_scaling_factor_must_be_folded(model, arch):
    sae = make_sae(arch, norm="expected_average_only_in")
    call = "sae.fold_activation_norm_scaling_factor(scaling_factor)"
    with pytest.raises(ValueError, match=re.escape(call)):
        Dictionary.from_sae(sae, model)
    sae.fold_activation_norm_scaling_factor(1.7)
    assert sae.cfg.normalize_activations == "none"
    check_decomposition(Dictionary.from_sae(sae, model), make_x(torch.float64))


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk_rescale"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_whitening_must_be_folded(model, arch, apply_b_dec):
    sae = make_sae(arch, norm="covariance_whitening", apply_b_dec=apply_b_dec)
    call = "sae.fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)"
    with pytest.raises(ValueError, match=re.escape(call)):
        Dictionary.from_sae(sae, model)
    g = torch.Generator().manual_seed(3)
    m = torch.eye(D_MODEL, dtype=torch.float64) + 0.1 * torch.randn(
        D_MODEL, D_MODEL, generator=g, dtype=torch.float64
    )
    sae.fold_activation_whitening(torch.randn(D_MODEL, generator=g), m, torch.linalg.inv(m))
    assert sae.cfg.normalize_activations == "none"
    check_decomposition(Dictionary.from_sae(sae, model), make_x(torch.float64))


def test_matching_pursuit_whitening_cannot_be_folded(model):
    sae = make_sae("matching_pursuit", norm="covariance_whitening")
    with pytest.raises(ValueError, match="cannot fold whitening"):
        Dictionary.from_sae(sae, model)


def test_decompose_rechecks_normalization(model):
    sae = make_sae()
    dic = Dictionary.from_sae(sae, model)
    sae.cfg.normalize_activations = "expected_average_only_in"
    with pytest.raises(ValueError, match=re.escape("fold_activation_norm_scaling_factor")):
        dic.decompose(make_x(torch.float64))


def test_decoder_follows_folding(model):
    # W_dec edited through .data (as SAELens's fold_* do) is picked up by the next decompose
    sae = make_sae("standard", dtype="float32")
    dic = Dictionary.from_sae(sae, model)
    x = make_x(torch.float64)
    stale = dic.decoder(torch.float64, "cpu").clone()
    sae.fold_W_dec_norm()
    assert not torch.allclose(stale, sae.W_dec.detach().double())
    d = dic.decompose(x)
    w = dic.decoder(torch.float64, "cpu")
    torch.testing.assert_close(w, sae.W_dec.detach().double(), rtol=0, atol=0)
    with torch.no_grad():
        ref = sae(x).double()
    torch.testing.assert_close(linear_part(d, w) + d.bias, ref, rtol=0, atol=1e-5)
    dic.clear_cache()
    assert dic.decoder(torch.float64, "cpu") is not w


def test_on_model_activations(model):
    # an SAE on blocks.0.hook_resid_post decomposes exactly what attention layer 1 reads
    sae = make_sae("jumprelu", hook="blocks.0.hook_resid_post")
    model64 = tiny_model(dtype=torch.float64)
    _, cache = model64.run_with_cache(torch.tensor([[1, 5, 7, 3, 2, 9]]))
    x = cache["blocks.1.hook_resid_pre"][0]
    torch.testing.assert_close(x, cache["blocks.0.hook_resid_post"][0], rtol=0, atol=0)
    dic = Dictionary.from_sae(sae, model)
    assert dic.layer == 1
    check_decomposition(dic, x)


class _SAELike:
    """Not a sae_lens.SAE: an object with its interface (as a user's own SAE class would be)."""

    def __init__(self, sae):
        self._sae = sae
        self.cfg, self.W_dec, self.b_dec = sae.cfg, sae.W_dec, sae.b_dec
        self.W_enc, self.b_enc = sae.W_enc, sae.b_enc
        self.device, self.dtype = sae.device, sae.dtype

    def encode(self, x):
        return self._sae.encode(x)

    def decode(self, f):
        return self._sae.decode(f)

    def __call__(self, x):
        return self._sae(x)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_an_object_with_the_sae_interface_decomposes_like_the_sae(model, arch):
    sae = make_sae(arch, "float64", "none", True)
    like = _SAELike(sae)
    assert not isinstance(like, type(sae))
    x = make_x(torch.float64)
    got = check_decomposition(Dictionary.from_sae(like, model), x)
    want = Dictionary.from_sae(sae, model).decompose(x)
    assert torch.equal(got.feature_ids, want.feature_ids)
    torch.testing.assert_close(got.coeffs, want.coeffs, rtol=0, atol=0)
    with pytest.raises(TypeError, match="W_dec, b_dec, encode, cfg"):
        Dictionary.from_sae(object(), model)
