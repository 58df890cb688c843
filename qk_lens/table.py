"""The batch primitive: top-k QK terms plus the exact remainder for every (head, q, k) of a layer.

Both sides are projected once for every position and head (``[head, pos, slot, d_head]``, i.e.
memory T·slots·heads·d_head). Query positions are then processed in chunks: one batched matmul
gives every term of the chunk against all earlier keys, the selected (unmasked, prob ≥ min_prob)
pairs are gathered and reduced to their top-k by |term|. No T²·slots² tensor ever exists.

Speed note: ``torch.topk`` over every term dominates (≈ 4 ns/term on a 2-core CPU, against
≈ 1 ns/term for the matmul at the dense rate). An exact pruning exists — every top-k entry of a
pair's term matrix lies in the top-k rows by row |max| and the top-k columns by column |max|,
cutting 67×67 candidates to 32×32 — but with torch's reductions and gathers it measured slower
than plain top-k here; a fused kernel would be the way to the roofline target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import einsum
from tqdm.auto import tqdm

from qk_lens.attention import LayerQK
from qk_lens.attribution import ALIBI_LABEL, ProjectedSide, project_side
from qk_lens.bases import Meta, _meta, concat_meta
from qk_lens.capture import Capture

REMAINDER, ALIBI = -1, -2  # pseudo-part codes in the table

# Elements of the per-chunk term tensor: small enough to stay near the caches, large enough that
# the batched matmul runs near full speed.
_CHUNK_ELEMENTS = 8_000_000


def _part_index(side: ProjectedSide) -> torch.Tensor:
    """(pos, slot) → entry of ``side.meta`` (−1 for padding)."""
    idx = torch.full(side.valid.shape, -1, dtype=torch.long)
    idx[side.valid] = torch.arange(int(side.valid.sum()))
    return idx


def _categorical(meta: Meta, column: str, rows: np.ndarray) -> pd.Categorical:
    codes, uniques = pd.factorize(meta[column], use_na_sentinel=False)
    return pd.Categorical.from_codes(codes[rows], categories=uniques)


def attribution_table(
    model: Any,
    cap: Capture,
    qk: LayerQK,
    heads: list[int],
    top_k: int,
    min_prob: float,
    query_basis: Any,
    key_basis: Any,
    chunk_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    T = cap.n_tokens
    positions = torch.arange(T)
    H = torch.tensor(heads)
    q_side = project_side(model, qk, "query", query_basis, positions, H)
    k_side = project_side(model, qk, "key", key_basis, positions, H)
    Q, K = q_side.vectors, k_side.vectors  # [h, T, Pq, d], [h, T, Pk, d]
    n_h, _, Pq, d = Q.shape
    Pk = K.shape[2]
    q_index, k_index = _part_index(q_side), _part_index(k_side)

    pattern = cap.pattern(qk.layer)[H].to(Q.dtype)
    final = cap.scores(qk.layer)[H].to(Q.dtype)
    select = qk.key_allowed(positions, positions)[None] & (pattern >= min_prob)
    # Each pair's score from the summed parts: Σ_ab q_a·k_b = (Σ_a q_a)·(Σ_b k_b).
    totals = einsum(Q.sum(2), K.sum(2), "h q d, h k d -> h q k")
    if qk.alibi:
        alibi = qk.alibi_terms(H, positions, positions)
        totals = totals + alibi
    k_eff = min(top_k, Pq * Pk)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, n_h * Pq * T * Pk))

    cols: dict[str, list] = {c: [] for c in ("h", "q", "k", "qi", "ki", "term", "rank")}
    flops = 0
    for q0 in tqdm(range(0, T, chunk_size), disable=not progress, desc=f"L{qk.layer} QK table"):
        q1 = min(T, q0 + chunk_size)
        sel = select[:, q0:q1]
        any_key = torch.nonzero(sel.any(0).any(0))[:, 0]
        if len(any_key) == 0:
            continue
        k0, k1 = int(any_key[0]), int(any_key[-1]) + 1  # keys outside [k0, k1) are never selected
        tq, tk = q1 - q0, k1 - k0
        # Per (head, query): K[keys] @ q^T, so each pair's Pk×Pq block is contiguous.
        keys = K[:, None, k0:k1].reshape(n_h, 1, tk * Pk, d)
        terms = torch.matmul(keys, Q[:, q0:q1].transpose(-1, -2)).view(n_h, tq, tk, Pk * Pq)
        flops += 2 * n_h * tq * tk * Pk * Pq * d
        sel = sel[:, :, k0:k1]
        hh, qq, kk = torch.nonzero(sel, as_tuple=True)
        chosen = terms.reshape(-1, Pk * Pq) if bool(sel.all()) else terms[hh, qq, kk]
        _, idx = torch.topk(chosen.abs(), k_eff, dim=-1)
        vals = chosen.gather(-1, idx)
        qpos, kpos = (qq + q0)[:, None], (kk + k0)[:, None]
        ki = k_index[kpos, idx // Pq]
        qi = q_index[qpos, idx % Pq]
        keep = (qi >= 0) & (ki >= 0)  # padding slots (exact zeros) never count as interactions
        rank = torch.arange(k_eff).expand_as(idx)
        # The exact remainder: the pair's score minus the listed terms (and ALiBi, listed apart).
        # Extra columns go right after each pair's listed terms, so rows come out grouped by pair.
        rem = totals[hh, qq + q0, kk + k0] - torch.where(keep, vals, 0.0).sum(-1)
        extra_vals, extra_codes = [rem], [REMAINDER]
        if qk.alibi:
            a = alibi[hh, qq + q0, kk + k0]
            extra_vals, extra_codes = [rem - a, a], [REMAINDER, ALIBI]
        n_x = len(extra_codes)
        codes = torch.tensor(extra_codes).expand(len(hh), n_x)
        keep = torch.cat([keep, torch.ones(len(hh), n_x, dtype=torch.bool)], 1)
        width = k_eff + n_x
        for name, v in (
            ("h", hh[:, None].expand(-1, width)),
            ("q", qpos.expand(-1, width)),
            ("k", kpos.expand(-1, width)),
            ("qi", torch.cat([qi, codes], 1)),
            ("ki", torch.cat([ki, codes], 1)),
            ("term", torch.cat([vals, torch.stack(extra_vals, 1)], 1)),
            ("rank", torch.cat([rank, codes], 1)),
        ):
            cols[name].append(v[keep])

    if not cols["h"]:
        return _empty_frame()
    c = {k: torch.cat(v).numpy() for k, v in cols.items()}
    q_meta = _with_special(q_side.meta)
    k_meta = _with_special(k_side.meta)
    n_qm, n_km = len(q_side.meta["kind"]), len(k_side.meta["kind"])
    qi = np.where(c["qi"] >= 0, c["qi"], n_qm - 1 - c["qi"])  # −1 → remainder, −2 → ALiBi
    ki = np.where(c["ki"] >= 0, c["ki"], n_km - 1 - c["ki"])
    hq, qq_, kk_ = c["h"], c["q"], c["k"]
    frame = pd.DataFrame(
        {
            "layer": qk.layer,
            "head": np.asarray(heads)[hq],
            "q_pos": qq_,
            "k_pos": kk_,
            "prob": pattern[hq, qq_, kk_].to(torch.float64).numpy(),
            "score": totals[hq, qq_, kk_].to(torch.float64).numpy(),
            "model_score": final[hq, qq_, kk_].to(torch.float64).numpy(),
            "rank": c["rank"],
            "q_kind": _categorical(q_meta, "kind", qi),
            "q_feature": q_meta["feature"][qi],
            "q_label": _categorical(q_meta, "label", qi),
            "k_kind": _categorical(k_meta, "kind", ki),
            "k_part_pos": k_meta["position"][ki],
            "k_feature": k_meta["feature"][ki],
            "k_label": _categorical(k_meta, "label", ki),
            "term": c["term"].astype(np.float64),
        }
    )
    frame.attrs.update({"flops": flops, "query_parts": n_qm, "key_parts": n_km})
    return frame


def _with_special(meta: Meta) -> Meta:
    """Append the pseudo-parts 'remainder' (code −1) and 'alibi' (code −2)."""
    extra = _meta(
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
