"""HTML views of a finished head atlas: a layer × head heatmap per score, a labelled grid, a report.

Same rules as :mod:`qk_lens.views.html`: no math (the only arithmetic picks a colour intensity
from a value and a given or column-wide scale), inline styles, every data string escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from qk_lens.atlas import SCORE_INFO
from qk_lens.display import register
from qk_lens.views.html import BLUE, DARK_TEXT_AT, RED, Report, esc, fig, mix, table

if TYPE_CHECKING:
    from qk_lens.atlas import HeadAtlas

__all__ = ["atlas_report", "label_grid", "score_heatmap"]

# One colour per label (muted, distinguishable); a cell takes its first label's colour.
LABEL_COLOURS: dict[str, str] = {
    "previous-token": "#4e79a7",
    "induction": "#e15759",
    "duplicate": "#f28e2b",
    "BOS sink": "#9c9c9c",
    "self": "#b07aa1",
    "fixed offset": "#76b7b2",
    "diffuse": "#d4d4d4",
    "copying": "#59a14f",
    "suppression": "#8c564b",
    "concordance-like": "#edc948",
    "discordance-like": "#ff9da7",
}
_FALLBACK = "#bab0ac"
_CELL = "border:1px solid #fff;padding:.15em .35em;text-align:center;vertical-align:top"

# Scores shown as heatmaps in the report, in order (those present in the frame).
REPORT_SCORES = (
    "previous_token",
    "induction",
    "duplicate_token",
    "first_token",
    "self",
    "offset_score",
    "entropy",
    "ov_copying",
    "qk_skew",
    "same_token",
    "qk_eff_rank",
    "ov_eff_rank",
    "q_comp_z",
    "k_comp_z",
    "v_comp_z",
)


def _is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@register("atlas.heatmap")
def score_heatmap(
    frame: pd.DataFrame,
    score: str,
    title: str = "",
    caption: str = "",
    signed: bool = False,
    scale: float | None = None,
) -> str:
    """Layers as rows, heads as columns, one cell per head filled by ``frame[score]``.

    Unsigned: white→blue at value/scale; signed: red (negative) / blue (positive) at |value|/scale.
    ``scale`` None = the column's largest finite |value|. NaN cells are grey and blank.
    """
    for col in ("layer", "head", "name", score):
        if col not in frame.columns:
            raise KeyError(f"frame has no column {col!r}")
    n_layers = int(frame["layer"].max()) + 1
    n_heads = int(frame["head"].max()) + 1
    values = {(int(r.layer), int(r.head)): (r.name_, r.value) for r in _cells(frame, score)}
    if scale is None:
        finite = [abs(float(v)) for _, v in values.values() if _is_finite(v)]
        scale = max(finite, default=0.0)
    parts = ['<table class="qkl-hm"><thead><tr><th></th>']
    parts.extend(f'<th class="kh">H{h}</th>' for h in range(n_heads))
    parts.append("</tr></thead><tbody>")
    for layer in range(n_layers):
        parts.append(f'<tr><th class="qh">L{layer}</th>')
        for head in range(n_heads):
            name, value = values.get((layer, head), (f"L{layer}H{head}", float("nan")))
            if not _is_finite(value):
                parts.append(f'<td class="c m" title="{esc(name)}: {esc(score)} n/a"></td>')
                continue
            v = float(value)
            t = abs(v) / scale if scale and scale > 0 else 0.0
            colour = mix(RED if (signed and v < 0) else BLUE, t)
            style = f"background:{colour}" + (";color:#fff" if t > DARK_TEXT_AT else "")
            tip = f"{esc(name)}: {esc(score)} = {v:.4g}"
            parts.append(f'<td class="c" style="{style}" title="{tip}">{v:.2f}</td>')
        parts.append("</tr>")
    parts.append("</tbody></table>")
    body = f'<div class="qkl-scroll">{"".join(parts)}</div>'
    return fig(body, title, caption, "qkl-atlas-heatmap")


def _cells(frame: pd.DataFrame, score: str) -> list[Any]:
    sub = frame[["layer", "head", "name", score]].rename(columns={"name": "name_", score: "value"})
    return list(sub.itertuples(index=False))


@register("atlas.grid")
def label_grid(
    frame: pd.DataFrame, labels: Sequence[str] = tuple(LABEL_COLOURS), title: str = ""
) -> str:
    """Layers as rows, heads as columns: each cell names the head and lists its labels, takes
    its first label's colour, and carries the evidence (scores vs thresholds) as a tooltip."""
    for col in ("layer", "head", "name", "labels", "evidence"):
        if col not in frame.columns:
            raise KeyError(f"frame has no column {col!r}")
    n_layers = int(frame["layer"].max()) + 1
    n_heads = int(frame["head"].max()) + 1
    cells = {(int(r.layer), int(r.head)): r for r in frame.itertuples(index=False)}
    parts = ['<table style="border-collapse:collapse;font-size:.8em"><thead><tr><th></th>']
    parts.extend(f'<th style="padding:0 .3em">H{h}</th>' for h in range(n_heads))
    parts.append("</tr></thead><tbody>")
    for layer in range(n_layers):
        parts.append(f'<tr><th style="padding:0 .3em;text-align:right">L{layer}</th>')
        for head in range(n_heads):
            row = cells.get((layer, head))
            if row is None:
                parts.append(f'<td style="{_CELL};background:#f2f2f2"></td>')
                continue
            head_labels = list(row.labels)
            colour = LABEL_COLOURS.get(head_labels[0], _FALLBACK) if head_labels else "#ffffff"
            text = "<br>".join(esc(lab) for lab in head_labels) or "&middot;"
            tip = esc(row.evidence or "no label")
            parts.append(
                f'<td style="{_CELL};background:{colour}" title="{tip}">'
                f"<b>{esc(row.name)}</b><br>{text}</td>"
            )
        parts.append("</tr>")
    parts.append("</tbody></table>")
    legend = " ".join(
        f'<span style="display:inline-block;padding:0 .4em;margin:.1em;'
        f'background:{LABEL_COLOURS.get(lab, _FALLBACK)}">{esc(lab)}</span>'
        for lab in labels
    )
    body = (
        f'<div class="qkl-scroll">{"".join(parts)}</div><div style="margin-top:.3em">{legend}</div>'
    )
    caption = "A cell's colour is its first label; hover over it for the evidence."
    return fig(body, title, caption, "qkl-atlas-grid")


