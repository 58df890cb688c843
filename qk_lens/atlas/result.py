"""The head atlas as a result: one row per (layer, head) with scores, labels and evidence."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from qk_lens.atlas.composition import Composition
from qk_lens.atlas.probes import SCORE_COLUMNS
from qk_lens.atlas.weights import Spectra
from qk_lens.checks import check_count, check_index, renamed
from qk_lens.display import render

if TYPE_CHECKING:
    from qk_lens.views import Report

# label -> (score column, comparison, threshold key). Order = display order.
LABEL_RULES: dict[str, tuple[str, str, str]] = {
    "previous-token": ("previous_token", ">=", "previous_token"),
    "induction": ("induction", ">=", "induction"),
    "duplicate": ("duplicate_token", ">=", "duplicate_token"),
    "BOS sink": ("first_token", ">=", "first_token"),
    "self": ("self", ">=", "self"),
    "fixed offset": ("offset_score", ">=", "offset_score"),  # and offset >= min_offset
    "diffuse": ("entropy", ">=", "entropy"),
    "copying": ("ov_copying", ">=", "ov_copying"),
    "suppression": ("ov_copying", "<=-", "ov_copying"),
    "concordance-like": ("qk_skew", ">=", "qk_skew"),
    "discordance-like": ("qk_skew", "<=-", "qk_skew"),
}
LABELS: tuple[str, ...] = tuple(LABEL_RULES)

THRESHOLDS: dict[str, float] = {
    "previous_token": 0.3,  # mean attention to q-1
    "induction": 0.3,  # mean attention to the token after the earlier occurrence
    "duplicate_token": 0.3,  # mean attention to earlier copies of the query's token
    "first_token": 0.5,  # mean attention to position 0
    "self": 0.3,  # mean attention to q itself
    "offset_score": 0.3,  # mean attention at the dominant offset ...
    "min_offset": 2,  # ... which must be >= 2 (offset 1 is previous-token)
    "entropy": 0.85,  # normalized pattern entropy (1 = uniform)
    "ov_copying": 0.5,  # |Re Σλ / Σ|λ|| of the OV token map; sign picks copying / suppression
    "qk_skew": 0.5,  # |Re Σλ / Σ|λ|| of W_Q W_K^T; sign picks concordance / discordance-like
    "composition_z": 3.0,  # a partner is above the random-rotation baseline at this z
}

# For views: score -> (short description, signed, fixed colour scale or None = column's max |v|)
SCORE_INFO: dict[str, tuple[str, bool, float | None]] = {
    "previous_token": ("mean attention to the previous token", False, 1.0),
    "induction": ("mean attention to the token after an earlier copy", False, 1.0),
    "duplicate_token": ("mean attention to an earlier copy of the token", False, 1.0),
    "first_token": ("mean attention to position 0 (BOS sink)", False, 1.0),
    "self": ("mean attention to the query's own position", False, 1.0),
    "offset_score": ("mean attention at the dominant offset", False, 1.0),
    "entropy": ("pattern entropy / log(#keys): 1 = uniform", False, 1.0),
    "ov_copying": ("OV token map eigenvalues Re Σλ/Σ|λ|: +1 copy, −1 suppress", True, 1.0),
    "ov_positive_frac": ("share of |λ| of the OV token map with Re λ > 0", False, 1.0),
    "qk_skew": ("W_QK eigenvalues Re Σλ/Σ|λ| (a score, not proof)", True, 1.0),
    "qk_positive_frac": ("share of |λ| of W_QK with Re λ > 0", False, 1.0),
    "same_token": ("row-centred diagonal of Ê W_QK Êᵀ in RMS units", True, None),
    "qk_eff_rank": ("effective rank of W_QK", False, None),
    "ov_eff_rank": ("effective rank of W_OV", False, None),
    "qk_norm": ("Frobenius norm of W_QK / attn_scale", False, None),
    "ov_norm": ("Frobenius norm of W_OV", False, None),
    "q_comp": ("strongest Q-composition score with an earlier head", False, None),
    "k_comp": ("strongest K-composition score with an earlier head", False, None),
    "v_comp": ("strongest V-composition score with an earlier head", False, None),
    "q_comp_z": ("strongest Q-composition, z vs random rotation", True, None),
    "k_comp_z": ("strongest K-composition, z vs random rotation", True, None),
    "v_comp_z": ("strongest V-composition, z vs random rotation", True, None),
}


@dataclass
class HeadAtlas:
    """One row per (layer, head): scores, labels and evidence; see :func:`head_atlas`."""

    frame: pd.DataFrame
    spectra: Spectra
    composition: Composition | None
    virtual_heads: pd.DataFrame
    thresholds: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.frame["layer"].max()) + 1

    @property
    def n_heads(self) -> int:
        return int(self.frame["head"].max()) + 1

    def _row(self, layer: int, head: int) -> pd.Series:
        layer = check_index("layer", layer, self.n_layers, "layers")
        head = check_index("head", head, self.n_heads, "heads per layer")
        return self.frame.iloc[layer * self.n_heads + head]

    def labels(self, layer: int, head: int) -> list[str]:
        """The labels of one head (in :data:`LABELS` order)."""
        return list(self._row(layer, head)["labels"])

    def evidence(self, layer: int, head: int) -> str:
        """The scores and thresholds behind one head's labels."""
        return str(self._row(layer, head)["evidence"])

    def heads_with(self, label: str) -> list[tuple[int, int]]:
        """(layer, head) of every head carrying ``label`` (one of :data:`LABELS`)."""
        if label not in LABEL_RULES:
            raise ValueError(f"unknown label {label!r}; labels are: {', '.join(LABELS)}")
        mask = self.frame["labels"].map(lambda labels: label in labels)
        return [(int(r.layer), int(r.head)) for r in self.frame[mask].itertuples()]

    def relabel(self, **thresholds: float) -> HeadAtlas:
        """A copy labelled with some thresholds changed (scores are reused, nothing recomputed)."""
        unknown = sorted(set(thresholds) - set(THRESHOLDS))
        if unknown:
            raise ValueError(f"unknown thresholds {unknown}; known: {sorted(THRESHOLDS)}")
        merged = {**self.thresholds, **{k: float(v) for k, v in thresholds.items()}}
        return replace(self, frame=label_frame(self.frame, merged), thresholds=merged)

    @renamed(k="top_k")
    def top(self, score: str, top_k: int = 5) -> pd.DataFrame:
        """The ``top_k`` heads with the highest ``score``."""
        check_score(self.frame, score)
        top_k = check_count("top_k", top_k)
        cols = ["layer", "head", "name", score, "label_str"]
        return self.frame.nlargest(top_k, score)[cols].reset_index(drop=True)

    # ----------------------------------------------------------------- views
    def heatmap(self, score: str, title: str | None = None) -> str:
        """A layer × head HTML heatmap of one score column."""
        check_score(self.frame, score)
        description, signed, scale = SCORE_INFO.get(score, (score, True, None))
        return render(
            "atlas.heatmap", self.frame, score, title=title or score, caption=description,
            signed=signed, scale=scale,
        )  # fmt: skip

    def grid(self) -> str:
        """A compact layer × head grid of labels (the evidence in each cell's tooltip)."""
        return render("atlas.grid", self.frame, LABELS)

    def report(self, title: str | None = None) -> Report:
        """A :class:`qk_lens.views.Report` with the grid, heatmaps and tables."""
        return render(
            "atlas.report", self, title or f"Head atlas: {self.info.get('model', 'model')}"
        )

    def to_html(self, title: str | None = None) -> str:
        """A self-contained HTML document (inline CSS, no scripts, no network)."""
        return self.report(title).to_html()

    def save(self, path: str | Path, title: str | None = None) -> Path:
        """Write :meth:`to_html` to ``path``; returns the path written."""
        return self.report(title).save(path)

    def figure(self, columns: list[str] | None = None) -> Any:
        """A plotly figure: one heatmap per score (layer × head) of :attr:`frame`."""
        cols = list(columns) if columns is not None else [
            c for c in SCORE_COLUMNS if c in self.frame.columns
        ]  # fmt: skip
        return render("figure.atlas", self.frame, cols, "head atlas: scores per head")

    def _repr_html_(self) -> str:
        return self.report()._repr_html_()

    def __repr__(self) -> str:
        # The dataclass's own repr prints every spectrum and baseline tensor: pages of numbers.
        heads: dict[str, list[str]] = {}
        for row in self.frame.itertuples():
            for label in row.labels:
                heads.setdefault(label, []).append(row.name)
        lines = [f"  {label}: {' '.join(names)}" for label, names in heads.items()]
        model = self.info.get("model", "model")
        head = f"HeadAtlas({model}: {self.n_layers} layers × {self.n_heads} heads"
        return head + (", heads per label:\n" + "\n".join(lines) + ")" if lines else ")")


