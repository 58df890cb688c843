"""The batch primitive: top-k QK terms plus the exact remainder for every (head, q, k) of a layer.

Both sides are projected once for every position and head (``[head, pos, slot, d_head]``, i.e.
memory T·slots·heads·d_head). The selected (unmasked, prob ≥ min_prob) pairs then go, all at once
(or ``chunk_size`` query positions at a time), to ``qk_lens.attribution.topk``, which keeps each pair's
top-k terms while it multiplies (a fused C kernel) or in small ``torch.topk`` chunks. No
T²·slots² tensor ever exists; the output is pairs × (top_k + 1) rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import einsum
from torch import Tensor
from tqdm.auto import tqdm

from qk_lens.arch import LayerQK
from qk_lens.attribution.compute import setup
from qk_lens.attribution.projection import ProjectedSide, project_side
from qk_lens.attribution.terms import ALIBI_LABEL
from qk_lens.attribution.topk import top_terms
from qk_lens.bases import Basis, Meta, concat_meta, part_meta
from qk_lens.capture import Capture
from qk_lens.checks import check_count, check_index

REMAINDER, ALIBI = -1, -2  # pseudo-part codes in the table


def _part_index(side: ProjectedSide) -> torch.Tensor:
    """(pos, slot) → entry of ``side.meta`` (−1 for padding)."""
    idx = torch.full(side.valid.shape, -1, dtype=torch.long)
    idx[side.valid] = torch.arange(int(side.valid.sum()))
    return idx


def _categorical(meta: Meta, column: str, rows: np.ndarray) -> pd.Categorical:
    codes, uniques = pd.factorize(meta[column], use_na_sentinel=False)
    # rows index meta, so the codes are valid by construction: skip from_codes' range check
    return pd.Categorical.from_codes(codes[rows], categories=uniques, validate=False)


def iter_attribution_table(
    model: Any,
    cap: Capture,
    qk: LayerQK,
    heads: list[int],
    top_k: int,
    min_prob: float,
    query_basis: Basis,
    key_basis: Basis,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Iterator[pd.DataFrame]:
    """The table's rows, ``chunk_size`` query positions at a time (pairs in (q, head, k)
    order across chunks): memory beyond the projected sides follows one chunk's rows."""
    T = cap.n_tokens
    positions = torch.arange(T)
    H = torch.tensor(heads)
    q_parts = query_basis.parts(model, cap, qk.layer, positions)
    # the same basis on both sides (the usual case): its parts are built once
    same = getattr(query_basis, "key", None) == getattr(key_basis, "key", object())
    k_parts = q_parts if same else key_basis.parts(model, cap, qk.layer, positions)
    q_side = project_side(model, qk, "query", query_basis, positions, H, q_parts)
    k_side = project_side(model, qk, "key", key_basis, positions, H, k_parts)
    del q_parts, k_parts
    Q, K = q_side.vectors, k_side.vectors  # [h, T, Pq, d], [h, T, Pk, d]
    _, _, Pq, d = Q.shape
    Pk = K.shape[2]
    q_index, k_index = _part_index(q_side), _part_index(k_side)
    q_meta = _with_special(q_side.meta)
    k_meta = _with_special(k_side.meta)
    n_qm, n_km = len(q_side.meta["kind"]), len(k_side.meta["kind"])
    # Each pair's score from the summed parts: Σ_ab q_a·k_b = (Σ_a q_a)·(Σ_b k_b).
    Q_sum, K_sum = Q.sum(2), K.sum(2)
    pattern_all = cap.pattern(qk.layer)
    final_all = cap.scores(qk.layer)
    has_alibi = qk.arch.alibi is not None
    k_eff = min(top_k, Pq * Pk)
    if chunk_size is None:
        chunk_size = T  # one call: the selection's prep is per call, its progress per pair

    allowed = qk.key_allowed(positions, positions)
    n_selected = int(sum(
        int((allowed[q0 : q0 + chunk_size][None] & (pattern_all[H, q0 : q0 + chunk_size] >= min_prob)).sum())
        for q0 in range(0, T, chunk_size)
    ))  # fmt: skip
    desc = f"L{qk.layer} QK table"
    with tqdm(total=n_selected, disable=not progress, desc=desc, unit="pair") as bar:
        for q0 in range(0, T, chunk_size):
            q1 = min(T, q0 + chunk_size)
            pattern = pattern_all[H, q0:q1].to(Q.dtype)  # [h, c, T]
            select = allowed[q0:q1][None] & (pattern >= min_prob)
            # (q, head, k) order: nonzero over the [q, head, k] view
            qq, hh, kk = torch.nonzero(select.transpose(0, 1), as_tuple=True)
            if len(qq) == 0:
                continue
            stats: dict = {}
            vals, idx = top_terms(
                Q[:, q0:q1], K, hh, qq, kk, k_eff, stats=stats, progress=bar.update
            )
            # each pair's score from its own two vectors: the same numbers whatever the chunks
            totals = einsum(Q_sum[hh, qq + q0], K_sum[hh, kk], "p d, p d -> p")
            alibi = None
            if has_alibi:
                alibi = qk.alibi_terms(H, positions[q0:q1], positions)[hh, qq, kk]
                totals = totals + alibi
            frame = _frame(
                qk.layer, heads, hh, qq, kk, q0, vals, idx, totals, alibi, pattern,
                final_all[H, q0:q1].to(Q.dtype), q_index, k_index, q_meta, k_meta, n_qm, n_km,
                Pq, Pk, k_eff,
            )  # fmt: skip
            frame.attrs.update(
                {
                    "flops": 2 * len(hh) * Pq * Pk * d,  # of every term product of these pairs
                    "multiplied": stats["fraction_multiplied"] * len(hh),  # pairs' worth computed
                    "pairs": len(hh),
                    "query_parts": n_qm,
                    "key_parts": n_km,
                }
            )
            yield frame