@register("atlas.report")
def atlas_report(atlas: HeadAtlas, title: str) -> Report:
    """The full report: summary, label grid, labelled heads, heatmaps, composition, thresholds."""
    frame = atlas.frame
    info = atlas.info
    report = Report(title)
    probe = info.get("probe", {})
    summary = (
        f"{info.get('n_layers')} layers × {info.get('n_heads')} heads "
        f"(d_model {info.get('d_model')}, d_head {info.get('d_head')}, "
        f"norm {info.get('normalization')}, positions {info.get('positional_embedding')}, "
        f"kv heads {info.get('n_key_value_heads') or info.get('n_heads')}). "
        f"Patterns from {probe.get('n')} repeated random probes (segment length "
        f"{probe.get('length')}, seed {probe.get('seed')})"
        + (f" and {info['n_prompts']} user prompts." if info.get("n_prompts") else ".")
        + "\n\nWeight-level scores use norm-folded weights (frozen unit scale) and the direct "
        "token path; with rotary, W_Q W_Kᵀ is the form at zero relative offset. The QK "
        "eigenvalue skew (concordance-/discordance-like) is a score, not proof of a function."
    )
    report.add_text("Summary", summary)
    report.add("Labels", label_grid(frame, tuple(LABEL_COLOURS)))
    labelled = frame[frame["labels"].map(len) > 0][["name", "label_str", "evidence"]]
    report.add("Labelled heads", table(labelled, max_rows=200))
    heatmaps = []
    for score in REPORT_SCORES:
        if score in frame.columns:
            description, signed, scale = SCORE_INFO.get(score, (score, True, None))
            heatmaps.append(
                score_heatmap(frame, score, score, description, signed=signed, scale=scale)
            )
    report.add("Scores", *heatmaps)
    if atlas.composition is not None:
        cols = [
            c
            for m in ("q", "k", "v")
            for c in (f"{m}_comp_partner", f"{m}_comp", f"{m}_comp_z")
            if c in frame.columns
        ]
        comp = frame[frame["layer"] > 0][["name", *cols]]
        base = atlas.composition.baseline_summary()
        report.add(
            "Composition",
            table(comp, "Strongest earlier partner per head", max_rows=500,
                  signed_columns=[c for c in cols if c.endswith("_z")]),
            table(
                base,
                "Baseline: the score of the same two heads with the residual basis randomly "
                "rotated (mean 1/√d; its std depends on both heads' spectra)",
            ),
        )  # fmt: skip
        report.add(
            "Virtual heads",
            table(
                atlas.virtual_heads,
                "Each head's strongest V-composition partner; copying score of the composed path",
                max_rows=100,
                signed_columns=["copying", "first_copying", "second_copying"],
            ),
        )
    thresholds = pd.DataFrame(
        {"threshold": list(atlas.thresholds.values())}, index=list(atlas.thresholds)
    ).rename_axis("score")
    report.add("Thresholds", table(thresholds))
    return report
