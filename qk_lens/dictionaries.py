"""SAELens SAEs as an exact basis for the residual stream an attention layer reads.

For every token row x: ``x = sum_i coeffs_i * W_dec[i] + bias + error`` exactly, where ``error`` is
x minus the SAE's own reconstruction ``decode(encode(x))``. Runtime normalization
(``constant_norm_rescale``, ``layer_norm``) becomes a per-token factor on the coefficients and a
per-token bias; ``rescale_acts_by_decoder_norm`` becomes a per-feature factor on the coefficients.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch import ModelArch, arch_of, supported
from qk_lens.labels import LabelSet, load_labels

try:
    from sae_lens import SAE
    from sae_lens.saes import TemporalSAE, Transcoder
except ImportError:  # SAELens pins TransformerLens < 4: beside 4.x, SAE-like objects only
    SAE = TemporalSAE = Transcoder = None

# What qk_lens uses of an SAE: SAELens's interface, for objects of other classes too.
SAE_INTERFACE = ("W_dec", "b_dec", "encode", "cfg")
_HOOK_LAYER = re.compile(r"blocks\.(\d+)\.")

__all__ = [
    "FOLD_REQUIRED_NORMALIZATIONS",
    "RUNTIME_NORMALIZATIONS",
    "SUPPORTED_ARCHITECTURES",
    "Decomposition",
    "Dictionary",
]

# Per-token architectures whose decode is linear in encode's output (checked against SAELens 6.54).
SUPPORTED_ARCHITECTURES = ("standard", "gated", "jumprelu", "topk", "abstopk", "matching_pursuit")
RUNTIME_NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
FOLD_REQUIRED_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")
# Attributes SAELens's stateful normalization sets in encode and deletes in decode.
_NORM_STATE_ATTRS = ("x_norm_coeff", "ln_mu", "ln_std")

_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")
_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
_LN1_NORMALIZED = re.compile(r"blocks\.(\d+)\.ln1\.hook_normalized")


@dataclass
class Decomposition:
    """Exact split of token activations into active features, a bias and an error.

    ``x[t] = sum_j coeffs[t, j] * W_dec[feature_ids[t, j]] + bias[t] + error[t]`` over the non-padding
    entries (``feature_ids >= 0``), with ``W_dec`` = ``Dictionary.decoder(x.dtype, x.device)``.
    """

    feature_ids: Int[Tensor, "n_tok k"]
    coeffs: Float[Tensor, "n_tok k"]
    activations: Float[Tensor, "n_tok k"]
    bias: Float[Tensor, "n_tok d_in"]
    error: Float[Tensor, "n_tok d_in"]


def _qk_hooks(layer: int | None) -> str:
    """The hooks an SAE must read to serve attention layer ``layer``."""
    if layer is None:
        return "blocks.L.hook_resid_pre or blocks.{L-1}.hook_resid_post (L = the attention layer)"
    if layer == 0:
        return "blocks.0.hook_resid_pre"
    return f"blocks.{layer}.hook_resid_pre or blocks.{layer - 1}.hook_resid_post"


def _describe_hook(hook_name: str) -> str:
    if hook_name.endswith("_z"):
        return "per-head attention outputs (hook_z)"
    if "attn_out" in hook_name or "hook_result" in hook_name:
        return "attention outputs"
    if "resid_mid" in hook_name:
        return "the mid-block residual (after attention, before the MLP)"
    if "mlp" in hook_name or "ln2" in hook_name:
        return "the MLP's input or output"
    return "an unrecognised hook"


def _is_sae(obj: Any) -> bool:
    if SAE is not None and isinstance(obj, SAE):
        return True
    return all(hasattr(obj, a) for a in SAE_INTERFACE) and hasattr(
        getattr(obj.cfg, "metadata", None), "hook_name"
    )


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _suggestion_layer(hook_name: str | None, layer: int | None, n_layers: int) -> int | None:
    """The attention layer to name in a refusal: the requested one, else the hook's own layer."""
    if layer is None and hook_name and (m := _HOOK_LAYER.match(hook_name)):
        layer = int(m.group(1))
    if layer is None or not 0 <= layer < n_layers:
        return None
    return layer


