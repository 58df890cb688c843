"""The data of the interactive QK explorer: one layer's attention patterns, and for every
(head, query, key) pair above an attention threshold its top terms in one or more bases, with
each term's share of the score. Everything is computed here; the page
(:mod:`qk_lens.views.explorer`) only lays it out."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import einsum

from qk_lens.attribution.compute import setup
from qk_lens.attribution.projection import project_side
from qk_lens.attribution.table import qk_attribution_table
from qk_lens.checks import check_index
from qk_lens.display import render
from qk_lens.state import capture

EXPLORER_BASES = ("dictionary", "upstream", "transcoders")


@dataclass
class QKExplorer:
    """One layer's patterns and, per basis, the top terms of every pair with attention ≥
    ``min_prob`` (``tables[basis]``: :func:`qk_attribution_table` rows, remainder rows
    included). ``profile``: a QK profile table (``QKProfile.head(...)`` rows of any heads) to
    show beside, or None."""

    layer: int
    heads: list[int]
    str_tokens: list[str]
    patterns: np.ndarray  # [head, q, k], the heads in ``heads`` order
    tables: dict[str, pd.DataFrame]
    min_prob: float
    top_k: int
    title: str
    profile: pd.DataFrame | None = field(default=None, repr=False)
    # per basis: :func:`query_marginal_table` rows (the exact two-key contrast), or absent
    marginals: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def bases(self) -> list[str]:
        return list(self.tables)

    def payload(self) -> dict[str, Any]:
        """The page's data: ``strings`` and ``parts`` ([kind, label] string indices and feature
        id), patterns as base64 bytes (probability × 255, rounded), each pair as
        [head, q, k, prob, score, [[q part, k part, term, share, rank], …], marginals], where
        ``marginals`` (when computed) are q_a · k for the query parts ``query_rows[basis]["h,q"]``
        of its row, then the rest of the score: two keys of one query subtract part by part."""
        strings: dict[str, int] = {}
        parts: dict[tuple[int, int, int, int], int] = {}

        def text(s: str) -> int:
            if s not in strings:
                strings[s] = len(strings)
            return strings[s]

        def lab(kind: str, label: str, feature: int, pos: int) -> int:
            # one entry per part (features with the same label stay apart), strings shared
            key = (text(kind), text(label), feature, pos)
            if key not in parts:
                parts[key] = len(parts)
            return parts[key]

        marg = {
            b: {
                (int(h), int(q), int(k)): g.sort_values("order")["marginal"].tolist()
                for (h, q, k), g in mdf.groupby(["head", "q_pos", "k_pos"], sort=True)
            }
            for b, mdf in self.marginals.items()
        }
        cells: dict[str, list] = {}
        rows_of: dict[str, dict[str, list[int]]] = {}
        for basis, mdf in self.marginals.items():
            # one list of query parts per (head, q), shared by every key of that row
            rows_of[basis] = {
                f"{h},{q}": [
                    lab(str(r.q_kind), str(r.q_label), int(r.q_feature), int(q))
                    for r in g.drop_duplicates("slot").sort_values("order").itertuples()
                ]
                for (h, q), g in mdf.groupby(["head", "q_pos"], sort=True)
            }
        for basis, df in self.tables.items():
            out = []
            if not df.empty:
                for (h, q, k), g in df.groupby(["head", "q_pos", "k_pos"], sort=True):
                    score = float(g["score"].iloc[0])
                    rows = []
                    for r in g.sort_values(
                        "rank", key=lambda s: s.where(s >= 0, 10**9)
                    ).itertuples():
                        term = float(r.term)
                        share = term / score if score != 0 else None
                        rows.append([
                            lab(str(r.q_kind), str(r.q_label), int(r.q_feature), int(q)),
                            lab(str(r.k_kind), str(r.k_label), int(r.k_feature), int(r.k_part_pos)),
                            _sig(term), None if share is None else _sig(share),
                            int(r.rank),
                        ])  # fmt: skip
                    cell = [int(h), int(q), int(k), _sig(float(g["prob"].iloc[0])),
                            _sig(score), rows]  # fmt: skip
                    if basis in marg:
                        m = marg[basis].get((int(h), int(q), int(k)))
                        if m is not None:  # the row's parts' marginals, then the rest
                            cell.append([_sig(v) for v in m] + [_sig(score - float(sum(m)))])
                    out.append(cell)
            cells[basis] = out
        pat = np.clip(np.rint(self.patterns * 255.0), 0, 255).astype(np.uint8)
        profile = None
        if self.profile is not None and not self.profile.empty:
            cols = [c for c in ("head", "q_label", "k_label", "count", "n_prompts", "mean_term",
                                "mean_share") if c in self.profile.columns]  # fmt: skip
            prof = self.profile[cols]
            profile = {"columns": cols, "rows": [
                [_sig(v) if isinstance(v, float) else (v.item() if hasattr(v, "item") else v)
                 for v in row] for row in prof.itertuples(index=False)]}  # fmt: skip
        return {
            "title": self.title,
            "layer": self.layer,
            "heads": self.heads,
            "tokens": self.str_tokens,
            "min_prob": self.min_prob,
            "top_k": self.top_k,
            "bases": self.bases,
            "strings": list(strings),
            "parts": [[kind, label, feat] for (kind, label, feat, _) in parts],
            "patterns": [base64.b64encode(p.tobytes()).decode("ascii") for p in pat],
            "cells": cells,
            "query_rows": rows_of,
            "profile": profile,
        }

    def html(self) -> str:
        """The explorer as one self-contained HTML page (data and script inline, no network)."""
        return render("qk_explorer", self.payload())

    def save(self, path: str | PathLike[str]) -> Path:
        from qk_lens.files import write_text

        return write_text(path, self.html())

    def _repr_html_(self) -> str:
        return render("qk_explorer", self.payload(), fragment=True)

    def __repr__(self) -> str:
        n = {b: len(df.groupby(["head", "q_pos", "k_pos"])) if not df.empty else 0
             for b, df in self.tables.items()}  # fmt: skip
        return (
            f"QKExplorer(layer {self.layer}, heads {self.heads}, {len(self.str_tokens)} tokens, "
            f"pairs with attention ≥ {self.min_prob}: {n})"
        )


def _sig(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits (a smaller page; the tables keep full values)."""
    if x == 0 or not np.isfinite(x):
        return float(x)
    return float(f"{x:.{digits}g}")


