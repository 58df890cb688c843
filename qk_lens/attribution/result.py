"""QK attributions: a head's score at (q, k) as a sum of query-part × key-part terms.

``terms[a, b] = q_a · k_b`` with ``q_a`` already divided by ``attn_scale``; the terms sum to the
model's raw (pre-softcap) score (docs/contract.md). These are the result objects; the
computation is in :mod:`qk_lens.attribution.compute`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from qk_lens.attribution.contrast import (
    Components,
    GroupedTerms,
    QKContrast,
    components,
    contrast_attribution,
    contrast_row,
    group_terms,
    inhibitors,
)
from qk_lens.attribution.terms import (
    INTERACTIONS,
    AttributionSource,
    CompletenessError,
    interaction_kind,
    tolerance,
    top_entries,
)
from qk_lens.bases import PART_COLUMNS, Meta, meta_frame, part_meta
from qk_lens.checks import as_int, check_count, renamed
from qk_lens.files import atomic_path, write_text


@dataclass
class QKAttribution:
    """Why head ``head`` of ``layer`` scored key ``k_pos`` from query ``q_pos`` as it did.

    ``terms[a, b]`` is the interaction of query part ``a`` (a row of ``query_parts``) with key
    part ``b`` (a row of ``key_parts``); ``terms.sum() == score``, the raw pre-softcap score.
    ``model_score`` is what ``hook_attn_scores`` holds (after softcap / ALiBi), ``prob`` the
    pattern value.
    """

    layer: int
    head: int
    q_pos: int
    k_pos: int
    terms: Float[Tensor, "n_q n_k"]
    query_meta: Meta
    key_meta: Meta
    query_vectors: Float[Tensor, "n_q d_head"]
    key_vectors: Float[Tensor, "n_k d_head"]
    model_raw_score: float
    model_score: float
    prob: float
    softcap: float | None = None
    scale: float = 1.0  # ‖q‖·‖k‖/attn_scale (+|ALiBi|): the magnitude float32 rounding scales with
    q_token: str | None = None
    k_token: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # set when computed from a model: lets contrast() fetch other keys of the same row; not saved
    source: AttributionSource | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ the parts
    @cached_property
    def query_parts(self) -> pd.DataFrame:
        """One row per query part: kind, layer, head, position, feature, activation, label."""
        return meta_frame(self.query_meta)

    @cached_property
    def key_parts(self) -> pd.DataFrame:
        """One row per key part: kind, layer, head, position, feature, activation, label."""
        return meta_frame(self.key_meta)

    # ------------------------------------------------------------------ the numbers
    @property
    def score(self) -> float:
        """The raw (pre-softcap) score: the sum of the terms."""
        return float(self.terms.sum())

    @property
    def capped_score(self) -> float:
        """``cap·tanh(score/cap)`` under softcap, else the score."""
        if self.softcap is None:
            return self.score
        return float(self.softcap * np.tanh(self.score / self.softcap))

    def capped_terms(self) -> Float[Tensor, "n_q n_k"]:
        """Terms rescaled by capped/raw so that they sum to the (softcapped) model score.

        Softcap is not bilinear; this proportional view is a convention, reported as such.
        """
        s = self.score
        return self.terms * (self.capped_score / s if s != 0 else 1.0)

    @property
    def tolerance(self) -> float:
        return tolerance(self.terms.dtype, self.scale)

    def check(self, tolerance: float | None = None) -> float:
        """Raise :class:`CompletenessError` unless the terms sum to the model's own scores.

        Checks Σ terms against the raw score read from the model's hooks, and the (softcapped)
        sum against ``hook_attn_scores``. Returns the larger absolute error.
        """
        tol = self.tolerance if tolerance is None else tolerance
        err_raw = abs(self.score - self.model_raw_score)
        err_final = abs(self.capped_score - self.model_score)
        err = max(err_raw, err_final)
        if not err <= tol:
            raise CompletenessError(
                f"L{self.layer}H{self.head} q={self.q_pos} k={self.k_pos}: Σ terms = {self.score!r} "
                f"but the model's raw score is {self.model_raw_score!r} (|Δ| = {err_raw:.3g}) and "
                f"its hook_attn_scores value is {self.model_score!r} (|Δ| = {err_final:.3g}); "
                f"tolerance {tol:.3g}"
            )
        return err

    # ------------------------------------------------------------------ tables
    def _pair_frame(self, qi: np.ndarray, ki: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        cols = ["kind", "position", "layer", "head", "feature", "activation", "label"]
        data = {f"q_{c}": self.query_meta[c][qi] for c in cols}
        data.update({f"k_{c}": self.key_meta[c][ki] for c in cols})
        out = pd.DataFrame(data)
        out["term"] = values
        score = self.score
        out["share"] = values / score if score != 0 else np.nan
        out["interaction"] = interaction_kind(out["q_kind"].to_numpy(), out["k_kind"].to_numpy())
        return out

    @renamed(k="top_k")
    def top(self, top_k: int = 10, sign: str = "abs") -> pd.DataFrame:
        """The ``top_k`` largest interactions (by |term|, or ``sign="pos"/"neg"``), both labels
        side by side."""
        rows, cols, values = top_entries(self.terms, check_count("top_k", top_k), sign)
        return self._pair_frame(rows, cols, values).reset_index(drop=True)

    def frame(self) -> pd.DataFrame:
        """Every term as a row (n_q × n_k rows)."""
        n_q, n_k = self.terms.shape
        qi, ki = np.divmod(np.arange(n_q * n_k), n_k)
        return self._pair_frame(qi, ki, self.terms.reshape(-1).to(torch.float64).numpy())

    def to_frame(self) -> pd.DataFrame:
        """Deprecated name of :meth:`frame`."""
        warnings.warn(
            "QKAttribution.to_frame() is deprecated; use .frame()", DeprecationWarning, stacklevel=2
        )
        return self.frame()

    def query_marginals(self) -> pd.DataFrame:
        """Each query part's total over all key parts (= q_a · k), sorted by |value|."""
        out = self.query_parts.copy()
        out["marginal"] = self.terms.sum(1).to(torch.float64).numpy()
        return out.reindex(out["marginal"].abs().sort_values(ascending=False).index)

    def key_marginals(self) -> pd.DataFrame:
        """Each key part's total over all query parts (= q · k_b), sorted by |value|."""
        out = self.key_parts.copy()
        out["marginal"] = self.terms.sum(0).to(torch.float64).numpy()
        return out.reindex(out["marginal"].abs().sort_values(ascending=False).index)

    def contrast(
        self,
        other: Any = None,
        relative_to: str | None = None,
        capped: bool = False,
        model: Any = None,
        prompt: Any = None,
    ) -> QKContrast:
        """Why this key and not ``other`` (a key position or another QKAttribution of the same
        query): an exact decomposition of s(q,k) − s(q,k′); ``relative_to="mean"`` against the
        pattern-weighted mean over keys. See :func:`qk_lens.attribution.contrast.contrast_attribution`."""
        return contrast_attribution(self, other, relative_to, capped, model, prompt)

    def components(self, rank: int | None = None) -> Components:
        """SVD of the term matrix: a few query-side × key-side components that sum to the score."""
        return components(self, rank)

    def group(self, query_by: Any = "label", key_by: Any = "label") -> GroupedTerms:
        """Terms summed per (query group, key group): by label, a part column, or your groups."""
        return group_terms(self, query_by, key_by)

    def coverage(self) -> pd.DataFrame:
        """How much of the score each kind of interaction carries.

        Rows: ``feature × feature``, ``error`` (any term touching an error part), ``bias`` (touching
        a dictionary/attention bias and no error), ``other`` (e.g. upstream components). Columns:
        the summed terms, their share of the score, and their share of Σ|terms|. A dictionary
        explains a score well when feature × feature carries most of both.
        """
        q_kind = self.query_meta["kind"]
        k_kind = self.key_meta["kind"]
        kinds = interaction_kind(
            q_kind[:, None].repeat(len(k_kind), 1),
            np.broadcast_to(k_kind, (len(q_kind), len(k_kind))),
        )
        t = self.terms.to(torch.float64).numpy()
        total_abs = np.abs(t).sum()
        score = t.sum()
        rows = []
        for name in INTERACTIONS:
            m = kinds == name
            s = t[m].sum()
            rows.append(
                {
                    "interaction": name,
                    "sum": s,
                    "share_of_score": s / score if score != 0 else np.nan,
                    "share_of_abs": np.abs(t[m]).sum() / total_abs if total_abs > 0 else np.nan,
                    "n_terms": int(m.sum()),
                }
            )
        return pd.DataFrame(rows).set_index("interaction")

    def __repr__(self) -> str:
        tok = ""
        if self.q_token is not None:
            tok = f" ({self.q_token!r} → {self.k_token!r})"
        return (
            f"QKAttribution(L{self.layer}H{self.head}, q={self.q_pos}, k={self.k_pos}{tok}, "
            f"score={self.score:.4g}, model_score={self.model_score:.4g}, prob={self.prob:.3g}, "
            f"terms={tuple(self.terms.shape)})"
        )

    # ------------------------------------------------------------------ files (no pickle)
    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (tensors) and ``path.json`` (tables and scalars); returns
        the ``.json`` path (``QKAttribution.load`` takes either)."""
        path = Path(path)
        with atomic_path(path.with_suffix(".safetensors")) as tmp:
            save_file(
                {
                    "terms": self.terms.contiguous(),
                    "query_vectors": self.query_vectors.contiguous(),
                    "key_vectors": self.key_vectors.contiguous(),
                },
                str(tmp),
            )
        info = {
            "format": "qk_lens.QKAttribution/1",
            "layer": self.layer,
            "head": self.head,
            "q_pos": self.q_pos,
            "k_pos": self.k_pos,
            "model_raw_score": self.model_raw_score,
            "model_score": self.model_score,
            "prob": self.prob,
            "softcap": self.softcap,
            "scale": self.scale,
            "q_token": self.q_token,
            "k_token": self.k_token,
            "meta": self.meta,
            "query_parts": {c: v.tolist() for c, v in self.query_meta.items()},
            "key_parts": {c: v.tolist() for c, v in self.key_meta.items()},
        }
        return write_text(path.with_suffix(".json"), json.dumps(info, default=_json_default))

    @classmethod
    def load(cls, path: str | Path) -> QKAttribution:
        path = Path(path)
        js, st = path.with_suffix(".json"), path.with_suffix(".safetensors")
        for f in (js, st):
            if not f.exists():
                raise FileNotFoundError(
                    f"{f} does not exist (a saved QKAttribution is a .json + .safetensors pair)"
                )
        try:
            info = json.loads(js.read_text())
            tensors = load_file(str(st))
        except Exception as e:  # corrupt files: say which and why
            raise ValueError(f"could not read saved QKAttribution at {path}: {e}") from e
        if info.get("format") != "qk_lens.QKAttribution/1":
            raise ValueError(f"{js} is not a saved QKAttribution (format={info.get('format')!r})")
        try:
            qp = part_meta(*(info["query_parts"][c] for c in PART_COLUMNS))
            kp = part_meta(*(info["key_parts"][c] for c in PART_COLUMNS))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{js}: part tables are malformed ({e})") from e
        terms = tensors["terms"]
        if terms.shape != (len(qp["kind"]), len(kp["kind"])):
            raise ValueError(
                f"{st}: terms shape {tuple(terms.shape)} does not match the part tables"
            )
        return cls(
            layer=info["layer"],
            head=info["head"],
            q_pos=info["q_pos"],
            k_pos=info["k_pos"],
            terms=terms,
            query_meta=qp,
            key_meta=kp,
            query_vectors=tensors["query_vectors"],
            key_vectors=tensors["key_vectors"],
            model_raw_score=info["model_raw_score"],
            model_score=info["model_score"],
            prob=info["prob"],
            softcap=info["softcap"],
            scale=info["scale"],
            q_token=info["q_token"],
            k_token=info["k_token"],
            meta=info["meta"],
        )


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if np.isnan(o) else float(o)
    raise TypeError(f"cannot serialize {type(o).__name__}")


@dataclass
class QKAttributions:
    """QK attributions of one query against several keys (per-key access, the pattern row)."""

    layer: int
    head: int
    q_pos: int
    items: list[QKAttribution]
    pattern: Float[Tensor, "n_keys_in_row"]  # the head's whole pattern row at q_pos (masked = 0)

    @property
    def k_positions(self) -> list[int]:
        return [a.k_pos for a in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[QKAttribution]:
        return iter(self.items)

    def __getitem__(self, k_pos: int) -> QKAttribution:
        k_pos = as_int("k_pos", k_pos, "an int key position")
        for a in self.items:
            if a.k_pos == k_pos:
                return a
        if k_pos < 0 and len(self.pattern) + k_pos in self.k_positions:
            return self[len(self.pattern) + k_pos]
        raise KeyError(f"key position {k_pos} is not among the attributed keys {self.k_positions}")

    @property
    def scores(self) -> Float[Tensor, "n_keys"]:
        return torch.tensor([a.score for a in self.items], dtype=torch.float64)

    @property
    def probs(self) -> Float[Tensor, "n_keys"]:
        return torch.tensor([a.prob for a in self.items], dtype=torch.float64)

    def stacked_terms(
        self,
    ) -> tuple[Float[Tensor, "n_keys n_q max_k"], Bool[Tensor, "n_keys max_k"]]:
        """All keys' term matrices padded to a common number of key parts, with the mask."""
        n_max = max(a.terms.shape[1] for a in self.items)
        n_q = self.items[0].terms.shape[0]
        out = self.items[0].terms.new_zeros(len(self.items), n_q, n_max)
        mask = torch.zeros(len(self.items), n_max, dtype=torch.bool)
        for i, a in enumerate(self.items):
            out[i, :, : a.terms.shape[1]] = a.terms
            mask[i, : a.terms.shape[1]] = True
        return out, mask

    def check(self, tolerance: float | None = None) -> float:
        """Every key's :meth:`QKAttribution.check`; returns the largest error."""
        return max(a.check(tolerance) for a in self.items)

    def summary(self) -> pd.DataFrame:
        """One row per key: position, token, score, model score, probability."""
        return pd.DataFrame(
            {
                "k_pos": [a.k_pos for a in self.items],
                "k_token": [a.k_token for a in self.items],
                "score": [a.score for a in self.items],
                "model_score": [a.model_score for a in self.items],
                "prob": [a.prob for a in self.items],
            }
        )

    @renamed(k="top_k")
    def top(self, top_k: int = 10) -> pd.DataFrame:
        """The ``top_k`` largest |term| interactions over all keys, with the key position."""
        top_k = check_count("top_k", top_k)
        frames = [a.top(top_k).assign(k_pos=a.k_pos) for a in self.items]
        out = pd.concat(frames, ignore_index=True)
        return out.reindex(
            out["term"].abs().sort_values(ascending=False).index[:top_k]
        ).reset_index(drop=True)

    def contrast(
        self, k_pos: int, other: Any = None, relative_to: str | None = None, capped: bool = False
    ) -> QKContrast:
        """Exact decomposition of s(k_pos) − s(other) (or − the pattern-weighted mean with
        ``relative_to="mean"``); see :func:`qk_lens.attribution.contrast.contrast_row`."""
        return contrast_row(self, k_pos, other, relative_to, capped)

    @renamed(top="top_k")
    def inhibitors(
        self, k_pos: int | None = None, top_k: int = 10, level: str = "term"
    ) -> pd.DataFrame:
        """The strongest negative terms at competing keys, ranked by what removing each would
        cost ``k_pos``'s log-probability; see :func:`qk_lens.attribution.contrast.inhibitors`."""
        return inhibitors(self, k_pos, top_k, level)

    def __repr__(self) -> str:
        return f"QKAttributions(L{self.layer}H{self.head}, q={self.q_pos}, keys={self.k_positions})"
