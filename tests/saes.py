"""Shared SAE factory for the tests: every per-token SAELens architecture, randomized.

With SAELens installed (stack (a)) the SAEs are SAELens objects. Beside TransformerLens 4
(stack (b)) they are qk_lens's reader of SAELens's saved format: the same random parameters are
written to disk in that format and read back (``qk_lens.sae_files``).
"""

import importlib.util
import tempfile

import torch

HAVE_SAE_LENS = importlib.util.find_spec("sae_lens") is not None
NORMS = ["none", "constant_norm_rescale", "layer_norm"]

# name -> (SAELens architecture, extra config kwargs)
ARCHS = {
    "standard": ("standard", {}),
    "gated": ("gated", {}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {"k": 6}),
    "topk_rescale": ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    "abstopk": ("abstopk", {"k": 6}),
    "abstopk_rescale": ("abstopk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    "matching_pursuit": ("matching_pursuit", {}),
}


def sae_lens_classes(architecture: str):
    """(SAE class, config class) of SAELens for ``architecture``."""
    from sae_lens import saes

    name = {"topk": "TopK", "abstopk": "AbsTopK", "jumprelu": "JumpReLU"}.get(
        architecture, "".join(w.title() for w in architecture.split("_"))
    )
    return getattr(saes, f"{name}SAE"), getattr(saes, f"{name}SAEConfig")


def randomize_(sae, seed: int = 0) -> None:
    """Give every parameter a generic value: non-unit decoder rows, nonzero biases, thresholds > 0."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    with torch.no_grad():
        w_dec = rand(sae.cfg.d_sae, sae.cfg.d_in)
        # matching pursuit overshoots (its residual grows) once a row norm exceeds sqrt(2)
        top = 1.2 if sae.cfg.architecture() == "matching_pursuit" else 2.3
        norms = 0.3 + (top - 0.3) * torch.rand(sae.cfg.d_sae, 1, generator=g, dtype=torch.float64)
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=-1, keepdim=True) * norms)
        if isinstance(sae.W_enc, torch.nn.Parameter):  # matching pursuit ties W_enc to W_dec.T
            sae.W_enc.copy_(rand(sae.cfg.d_in, sae.cfg.d_sae) / sae.cfg.d_in**0.5)
        sae.b_dec.copy_(0.5 * rand(sae.cfg.d_in))
        for name in ("b_enc", "b_gate", "b_mag"):
            if isinstance(getattr(sae, name, None), torch.nn.Parameter):
                getattr(sae, name).copy_(0.3 * rand(sae.cfg.d_sae))
        if isinstance(getattr(sae, "r_mag", None), torch.nn.Parameter):
            sae.r_mag.copy_(0.3 * rand(sae.cfg.d_sae))
        if isinstance(getattr(sae, "threshold", None), torch.nn.Parameter):
            sae.threshold.copy_(0.05 + 0.4 * torch.rand(sae.cfg.d_sae, generator=g))


def make_sae(
    arch: str = "standard",
    dtype: str = "float64",
    norm: str = "none",
    apply_b_dec: bool = True,
    hook: str = "blocks.1.hook_resid_pre",
    seed: int = 0,
    d_in: int = 16,
    d_sae: int = 40,
    **metadata,
):
    """A randomized SAE of architecture ``arch`` (a key of ARCHS) on ``hook``: a SAELens SAE,
    or (without SAELens) one written in SAELens's format and read back by qk_lens."""
    architecture, extra = ARCHS[arch]
    kwargs = dict(
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype,
        normalize_activations=norm,
        apply_b_dec_to_input=apply_b_dec,
        **extra,
    )
    if HAVE_SAE_LENS:
        from sae_lens.saes.sae import SAEMetadata

        cls, cfg_cls = sae_lens_classes(architecture)
        sae = cls(cfg_cls(metadata=SAEMetadata(hook_name=hook, **metadata), **kwargs))
        randomize_(sae, seed)
        return sae
    from qk_lens.sae_files import SAEMetadata, SavedSAE, SavedSAEConfig, load_saved_sae

    cfg = SavedSAEConfig(
        arch=architecture, metadata=SAEMetadata(hook_name=hook, **metadata), **kwargs
    )
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    from qk_lens.sae_files import parameter_names

    weights = {
        n: torch.zeros(shapes.get(n, (d_sae,)), dtype=getattr(torch, dtype))
        for n in parameter_names(architecture)
    }
    sae = SavedSAE(cfg, weights)
    randomize_(sae, seed)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(tmp)
        return load_saved_sae(tmp)


_ATTACHED: dict = {}


def attached_with_sae(name: str, dtype=None, n_tok: int = 14):
    """(attached model, tokens [n_tok], layer): a random test model (a HookedTransformer variant
    of tests/archs.py, or a bridge of tests/bridges.py) with a randomized TopK SAE on its last
    layer's resid_pre; one per (name, dtype, n_tok)."""
    import torch

    import qk_lens
    from tests.models import make_any, make_tokens

    dtype = torch.float64 if dtype is None else dtype
    key = (name, dtype, n_tok)
    if key not in _ATTACHED:
        model = qk_lens.attach(make_any(name, dtype))
        layer = model.cfg.n_layers - 1
        sae = make_sae(
            "topk",
            dtype="float64" if dtype == torch.float64 else "float32",
            hook=f"blocks.{layer}.hook_resid_pre",
            d_in=model.cfg.d_model,
            d_sae=4 * model.cfg.d_model,
            seed=3,
        )
        model.add_dictionary(sae)
        _ATTACHED[key] = (model, make_tokens(model, n_tok)[0], layer)
    return _ATTACHED[key]
