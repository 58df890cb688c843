"""Self-contained HTML views of finished results (no network, no JS, no math).

>>> from qk_lens.views import Report, pattern_heatmap, table, bar_list
>>> report = Report("L3H5: why does q attend to k?")
>>> report.verdict(True, "terms sum to the model's score")
>>> report.add("Pattern", pattern_heatmap(pattern, str_tokens, highlight=[(9, 4)]))
>>> report.add("Top terms", table(attr.top(10), signed_columns=["term"]))
>>> report.save("reports/l3h5.html")
"""

from qk_lens.views.atlas import atlas_report, label_grid, score_heatmap
from qk_lens.views.explorer import explorer_html
from qk_lens.views.figures import atlas_figure, contrast_figure, sweep_figure
from qk_lens.views.graph_view import graph_view_html
from qk_lens.views.html import Report, bar_list, pattern_heatmap, table

__all__ = [
    "Report",
    "atlas_figure",
    "atlas_report",
    "bar_list",
    "contrast_figure",
    "explorer_html",
    "graph_view_html",
    "label_grid",
    "pattern_heatmap",
    "score_heatmap",
    "sweep_figure",
    "table",
]