def attribution_table(
    model: Any,
    cap: Capture,
    qk: LayerQK,
    heads: list[int],
    top_k: int,
    min_prob: float,
    query_basis: Basis,
    key_basis: Basis,
    chunk_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    frames = list(
        iter_attribution_table(
            model, cap, qk, heads, top_k, min_prob, query_basis, key_basis, chunk_size, progress
        )
    )
    if not frames:
        return _empty_frame()
    attrs = {k: sum(f.attrs[k] for f in frames) for k in ("flops", "multiplied", "pairs")}
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    frame.attrs = {
        "flops": attrs["flops"],  # of every term product of the selected pairs
        "fraction_multiplied": attrs["multiplied"] / attrs["pairs"],  # the share computed
        "query_parts": frames[0].attrs["query_parts"],
        "key_parts": frames[0].attrs["key_parts"],
    }
    return frame


def _frame(
    layer: int, heads: list[int], hh: Tensor, qq: Tensor, kk: Tensor, q0: int, vals: Tensor,
    idx: Tensor, totals: Tensor, alibi: Tensor | None, pattern: Tensor, final: Tensor,
    q_index: Tensor, k_index: Tensor, q_meta: Meta, k_meta: Meta, n_qm: int, n_km: int,
    Pq: int, Pk: int, k_eff: int,
) -> pd.DataFrame:  # fmt: skip
    """One chunk's rows; ``qq`` are positions within the chunk (starting at ``q0``),
    ``totals`` / ``alibi`` are per selected pair, ``pattern`` / ``final`` the chunk's
    [h, c, T] slices."""
    n_pairs = len(hh)
    # Each listed term's meta rows: flat numpy lookups (2-D torch indexing over [pairs, top_k]
    # is several times slower).
    idx_np = idx.numpy()
    a = idx_np // Pq
    q_abs = qq + q0
    ki = k_index.numpy().reshape(-1)[kk.numpy()[:, None] * Pk + a]
    qi = q_index.numpy().reshape(-1)[q_abs.numpy()[:, None] * Pq + (idx_np - a * Pq)]
    listed_term = (qi >= 0) & (ki >= 0)  # padding slots (exact zeros) never count as interactions
    # The exact remainder: the pair's score minus the listed terms (and ALiBi, listed apart).
    # Extra columns go right after each pair's listed terms, so rows come out grouped by pair.
    pair_total = totals
    rem = pair_total - torch.where(torch.from_numpy(listed_term), vals, 0.0).sum(-1)
    extra_vals, extra_codes = [rem], [REMAINDER]
    if alibi is not None:
        alibi_term = alibi
        extra_vals, extra_codes = [rem - alibi_term, alibi_term], [REMAINDER, ALIBI]
    n_extra = len(extra_codes)
    codes = np.broadcast_to(np.array(extra_codes), (n_pairs, n_extra))
    keep = np.concatenate([listed_term, np.ones((n_pairs, n_extra), dtype=bool)], 1)
    n_rows = keep.sum(1)

    def per_row(x: torch.Tensor) -> np.ndarray:  # a per-pair value on each of the pair's rows
        return np.repeat(x.numpy(), n_rows)

    def listed(*parts: np.ndarray) -> np.ndarray:  # [pair, width] pieces → kept entries, row-major
        return np.concatenate(parts, 1)[keep]

    # −1 → remainder, −2 → ALiBi: the pseudo-parts appended after the real ones
    qi = listed(qi, n_qm - 1 - codes)
    ki = listed(ki, n_km - 1 - codes)
    columns = {
        "layer": np.full(len(qi), layer),
        "head": per_row(torch.tensor(heads)[hh]),
        "q_pos": per_row(q_abs),
        "k_pos": per_row(kk),
        "prob": per_row(pattern[hh, qq, kk].to(torch.float64)),
        "score": per_row(pair_total.to(torch.float64)),
        "model_score": per_row(final[hh, qq, kk].to(torch.float64)),
        "rank": listed(np.broadcast_to(np.arange(k_eff), idx_np.shape), codes),
        "q_kind": _categorical(q_meta, "kind", qi),
        "q_feature": q_meta["feature"][qi],
        "q_label": _categorical(q_meta, "label", qi),
        "k_kind": _categorical(k_meta, "kind", ki),
        "k_part_pos": k_meta["position"][ki],
        "k_feature": k_meta["feature"][ki],
        "k_label": _categorical(k_meta, "label", ki),
        "term": listed(vals.numpy(), torch.stack(extra_vals, 1).numpy()).astype(np.float64),
    }
    # Side by side without consolidating same-dtype columns into 2-D blocks (a copy of every
    # column, as long as everything else the table does).
    return pd.concat([pd.Series(v, name=c, copy=False) for c, v in columns.items()], axis=1)


def _validated(
    model: Any, prompt: Any, layer: int, heads: Any, top_k: Any, min_prob: Any, basis: Any,
    query_basis: Any, key_basis: Any, chunk_size: Any,
) -> tuple:  # fmt: skip
    layer, cap, qk, qb, kb = setup(model, prompt, layer, query_basis, key_basis, basis)
    if heads is None:
        head_list = list(range(qk.n_heads))
    else:
        head_list = [heads] if not isinstance(heads, (list, tuple)) else list(heads)
        if not head_list:
            raise ValueError("heads is an empty list; give head indices or None for all heads")
        head_list = [check_index("head", h, qk.n_heads, "heads per layer") for h in head_list]
    top_k = check_count("top_k", top_k)
    if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float, np.floating)):
        raise TypeError(f"min_prob must be a number in [0, 1], got {type(min_prob).__name__}")
    if not 0.0 <= float(min_prob) <= 1.0:
        raise ValueError(f"min_prob must lie in [0, 1], got {min_prob!r}")
    if chunk_size is not None:
        chunk_size = check_count("chunk_size", chunk_size)
    return cap, qk, head_list, top_k, float(min_prob), qb, kb, chunk_size