def qk_explorer(
    model: Any,
    prompt: Any,
    layer: int,
    heads: int | list[int] | None = None,
    bases: tuple[str, ...] | list[str] = ("dictionary", "upstream"),
    top_k: int = 8,
    min_prob: float = 0.05,
    profile: pd.DataFrame | None = None,
    title: str | None = None,
) -> QKExplorer:
    """The QK explorer of ``layer`` on ``prompt`` (``model.qk_explorer``): patterns of ``heads``
    (None: all), and the top ``top_k`` terms of every pair with attention ≥ ``min_prob`` in each
    of ``bases`` (any of ``"dictionary"``, ``"upstream"``, ``"transcoders"``; the ones the model
    cannot use are an error)."""
    cap = capture(model, prompt)
    n_heads = cap.pattern(check_index("layer", layer, model.cfg.n_layers, "layers")).shape[0]
    if heads is None:
        heads = list(range(n_heads))
    elif isinstance(heads, int):
        heads = [heads]
    heads = [check_index("head", h, n_heads, "heads per layer") for h in heads]
    if isinstance(bases, str):
        bases = [bases]
    bad = [b for b in bases if b not in EXPLORER_BASES]
    if bad or not bases:
        raise ValueError(f"bases must be a non-empty list of {EXPLORER_BASES}, got {list(bases)}")
    tables = {
        b: qk_attribution_table(model, prompt, layer, heads=heads, top_k=top_k,
                                min_prob=min_prob, basis=b)
        for b in bases
    }  # fmt: skip
    marginals = {
        b: query_marginal_table(model, prompt, layer, heads, b, tables[b], top_m=top_k)
        for b in bases
    }
    pattern = cap.pattern(layer)[heads].detach().double().cpu().numpy()
    tokens = cap.str_tokens or [str(t) for t in cap.tokens.tolist()]
    return QKExplorer(
        layer=layer, heads=heads, str_tokens=list(tokens), patterns=pattern, tables=tables,
        min_prob=float(min_prob), top_k=int(top_k),
        title=title or f"QK explorer: layer {layer}", profile=profile, marginals=marginals,
    )  # fmt: skip