def check_score(frame: pd.DataFrame, score: str) -> None:
    if score not in frame.columns or not pd.api.types.is_numeric_dtype(frame[score]):
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        raise ValueError(f"unknown score {score!r}; numeric columns: {', '.join(numeric)}")


def label_frame(frame: pd.DataFrame, thresholds: Mapping[str, float]) -> pd.DataFrame:
    frame = frame.copy()
    labels_col, evidence_col = [], []
    for row in frame.itertuples(index=False):
        row = row._asdict()
        labels, evidence = [], []
        for label, (column, op, key) in LABEL_RULES.items():
            value = row.get(column, float("nan"))
            if value is None or not np.isfinite(value):
                continue
            t = float(thresholds[key])
            hit = value >= t if op == ">=" else value <= -t
            if label == "fixed offset":
                hit = hit and row.get("offset", 0) >= thresholds["min_offset"]
            if hit:
                labels.append(label)
                sign = "≥" if op == ">=" else "≤"
                shown = t if op == ">=" else -t
                extra = f" at offset {int(row['offset'])}" if label == "fixed offset" else ""
                evidence.append(f"{label}: {column}={value:.3g} {sign} {shown:g}{extra}")
        labels_col.append(labels)
        evidence_col.append("; ".join(evidence))
    frame["labels"] = labels_col
    frame["label_str"] = [", ".join(labels) for labels in labels_col]
    frame["evidence"] = evidence_col
    return frame
