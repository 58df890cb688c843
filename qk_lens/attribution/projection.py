"""Projected sides: a basis's parts at each position, mapped into a head's query or key space."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from qk_lens.arch import LayerQK, Side
from qk_lens.bases import Basis, Meta, PartsBatch, concat_meta, part_meta, take_meta


@dataclass
class ProjectedSide:
    """One side's parts in head space, for several heads and positions (padded slots)."""

    vectors: Float[Tensor, "h n_pos slot d_head"]
    valid: Bool[Tensor, "n_pos slot"]
    meta: Meta  # entries of valid (pos, slot) in row-major order
    positions: Int[Tensor, "n_pos"]

    @cached_property
    def _starts(self) -> np.ndarray:
        counts = self.valid.sum(1).numpy()
        return np.concatenate([[0], np.cumsum(counts)])

    def rows_of(self, i: int) -> slice:
        """The meta entries belonging to the i-th position."""
        return slice(int(self._starts[i]), int(self._starts[i + 1]))


FACTOR_MIN_POSITIONS = 8


def project_side(
    model: Any,
    qk: LayerQK,
    side: Side,
    basis: Basis,
    positions: Int[Tensor, "n_pos"],
    heads: Int[Tensor, "h"],
    parts: PartsBatch | None = None,
) -> ProjectedSide:
    """Basis parts at ``positions`` → head space, plus the attention-bias part of each position.
    ``parts``: ``basis.parts(...)`` at these positions, when the caller already has them."""
    cap = qk.cap
    qk.check_clip(side, positions, heads)
    pb: PartsBatch = parts if parts is not None else basis.parts(model, cap, qk.layer, positions)
    n_pos, n_slots, d_model = pb.vectors.shape
    flat_pos = positions[:, None].expand(n_pos, n_slots).reshape(-1)
    # Mapping distinct rows once pays where rows recur, i.e. over many positions; for a few its
    # bookkeeping costs more than it saves (both are exact).
    if pb.row_ids is None or n_pos < FACTOR_MIN_POSITIONS:
        proj = qk.project(side, pb.vectors.reshape(-1, d_model), flat_pos, heads, pb.space)
    else:
        proj = project_factored(qk, side, pb, flat_pos, heads)
    proj = proj.reshape(len(heads), n_pos, n_slots, -1)
    extras = [qk.project_bias(side, positions, heads)[:, :, None]]
    pos_np = positions.numpy()
    extra_meta = [bias_meta(qk, side, pos_np)]
    if qk.arch.shortformer:
        pos_embed = cap.get("hook_pos_embed")[positions]
        extras.append(qk.project(side, pos_embed, positions, heads, "attn_input")[:, :, None])
        extra_meta.append(
            part_meta(
                "positional embedding",
                -1,
                -1,
                pos_np,
                -1,
                np.nan,
                "positional embedding (shortformer)",
            )
        )
    vectors = torch.cat([proj, *extras], dim=2)
    valid = torch.cat([pb.valid, torch.ones(n_pos, len(extras), dtype=torch.bool)], dim=1)
    meta = concat_meta([pb.meta, *extra_meta])
    if n_pos > 1:
        # Interleave the extra entries after each position's basis parts (row-major over
        # (pos, slot)); with one position they already follow its parts.
        width = n_slots + len(extras)
        counts = pb.valid.sum(1).numpy()
        keys = [np.repeat(np.arange(n_pos), counts) * width + ranks(counts)]
        keys += [np.arange(n_pos) * width + n_slots + j for j in range(len(extras))]
        meta = take_meta(meta, np.argsort(np.concatenate(keys), kind="stable"))
    return ProjectedSide(vectors, valid, meta, positions)


def bias_meta(qk: LayerQK, side: Side, positions: np.ndarray) -> Meta:
    """The attention-bias part's metadata at ``positions`` (kept on the capture for one
    position: every call on a pair asks for it again)."""
    key = (
        ("attention bias meta", qk.layer, side, int(positions[0])) if len(positions) == 1 else None
    )
    if key is not None and key in qk.cap.derived:
        return qk.cap.derived[key]
    wqk = "W_Q + b_Q" if side == "query" else "W_K + b_K"
    meta = part_meta(
        "attention bias", qk.layer, -1, positions, -1, np.nan, f"attn bias (ln1.b·{wqk})"
    )
    if key is not None:
        qk.cap.derived[key] = meta
    return meta


def project_factored(
    qk: LayerQK, side: Side, pb: PartsBatch, flat_pos: Int[Tensor, "n"], heads: Int[Tensor, "h"]
) -> Float[Tensor, "h n d_head"]:
    """``qk.project`` of every (pos, slot) vector, mapping each distinct decoder row once.

    The frozen norm and W_Q/W_K are linear and the same at every position up to 1/σ(pos), so
    c · row at position p projects to c / σ(p) · (row through the norm weight and W); qk-norm,
    rotary and the score scale then act per position as in :meth:`LayerQK.project`.
    """
    d_model = pb.vectors.shape[-1]
    ids = pb.row_ids.reshape(-1)
    factored = ids >= 0
    unique, inverse = torch.unique(ids[factored], return_inverse=True)
    per_row = qk.pre_rotary_rows(side, pb.rows[unique], heads, pb.space)  # [h, u, d_head]
    # every slot gathers a row (slots without one gather a zero row, coefficient 0) ...
    per_row = torch.cat([per_row, per_row.new_zeros(len(heads), 1, per_row.shape[-1])], dim=1)
    which = torch.full_like(ids, len(unique))
    which[factored] = inverse
    coef = torch.where(factored, pb.coeffs.reshape(-1).to(per_row.dtype), 0.0)
    scale = qk.frozen_scale(flat_pos, pb.space)
    if scale is not None:
        coef = coef / scale
    pre = per_row[:, which] * coef[None, :, None]
    # ... and the others (dictionary bias, error, inactive slots) are projected as they are
    rest = torch.nonzero(~factored)[:, 0]
    vectors = pb.vectors.reshape(-1, d_model)[rest]
    pre[:, rest] = qk.pre_rotary(side, vectors, flat_pos[rest], heads, pb.space)
    return qk.finish(side, pre, flat_pos, heads)


def ranks(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated."""
    if len(counts) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(int(counts.sum())) - starts