def _normalization_error(sae: SAE, mode: str) -> ValueError:
    hook = sae.cfg.metadata.hook_name
    if mode == "expected_average_only_in":
        return ValueError(
            f"SAE on {hook!r} has normalize_activations='expected_average_only_in': SAELens does not "
            "apply this scaling at inference, so it must be folded into the weights first: call "
            "sae.fold_activation_norm_scaling_factor(scaling_factor) with the training scale "
            "sqrt(d_in) / mean ||x|| (for a registry release: sae_lens.loading."
            "pretrained_saes_directory.get_norm_scaling_factor(release, sae_id)). Folding sets "
            "normalize_activations to 'none'."
        )
    if mode == "covariance_whitening":
        if sae.cfg.architecture() == "matching_pursuit":
            return ValueError(
                f"SAE on {hook!r} is a matching_pursuit SAE with "
                "normalize_activations='covariance_whitening'; SAELens cannot fold whitening into a "
                "tied encoder (fold_activation_whitening raises), so it is not supported."
            )
        return ValueError(
            f"SAE on {hook!r} has normalize_activations='covariance_whitening': SAELens does not "
            "apply the whitening at inference, so it must be folded into the weights first: call "
            "sae.fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix) with the "
            "statistics it was trained with (SAETrainer folds them at the end of training). "
            "Folding sets normalize_activations to 'none'."
        )
    return ValueError(
        f"SAE on {hook!r} has unsupported normalize_activations={mode!r}; supported: "
        f"{', '.join(RUNTIME_NORMALIZATIONS)} (fold {', '.join(FOLD_REQUIRED_NORMALIZATIONS)} first)."
    )


def _check_architecture(sae: SAE, hook_name: str, suggest: int | None) -> None:
    """Refuse what is not a per-token SAE whose decode is linear in its own features."""
    arch = sae.cfg.architecture()
    cls = type(sae).__name__
    if (Transcoder is not None and isinstance(sae, Transcoder)) or "transcoder" in arch:
        out = getattr(sae.cfg.metadata, "hook_name_out", None) or "another hook"
        raise ValueError(
            f"{cls} (architecture {arch!r}) on {hook_name!r} is a transcoder: it maps its input to "
            f"{out} instead of reconstructing it, so it cannot decompose the residual an attention "
            f"layer reads; use an SAE on {_qk_hooks(suggest)}."
        )
    if (TemporalSAE is not None and isinstance(sae, TemporalSAE)) or arch == "temporal":
        raise ValueError(
            f"{cls} on {hook_name!r} is a temporal SAE: it predicts each token's code from earlier "
            "tokens, so its reconstruction is not a per-token dictionary; use a per-token SAE on "
            f"{_qk_hooks(suggest)}."
        )
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        raise ValueError(
            f"{cls} (architecture {arch!r}) selects features across the whole batch, so a token's "
            "decomposition depends on the other tokens. Save it with sae.save_inference_model(path) "
            "and load the per-token JumpReLU SAE with SAE.load_from_disk(path)."
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported SAE architecture {arch!r} ({cls}); supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )


