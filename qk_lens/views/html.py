"""HTML fragments and a one-file report for results that are already computed.

Design rules:

- No math: every function receives finished numbers and only formats them. The one exception is
  choosing a colour intensity from a given value (and, for signed table columns and bars, scaling
  it by the largest shown magnitude so colours are comparable within a column).
- Self-contained: one inline ``<style>``, no scripts, no external fonts, images or links, so a saved
  report opens offline and can be attached to an issue as-is.
- Everything that comes from data (tokens, labels, column names, cell values, headings, titles) is
  HTML-escaped. Fragments passed to :meth:`Report.add` are trusted HTML (usually from the builders
  here); use :meth:`Report.add_text` for plain text.
- All CSS rules are scoped under ``.qkl`` so a report displayed inline in Jupyter does not restyle
  the notebook. Colours that carry meaning (cell backgrounds, highlight outlines, bars) are inline
  styles, so a fragment shown on its own still reads correctly without the stylesheet.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from qk_lens.files import write_text

if TYPE_CHECKING:  # only for annotations; views never need torch at runtime
    import torch

__all__ = ["Report", "bar_list", "json_script", "page", "pattern_heatmap", "table"]

# Above this many key columns the heatmap switches to compact cells without printed numbers.
MAX_NUMBERED_WIDTH = 32

BLUE = (33, 102, 172)  # positive / attention probability
RED = (178, 24, 43)  # negative
HIGHLIGHT = "outline:2px solid #f28e2b;outline-offset:-2px"
# Past this intensity the fill is dark enough that white text reads better than black.
DARK_TEXT_AT = 0.6

CSS = """
.qkl{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  color:#222;line-height:1.4;max-width:1400px;margin:0 auto;padding:0 1em}
.qkl h1{font-size:1.6em;margin:.6em 0 .4em}
.qkl h2{font-size:1.25em;margin:1.4em 0 .5em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.qkl p{margin:.4em 0;white-space:pre-wrap}
.qkl .qkl-verdict{border-radius:6px;padding:.7em 1em;margin:.6em 0;font-size:1.1em;
  font-weight:600;border:2px solid}
.qkl .qkl-verdict.ok{background:#e8f5e9;border-color:#2e7d32;color:#1b5e20}
.qkl .qkl-verdict.fail{background:#ffebee;border-color:#c62828;color:#b71c1c}
.qkl .qkl-fig{margin:.6em 0 1.2em}
.qkl .qkl-title{font-weight:600;margin:.2em 0}
.qkl .qkl-caption{color:#555;font-size:.9em;margin:.3em 0}
.qkl .qkl-note{color:#777;font-size:.85em;font-style:italic;margin:.2em 0}
.qkl .qkl-scroll{overflow:auto;max-width:100%;max-height:90vh}
.qkl table.qkl-tab{border-collapse:collapse;font-size:.85em}
.qkl table.qkl-tab th,.qkl table.qkl-tab td{border:1px solid #ddd;padding:.2em .5em}
.qkl table.qkl-tab th{background:#f5f5f5;text-align:left}
.qkl table.qkl-tab td.n{text-align:right;font-variant-numeric:tabular-nums}
.qkl table.qkl-hm{border-collapse:collapse;font-family:ui-monospace,Menlo,Consolas,monospace;
  font-size:10px}
.qkl table.qkl-hm td.c{width:2.9em;min-width:2.9em;height:1.7em;padding:0;text-align:center;
  border:1px solid #fff}
.qkl table.qkl-hm td.m{background:#f2f2f2}
.qkl table.qkl-hm th{font-weight:normal;white-space:pre;overflow:hidden;padding:0 .3em}
.qkl table.qkl-hm th.qh{text-align:right;max-width:16em;text-overflow:ellipsis}
.qkl table.qkl-hm th.kh{writing-mode:vertical-rl;transform:rotate(180deg);max-height:9em;
  text-align:left;padding:.3em 0;vertical-align:bottom}
.qkl table.qkl-hm.compact{font-size:7px}
.qkl table.qkl-hm.compact td.c{width:8px;min-width:8px;height:8px;border:0}
.qkl table.qkl-hm.compact th{line-height:8px;padding:0 1px}
.qkl table.qkl-bars{border-collapse:collapse;font-size:.9em}
.qkl table.qkl-bars td{padding:.15em .4em}
.qkl table.qkl-bars td.lbl{text-align:right;white-space:pre}
.qkl table.qkl-bars td.n{text-align:right;font-variant-numeric:tabular-nums}
"""


# --------------------------------------------------------------------------- small helpers
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def mix(end: tuple[int, int, int], t: float) -> str:
    """White→``end`` at intensity ``t`` (clipped to [0, 1]); only picks a colour."""
    t = min(max(float(t), 0.0), 1.0)
    r, g, b = (round(255 + (e - 255) * t) for e in end)
    return f"rgb({r},{g},{b})"


def _token_label(token: str) -> str:
    # Whitespace tokens would be invisible or break the layout; show them as escapes instead.
    return str(token).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def fig(body: str, title: str, caption: str, kind: str) -> str:
    head = f'<div class="qkl-title">{esc(title)}</div>' if title else ""
    foot = f'<div class="qkl-caption">{esc(caption)}</div>' if caption else ""
    return f'<div class="qkl-fig {kind}">{head}{body}{foot}</div>'


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _to_numpy(array: Any) -> np.ndarray:
    # Duck-typed so views do not import torch; .float() because bf16 has no numpy dtype.
    if hasattr(array, "detach"):
        array = array.detach().cpu().float().numpy()
    return np.asarray(array, dtype=np.float64)


# --------------------------------------------------------------------------- heatmap
def pattern_heatmap(
    pattern: np.ndarray | torch.Tensor,
    str_tokens: Sequence[str],
    title: str = "",
    highlight: Iterable[tuple[int, int]] = (),
    caption: str = "",
) -> str:
    """A [q, k] attention-pattern table: rows are query positions, columns key positions.

    Cell fill goes white→blue with the value (expected in [0, 1]; values outside are clipped for
    the colour only). Non-finite cells (NaN = masked) are blank and grey. Every cell carries its
    exact value in a tooltip; up to ``MAX_NUMBERED_WIDTH`` columns it also prints it (2 decimals),
    beyond that cells become compact so a 256×256 pattern stays usable. ``highlight`` cells get
    an outline.
    """
    values = _to_numpy(pattern)
    if values.ndim != 2:
        raise ValueError(f"pattern must be 2-D [q, k], got shape {values.shape}")
    n_q, n_k = values.shape
    tokens = [_token_label(t) for t in str_tokens]
    if n_q > len(tokens) or n_k > len(tokens):
        raise ValueError(f"pattern {values.shape} has more positions than {len(tokens)} tokens")
    marked = set()
    for q, k in highlight:
        q, k = int(q), int(k)
        if not (0 <= q < n_q and 0 <= k < n_k):
            raise ValueError(f"highlight ({q}, {k}) is outside the pattern's shape {values.shape}")
        marked.add((q, k))

    numbered = n_k <= MAX_NUMBERED_WIDTH
    esc_tok = [esc(t) for t in tokens]
    esc_quoted = [esc(repr(t)) for t in tokens]  # quotes make leading spaces visible in tooltips

    parts = [f'<table class="qkl-hm{"" if numbered else " compact"}"><thead><tr><th></th>']
    for k in range(n_k):
        parts.append(f'<th class="kh" title="k{k} {esc_quoted[k]}">{esc_tok[k]}</th>')
    parts.append("</tr></thead><tbody>")
    for q in range(n_q):
        parts.append(f'<tr><th class="qh" title="q{q} {esc_quoted[q]}">q: {esc_tok[q]}</th>')
        row = values[q]
        for k in range(n_k):
            v = float(row[k])
            tip = f"q{q} {esc_quoted[q]} → k{k} {esc_quoted[k]}"
            ring = HIGHLIGHT if (q, k) in marked else ""
            if not math.isfinite(v):
                style = f' style="{ring}"' if ring else ""
                parts.append(f'<td class="c m"{style} title="{tip}: masked"></td>')
                continue
            style = f"background:{mix(BLUE, v)}"
            if numbered and v > DARK_TEXT_AT:
                style += ";color:#fff"
            if ring:
                style += ";" + ring
            text = f"{v:.2f}" if numbered else ""
            parts.append(f'<td class="c" style="{style}" title="{tip}: {v:.4f}">{text}</td>')
        parts.append("</tr>")
    parts.append("</tbody></table>")
    body = f'<div class="qkl-scroll">{"".join(parts)}</div>'
    return fig(body, title, caption, "qkl-heatmap")


# --------------------------------------------------------------------------- table
def _format_cell(value: Any, float_format: str) -> tuple[str, bool]:
    """(escaped text, is_number)."""
    if isinstance(value, (float, np.floating)):
        return esc(float_format.format(value)), True
    if _is_real(value):
        return esc(value), True
    return esc(value), False


def _default_index(index: pd.Index) -> bool:
    # A plain 0..n-1 RangeIndex carries no information, so it is not shown.
    return (
        isinstance(index, pd.RangeIndex)
        and index.name is None
        and index.start == 0
        and index.step == 1
    )


def table(
    df: pd.DataFrame,
    title: str = "",
    max_rows: int = 50,
    signed_columns: Sequence[str] = (),
    float_format: str = "{:.4g}",
    caption: str = "",
) -> str:
    """An escaped HTML table of the first ``max_rows`` rows of ``df``.

    Columns named in ``signed_columns`` are filled red (negative) / blue (positive), with
    intensity = |value| / (that column's largest |value| among the shown rows). A non-default index
    is shown as the first column. Truncation is noted as "… N more rows".
    """
    if max_rows < 0:
        raise ValueError(f"max_rows must be ≥ 0, got {max_rows}")
    missing = [c for c in signed_columns if c not in df.columns]
    if missing:
        raise KeyError(f"signed_columns not in the DataFrame: {missing}")
    shown = df.iloc[:max_rows]
    hidden = len(df) - len(shown)
    show_index = not _default_index(df.index)

    # Per signed column: the largest finite |value| among the shown rows (the colour scale).
    scale: dict[int, float] = {}
    for j, col in enumerate(df.columns):
        if col not in signed_columns:
            continue
        finite = [abs(float(v)) for v in shown.iloc[:, j] if _is_real(v) and math.isfinite(v)]
        scale[j] = max(finite, default=0.0)

    parts = ['<table class="qkl-tab"><thead><tr>']
    if show_index:
        names = [n for n in df.index.names if n is not None]
        parts.append(f"<th>{esc(', '.join(map(str, names)))}</th>")
    parts.extend(f"<th>{esc(c)}</th>" for c in df.columns)
    parts.append("</tr></thead><tbody>")
    for label, row in zip(shown.index, shown.itertuples(index=False, name=None), strict=True):
        parts.append("<tr>")
        if show_index:
            text = ", ".join(map(str, label)) if isinstance(label, tuple) else str(label)
            parts.append(f"<th>{esc(text)}</th>")
        for j, value in enumerate(row):
            text, is_number = _format_cell(value, float_format)
            attrs = ' class="n"' if is_number else ""
            top = scale.get(j, 0.0)
            if is_number and top > 0 and math.isfinite(value):
                t = abs(float(value)) / top
                style = f"background:{mix(RED if value < 0 else BLUE, t)}"
                if t > DARK_TEXT_AT:
                    style += ";color:#fff"
                attrs += f' style="{style}"'
            parts.append(f"<td{attrs}>{text}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    if hidden > 0:
        parts.append(f'<div class="qkl-note">… {hidden} more rows (of {len(df)})</div>')
    elif len(df) == 0:
        parts.append('<div class="qkl-note">(no rows)</div>')
    body = f'<div class="qkl-scroll">{"".join(parts)}</div>'
    return fig(body, title, caption, "qkl-table")


# --------------------------------------------------------------------------- bars
def bar_list(items: Sequence[tuple[str, float]], title: str = "", caption: str = "") -> str:
    """Horizontal signed bars: negatives grow left (red), positives right (blue) of a centre line.

    Bar length is |value| relative to the largest |value| in ``items``; the exact value is printed.
    """
    items = [(str(label), float(value)) for label, value in items]
    if not items:
        return fig('<div class="qkl-note">(no items)</div>', title, caption, "qkl-bars")
    top = max((abs(v) for _, v in items if math.isfinite(v)), default=0.0)
    # Inline layout so the bars survive without the report stylesheet.
    half = "display:inline-block;width:10em;height:1em;vertical-align:middle"
    parts = ['<table class="qkl-bars"><tbody>']
    for label, value in items:
        share = abs(value) / top if top > 0 and math.isfinite(value) else 0.0
        width = f"{100 * share:.1f}%"
        neg = f"width:{width};background:{mix(RED, 0.85)}" if value < 0 else "width:0"
        pos = f"width:{width};background:{mix(BLUE, 0.85)}" if value > 0 else "width:0"
        parts.append(
            f'<tr><td class="lbl">{esc(_token_label(label))}</td><td>'
            f'<span style="{half};text-align:right;border-right:1px solid #888">'
            f'<span style="display:inline-block;height:100%;{neg}"></span></span>'
            f'<span style="{half}"><span style="display:inline-block;height:100%;{pos}">'
            f'</span></span></td><td class="n">{esc(f"{value:.4g}")}</td></tr>'
        )
    parts.append("</tbody></table>")
    return fig("".join(parts), title, caption, "qkl-bars")


# --------------------------------------------------------------------------- report
@dataclass
class Report:
    """An ordered list of (heading, HTML fragment) sections, rendered as one offline HTML file."""

    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)
    verdicts: list[tuple[bool, str]] = field(default_factory=list)

    def add(self, heading: str, *fragments: str) -> Report:
        """Append a section; fragments are trusted HTML (e.g. from ``table``/``pattern_heatmap``)."""
        self.sections.append((heading, "".join(fragments)))
        return self

    def add_text(self, heading: str, text: str) -> Report:
        """Append escaped plain text; a blank line starts a new paragraph."""
        paragraphs = [p.strip("\n") for p in re.split(r"\n(?:[ \t]*\n)+", text) if p.strip()]
        return self.add(heading, "".join(f"<p>{esc(p)}</p>" for p in paragraphs))

    def verdict(self, ok: bool, text: str) -> Report:
        """A prominent pass/fail box shown at the top, above all sections."""
        self.verdicts.append((bool(ok), text))
        return self

    def _body(self) -> str:
        parts = [f"<h1>{esc(self.title)}</h1>"]
        for ok, text in self.verdicts:
            kind, mark = ("ok", "✔ PASS") if ok else ("fail", "✘ FAIL")
            parts.append(f'<div class="qkl-verdict {kind}" role="status">{mark}: {esc(text)}</div>')
        for heading, fragment in self.sections:
            parts.append(f"<section><h2>{esc(heading)}</h2>{fragment}</section>")
        return "".join(parts)

    def to_html(self) -> str:
        """The full standalone document (UTF-8, inline CSS, no external resources)."""
        return (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head>"
            f'<body><div class="qkl">{self._body()}</div></body></html>\n'
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, self.to_html())
        return path

    def _repr_html_(self) -> str:
        # A fragment, not a document: notebooks embed it in their own page. CSS is scoped to .qkl.
        return f'<div class="qkl"><style>{CSS}</style>{self._body()}</div>'


def json_script(payload: Any) -> str:
    """``payload`` as a ``<script type="application/json">`` element (``</`` escaped, so the data
    cannot end the element)."""
    import json

    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json">{data}</script>'


def page(body: str, title: str, fragment: bool) -> str:
    """``body`` as a whole HTML document, or as it is (``fragment``: for a notebook cell);
    ``title`` is already escaped."""
    if fragment:
        return body
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title></head><body>{body}</body></html>"
    )
