"""Transcoders and cross-layer transcoders (CLTs): the replacement of every MLP whose features
attribution graphs are built from (docs/transcoders.md).

A per-layer transcoder reads the MLP's input at layer l and writes its output:
``out_l = Σ_i a_i · W_dec[l][i] + b_dec[l] (+ x_in · W_skip[l]) + error_l``. A CLT feature reads at
layer l and writes to the output of every layer l' ≥ l with its own decoder row
``W_dec[l][i, l' − l]``. The error is what the transcoders leave of the MLP's actual output, so
the parts sum to that output exactly, layer by layer; :class:`Transcoders` holds the weights in
one layout whatever they were saved in (circuit-tracer's files, SAELens's transcoder classes),
and :class:`TranscoderSplit` the split on one prompt.

Points (circuit-tracer's hook names, and SAELens's):

* input ``"mlp_input"``: the MLP module's input, after its norm with gain and bias
  (circuit-tracer's ``mlp.hook_in``); ``"normalized"``: the norm's centred, scaled input before
  its gain (``ln2.hook_normalized``, as TransformerLens records it); ``"resid_mid"``: before the
  norm (``hook_resid_mid``, ``hook_mlp_in``; the block's input in parallel blocks);
* output ``"mlp_out"``: what the block adds to the residual (``hook_mlp_out``); ``"raw"``: the MLP
  module's output, before a post-MLP norm (``mlp.hook_out``; the same tensor without one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch import ModelArch, arch_of, linearize_norm
from qk_lens.capture import Capture
from qk_lens.labels import load_labels
from qk_lens.transcoder_files import read_circuit_tracer, write_circuit_tracer

__all__ = [
    "ACTIVATIONS",
    "INPUT_HOOKS",
    "OUTPUT_HOOKS",
    "TranscoderSplit",
    "Transcoders",
    "load_transcoders",
    "topk_activation",
]

ACTIVATIONS = ("relu", "jumprelu", "topk")
# Hook names (relative to blocks.L.) → the point they name.
INPUT_HOOKS = {
    "mlp.hook_in": "mlp_input",
    "ln2.hook_normalized": "normalized",
    "hook_resid_mid": "resid_mid",
    "hook_mlp_in": "resid_mid",
}
OUTPUT_HOOKS = {"hook_mlp_out": "mlp_out", "mlp.hook_out": "raw"}
_CT_INPUT = {
    "mlp_input": "mlp.hook_in",
    "normalized": "ln2.hook_normalized",
    "resid_mid": "hook_resid_mid",
}
_CT_OUTPUT = {"mlp_out": "hook_mlp_out", "raw": "mlp.hook_out"}
_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _point(hook: str, table: Mapping[str, str], what: str) -> str:
    if hook not in table:
        raise ValueError(
            f"transcoder {what} hook {hook!r} is not one qk_lens can read; supported: "
            f"{sorted(table)} (relative to blocks.L.)"
        )
    return table[hook]


def topk_activation(pre: Float[Tensor, "n d_tc"], k: int) -> Float[Tensor, "n d_tc"]:
    """TopK: each row's ``k`` largest pre-activations kept as they are, the rest 0 (differentiable,
    so the transcoders trained here use it too)."""
    idx = pre.topk(k, dim=-1).indices
    return pre * torch.zeros_like(pre).scatter_(-1, idx, 1.0)


@dataclass(eq=False)
class Transcoders:
    """Per-layer transcoders (one per layer, every layer) or one cross-layer transcoder.

    Weights, in one layout: ``W_enc[l]`` ``[d_model, d_transcoder]``; ``W_dec[l]``
    ``[d_transcoder, d_model]`` per layer or ``[d_transcoder, n_layers − l, d_model]`` for a CLT;
    ``W_skip[l]`` ``[d_model, d_model]`` with ``skip = x_in @ W_skip[l]``. ``encoders[l]``, when
    set, is the object's own encode (SAELens transcoders) and overrides the activation formula.
    Features at the first ``zero_positions`` positions count as inactive (their output goes to the
    error), as circuit-tracer does for the BOS token.
    """

    name: str
    cross_layer: bool
    input_point: str
    output_point: str
    W_enc: list[Float[Tensor, "d_model d_tc"]]
    b_enc: list[Float[Tensor, "d_tc"]]
    W_dec: list[Tensor]
    b_dec: list[Float[Tensor, "d_model"]]
    W_skip: list[Float[Tensor, "d_model d_model"]] | None = None
    activation: str = "relu"
    threshold: list[Float[Tensor, "d_tc"]] | None = None
    k: int | None = None
    encoders: list[Callable[[Tensor], Tensor]] | None = field(default=None, repr=False)
    zero_positions: int = 1
    scan: str | None = None
    model_name: str | None = None
    neuronpedia_ids: list[str | None] | None = None
    labels: dict[int, dict[int, str]] = field(default_factory=dict, repr=False)
    _cast: dict[tuple, list[Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.W_enc)
        if n == 0:
            raise ValueError("a transcoder set needs at least one layer")
        for name in ("b_enc", "W_dec", "b_dec"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} layers, W_enc has {n}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "jumprelu" and self.encoders is None and self.threshold is None:
            raise ValueError("a JumpReLU transcoder needs its thresholds")
        if self.activation == "topk" and self.encoders is None and not self.k:
            raise ValueError("a TopK transcoder needs k")
        d_model, d_tc = self.W_enc[0].shape
        for lyr in range(n):
            want = (d_tc, n - lyr, d_model) if self.cross_layer else (d_tc, d_model)
            if tuple(self.W_enc[lyr].shape) != (d_model, d_tc):
                raise ValueError(
                    f"layer {lyr}: W_enc has shape {tuple(self.W_enc[lyr].shape)}, expected "
                    f"{(d_model, d_tc)} like layer 0"
                )
            if tuple(self.W_dec[lyr].shape) != want:
                what = "[d_transcoder, n_layers − l, d_model]" if self.cross_layer else "[d_tc, d]"
                raise ValueError(
                    f"layer {lyr}: W_dec has shape {tuple(self.W_dec[lyr].shape)}, expected "
                    f"{want} ({what}): its decoder layers do not cover layers {lyr}..{n - 1}"
                )
            if self.W_skip is not None and tuple(self.W_skip[lyr].shape) != (d_model, d_model):
                raise ValueError(f"layer {lyr}: W_skip has shape {tuple(self.W_skip[lyr].shape)}")
        # a hook name (circuit-tracer's or SAELens's) stands for its point; anything else is refused
        if self.input_point in INPUT_HOOKS:
            self.input_point = INPUT_HOOKS[self.input_point]
        if self.input_point not in _CT_INPUT:
            raise ValueError(
                f"input_point {self.input_point!r} is not one of {sorted(_CT_INPUT)} (or a hook "
                f"name of {sorted(INPUT_HOOKS)})"
            )
        if self.output_point in OUTPUT_HOOKS:
            self.output_point = OUTPUT_HOOKS[self.output_point]
        if self.output_point not in _CT_OUTPUT:
            raise ValueError(
                f"output_point {self.output_point!r} is not one of {sorted(_CT_OUTPUT)} (or a "
                f"hook name of {sorted(OUTPUT_HOOKS)})"
            )
        if self.activation == "topk" and self.encoders is None and self.k > d_tc:
            raise ValueError(f"TopK k={self.k} exceeds the {d_tc} features per layer")

    # ------------------------------------------------------------------ sizes
    @property
    def n_layers(self) -> int:
        return len(self.W_enc)

    @property
    def d_model(self) -> int:
        return int(self.W_enc[0].shape[0])

    @property
    def d_transcoder(self) -> int:
        return int(self.W_enc[0].shape[1])

    @property
    def has_skip(self) -> bool:
        return self.W_skip is not None

    def output_layers(self, layer: int) -> range:
        """The layers a feature read at ``layer`` writes to."""
        return range(layer, self.n_layers) if self.cross_layer else range(layer, layer + 1)

    def __repr__(self) -> str:
        kind = "cross-layer transcoder" if self.cross_layer else "per-layer transcoders"
        skip = ", skip" if self.has_skip else ""
        return (
            f"Transcoders({self.name!r}: {kind}, {self.n_layers} layers × {self.d_transcoder} "
            f"features, {self.activation}{skip}, reads {self.input_point}, writes "
            f"{self.output_point})"
        )

    # ------------------------------------------------------------------ labels
    def label(self, layer: int, feature: int) -> str:
        return self.labels.get(int(layer), {}).get(int(feature), "")

    def labels_of(self, layers: np.ndarray, features: np.ndarray) -> list[str]:
        return [
            self.labels.get(lyr, {}).get(f, "")
            for lyr, f in zip(
                np.asarray(layers).tolist(), np.asarray(features).tolist(), strict=True
            )
        ]

    def set_labels(self, layer: int, labels: Any) -> None:
        """Feature descriptions of one layer (anything :func:`qk_lens.labels.load_labels` reads)."""
        self.labels[int(layer)] = load_labels(labels, d_sae=self.d_transcoder)

    def digest(self) -> list[float]:
        """A cheap identity of the transcoders (per-layer sums of every weight in float64, the
        activation, k, the points): what a graph records to refuse other transcoders."""
        out = []
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold"):
            ts = getattr(self, name)
            out += [-1.0] if ts is None else [float(t.double().sum()) for t in ts]
        tags = (self.activation, self.k, self.input_point, self.output_point, self.zero_positions)
        return out + [float(sum(map(ord, repr(tags))))]

    def neuronpedia_id(self, layer: int) -> str | None:
        return None if self.neuronpedia_ids is None else self.neuronpedia_ids[layer]

    # ------------------------------------------------------------------ weights
    def weights(self, name: str, dtype: torch.dtype, device: torch.device | str) -> list[Tensor]:
        """``W_enc`` / ``b_enc`` / ``W_dec`` / ``b_dec`` / ``W_skip`` in ``dtype`` (cached)."""
        key = (name, dtype, str(device))
        if key not in self._cast:
            src = getattr(self, name)
            self._cast[key] = [t.detach().to(device=device, dtype=dtype) for t in src]
        return self._cast[key]

    def decoder_rows(
        self, layer: int, out_layer: int, features: Int[Tensor, "n"], dtype: torch.dtype
    ) -> Float[Tensor, "n d_model"]:
        """Decoder rows of features read at ``layer`` for the output of ``out_layer``."""
        W = self.W_dec[layer]
        rows = W[features] if not self.cross_layer else W[features, out_layer - layer]
        return rows.to(dtype)

    # ------------------------------------------------------------------ encode
    def pre_activations(self, layer: int, x: Float[Tensor, "n d_model"]) -> Tensor:
        W = self.weights("W_enc", x.dtype, x.device)[layer]
        b = self.weights("b_enc", x.dtype, x.device)[layer]
        return x @ W + b

    def encode(self, layer: int, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_tc"]:
        """Feature activations of the rows of ``x`` (the transcoder's input at ``layer``)."""
        with torch.no_grad():
            if self.encoders is not None:
                enc = self.encoders[layer]
                return enc(x).to(x.dtype)
            pre = self.pre_activations(layer, x)
            if self.activation == "relu":
                return torch.relu(pre)
            if self.activation == "jumprelu":
                th = self.threshold[layer].to(pre.dtype)
                return pre * (pre > th)  # circuit-tracer's JumpReLU (no ReLU before the gate)
            return topk_activation(pre, self.k)

    # ------------------------------------------------------------------ model
    def check_model(self, model: Any) -> ModelArch:
        """The model's architecture, after checking this set fits it (layers, width, MLPs)."""
        arch = arch_of(model)
        if arch.attn_only:
            raise ValueError("the model is attention-only: it has no MLPs for transcoders")
        if arch.post_norm or arch.moe:
            what = "post-norm blocks" if arch.post_norm else "mixture-of-experts MLPs"
            raise ValueError(f"transcoders on {what} are not supported")
        if self.n_layers != arch.n_layers:
            kind = "the CLT reads" if self.cross_layer else "the set has transcoders for"
            raise ValueError(
                f"{kind} {self.n_layers} layers but the model has {arch.n_layers}: every MLP "
                "needs its transcoder"
            )
        if self.d_model != arch.d_model:
            raise ValueError(
                f"the transcoders have d_model={self.d_model} but the model has "
                f"d_model={arch.d_model}; they were trained on a different model"
            )
        return arch

    def split(self, model: Any, cap: Capture) -> TranscoderSplit:
        """The split of every MLP's output on ``cap`` (cached on the capture)."""
        arch = self.check_model(model)
        dev = cap.tokens.device
        if dev.type != "cpu" or arch.device.type != "cpu":
            raise ValueError(
                f"transcoder bases and graphs run on CPU models for now; this model is on "
                f"{arch.device} (model.to('cpu') first)"
            )
        key = ("transcoders", id(self), arch.dtype)
        hit = cap.derived.get(key)
        if hit is None:
            hit = TranscoderSplit.compute(self, arch, cap)
            cap.derived[key] = hit
        return hit

    # ------------------------------------------------------------------ files
    def save_circuit_tracer(self, directory: str | PathLike[str]) -> Path:
        """Write the set in circuit-tracer's format (``config.yaml`` + safetensors) to a new
        directory; :func:`load_transcoders` and circuit-tracer both read it."""
        return write_circuit_tracer(
            directory,
            cross_layer=self.cross_layer,
            input_hook=_CT_INPUT[self.input_point],
            output_hook=_CT_OUTPUT[self.output_point],
            W_enc=self.W_enc, b_enc=self.b_enc, W_dec=self.W_dec, b_dec=self.b_dec,
            W_skip=self.W_skip, threshold=self.threshold,
            activation=self.activation, k=self.k, scan=self.scan or self.name,
            model_name=self.model_name,
        )  # fmt: skip


@dataclass
class TranscoderSplit:
    """Every MLP's output on one prompt, split into its transcoder parts.

    In residual space (what the block adds, after any post-MLP norm at its frozen scale):
    ``mlp_out[l] = Σ_{features (src, p, i) writing to l} write + bias[l] + skip[l] + error[l]``.
    Active features are listed once each, at their source layer: ``feat_layer``, ``feat_pos``,
    ``feat_id``, ``feat_act``.
    """

    transcoders: Transcoders
    dtype: torch.dtype
    inputs: list[Float[Tensor, "pos d_model"]]  # the transcoder's input at each layer
    in_norm: list[Any]  # the MLP's own norm (FrozenNorm), whose frozen scale the input uses
    in_scale: list[Float[Tensor, "pos"]]
    post_scale: list[Float[Tensor, "pos"] | None]  # the frozen post-MLP norm scale (raw output)
    post: list[Any]  # FrozenNorm or None per layer: maps a raw write into the residual
    bias: Float[Tensor, "layer pos d_model"]
    skip: Float[Tensor, "layer pos d_model"] | None
    error: Float[Tensor, "layer pos d_model"]
    feat_layer: Int[Tensor, "n"]
    feat_pos: Int[Tensor, "n"]
    feat_id: Int[Tensor, "n"]
    feat_act: Float[Tensor, "n"]

    @classmethod
    def compute(cls, tc: Transcoders, arch: ModelArch, cap: Capture) -> TranscoderSplit:
        dt = arch.dtype
        T = cap.n_tokens
        inputs, scales, posts, in_norms, in_scales = [], [], [], [], []
        lay, pos, ids, acts = [], [], [], []
        for lyr in range(arch.n_layers):
            la = arch.layer(lyr)
            resid = cap.layer_act(lyr, la.hooks.resid_pre).to(dt)
            mid = (
                resid
                if la.mlp_mode == "parallel"
                else resid + cap.layer_act(lyr, la.hooks.attn_out).to(dt)
            )
            pre_norm = la.mlp_in.to(dt)
            sigma = pre_norm.scale(mid)
            if tc.input_point == "resid_mid":
                x_in = mid
            elif tc.input_point == "normalized":
                x_in = linearize_norm(mid, sigma, pre_norm.kind, None)  # no gain, no bias
            else:
                x_in = pre_norm.forward(mid, sigma)
            inputs.append(x_in)
            in_norms.append(pre_norm)
            in_scales.append(sigma)
            post = None if la.mlp_out is None else la.mlp_out.to(dt)
            if tc.output_point == "raw" and post is not None:
                # The raw MLP output is not a hook: run the MLP at the captured point once for
                # its post-norm scale (frozen from here on).
                h = pre_norm.forward(mid, sigma)
                mdt = next((p.dtype for p in la.mlp.parameters()), dt)
                with torch.no_grad():
                    raw = la.mlp(h.to(mdt)[None])[0].to(dt)
                scales.append(post.scale(raw))
                posts.append(post)
            else:
                scales.append(None)
                posts.append(None)
            a = tc.encode(lyr, x_in)
            a[: tc.zero_positions] = 0
            p_idx, f_idx = torch.nonzero(a, as_tuple=True)
            lay.append(torch.full_like(p_idx, lyr))
            pos.append(p_idx)
            ids.append(f_idx)
            acts.append(a[p_idx, f_idx])
        split = cls(
            tc, dt, inputs, in_norms, in_scales, scales, posts,
            bias=torch.zeros(arch.n_layers, T, arch.d_model, dtype=dt),
            skip=None, error=torch.zeros(arch.n_layers, T, arch.d_model, dtype=dt),
            feat_layer=torch.cat(lay), feat_pos=torch.cat(pos), feat_id=torch.cat(ids),
            feat_act=torch.cat(acts),
        )  # fmt: skip
        b_dec = tc.weights("b_dec", dt, "cpu")
        skips = []
        for out in range(arch.n_layers):
            la = arch.layer(out)
            mlp_out = cap.layer_act(out, la.hooks.mlp_out).to(dt)
            split.bias[out] = split.to_resid(out, b_dec[out].expand(T, -1), bias=True)
            recon = split.bias[out].clone()
            if tc.has_skip:
                W = tc.weights("W_skip", dt, "cpu")[out]
                skips.append(split.to_resid(out, inputs[out] @ W))
                recon = recon + skips[-1]
            recon = recon + split.writes_at(out)
            split.error[out] = mlp_out - recon
        if tc.has_skip:
            split.skip = torch.stack(skips)
        return split

    # ------------------------------------------------------------------ frozen linear maps
    def in_adjoint(
        self, layer: int, g: Float[Tensor, "... d_model"], positions: Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        """The adjoint of the (frozen, linear part of the) map from the MLP's pre-norm input to
        the transcoder's input, at ``positions``: a covector on ``x_in`` → one on ``mid``."""
        point = self.transcoders.input_point
        if point == "resid_mid":
            return g
        norm, sigma = self.in_norm[layer], self.in_scale[layer][positions]
        if point == "normalized":
            out = g - g.mean(-1, keepdim=True) if norm.centers else g
            return out if norm.is_identity else out / sigma[..., None]
        return norm.transpose(g, sigma)

    def in_linear(
        self, layer: int, v: Float[Tensor, "... d_model"], positions: Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        """The frozen linear map ``mid → x_in`` (no bias) at ``positions``."""
        point = self.transcoders.input_point
        if point == "resid_mid":
            return v
        norm, sigma = self.in_norm[layer], self.in_scale[layer][positions]
        shape = v.shape
        v2, s2 = v.reshape(-1, shape[-1]), sigma.reshape(-1)
        if point == "normalized":
            return linearize_norm(v2, s2, norm.kind, None).reshape(shape)
        return norm.linear(v2, s2).reshape(shape)

    def post_adjoint(
        self, layer: int, g: Float[Tensor, "... d_model"], positions: Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        post = self.post[layer]
        return g if post is None else post.transpose(g, self.post_scale[layer][positions])

    def skip_linear(
        self, layer: int, v: Float[Tensor, "... d_model"], positions: Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        """The skip connection's frozen linear map ``mid → residual`` at ``positions``."""
        W = self.transcoders.weights("W_skip", self.dtype, v.device)[layer]
        out = self.in_linear(layer, v, positions) @ W
        post = self.post[layer]
        if post is None:
            return out
        shape = out.shape
        sig = self.post_scale[layer][positions].reshape(-1)
        return post.linear(out.reshape(-1, shape[-1]), sig).reshape(shape)

    def skip_adjoint(
        self, layer: int, g: Float[Tensor, "... d_model"], positions: Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        W = self.transcoders.weights("W_skip", self.dtype, g.device)[layer]
        return self.in_adjoint(layer, self.post_adjoint(layer, g, positions) @ W.T, positions)

    def to_resid(self, layer: int, v: Float[Tensor, "n d_model"], bias: bool = False) -> Tensor:
        """A raw transcoder write at every position into residual space (post-MLP norm at its
        frozen scale; ``bias``: plus the norm's own bias, once)."""
        post = self.post[layer]
        if post is None:
            return v
        out = post.linear(v, self.post_scale[layer])
        return out + post.bias if bias and post.bias is not None else out

    def writes_at(self, out_layer: int) -> Float[Tensor, "pos d_model"]:
        """Σ of every active feature's write to ``out_layer``'s output, per position."""
        T = self.error.shape[1]
        total = torch.zeros(T, self.error.shape[2], dtype=self.dtype)
        sel = self.writing_to(out_layer)
        if len(sel):
            total.index_add_(0, self.feat_pos[sel], self.feature_vectors(sel, out_layer))
        return total

    def writing_to(self, out_layer: int) -> Int[Tensor, "n"]:
        """Indices of the active features that write to ``out_layer``."""
        if self.transcoders.cross_layer:
            return torch.nonzero(self.feat_layer <= out_layer)[:, 0]
        return torch.nonzero(self.feat_layer == out_layer)[:, 0]

    def feature_vectors(self, sel: Int[Tensor, "n"], out_layer: int) -> Float[Tensor, "n d_model"]:
        """Residual-space writes of features ``sel`` to ``out_layer`` (each at its position)."""
        tc = self.transcoders
        rows = torch.empty(len(sel), tc.d_model, dtype=self.dtype)
        layers = self.feat_layer[sel]
        for src in layers.unique().tolist():
            m = layers == src
            rows[m] = tc.decoder_rows(src, out_layer, self.feat_id[sel][m], self.dtype)
        v = rows * self.feat_act[sel, None].to(self.dtype)
        post = self.post[out_layer]
        if post is None:
            return v
        return post.linear(v, self.post_scale[out_layer][self.feat_pos[sel]])

    def feature_write_until(self, sel: Int[Tensor, "n"], layer: int) -> Float[Tensor, "n d_model"]:
        """Each feature's total write into the residual entering ``layer`` (a CLT feature's
        writes to every output layer before ``layer``)."""
        out = torch.zeros(len(sel), self.error.shape[2], dtype=self.dtype)
        src = self.feat_layer[sel]
        for out_layer in range(int(src.min()) if len(sel) else 0, layer):
            m = (
                torch.nonzero(src <= out_layer)[:, 0]
                if self.transcoders.cross_layer
                else (torch.nonzero(src == out_layer)[:, 0])
            )
            if len(m):
                out[m] += self.feature_vectors(sel[m], out_layer)
        return out

    @property
    def n_features(self) -> int:
        return len(self.feat_id)


def load_transcoders(
    source: Any,
    model: Any = None,
    labels: Mapping[int, Any] | None = None,
    zero_positions: int = 1,
) -> Transcoders:
    """Transcoders from circuit-tracer's files or from SAELens transcoder objects.

    ``source``: a directory, a ``config.yaml`` or ``hf://ORG/REPO[/FOLDER]`` in circuit-tracer's
    format (a transcoder set:
    ``model_kind: transcoder_set`` with ``layer_{i}.safetensors`` or a ``transcoders`` list; a
    CLT: ``model_kind: cross_layer_transcoder``, or a directory of ``W_enc_{i}`` /
    ``W_dec_{i}.safetensors``), a list of SAELens transcoders (one per layer), or a
    :class:`Transcoders`. ``model``: checked against (layers, width). ``labels``: layer →
    anything :func:`qk_lens.labels.load_labels` reads.
    """
    if isinstance(source, Transcoders):
        tc = source
    elif isinstance(source, (str, PathLike)):
        tc = _from_circuit_tracer(source, zero_positions)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        tc = _from_saelens(list(source), zero_positions)
    else:
        raise TypeError(
            "transcoders must be a path (circuit-tracer's files), a list of SAELens transcoders "
            f"or a Transcoders, got {type(source).__name__}"
        )
    for layer, lab in (labels or {}).items():
        tc.set_labels(layer, lab)
    if model is not None:
        tc.check_model(model)
    return tc


def _from_saelens(saes: list[Any], zero_positions: int) -> Transcoders:
    """Per-layer SAELens transcoders (Transcoder, SkipTranscoder, JumpReLU*), one per layer."""
    if not saes:
        raise ValueError("an empty list of transcoders")
    by_layer: dict[int, Any] = {}
    points: set[tuple[str, str]] = set()
    for i, sae in enumerate(saes):
        for attr in ("W_enc", "b_enc", "W_dec", "b_dec", "encode", "cfg"):
            if not hasattr(sae, attr):
                raise TypeError(f"transcoder {i} ({type(sae).__name__}) has no {attr}")
        meta = sae.cfg.metadata
        hook_in, hook_out = meta.hook_name, getattr(meta, "hook_name_out", None)
        m_in = _LAYER_HOOK.match(hook_in or "")
        m_out = _LAYER_HOOK.match(hook_out or "")
        if m_in is None or m_out is None:
            raise ValueError(
                f"transcoder {i} reads {hook_in!r} and writes {hook_out!r}: a transcoder must "
                "read and write hooks of one block (blocks.L.…, with cfg.metadata.hook_name_out)"
            )
        if m_in.group(1) != m_out.group(1):
            raise ValueError(
                f"transcoder {i} reads {hook_in!r} but writes {hook_out!r}: a per-layer "
                "transcoder replaces one MLP"
            )
        layer = int(m_in.group(1))
        if layer in by_layer:
            raise ValueError(f"two transcoders for layer {layer}")
        points.add(
            (_point(m_in.group(2), INPUT_HOOKS, "input"), _point(m_out.group(2), OUTPUT_HOOKS, "output"))
        )  # fmt: skip
        if getattr(sae.cfg, "normalize_activations", "none") not in ("none", None):
            raise ValueError(
                f"transcoder {i} normalizes its input at runtime "
                f"({sae.cfg.normalize_activations!r}); fold it first"
            )
        by_layer[layer] = sae
    n = max(by_layer) + 1
    missing = sorted(set(range(n)) - set(by_layer))
    if missing:
        raise ValueError(f"the set has no transcoder for layers {missing}: every MLP needs one")
    if len(points) != 1:
        raise ValueError(f"the transcoders read/write different points: {sorted(points)}")
    (inp, out) = points.pop()
    ordered = [by_layer[i] for i in range(n)]
    skip = [hasattr(s, "W_skip") for s in ordered]
    if any(skip) and not all(skip):
        raise ValueError("some transcoders have a skip connection and some do not")
    arch = ordered[0].cfg.architecture()
    activation = "jumprelu" if "jumprelu" in arch else ("topk" if "topk" in arch else "relu")
    ids = [getattr(s.cfg.metadata, "neuronpedia_id", None) for s in ordered]

    def det(t: Tensor) -> Tensor:
        return t.detach()

    return Transcoders(
        name=ids[0].rsplit("/", 1)[0] if ids[0] else f"transcoders:{ordered[0].cfg.metadata.hook_name}",
        cross_layer=False,
        input_point=inp,
        output_point=out,
        W_enc=[det(s.W_enc) for s in ordered],
        b_enc=[det(s.b_enc) for s in ordered],
        W_dec=[det(s.W_dec) for s in ordered],
        b_dec=[det(s.b_dec) for s in ordered],
        W_skip=[det(s.W_skip).T for s in ordered] if all(skip) else None,
        activation=activation,
        threshold=[det(s.threshold) for s in ordered] if activation == "jumprelu" else None,
        encoders=[s.encode for s in ordered],
        zero_positions=zero_positions,
        model_name=getattr(ordered[0].cfg.metadata, "model_name", None),
        neuronpedia_ids=ids if any(ids) else None,
    )  # fmt: skip


def _from_circuit_tracer(source: str | PathLike[str], zero_positions: int) -> Transcoders:
    raw = read_circuit_tracer(source)
    activation = raw["activation"]
    if activation in ("jumprelu", "jump_relu"):
        activation = None  # JumpReLU: its thresholds are in the files
    if activation not in (None, "relu", "topk"):
        raise ValueError(
            f"{source}: activation {activation!r} is not relu, topk or jumprelu (JumpReLU reads "
            "its thresholds from the files)"
        )
    if activation is None and raw["threshold"] is None and raw["activation"] is not None:
        raise ValueError(
            f"{source}: activation {raw['activation']!r} but the files hold no thresholds"
        )
    if activation is None:
        activation = "jumprelu" if raw["threshold"] is not None else "relu"
    k = raw["k"] if raw["k"] is not None else raw["file_k"]
    scan = raw["scan"]
    return Transcoders(
        name=str(scan if isinstance(scan, str) else Path(str(source)).name),
        cross_layer=raw["cross_layer"],
        input_point=_point(raw["input_hook"], INPUT_HOOKS, "input"),
        output_point=_point(raw["output_hook"], OUTPUT_HOOKS, "output"),
        W_enc=raw["W_enc"], b_enc=raw["b_enc"], W_dec=raw["W_dec"], b_dec=raw["b_dec"],
        W_skip=raw["W_skip"], activation=activation, threshold=raw["threshold"], k=k,
        zero_positions=zero_positions, scan=scan if isinstance(scan, str) else None,
        model_name=raw["model_name"],
    )  # fmt: skip