def _serves(hook_name: str, arch: ModelArch, suggest: int | None) -> tuple[int, str]:
    """(attention layer, space) the SAE's hook feeds, or a ValueError saying what would work."""
    n_layers = arch.n_layers
    if m := _RESID_PRE.fullmatch(hook_name):
        return int(m.group(1)), "resid"
    if m := _RESID_POST.fullmatch(hook_name):
        n = int(m.group(1))
        if n == n_layers - 1:
            raise ValueError(
                f"the SAE reads {hook_name!r}, the residual after the last block: it feeds "
                f"ln_final and the unembedding, no attention layer. For the last attention layer "
                f"use an SAE on {_qk_hooks(n_layers - 1)}."
            )
        return n + 1, "resid"
    if m := _LN1_NORMALIZED.fullmatch(hook_name):
        layer = int(m.group(1))
        if layer < n_layers and arch.layer(layer).attn_in.is_identity:
            raise ValueError(
                f"the SAE reads {hook_name!r} but the model has no ln1 (normalization_type=None); "
                f"use an SAE on {_qk_hooks(int(m.group(1)))}."
            )
        return int(m.group(1)), "normalized"
    if hook_name == "hook_embed":
        # Without additive positional embeddings, the embedding is the residual entering block 0.
        if arch.has_pos_embed_part:
            raise ValueError(
                "the SAE reads 'hook_embed', but this model adds positional embeddings before "
                "block 0, so it is not the residual attention layer 0 reads; use an SAE on "
                "blocks.0.hook_resid_pre."
            )
        return 0, "resid"
    raise ValueError(
        f"the SAE reads {hook_name!r} ({_describe_hook(hook_name)}), which is not the residual "
        "stream entering an attention layer, so it cannot serve the QK slot; use an SAE on "
        f"{_qk_hooks(suggest)}."
    )