def qk_attribution_table(
    model: Any,
    prompt: Any,
    layer: int,
    heads: int | list[int] | None = None,
    top_k: int = 32,
    min_prob: float = 0.0,
    basis: Any = "dictionary",
    query_basis: Any = None,
    key_basis: Any = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """``model.qk_attribution_table`` (see its docstring): validation, then :func:`attribution_table`."""
    args = _validated(
        model, prompt, layer, heads, top_k, min_prob, basis, query_basis, key_basis, chunk_size
    )
    return attribution_table(model, *args, progress=progress)


def qk_attribution_table_chunks(
    model: Any,
    prompt: Any,
    layer: int,
    heads: int | list[int] | None = None,
    top_k: int = 32,
    min_prob: float = 0.0,
    basis: Any = "dictionary",
    query_basis: Any = None,
    key_basis: Any = None,
    chunk_size: int = 256,
    progress: bool = False,
) -> Iterator[pd.DataFrame]:
    """The rows of :func:`qk_attribution_table`, ``chunk_size`` query positions at a time, for
    writers that stream them out (long prompts): concatenated, they are the same table."""
    args = _validated(
        model, prompt, layer, heads, top_k, min_prob, basis, query_basis, key_basis, chunk_size
    )
    return iter_attribution_table(model, *args, progress=progress)


def _with_special(meta: Meta) -> Meta:
    """Append the pseudo-parts 'remainder' (code −1) and 'alibi' (code −2)."""
    extra = part_meta(
        np.array(["remainder", "alibi"], dtype=object), -1, -1, np.array([-1, -1]), -1, np.nan,
        np.array(["remainder (all other terms)", ALIBI_LABEL], dtype=object),
    )  # fmt: skip
    return concat_meta([meta, extra])


def _empty_frame() -> pd.DataFrame:
    columns = [
        "layer",
        "head",
        "q_pos",
        "k_pos",
        "prob",
        "score",
        "model_score",
        "rank",
        "q_kind",
        "q_feature",
        "q_label",
        "k_kind",
        "k_part_pos",
        "k_feature",
        "k_label",
        "term",
    ]
    return pd.DataFrame({c: [] for c in columns})
