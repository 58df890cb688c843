"""Contrasts, competition and distillation: explain the pattern, not just one score.

A score alone does not say why a head attended *here*: softmax makes keys compete. This module
turns QK attributions into exact answers to comparative questions (docs/steering.md).

**Contrast with another key.** For one query q, the query parts are shared by every key; the key
parts differ per key. Key parts are matched across keys by their *identity* — (kind, layer, head,
feature, label), i.e. everything but the position — so "feature 17 at k" and "feature 17 at k′"
form one group and net out. With ``T_k[a, b]`` the terms at key k::

    C[a, g] = Σ_{b ∈ g at k} T_k[a, b] − Σ_{b ∈ g at k′} T_k′[a, b]
    Σ_{a,g} C[a, g] = s(q, k) − s(q, k′)            (exact)

**Contrast with the pattern-weighted mean** (``relative_to="mean"``)::

    C[a, g] = T_k[a, g] − Σ_{k′} p(k′) T_k′[a, g]
    Σ C = s(k) − E_p[s]                              (exact)

with p the softmax of the head's scores over the row's keys (the model's pattern, renormalized).
It tracks the log-probability through an exact identity: for ``s̃`` the model's (post-softcap)
score, ``log p(k) = (s̃(k) − E_p[s̃]) − H(p)``, H the entropy of the row. Without softcap s̃ = s,
so the terms decompose ``log p(k) + H(p)``; with softcap pass ``capped=True`` to decompose the
capped scores (terms rescaled per key by capped/raw, a convention as in ``capped_terms``).

**Inhibitors**: negative terms at competing keys, ranked by the exact counterfactual effect on the
target's attention if that one term were absent (all else fixed):
``Δ log p(k) = −log(1 + p(k′)(e^{Δs̃(k′)} − 1))`` with ``Δs̃(k′)`` the competitor's score change.

**Components**: the SVD of a term matrix, ``T = Σ_i σ_i u_i v_iᵀ``; component i contributes
``σ_i (Σ_a u_ia)(Σ_b v_ib)`` to the score, and these contributions sum to it exactly.

**Groups**: terms summed over (query group × key group) blocks, by label, kind, any part column,
a callable, or the user's own feature groups; the blocks sum to the score exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from qk_lens.attribution.terms import (
    CompletenessError,
    interaction_kind,
    tolerance,
    top_entries,
)
from qk_lens.bases import PART_COLUMNS, Meta, meta_frame
from qk_lens.checks import check_count, check_index, check_int, renamed
from qk_lens.display import render

if TYPE_CHECKING:
    from qk_lens.attribution.result import QKAttribution, QKAttributions

IDENTITY = ("kind", "layer", "head", "feature", "label")  # a key part's identity across keys

__all__ = [
    "Components",
    "GroupedTerms",
    "QKContrast",
    "components",
    "contrast",
    "contrast_attribution",
    "contrast_row",
    "group_terms",
    "inhibitors",
]


# =========================================================================== helpers
# The result classes build on this module, so it recognizes them by their fields.
def _is_attribution(a: Any) -> bool:
    return all(hasattr(a, f) for f in ("terms", "query_meta", "key_meta", "k_pos", "model_score"))


def _is_row(row: Any) -> bool:
    return hasattr(row, "items") and hasattr(row, "pattern") and hasattr(row, "k_positions")


def _require_attr(name: str, a: Any) -> QKAttribution:
    if not _is_attribution(a):
        raise TypeError(f"{name} must be a QKAttribution, got {type(a).__name__}")
    return a


def _same_query(a: QKAttribution, b: QKAttribution) -> None:
    """Two attributions can be contrasted only if they share head, query and query parts."""
    if (a.layer, a.head, a.q_pos) != (b.layer, b.head, b.q_pos):
        raise ValueError(
            f"contrasted attributions must share layer, head and query position: got "
            f"L{a.layer}H{a.head} q={a.q_pos} and L{b.layer}H{b.head} q={b.q_pos}"
        )
    same = len(a.query_meta["kind"]) == len(b.query_meta["kind"]) and all(
        np.array_equal(a.query_meta[c], b.query_meta[c]) for c in ("kind", "feature", "position")
    )
    if not same:
        raise ValueError(
            "contrasted attributions have different query parts (different query bases?); "
            "compute both with the same query_basis"
        )


def _identities(meta: Meta) -> list[tuple]:
    return list(zip(*(meta[c].tolist() for c in IDENTITY), strict=True))


@dataclass
class _Groups:
    """Union of key-part identities over several keys, and each key's map into it."""

    ids: list[tuple]
    index: list[Tensor]  # per key: group index of each of its key parts

    @classmethod
    def of(cls, metas: list[Meta]) -> _Groups:
        ids: dict[tuple, int] = {}
        index = []
        for m in metas:
            idx = [ids.setdefault(i, len(ids)) for i in _identities(m)]
            index.append(torch.tensor(idx, dtype=torch.long))
        return cls(list(ids), index)

    def meta(self) -> Meta:
        cols = dict(zip(IDENTITY, zip(*self.ids, strict=True), strict=True)) if self.ids else {}
        n = len(self.ids)
        out = {}
        for c in PART_COLUMNS:
            if c in cols:
                dt = object if c in ("kind", "label") else np.int64
                out[c] = np.asarray(cols[c], dtype=dt)
            elif c == "position":
                out[c] = np.full(n, -1, dtype=np.int64)  # a group spans positions
            else:
                out[c] = np.full(n, np.nan)
        return out

    def grouped(self, i: int, terms: Tensor) -> Tensor:
        terms = terms.detach().cpu()
        out = terms.new_zeros(terms.shape[0], len(self.ids))
        return out.index_add_(1, self.index[i], terms)


