"""Composition between heads (Elhage et al. 2021, on the norm-folded weights), its random-rotation
baseline, each head's strongest partners, and the virtual heads they form."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import einops
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix

from qk_lens.atlas.weights import (
    GramFactors,
    HeadWeights,
    TokenMoments,
    copying_score,
    participation_ratio,
)
from qk_lens.checks import check_count, check_index, renamed

COMPOSITION_MODES = ("q", "k", "v")

# Elements of one [l1-chunk, head, head, d_head, d_head*3] composition product buffer.
COMP_BLOCK_ELEMENTS = 1 << 24


@dataclass
class Composition:
    """Composition scores ``[l1, h1, l2, h2]`` (writer, reader; 0 unless l1 < l2, the
    TransformerLens convention) and, per pair, the score's random-rotation baseline.

    Baseline: the same two heads with the residual basis between them randomly rotated. Then
    score² has mean 1/d (d = residual dimension seen, d_model − 1 when norms centre) and, to
    leading order in 1/d, variance 2 / (d² r₁ r₂) with r = (Σσ²)² / Σσ⁴ the participation ratio of
    each head's spectrum (writer: W_OV; reader: W_QK for Q/K, W_OV for V). So the baseline is
    1/√d · (1 − 1/(4 r₁ r₂)) ± 1/√(2 d r₁ r₂): low-rank heads compose by chance more often."""

    q: Float[Tensor, "layer head layer head"]
    k: Float[Tensor, "layer head layer head"]
    v: Float[Tensor, "layer head layer head"]
    baseline_mean: dict[str, Float[Tensor, "layer head layer head"]]
    baseline_std: dict[str, Float[Tensor, "layer head layer head"]]
    d_residual: int

    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, Tensor],
        qk_sv: Float[Tensor, "layer head r"],
        ov_sv: Float[Tensor, "layer head r"],
        d_residual: int,
    ) -> Composition:
        pr_qk, pr_ov = participation_ratio(qk_sv), participation_ratio(ov_sv)
        means, stds = {}, {}
        for mode in COMPOSITION_MODES:
            reader = pr_ov if mode == "v" else pr_qk
            pair = pr_ov[:, :, None, None] * reader[None, None, :, :]  # r₁ r₂
            means[mode] = (1 - 1 / (4 * pair)) / math.sqrt(d_residual)
            stds[mode] = 1 / (2 * d_residual * pair).sqrt()
        return cls(**scores, baseline_mean=means, baseline_std=stds, d_residual=d_residual)

    def scores(self, mode: str) -> Float[Tensor, "layer head layer head"]:
        mode = check_mode(mode)
        return getattr(self, mode)

    def z(self, mode: str) -> Float[Tensor, "layer head layer head"]:
        """(score − baseline mean) / baseline std; NaN where no composition is possible."""
        mode = check_mode(mode)
        scores = self.scores(mode)
        n_layers = scores.shape[0]
        possible = (torch.arange(n_layers)[:, None] < torch.arange(n_layers)[None, :])[
            :, None, :, None
        ].expand_as(scores)
        out = (scores - self.baseline_mean[mode]) / self.baseline_std[mode]
        return torch.where(possible, out, torch.full_like(out, float("nan")))

    def baseline_summary(self) -> pd.DataFrame:
        """Per mode: the baseline mean (1/√d) and the range of its per-pair std."""
        n_layers = self.q.shape[0]
        later = torch.triu(torch.ones(n_layers, n_layers, dtype=torch.bool), 1)[:, None, :, None]
        rows = {}
        for mode in COMPOSITION_MODES:
            std = self.baseline_std[mode].masked_select(later.expand_as(self.q))
            rows[mode] = {
                "mean": 1 / math.sqrt(self.d_residual),
                "std_min": float(std.min()) if std.numel() else float("nan"),
                "std_median": float(std.median()) if std.numel() else float("nan"),
                "std_max": float(std.max()) if std.numel() else float("nan"),
                "d_residual": self.d_residual,
            }
        return pd.DataFrame(rows).T.rename_axis("mode")

    @renamed(k="top_k")
    def partners(self, layer: int, head: int, mode: str, top_k: int = 3) -> pd.DataFrame:
        """The ``top_k`` earlier heads whose writes this head's ``mode`` input reads most."""
        mode = check_mode(mode)
        n_layers, n_heads = self.q.shape[:2]
        layer = check_index("layer", layer, n_layers, "layers")
        head = check_index("head", head, n_heads, "heads per layer")
        k = check_count("top_k", top_k)
        scores = self.scores(mode)[:layer, :, layer, head].reshape(-1)
        z = self.z(mode)[:layer, :, layer, head].reshape(-1)
        order = torch.argsort(scores, descending=True)[:k]
        return pd.DataFrame(
            {
                "layer": (order // n_heads).tolist(),
                "head": (order % n_heads).tolist(),
                "score": scores[order].tolist(),
                "z": z[order].tolist(),
            }
        )


def check_mode(mode: str) -> str:
    m = str(mode).lower()
    if m not in COMPOSITION_MODES:
        raise ValueError(f"mode must be one of 'q', 'k', 'v', got {mode!r}")
    return m


def composition_factors(
    w: HeadWeights, f: GramFactors
) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """Small factors with ‖W_OV¹ R²‖_F = ‖left¹ · right²‖_F, and the two Frobenius norms.

    left = F_V W_O (TransformerLens's ``collapse_l`` up to a rotation); right = W_Q F_Kᵀ (Q),
    W_K F_Qᵀ (K), W_V F_Oᵀ (V), like ``collapse_r`` of W_QK, W_QKᵀ and W_OV."""
    dt = w.W_O.dtype
    left = f.v.to(dt) @ w.W_O  # [l, h, d_head, d_model]
    rights = {
        "q": w.W_Q @ f.k.mT.to(dt),
        "k": w.W_K @ f.q.mT.to(dt),
        "v": w.W_V @ f.o.mT.to(dt),
    }
    ov_norm = torch.linalg.matrix_norm(f.v @ f.o.mT)
    qk_norm = torch.linalg.matrix_norm(f.q @ f.k.mT)
    return left, rights, ov_norm, {"q": qk_norm, "k": qk_norm, "v": ov_norm}


def composition_scores(
    w: HeadWeights, f: GramFactors
) -> dict[str, Float[Tensor, "layer head layer head"]]:
    """TransformerLens's composition scores (``utils.composition_scores``) on the folded weights,
    for l1 < l2 only, in blocks: one d_head × d_model × d_head product per pair of heads."""
    left, rights, left_norm, right_norm = composition_factors(w, f)
    n_layers, n_heads, d_head = left.shape[:3]
    out = {
        m: torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=torch.float64)
        for m in COMPOSITION_MODES
    }
    width = sum(r.shape[-1] for r in rights.values())
    step = max(1, COMP_BLOCK_ELEMENTS // (n_heads * n_heads * d_head * width))
    for l2 in range(1, n_layers):
        right = torch.cat([rights[m][l2] for m in COMPOSITION_MODES], -1)  # [h2, d_model, 3r]
        for l1 in range(0, l2, step):
            stop = min(l1 + step, l2)
            prod = einops.einsum(left[l1:stop], right, "l1 h1 r1 d_m, h2 d_m r2 -> l1 h1 h2 r1 r2")
            offset = 0
            for m in COMPOSITION_MODES:
                r = rights[m].shape[-1]
                norm = torch.linalg.vector_norm(prod[..., offset : offset + r], dim=(-2, -1))
                offset += r
                denom = left_norm[l1:stop, :, None] * right_norm[m][l2][None, None, :]
                out[m][l1:stop, :, l2, :] = (norm.double() / denom).cpu()
    return out


def virtual_heads(
    w: HeadWeights,
    moments: TokenMoments,
    comp: Composition,
    ov_copy: Float[Tensor, "layer head"],
    z_min: float,
) -> pd.DataFrame:
    """For every head its strongest V-composition partner, and the composed path's copying score."""
    columns = [
        "first", "second", "first_layer", "first_head", "second_layer", "second_head", "v_comp",
        "v_comp_z", "above_baseline", "copying", "positive_frac", "first_copying",
        "second_copying",
    ]  # fmt: skip
    n_layers, n_heads = w.W_Q.shape[:2]
    if n_layers < 2:
        return pd.DataFrame(columns=columns)
    z = comp.z("v")
    ov_copy = ov_copy.cpu()
    pairs = []
    for l2 in range(1, n_layers):
        for h2 in range(n_heads):
            l1, h1 = divmod(int(torch.argmax(comp.v[:l2, :, l2, h2].reshape(-1))), n_heads)
            pairs.append((l1, h1, l2, h2))
    l1, h1, l2, h2 = (torch.tensor(c) for c in zip(*pairs, strict=True))
    # Ê W_V¹ W_O¹ W_V² W_O² W_U: its nonzero eigenvalues are those of the d_head × d_head
    # (W_O² W_U Ê) W_V¹ (W_O¹ W_V²), the small product FactoredMatrix.eigenvalues takes.
    middle = w.W_O[l1, h1] @ w.W_V[l2, h2]  # [pair, d_head, d_head]
    n = moments.unembed_embed.to(w.W_O.dtype)
    path = FactoredMatrix(w.W_V[l1, h1] @ middle, w.W_O[l2, h2] @ n)
    copy, pos = copying_score(path)
    rows = [
        {
            "first": f"L{a}H{b}",
            "second": f"L{c}H{d}",
            "first_layer": a,
            "first_head": b,
            "second_layer": c,
            "second_head": d,
            "v_comp": float(comp.v[a, b, c, d]),
            "v_comp_z": float(z[a, b, c, d]),
            "above_baseline": bool(z[a, b, c, d] >= z_min),
            "copying": float(copy[i]),
            "positive_frac": float(pos[i]),
            "first_copying": float(ov_copy[a, b]),
            "second_copying": float(ov_copy[c, d]),
        }
        for i, (a, b, c, d) in enumerate(pairs)
    ]
    df = pd.DataFrame(rows, columns=columns)
    return df.sort_values("v_comp", ascending=False, kind="stable").reset_index(drop=True)


def best_partners(comp: Composition, n_layers: int, n_heads: int) -> list[dict[str, Any]]:
    """Per head (row-major), its strongest earlier partner in each mode, with the z-score."""
    rows: list[dict[str, Any]] = [{} for _ in range(n_layers * n_heads)]
    for mode in COMPOSITION_MODES:
        key = f"{mode}_comp"
        scores, z = comp.scores(mode), comp.z(mode)
        for layer in range(n_layers):
            for head in range(n_heads):
                row = rows[layer * n_heads + head]
                if layer == 0:
                    row.update({f"{key}_partner": "", key: float("nan"), f"{key}_z": float("nan")})
                    continue
                flat = scores[:layer, :, layer, head].reshape(-1)
                l1, h1 = divmod(int(torch.argmax(flat)), n_heads)
                row[f"{key}_partner"] = f"L{l1}H{h1}"
                row[key] = float(scores[l1, h1, layer, head])
                row[f"{key}_z"] = float(z[l1, h1, layer, head])
    return rows