def _gathered_sum(
    coeffs: Float[Tensor, "n k"], ids: Int[Tensor, "n k"], rows: Float[Tensor, "d_sae d"]
) -> Float[Tensor, "n d"]:
    """Σ_j coeffs[:, j] · rows[ids[:, j]], in blocks of tokens (bounded memory)."""
    n, k = ids.shape
    out = rows.new_zeros(n, rows.shape[1])
    step = max(1, (1 << 22) // max(1, k * rows.shape[1]))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        out[lo:hi] = torch.einsum("n k, n k d -> n d", coeffs[lo:hi], rows[ids[lo:hi]])
    return out


def _pop_norm_state(sae: SAE) -> dict[str, Any]:
    state = vars(sae)
    return {a: state.pop(a) for a in _NORM_STATE_ATTRS if a in state}


@dataclass(eq=False)
class Dictionary:
    """A SAELens SAE usable as a residual basis for attention layer ``layer``.

    ``space`` is ``"resid"`` when the SAE reconstructs ``blocks.{layer}.hook_resid_pre`` (read on that
    hook or on ``blocks.{layer-1}.hook_resid_post``, the same tensor) and ``"normalized"`` when it
    reconstructs ``blocks.{layer}.ln1.hook_normalized``. Build it with :meth:`from_sae`.
    """

    sae: SAE = field(repr=False)
    layer: int
    hook_name: str
    space: str
    labels: dict[int, str] = field(default_factory=dict, repr=False)
    # (dtype, device) -> (W_dec data_ptr, W_dec version, converted copy)
    _decoder_cache: dict[tuple[torch.dtype, torch.device], tuple[int, int, Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    @classmethod
    def from_sae(
        cls,
        sae: SAE,
        model: Any,
        layer: int | None = None,
        labels: Mapping[int, str] | LabelSet | str | PathLike[str] | None = None,
    ) -> Dictionary:
        """Validate ``sae`` for the QK slot of ``model`` and infer the attention layer it serves.

        ``model`` is a model qk_lens has an architecture adapter for. ``layer``, if given, must
        agree with the layer inferred from ``sae.cfg.metadata.hook_name``. ``labels`` is anything
        :func:`qk_lens.labels.load_labels` reads: a mapping feature id -> description, a LabelSet,
        or a path to a JSON / LabelSet / Neuronpedia export file.
        """
        if not _is_sae(sae):
            raise TypeError(
                f"expected a sae_lens.SAE (or an object with its {', '.join(SAE_INTERFACE)} and "
                f"cfg.metadata.hook_name), got {_class_name(sae)}"
            )
        if not supported(model):
            raise TypeError(
                "model must be a TransformerLens model with cfg.n_layers and cfg.d_model (a "
                f"model qk_lens has an architecture adapter for), got {_class_name(model)}"
            )
        arch = arch_of(model)
        n_layers, d_model = arch.n_layers, arch.d_model
        if layer is not None:
            if isinstance(layer, bool) or not hasattr(layer, "__index__"):
                raise TypeError(f"layer must be an int or None, got {_class_name(layer)}")
            layer = operator.index(layer)
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} is outside [0, {n_layers}) for this model")

        hook_name = sae.cfg.metadata.hook_name
        suggest = _suggestion_layer(hook_name, layer, n_layers)
        if not isinstance(hook_name, str) or not hook_name:
            example = _qk_hooks(5 if suggest is None else suggest).split(" or ")[0]
            raise ValueError(
                "the SAE has no cfg.metadata.hook_name, so the residual it reconstructs is unknown; "
                f"set it, e.g. sae.cfg.metadata.hook_name = {example!r}"
            )
        _check_architecture(sae, hook_name, suggest)
        if sae.cfg.reshape_activations == "hook_z":
            raise ValueError(
                f"the SAE on {hook_name!r} reshapes hook_z activations (per-head attention "
                f"outputs), not the residual stream; use an SAE on {_qk_hooks(suggest)}."
            )

        inferred, space = _serves(hook_name, arch, suggest)
        if not 0 <= inferred < n_layers:
            raise ValueError(
                f"the SAE reads {hook_name!r}, which feeds attention layer {inferred}, outside "
                f"[0, {n_layers}) for this model"
            )
        if layer is not None and layer != inferred:
            raise ValueError(
                f"layer={layer} was requested but the SAE reads {hook_name!r}, which feeds "
                f"attention layer {inferred}; for layer {layer} use an SAE on {_qk_hooks(layer)}."
            )
        if sae.cfg.d_in != d_model:
            raise ValueError(
                f"the SAE on {hook_name!r} has d_in={sae.cfg.d_in} but the model has "
                f"d_model={d_model}; it was trained on a different model."
            )
        if tuple(sae.W_dec.shape) != (sae.cfg.d_sae, sae.cfg.d_in):
            raise ValueError(
                f"the SAE on {hook_name!r} has W_dec of shape {tuple(sae.W_dec.shape)}, expected "
                f"(d_sae, d_in) = ({sae.cfg.d_sae}, {sae.cfg.d_in}): it does not reconstruct its input."
            )
        if sae.cfg.normalize_activations not in RUNTIME_NORMALIZATIONS:
            raise _normalization_error(sae, sae.cfg.normalize_activations)

        # load_labels: TypeError for an unsupported type, ValueError for ids outside [0, d_sae).
        label_dict = {} if labels is None else load_labels(labels, d_sae=sae.cfg.d_sae)
        return cls(sae=sae, layer=inferred, hook_name=hook_name, space=space, labels=label_dict)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def name(self) -> str:
        """Short id for tables: the Neuronpedia id when known, else the hook name."""
        return self.sae.cfg.metadata.neuronpedia_id or self.hook_name

    def label(self, feature_id: int) -> str:
        return self.labels.get(int(feature_id), "")

    def labels_of(self, feature_ids: np.ndarray) -> list[str]:
        """:meth:`label` of each id (one dict lookup each, no per-id method call)."""
        get = self.labels.get
        return [get(i, "") for i in np.asarray(feature_ids).tolist()]

    def set_labels(self, labels: Mapping[int, str] | LabelSet | str | PathLike[str] | None) -> None:
        """Replace :attr:`labels` with anything :func:`qk_lens.labels.load_labels` reads."""
        self.labels = {} if labels is None else load_labels(labels, d_sae=self.d_sae)

    def decoder(
        self, dtype: torch.dtype, device: torch.device | str
    ) -> Float[Tensor, "d_sae d_in"]:
        """The W_dec rows the coefficients multiply, in ``dtype`` on ``device`` (no gradients).

        Converted copies are cached and refreshed by every :meth:`decompose` call in that
        dtype/device, so a decomposition and this decoder always match. The cache also follows
        reassignment and autograd-visible edits of ``W_dec``, but not ``W_dec.data`` edits (as in
        SAELens's fold_* methods): call :meth:`clear_cache` after folding.
        """
        w = self.sae.W_dec
        hit = self._decoder_cache.get((dtype, torch.device(device)))
        if hit is not None and hit[:2] == (w.data_ptr(), w._version):
            return hit[2]
        return self._refresh_decoder(dtype, device)

    def _refresh_decoder(
        self, dtype: torch.dtype, device: torch.device | str
    ) -> Float[Tensor, "d_sae d_in"]:
        w = self.sae.W_dec.detach()
        out = w.to(device=device, dtype=dtype)
        if out.data_ptr() != w.data_ptr():  # the SAE's own tensor needs no cache: always current
            self._decoder_cache[(dtype, torch.device(device))] = (w.data_ptr(), w._version, out)
        return out

    def clear_cache(self) -> None:
        self._decoder_cache.clear()

    def encode_with_state(
        self, x: Float[Tensor, "n_tok d_in"]
    ) -> tuple[Float[Tensor, "n_tok d_sae"], dict[str, Tensor]]:
        """The SAE's own ``encode`` of ``x`` (dense), and the per-token normalization state it
        computed (``x_norm_coeff`` / ``ln_mu`` / ``ln_std`` for the runtime modes).

        SAELens's encode stores that state on the SAE for the next decode to consume; it is
        taken off here and whatever a caller's pending encode had left there is put back.
        """
        sae = self.sae
        with torch.no_grad():
            outer_state = _pop_norm_state(sae)
            try:
                acts = sae.encode(x)
                norm_state = _pop_norm_state(sae)
            finally:
                _pop_norm_state(sae)
                for name, value in outer_state.items():
                    setattr(sae, name, value)
        return (acts.to_dense() if acts.is_sparse else acts), norm_state

    def encode(self, x: Float[Tensor, "n_tok d_in"]) -> Float[Tensor, "n_tok d_sae"]:
        """Feature activations of ``x`` (SAELens's encode, dense), leaving the SAE's state as it was."""
        return self.encode_with_state(x)[0]

    @property
    def capture_hook(self) -> str:
        """The hook holding the tensor this dictionary reconstructs, for its attention layer."""
        if self.space == "normalized":
            return f"blocks.{self.layer}.ln1.hook_normalized"
        return f"blocks.{self.layer}.hook_resid_pre"

    def decompose(self, x: Float[Tensor, "n_tok d_in"]) -> Decomposition:
        """Split each row of ``x`` exactly into active features, bias and error (no gradients).

        Runs the SAE's own ``encode`` (in the SAE's dtype); coefficients, bias and error are then
        formed in ``x``'s dtype so that ``sum coeffs * W_dec + bias + error == x`` to its rounding.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {_class_name(x)}")
        if x.ndim != 2 or x.shape[-1] != self.d_in:
            raise ValueError(
                f"x must have shape (n_tok, d_in={self.d_in}) for the SAE on {self.hook_name!r}, "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        sae, cfg = self.sae, self.sae.cfg
        mode = cfg.normalize_activations
        if mode not in RUNTIME_NORMALIZATIONS:
            raise _normalization_error(sae, mode)
        dtype, device = x.dtype, x.device
        n_tok = x.shape[0]

        with torch.no_grad():
            acts_sae, norm_state = self.encode_with_state(x.to(sae.device))

            acts = acts_sae.to(device=device, dtype=dtype)
            active = (acts_sae != 0).to(device)
            coeffs = acts
            if getattr(cfg, "rescale_acts_by_decoder_norm", False):
                # SAELens's decode multiplies acts by 1 / ||W_dec_i|| before the matmul.
                coeffs = coeffs * (1 / sae.W_dec.detach().norm(dim=-1)).to(device, dtype)
            if cfg.architecture() == "matching_pursuit" and not cfg.apply_b_dec_to_input:
                bias = x.new_zeros(n_tok, self.d_in)  # tied SAE: decode adds b_dec only if applied
            else:
                bias = sae.b_dec.detach().to(device=device, dtype=dtype).expand(n_tok, -1)
            if mode == "constant_norm_rescale":
                # encode: x * c with c = sqrt(d_in) / ||x||; decode: y / c.
                c = norm_state["x_norm_coeff"].to(device=device, dtype=dtype)
                coeffs, bias = coeffs / c, bias / c
            elif mode == "layer_norm":
                # encode: (x - mu) / (std + 1e-5), unbiased std; decode: y * std + mu (no eps).
                std = norm_state["ln_std"].to(device=device, dtype=dtype)
                mu = norm_state["ln_mu"].to(device=device, dtype=dtype)
                coeffs, bias = coeffs * std, bias * std + mu
            bias = bias.contiguous()

            k = max(int(active.sum(dim=-1).max()), 1) if n_tok else 1
            # Actives rank above every inactive entry even if a coefficient rounds to 0.
            key = torch.where(active, coeffs.abs(), torch.full_like(coeffs, -1.0))
            idx = key.topk(k, dim=-1).indices
            keep = active.gather(-1, idx)
            zero = torch.zeros((), dtype=dtype, device=device)
            kept = torch.where(keep, coeffs.gather(-1, idx), zero)
            # The reconstruction from the active rows only: a dense coeffs @ W_dec would read the
            # whole decoder (d_sae × d_in) for a handful of rows. (A fresh conversion keeps
            # decoder() in step with this decomposition.)
            recon = _gathered_sum(kept, idx, self._refresh_decoder(dtype, device)) + bias
            error = x.detach() - recon
            return Decomposition(
                feature_ids=torch.where(keep, idx, torch.full_like(idx, -1)),
                coeffs=kept,
                activations=torch.where(keep, acts.gather(-1, idx), zero),
                bias=bias,
                error=error,
            )


def encoder_readout(
    d: Any, fids: Int[Tensor, "n"], x: Float[Tensor, "n d_model"], dtype: torch.dtype
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n"]]:
    """(w_t, c_t) with ``w_t · x + c_t`` = the SAE's pre-activation of feature t at that token.

    Standard/topk/abstopk/jumprelu: ``W_enc`` column and ``b_enc − b_dec·W_enc`` (b_dec only when
    applied to the input); gated: the magnitude path (``W_enc·exp(r_mag)``, ``b_mag``); TopK with
    ``rescale_acts_by_decoder_norm``: times ‖W_dec_t‖. Runtime normalization is frozen at the
    token: ``constant_norm_rescale`` scales by √d_in/‖x‖, ``layer_norm`` centres and divides by
    (std + 1e-5).
    """
    sae, cfg = d.sae, d.sae.cfg
    arch = cfg.architecture()
    dev = x.device
    if arch == "matching_pursuit":
        raise ValueError(
            f"the SAE on {d.hook_name!r} is a matching_pursuit SAE: its encoder is iterative, so no "
            "feature has a linear pre-activation to read; use readout='decoder'"
        )
    idx = fids.to(sae.W_enc.device)

    def p(t: Tensor) -> Tensor:
        return t.detach()[..., idx].to(dev, dtype)

    W = p(sae.W_enc).T  # [n, d_in]
    if arch == "gated":
        W = W * p(sae.r_mag).exp()[:, None]
        b = p(sae.b_mag)
    else:
        b = p(sae.b_enc)
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        norms = sae.W_dec.detach()[idx].norm(dim=-1).to(dev, dtype)
        W, b = W * norms[:, None], b * norms
    if cfg.apply_b_dec_to_input:
        b = b - W @ sae.b_dec.detach().to(dev, dtype)
    mode = cfg.normalize_activations
    if mode == "constant_norm_rescale":
        W = W * (math.sqrt(cfg.d_in) / x.norm(dim=-1))[:, None]
    elif mode == "layer_norm":
        std = (x - x.mean(-1, keepdim=True)).std(dim=-1)
        W = (W - W.mean(-1, keepdim=True)) / (std + 1e-5)[:, None]
    elif mode != "none":
        raise ValueError(
            f"the SAE on {d.hook_name!r} has normalize_activations={mode!r}; fold it first"
        )
    return W, b