def _final(score: float, softcap: float | None) -> float:
    return score if softcap is None else softcap * math.tanh(score / softcap)


def _row_probs(row: QKAttributions) -> Float[Tensor, "n_keys"]:
    """softmax of the model's (post-softcap) scores over the row's keys, in float64."""
    s = torch.tensor([a.model_score for a in row.items], dtype=torch.float64)
    return s.softmax(0)


def _check_row_complete(row: QKAttributions) -> None:
    """The mean contrast and inhibitors need every key the head put attention on."""
    attended = set(torch.nonzero(row.pattern > 0)[:, 0].tolist())
    missing = sorted(attended - set(row.k_positions))
    if missing:
        raise ValueError(
            f"the row holds keys {row.k_positions} but the head also attends to {missing[:12]}; "
            "compute the row over every key (k_pos=None)"
        )


def _capped(a: QKAttribution, capped: bool) -> Tensor:
    return a.capped_terms() if capped else a.terms


# =========================================================================== contrast
@dataclass
class QKContrast:
    """Why key ``k_pos`` and not ``other`` (a key position, or ``"mean"``): exact terms.

    ``terms[a, g]`` is query part ``a`` × key group ``g`` (a key part's identity across keys:
    kind, layer, head, feature, label); ``terms.sum() == difference``. ``at_key[g]`` and
    ``at_other[g]`` are group g's contribution (q · k_g) at ``k_pos`` and at the other key (or the
    p-weighted mean). For ``"mean"``, ``weights`` is p over ``keys`` and ``log_prob``/``entropy``
    satisfy ``log_prob = capped difference − entropy`` exactly.
    """

    layer: int
    head: int
    q_pos: int
    k_pos: int
    other: int | str
    terms: Float[Tensor, "n_q n_groups"]
    query_meta: Meta
    key_meta: Meta  # one entry per key group (position −1)
    at_key: Float[Tensor, "n_groups"]
    at_other: Float[Tensor, "n_groups"]
    score: float  # s(q, k) (raw, or capped when capped=True)
    baseline: float  # s(q, k′), or E_p[s]
    model_difference: float  # the same difference from the model's own scores
    capped: bool = False
    keys: list[int] | None = None
    weights: Float[Tensor, "n_keys"] | None = None
    log_prob: float | None = None
    entropy: float | None = None
    scale: float = 1.0
    q_token: str | None = None
    k_token: str | None = None
    other_token: str | None = None
    model_advantage: float | None = None  # s̃(k) − E_p[s̃] from the model's scores (mean only)

    @property
    def difference(self) -> float:
        """Σ terms: s(q, k) − s(q, k′) (or − E_p[s])."""
        return float(self.terms.sum())

    @property
    def tolerance(self) -> float:
        return tolerance(self.terms.dtype, self.scale)

    def check(self, tolerance: float | None = None) -> float:
        """Raise CompletenessError unless Σ terms equals the difference of the model's scores."""
        tol = self.tolerance if tolerance is None else tolerance
        err = abs(self.difference - self.model_difference)
        if self.log_prob is not None:
            # log p(k) = capped advantage − H(p), from the model's own scores
            err = max(err, abs(self.model_advantage - self.entropy - self.log_prob))
        if not err <= tol:
            raise CompletenessError(
                f"contrast L{self.layer}H{self.head} q={self.q_pos} k={self.k_pos} vs "
                f"{self.other}: Σ terms = {self.difference!r}, model difference = "
                f"{self.model_difference!r} (|Δ| = {err:.3g}, tolerance {tol:.3g})"
            )
        return err

    # ------------------------------------------------------------------ tables
    @property
    def query_parts(self) -> pd.DataFrame:
        return meta_frame(self.query_meta)

    @property
    def key_groups(self) -> pd.DataFrame:
        """One row per key group: identity, contribution at k, at the other key, difference."""
        out = meta_frame(self.key_meta).drop(columns=["position", "activation"])
        out["at_key"] = self.at_key.double().numpy()
        out["at_other"] = self.at_other.double().numpy()
        out["difference"] = out["at_key"] - out["at_other"]
        return out

    def key_marginals(self) -> pd.DataFrame:
        """Key groups by |difference| (their summed terms over all query parts)."""
        out = self.key_groups
        return out.reindex(out["difference"].abs().sort_values(ascending=False).index)

    def query_marginals(self) -> pd.DataFrame:
        """Each query part's share of the difference (q_a · (k − k′)), by |value|."""
        out = self.query_parts.copy()
        out["marginal"] = self.terms.sum(1).double().numpy()
        return out.reindex(out["marginal"].abs().sort_values(ascending=False).index)

    def _pair_frame(self, qi: np.ndarray, gi: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        cols = ["kind", "position", "layer", "head", "feature", "activation", "label"]
        data = {f"q_{c}": self.query_meta[c][qi] for c in cols}
        data.update(
            {f"k_{c}": self.key_meta[c][gi] for c in ("kind", "layer", "head", "feature", "label")}
        )
        out = pd.DataFrame(data)
        out["term"] = values
        d = self.difference
        out["share"] = values / d if d != 0 else np.nan
        out["interaction"] = interaction_kind(out["q_kind"].to_numpy(), out["k_kind"].to_numpy())
        return out

    @renamed(k="top_k")
    def figure(self, top_k: int = 12) -> Any:
        """A plotly bar chart of the ``top_k`` key groups by |difference|: each one's
        contribution at the key, at the other, and the difference."""
        other = self.other if isinstance(self.other, str) else f"k={self.other}"
        title = (
            f"L{self.layer}H{self.head}, q={self.q_pos}: k={self.k_pos} vs {other}, "
            f"{self.score:.4g} − {self.baseline:.4g} = {self.difference:.4g}"
        )
        return render("figure.contrast", self.key_marginals(), title, check_count("top_k", top_k))

    def top(self, top_k: int = 10, sign: str = "abs") -> pd.DataFrame:
        """The ``top_k`` largest contrast terms (``sign="pos"``: for k, ``"neg"``: for the other)."""
        rows, cols, values = top_entries(self.terms, check_count("top_k", top_k), sign)
        return self._pair_frame(rows, cols, values)

    def frame(self) -> pd.DataFrame:
        """Every term as a row (n_q × n_groups)."""
        n_q, n_g = self.terms.shape
        qi, gi = np.divmod(np.arange(n_q * n_g), n_g)
        return self._pair_frame(qi, gi, self.terms.reshape(-1).double().numpy())

    def components(self, rank: int | None = None) -> Components:
        """The contrast's term matrix as a few query × key-group components (its SVD)."""
        return components(self, rank)

    def group(self, query_by: GroupSpec = "label", key_by: GroupSpec = "label") -> GroupedTerms:
        """Contrast terms summed per (query group, key group); see :func:`group_terms`."""
        return group_terms(self, query_by, key_by)

    def __repr__(self) -> str:
        extra = ""
        if self.log_prob is not None:
            extra = f", log p(k)={self.log_prob:.4g}, H={self.entropy:.4g}"
        return (
            f"QKContrast(L{self.layer}H{self.head}, q={self.q_pos}, k={self.k_pos} vs "
            f"{self.other}: {self.score:.4g} − {self.baseline:.4g} = {self.difference:.4g}"
            f"{extra}, terms={tuple(self.terms.shape)})"
        )


def contrast(a: QKAttribution, b: QKAttribution, capped: bool = False) -> QKContrast:
    """Exact decomposition of ``a.score − b.score`` (same head and query, two keys)."""
    _require_attr("a", a)
    _require_attr("b", b)
    _same_query(a, b)
    groups = _Groups.of([a.key_meta, b.key_meta])
    ta, tb = groups.grouped(0, _capped(a, capped)), groups.grouped(1, _capped(b, capped))
    sa = a.capped_score if capped else a.score
    sb = b.capped_score if capped else b.score
    model_diff = (
        (a.model_score - b.model_score) if capped else (a.model_raw_score - b.model_raw_score)
    )
    return QKContrast(
        layer=a.layer,
        head=a.head,
        q_pos=a.q_pos,
        k_pos=a.k_pos,
        other=b.k_pos,
        terms=ta - tb,
        query_meta=a.query_meta,
        key_meta=groups.meta(),
        at_key=ta.sum(0),
        at_other=tb.sum(0),
        score=sa,
        baseline=sb,
        model_difference=model_diff,
        capped=capped,
        scale=a.scale + b.scale,
        q_token=a.q_token,
        k_token=a.k_token,
        other_token=b.k_token,
    )


def contrast_row(
    row: QKAttributions,
    k_pos: int,
    other: int | None = None,
    relative_to: str | None = None,
    capped: bool = False,
) -> QKContrast:
    """Contrast key ``k_pos`` of a row with key ``other`` or with ``relative_to="mean"``."""
    if not _is_row(row):
        raise TypeError(f"row must be a QKAttributions, got {type(row).__name__}")
    if (other is None) == (relative_to is None):
        raise ValueError("give exactly one of other=<key position> or relative_to='mean'")
    a = row[k_pos]
    if other is not None:
        return contrast(a, row[other], capped=capped)
    if relative_to != "mean":
        raise ValueError(f"relative_to must be 'mean', got {relative_to!r}")
    _check_row_complete(row)
    for b in row.items:
        _same_query(a, b)
    p = _row_probs(row)
    groups = _Groups.of([b.key_meta for b in row.items])
    i = row.items.index(a)
    grouped = [groups.grouped(j, _capped(b, capped)) for j, b in enumerate(row.items)]
    mean = sum(float(p[j]) * g for j, g in enumerate(grouped))
    scores = [b.capped_score if capped else b.score for b in row.items]
    model_raw = torch.tensor([b.model_raw_score for b in row.items], dtype=torch.float64)
    model_final = torch.tensor([b.model_score for b in row.items], dtype=torch.float64)
    model_scores = model_final if capped else model_raw
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
    adv_final = float(model_final[i] - (p * model_final).sum())
    return QKContrast(
        layer=a.layer,
        head=a.head,
        q_pos=a.q_pos,
        k_pos=a.k_pos,
        other="mean",
        terms=grouped[i] - mean,
        query_meta=a.query_meta,
        key_meta=groups.meta(),
        at_key=grouped[i].sum(0),
        at_other=mean.sum(0),
        score=scores[i],
        baseline=float(sum(float(p[j]) * s for j, s in enumerate(scores))),
        model_difference=float(model_scores[i] - (p * model_scores).sum()),
        capped=capped,
        keys=row.k_positions,
        weights=p,
        log_prob=float(p[i].log()),
        entropy=entropy,
        scale=2 * max(b.scale for b in row.items),
        q_token=a.q_token,
        k_token=a.k_token,
        other_token=None,
        model_advantage=adv_final,
    )


def contrast_attribution(
    attr: QKAttribution,
    other: QKAttribution | int | None = None,
    relative_to: str | None = None,
    capped: bool = False,
    model: Any = None,
    prompt: Any = None,
) -> QKContrast:
    """``attr.contrast(other)`` / ``attr.contrast(relative_to="mean")``.

    ``other`` a QKAttribution needs nothing else. A key position, or ``relative_to="mean"``,
    needs the other keys' attributions: they are computed as ``attr`` was (``attr.source``), on
    ``model`` / ``prompt`` when given, else on the model and prompt ``attr`` came from.
    """
    _require_attr("attr", attr)
    if _is_attribution(other):
        if relative_to is not None:
            raise ValueError("give either other or relative_to, not both")
        return contrast(attr, other, capped=capped)
    if (other is None) == (relative_to is None):
        raise ValueError(
            "give exactly one of other (a key position or QKAttribution) or relative_to='mean'"
        )
    if relative_to is not None and relative_to != "mean":
        raise ValueError(f"relative_to must be 'mean', got {relative_to!r}")
    source = getattr(attr, "source", None)
    if source is None:
        raise ValueError(
            "this attribution does not know its model and prompt (it was loaded from a file); "
            "compute the other key with model.qk_attribution(...) and pass it as other, or use "
            "row.contrast(...) on a model.qk_attribution(..., k_pos=None) row"
        )
    model, prompt = source.resolve(model, prompt)
    kwargs = {
        "query_basis": attr.meta.get("query_basis", "dictionary"),
        "key_basis": attr.meta.get("key_basis", "dictionary"),
    }
    if relative_to == "mean":
        row = source.compute(model, prompt, attr.layer, attr.head, attr.q_pos, None, **kwargs)
        _same_query(attr, row[attr.k_pos])
        return contrast_row(row, attr.k_pos, relative_to="mean", capped=capped)
    b = source.compute(model, prompt, attr.layer, attr.head, attr.q_pos, other, **kwargs)
    return contrast(attr, b, capped=capped)


# =========================================================================== inhibitors
@renamed(top="top_k")
def inhibitors(
    row: QKAttributions,
    k_pos: int | None = None,
    top_k: int = 10,
    level: str = "term",
) -> pd.DataFrame:
    """The strongest negative terms at competing keys, ranked by what they do for ``k_pos``.

    For every key k′ ≠ ``k_pos`` (default: the key the head attends to most) and every negative
    term (``level="term"``), key-part marginal (``"key"``: q · k′_b) or query-part marginal
    (``"query"``: q_a · k′), the exact counterfactual with that contribution removed and all else
    fixed: the competitor's score rises by |term| (through softcap if any), and
    ``delta_log_p_target = −log(1 + p(k′)(e^{Δs̃} − 1))`` is what the target would lose.
    Rows are sorted by that loss (largest first): the contributions that most protect the target.
    """
    if not _is_row(row):
        raise TypeError(f"row must be a QKAttributions, got {type(row).__name__}")
    if level not in ("term", "key", "query"):
        raise ValueError(f"level must be 'term', 'key' or 'query', got {level!r}")
    top_k = check_count("top_k", top_k)
    _check_row_complete(row)
    p = _row_probs(row)
    if k_pos is None:
        i_t = int(p.argmax())
    else:
        i_t = row.items.index(row[k_pos])
    target = row.items[i_t]
    frames = []
    for j, a in enumerate(row.items):
        if j == i_t:
            continue
        t = a.terms.detach().double().cpu()
        if level == "term":
            values = t.reshape(-1)
        elif level == "key":
            values = t.sum(0)
        else:
            values = t.sum(1)
        neg = values < 0
        if not neg.any():
            continue
        n = min(top_k, int(neg.sum()))
        vals, idx = torch.topk(-values.masked_fill(~neg, 0.0), n)
        vals = -vals
        raw = a.score
        final = _final(raw, a.softcap)
        d_final = np.array([_final(raw - float(v), a.softcap) - final for v in vals])
        pj = float(p[j])
        growth = 1.0 + pj * np.expm1(d_final)
        rows = {
            "k_pos": a.k_pos,
            "k_token": a.k_token,
            "term": vals.numpy(),
            "competitor_prob": pj,
            "competitor_prob_without": pj * np.exp(d_final) / growth,
            "target_prob": float(p[i_t]),
            "target_prob_without": float(p[i_t]) / growth,
            "delta_log_p_target": -np.log(growth),
        }
        idx_np = idx.numpy()
        if level == "term":
            n_k = t.shape[1]
            qi, ki = idx_np // n_k, idx_np % n_k
        elif level == "key":
            qi, ki = None, idx_np
        else:
            qi, ki = idx_np, None
        df = pd.DataFrame(rows)
        for c in ("kind", "feature", "label"):
            if qi is not None:
                df[f"q_{c}"] = a.query_meta[c][qi]
            if ki is not None:
                df[f"k_{c}"] = a.key_meta[c][ki]
        frames.append(df)
    if not frames:
        return pd.DataFrame(
            columns=["k_pos", "k_token", "term", "delta_log_p_target", "target_prob_without"]
        )
    out = pd.concat(frames, ignore_index=True)
    out = out.sort_values("delta_log_p_target", kind="stable").head(top_k).reset_index(drop=True)
    out.attrs["target"] = target.k_pos
    return out


# =========================================================================== components
def _terms_of(obj: Any) -> tuple[Tensor, Meta, Meta]:
    for name in ("terms", "query_meta", "key_meta"):
        if not hasattr(obj, name):
            raise TypeError(
                f"expected a QKAttribution or QKContrast (terms, query_meta, key_meta), got "
                f"{type(obj).__name__}"
            )
    return obj.terms, obj.query_meta, obj.key_meta


@dataclass
class Components:
    """A term matrix as a few query-side × key-side feature components (its SVD).

    ``terms ≈ Σ_i strengths[i] · query_loadings[:, i] ⊗ key_loadings[:, i]`` (exact with every
    component). ``score_contributions[i] = σ_i (Σ_a u_ia)(Σ_b v_ib)``: they sum to the score over
    all components. Signs: each component's query loadings sum to ≥ 0.
    """

    strengths: Float[Tensor, "r"]
    query_loadings: Float[Tensor, "n_q r"]
    key_loadings: Float[Tensor, "n_k r"]
    score_contributions: Float[Tensor, "r"]
    all_strengths: Float[Tensor, "full"]  # every singular value (for energy shares)
    score: float
    query_meta: Meta
    key_meta: Meta

    @property
    def rank(self) -> int:
        return len(self.strengths)

    def explained(self) -> Float[Tensor, "r"]:
        """Cumulative fraction of the score the first i + 1 components carry."""
        return (
            self.score_contributions.cumsum(0) / self.score
            if self.score != 0
            else torch.full_like(self.score_contributions, float("nan"))
        )

    def energy(self) -> Float[Tensor, "r"]:
        """Fraction of Σ terms² (Frobenius) each component carries."""
        total = (self.all_strengths**2).sum()
        return self.strengths**2 / total if total > 0 else torch.zeros_like(self.strengths)

    def reconstruct(self, rank: int | None = None) -> Float[Tensor, "n_q n_k"]:
        r = self.rank if rank is None else check_int("rank", rank, 1, self.rank)
        u, s, v = self.query_loadings[:, :r], self.strengths[:r], self.key_loadings[:, :r]
        return torch.einsum("a i, i, b i -> a b", u, s, v)

    def _top_labels(self, meta: Meta, loadings: Tensor, n: int = 3) -> str:
        idx = loadings.abs().argsort(descending=True)[:n].numpy()
        return "; ".join(f"{_part_name(meta, int(i))} ({float(loadings[i]):+.2f})" for i in idx)

    def frame(self) -> pd.DataFrame:
        """One row per component: strength, score contribution and share, energy, top parts."""
        expl = self.explained().numpy()
        energy = self.energy().numpy()
        rows = []
        for i in range(self.rank):
            c = float(self.score_contributions[i])
            rows.append(
                {
                    "component": i,
                    "strength": float(self.strengths[i]),
                    "score_contribution": c,
                    "share_of_score": c / self.score if self.score != 0 else np.nan,
                    "cumulative_share": float(expl[i]),
                    "energy_share": float(energy[i]),
                    "top_query_parts": self._top_labels(self.query_meta, self.query_loadings[:, i]),
                    "top_key_parts": self._top_labels(self.key_meta, self.key_loadings[:, i]),
                }
            )
        return pd.DataFrame(rows)

    @renamed(k="top_k")
    def query_parts(self, component: int = 0, top_k: int = 10) -> pd.DataFrame:
        """The ``top_k`` query parts by |loading| on ``component``, with their share of its score
        contribution."""
        return self._side(self.query_meta, self.query_loadings, self.key_loadings, component, top_k)

    @renamed(k="top_k")
    def key_parts(self, component: int = 0, top_k: int = 10) -> pd.DataFrame:
        """The ``top_k`` key parts by |loading| on ``component``, with their share of its score
        contribution."""
        return self._side(self.key_meta, self.key_loadings, self.query_loadings, component, top_k)

    def _side(self, meta: Meta, load: Tensor, other: Tensor, i: int, k: int) -> pd.DataFrame:
        i = check_index("component", i, self.rank, "components")
        k = check_count("top_k", k)
        out = meta_frame(meta)
        out["loading"] = load[:, i].numpy()
        # part a's share of component i's score contribution: σ_i u_ia Σ_b v_ib
        out["contribution"] = (self.strengths[i] * load[:, i] * other[:, i].sum()).numpy()
        order = out["loading"].abs().sort_values(ascending=False).index[:k]
        return out.reindex(order)

    def __repr__(self) -> str:
        expl = self.explained()
        last = float(expl[-1]) if len(expl) else float("nan")
        return f"Components(rank={self.rank}, score={self.score:.4g}, explained={last:.3f})"


def _part_name(meta: Meta, i: int) -> str:
    label = meta["label"][i]
    if isinstance(label, str) and label:
        return label
    if meta["kind"][i] == "feature":
        return f"feature {meta['feature'][i]}"
    return str(meta["kind"][i])


def components(obj: Any, rank: int | None = None) -> Components:
    """SVD of the term matrix of a QKAttribution or QKContrast into ``rank`` components."""
    terms, qm, km = _terms_of(obj)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    t = terms.detach().double().cpu()
    U, S, Vh = torch.linalg.svd(t, full_matrices=False)
    V = Vh.T
    # deterministic signs: each component's query loadings sum to ≥ 0 (ties: largest |u| > 0)
    su = U.sum(0)
    big = U.gather(0, U.abs().argmax(0, keepdim=True))[0]
    flip = torch.where(su.abs() > 1e-12 * U.abs().sum(0).clamp_min(1e-300), su.sign(), big.sign())
    flip = torch.where(flip == 0, torch.ones_like(flip), flip)
    U, V = U * flip, V * flip
    r = len(S) if rank is None else min(rank, len(S))
    contrib = S * U.sum(0) * V.sum(0)
    return Components(
        strengths=S[:r],
        query_loadings=U[:, :r],
        key_loadings=V[:, :r],
        score_contributions=contrib[:r],
        all_strengths=S,
        score=float(t.sum()),
        query_meta=qm,
        key_meta=km,
    )


# =========================================================================== groups
GroupSpec = str | Callable[[dict[str, Any]], Any] | Mapping[str, Iterable[int | str]]


def _group_names(meta: Meta, by: GroupSpec, side: str) -> list[str]:
    n = len(meta["kind"])
    rows = [{c: meta[c][i] for c in PART_COLUMNS} for i in range(n)]
    if isinstance(by, Mapping):
        # the user's feature groups: feature ids or labels; everything else by kind
        lookup: dict[Any, str] = {}
        for name, members in by.items():
            if isinstance(members, (str, bytes)) or not isinstance(members, Iterable):
                raise TypeError(
                    f"{side}_by[{name!r}] must be a list of feature ids or labels, got "
                    f"{type(members).__name__}"
                )
            for m in members:
                if isinstance(m, bool) or not isinstance(m, (int, np.integer, str)):
                    raise TypeError(f"{side}_by[{name!r}] holds {m!r}: use feature ids or labels")
                lookup[int(m) if not isinstance(m, str) else m] = str(name)
        out = []
        for r in rows:
            if r["kind"] == "feature":
                g = lookup.get(int(r["feature"]), lookup.get(r["label"], "other features"))
            else:
                g = str(r["kind"])
            out.append(g)
        return out
    if callable(by):
        return [str(by(r)) for r in rows]
    if by == "label":
        return [_part_name(meta, i) for i in range(n)]
    if by in PART_COLUMNS:
        return [str(r[by]) for r in rows]
    raise ValueError(
        f"{side}_by must be 'label', a part column ({', '.join(PART_COLUMNS)}), a callable "
        f"(part row dict -> group name) or a dict {{group name: feature ids or labels}}; got {by!r}"
    )


@dataclass
class GroupedTerms:
    """Terms summed over (query group × key group) blocks; ``terms.sum()`` is the score."""

    terms: Float[Tensor, "n_qg n_kg"]
    query_groups: list[str]
    key_groups: list[str]
    query_counts: list[int]
    key_counts: list[int]

    @property
    def score(self) -> float:
        return float(self.terms.sum())

    def matrix(self) -> pd.DataFrame:
        """Query groups × key groups."""
        return pd.DataFrame(
            self.terms.double().numpy(), index=self.query_groups, columns=self.key_groups
        )

    def frame(self) -> pd.DataFrame:
        """One row per block, by |term|: query group, key group, term, share of the score."""
        n_q, n_k = self.terms.shape
        qi, ki = np.divmod(np.arange(n_q * n_k), n_k)
        values = self.terms.reshape(-1).double().numpy()
        out = pd.DataFrame(
            {
                "q_group": np.asarray(self.query_groups, dtype=object)[qi],
                "k_group": np.asarray(self.key_groups, dtype=object)[ki],
                "term": values,
                "n_q_parts": np.asarray(self.query_counts)[qi],
                "n_k_parts": np.asarray(self.key_counts)[ki],
            }
        )
        s = self.score
        out["share"] = values / s if s != 0 else np.nan
        return out.reindex(out["term"].abs().sort_values(ascending=False).index).reset_index(
            drop=True
        )

    @renamed(k="top_k")
    def top(self, top_k: int = 10) -> pd.DataFrame:
        """The ``top_k`` largest blocks."""
        return self.frame().head(check_count("top_k", top_k))

    def __repr__(self) -> str:
        return (
            f"GroupedTerms({len(self.query_groups)} query groups × {len(self.key_groups)} key "
            f"groups, score={self.score:.4g})"
        )


def group_terms(
    obj: Any, query_by: GroupSpec = "label", key_by: GroupSpec = "label"
) -> GroupedTerms:
    """Marginal terms per (query group, key group) of a QKAttribution or QKContrast.

    ``*_by``: ``"label"`` (the part's label; unlabelled features as ``feature N``, other parts
    by kind), any part column (``"kind"``, ``"feature"``, ``"layer"``, ...), a callable taking a
    part's row dict and returning its group, or ``{group name: [feature ids or labels]}`` (other
    features → ``"other features"``, non-feature parts by kind).
    """
    terms, qm, km = _terms_of(obj)
    terms = terms.detach().cpu()
    qn = _group_names(qm, query_by, "query")
    kn = _group_names(km, key_by, "key")
    q_groups = list(dict.fromkeys(qn))
    k_groups = list(dict.fromkeys(kn))
    qi = torch.tensor([q_groups.index(g) for g in qn], dtype=torch.long)
    ki = torch.tensor([k_groups.index(g) for g in kn], dtype=torch.long)
    t = terms.new_zeros(len(q_groups), terms.shape[1]).index_add_(0, qi, terms)
    t = t.new_zeros(len(q_groups), len(k_groups)).index_add_(1, ki, t)
    return GroupedTerms(
        terms=t,
        query_groups=q_groups,
        key_groups=k_groups,
        query_counts=torch.bincount(qi, minlength=len(q_groups)).tolist(),
        key_counts=torch.bincount(ki, minlength=len(k_groups)).tolist(),
    )
