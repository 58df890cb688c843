"""Norms at a frozen scale: the one place their linearization is written (docs/contract.md §2).

With its scale σ held at the value the forward computed, every norm qk_lens meets is affine in
its input: ``norm(x) = lin(x) / σ + b`` with ``lin`` = centring (LayerNorm kinds) and the gain
``w`` (weighted kinds). So the norm of any split of x is the sum of the norms of the pieces,
plus the bias once. The kinds are TransformerLens's names:

* ``LN``:     lin(x) = (x − mean(x)) ⊙ w, bias b
* ``LNPre``:  lin(x) = x − mean(x)
* ``RMS``:    lin(x) = x ⊙ w
* ``RMSPre``: lin(x) = x
* ``none``:   the identity (σ = 1)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float
from torch import Tensor

NORM_KINDS = ("LN", "LNPre", "RMS", "RMSPre", "none")
CENTRING_KINDS = ("LN", "LNPre")
WEIGHTED_KINDS = ("LN", "RMS")


def linearize_norm(
    vectors: Float[Tensor, "n d"],
    scale: Float[Tensor, "n"] | None,
    kind: str,
    weight: Float[Tensor, "d"] | None,
    centered_already: bool = False,
) -> Float[Tensor, "n d"]:
    """The norm at a frozen per-row scale, without its bias: exact for any split of the input."""
    if kind == "none":
        return vectors
    out = vectors
    if kind in CENTRING_KINDS and not centered_already:
        out = out - out.mean(-1, keepdim=True)
    if scale is not None:
        out = out / scale[:, None]
    if kind in WEIGHTED_KINDS and weight is not None:
        out = out * weight
    return out


@dataclass(eq=False)
class FrozenNorm:
    """A norm with its scale frozen: linear in its input, plus its bias.

    ``scale_hook`` names the hook (relative to ``blocks.L.``, or absolute for model-level norms)
    that records σ in a forward; ``None`` for ``kind == "none"``.
    """

    kind: str
    weight: Float[Tensor, "d"] | None
    bias: Float[Tensor, "d"] | None
    eps: float
    scale_hook: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ValueError(f"unsupported norm kind {self.kind!r}; known kinds: {NORM_KINDS}")

    @classmethod
    def identity(cls) -> FrozenNorm:
        return cls("none", None, None, 0.0)

    @property
    def centers(self) -> bool:
        return self.kind in CENTRING_KINDS

    @property
    def is_identity(self) -> bool:
        return self.kind == "none"

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> FrozenNorm:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device or t.device, dtype)

        return replace(self, weight=cast(self.weight), bias=cast(self.bias))

    def scale(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n"]:
        """The scale the norm computes at ``x`` (TransformerLens's formula), to be frozen."""
        if self.kind == "none":
            return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        xc = x - x.mean(-1, keepdim=True) if self.centers else x
        return (xc.pow(2).mean(-1) + self.eps).sqrt()

    def linear(
        self, x: Float[Tensor, "n d"], scale: Float[Tensor, "n"] | None
    ) -> Float[Tensor, "n d"]:
        """The frozen linear part (no bias); ``scale=None`` leaves out the 1/σ."""
        return linearize_norm(x, scale, self.kind, self.weight)

    def forward(self, x: Float[Tensor, "n d"], scale: Float[Tensor, "n"]) -> Float[Tensor, "n d"]:
        out = self.linear(x, scale)
        return out if self.bias is None else out + self.bias

    def transpose(
        self, g: Float[Tensor, "... d"], scale: Float[Tensor, "..."] | None = None
    ) -> Float[Tensor, "... d"]:
        """The adjoint of the frozen linear part: centre(g ⊙ w) / σ (centring is symmetric)."""
        out = g if self.weight is None or self.kind not in WEIGHTED_KINDS else g * self.weight
        if self.centers:
            out = out - out.mean(-1, keepdim=True)
        if scale is not None:
            out = out / scale[..., None]
        return out

    def fold_read(
        self, weight: Float[Tensor, "... d_model d_out"], centered_already: bool = False
    ) -> Float[Tensor, "... d_model d_out"]:
        """``P diag(w) W``: what a map reading through this norm applies at unit scale
        (``diag(w) W`` for inputs already centred)."""
        if self.kind in WEIGHTED_KINDS and self.weight is not None:
            weight = self.weight.to(weight.dtype)[:, None] * weight
        if self.centers and not centered_already:
            weight = weight - weight.mean(-2, keepdim=True)
        return weight

    def fold_write(
        self, weight: Float[Tensor, "... d_in d_model"]
    ) -> Float[Tensor, "... d_in d_model"]:
        """``W P diag(w)``: a write that passes through this norm at unit scale."""
        if self.centers:
            weight = weight - weight.mean(-1, keepdim=True)
        if self.kind in WEIGHTED_KINDS and self.weight is not None:
            weight = weight * self.weight.to(weight.dtype)
        return weight

    def normalize_rows(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """Each row through the norm's centring and its own live scale (no gain, no bias)."""
        if self.centers:
            x = x - x.mean(-1, keepdim=True)
        if self.kind != "none":
            x = x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return x
