"""Figures (plotly) of finished results: the head atlas's scores per head, a steering sweep
(attention and prediction against the steering scale, predicted against measured), a contrast
between two keys. They only plot the numbers the results hold (no math here);
``fig.write_html(path, include_plotlyjs=True)`` makes one offline file, and a notebook shows
them inline.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from qk_lens.display import register

BLUE, RED, GREY = "#2166ac", "#b2182b", "#777777"


def _go() -> Any:
    import plotly.graph_objects as go

    return go


def _subplots(**kwargs: Any) -> Any:
    from plotly.subplots import make_subplots

    return make_subplots(**kwargs)


@register("figure.atlas")
def atlas_figure(frame: pd.DataFrame, columns: list[str], title: str) -> Any:
    """One heatmap per score (layer rows × head columns) of the atlas's frame."""
    go = _go()
    fig = _subplots(rows=1, cols=len(columns), subplot_titles=columns, horizontal_spacing=0.04)
    n_layers, n_heads = int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1
    for i, col in enumerate(columns, start=1):
        z = frame.pivot(index="layer", columns="head", values=col).reindex(
            index=range(n_layers), columns=range(n_heads)
        )
        fig.add_trace(
            go.Heatmap(
                z=z.to_numpy(), x=[f"H{h}" for h in range(n_heads)],
                y=[f"L{lyr}" for lyr in range(n_layers)], coloraxis="coloraxis", name=col,
                hovertemplate=col + " L%{y} %{x}: %{z:.3f}<extra></extra>",
            ),
            row=1, col=i,
        )  # fmt: skip
    fig.update_layout(title=title, coloraxis={"colorscale": "Blues"}, height=320 + 24 * n_layers)
    return fig


@register("figure.sweep")
def sweep_figure(frame: pd.DataFrame, heads: list[str], title: str) -> Any:
    """Against the steering scale: each head's raw score at the target pair, measured and as the
    attribution predicted; its attention there; the top prediction's and the clean top token's
    probability."""
    go = _go()
    fig = _subplots(rows=1, cols=2, subplot_titles=("score at the target pair", "probabilities"))
    x = frame["scale"].tolist()
    for h in heads:
        fig.add_trace(go.Scatter(x=x, y=frame[f"{h} score"].tolist(), mode="lines+markers",
                                 name=f"{h} score (measured)", line={"color": BLUE}), 1, 1)  # fmt: skip
        fig.add_trace(go.Scatter(x=x, y=frame[f"{h} predicted score"].tolist(), mode="markers",
                                 name=f"{h} score (predicted)",
                                 marker={"symbol": "x", "size": 10, "color": RED}), 1, 1)  # fmt: skip
        fig.add_trace(go.Scatter(x=x, y=frame[f"{h} prob"].tolist(), mode="lines+markers",
                                 name=f"{h} attention"), 1, 2)  # fmt: skip
    fig.add_trace(go.Scatter(x=x, y=frame["clean_top_prob"].tolist(), mode="lines+markers",
                             name="p(clean top token)", line={"dash": "dash", "color": GREY}), 1, 2)  # fmt: skip
    fig.add_trace(go.Scatter(x=x, y=frame["top_after_prob"].tolist(), mode="lines+markers",
                             name="p(top token after)",
                             text=frame["top_after"].astype(str).tolist(),
                             hovertemplate="scale %{x}: %{text} %{y:.3f}<extra></extra>"), 1, 2)  # fmt: skip
    fig.update_xaxes(title_text="steering scale")
    fig.update_layout(title=title, height=420)
    return fig


@register("figure.contrast")
def contrast_figure(groups: pd.DataFrame, title: str, top_k: int) -> Any:
    """The key groups' contributions at the key and at the other key, and their difference,
    for the ``top_k`` groups by |difference| (``groups``: the contrast's ``key_marginals()``)."""
    go = _go()
    g = groups.head(top_k).iloc[::-1]
    # one bar per group: features with the same label stay apart by their id
    labels = [
        f"{lab} #{f}" + (f" (L{lay})" if lay >= 0 else "") if f >= 0 else f"{lab} ({kind})"
        for lab, lay, f, kind in zip(g["label"], g["layer"], g["feature"], g["kind"], strict=True)
    ]
    fig = go.Figure()
    fig.add_trace(go.Bar(y=labels, x=g["difference"].tolist(), orientation="h", name="difference",
                         marker={"color": [BLUE if v >= 0 else RED for v in g["difference"]]}))  # fmt: skip
    fig.add_trace(go.Scatter(y=labels, x=g["at_key"].tolist(), mode="markers", name="at the key",
                             marker={"color": "#333", "symbol": "circle"}))  # fmt: skip
    fig.add_trace(go.Scatter(y=labels, x=g["at_other"].tolist(), mode="markers",
                             name="at the other", marker={"color": GREY, "symbol": "diamond"}))  # fmt: skip
    fig.update_layout(
        title=title, height=160 + 28 * len(g), xaxis_title="contribution to the score"
    )
    return fig