def query_marginal_table(
    model: Any,
    prompt: Any,
    layer: int,
    heads: list[int],
    basis: str,
    table: pd.DataFrame,
    top_m: int = 8,
) -> pd.DataFrame:
    """For the pairs of ``table`` (a :func:`qk_attribution_table`), the query-side marginals
    q_a · k of the ``top_m`` query parts a that matter most in each (head, q) row (largest
    |q_a · k| over the row's keys), the same parts for every key of the row: for two keys of
    one query, s(q, k₁) − s(q, k₂) = Σ_a (q_a · k₁ − q_a · k₂) + the rest's difference, exactly
    (the query parts are the same vectors for both keys)."""
    cols = ["head", "q_pos", "k_pos", "slot", "order", "q_kind", "q_label", "q_feature",
            "marginal"]  # fmt: skip
    if table.empty:
        return pd.DataFrame(columns=cols)
    _, cap, qk, qb, kb = setup(model, prompt, layer, None, None, basis)
    T = cap.n_tokens
    positions = torch.arange(T)
    pairs = table[["head", "q_pos", "k_pos"]].drop_duplicates().sort_values(["head", "q_pos"])
    q_side = project_side(model, qk, "query", qb, positions, torch.tensor(heads))
    k_side = project_side(model, qk, "key", kb, positions, torch.tensor(heads))
    K_sum = k_side.vectors.sum(2)  # [h, T, d]: each key whole
    hidx = {h: i for i, h in enumerate(heads)}
    hh = torch.tensor([hidx[int(h)] for h in pairs["head"]], dtype=torch.long)
    qq = torch.tensor(pairs["q_pos"].to_numpy(), dtype=torch.long)
    kk = torch.tensor(pairs["k_pos"].to_numpy(), dtype=torch.long)
    # q_a · k of every query part a of every pair, a chunk of pairs at a time (bounded memory)
    m = torch.cat([
        einsum(q_side.vectors[hh[c], qq[c]], K_sum[hh[c], kk[c]], "p a d, p d -> p a")
        for c in torch.arange(len(pairs)).split(4096)
    ]).to(torch.float64)  # fmt: skip
    valid = q_side.valid[qq]  # [pair, slot]: padding slots are no part
    # each (head, q) row keeps the parts with the largest |q_a · k| over its keys
    row_key = hh * T + qq
    _, row = torch.unique(row_key, return_inverse=True)
    size = m.abs().masked_fill(~valid, -1.0)
    best = torch.full((int(row.max()) + 1, size.shape[1]), -1.0, dtype=size.dtype)
    best = best.scatter_reduce(0, row[:, None].expand_as(size), size, "amax")
    top = best.topk(min(top_m, size.shape[1]), dim=1)
    slot = top.indices[row]  # [pair, m]
    keep = (top.values[row] >= 0).numpy()  # rows with fewer parts than m
    meta_row = torch.full(q_side.valid.shape, -1, dtype=torch.long)
    meta_row[q_side.valid] = torch.arange(int(q_side.valid.sum()))
    r = meta_row[qq[:, None], slot].numpy()[keep]
    n_m = slot.shape[1]
    meta = q_side.meta
    return pd.DataFrame({
        "head": np.repeat(pairs["head"].to_numpy(), n_m).reshape(-1, n_m)[keep],
        "q_pos": np.repeat(qq.numpy(), n_m).reshape(-1, n_m)[keep],
        "k_pos": np.repeat(kk.numpy(), n_m).reshape(-1, n_m)[keep],
        "slot": slot.numpy()[keep],
        "order": np.broadcast_to(np.arange(n_m), slot.shape)[keep],
        "q_kind": np.asarray(meta["kind"])[r],
        "q_label": np.asarray(meta["label"])[r],
        "q_feature": np.asarray(meta["feature"]).astype(np.int64)[r],
        "marginal": m.gather(1, slot).numpy()[keep],
    }, columns=cols)  # fmt: skip
