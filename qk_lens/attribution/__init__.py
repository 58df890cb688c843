"""QK attributions: projection of basis parts into a head's query/key space, the bilinear terms,
their result objects, contrasts, and the batch table (with its top-k kernel)."""

from qk_lens.attribution.compute import BASIS_NAMES, attribute, qk_attribution, resolve_basis
from qk_lens.attribution.contrast import (
    Components,
    GroupedTerms,
    QKContrast,
    components,
    contrast,
    contrast_attribution,
    contrast_row,
    group_terms,
    inhibitors,
)
from qk_lens.attribution.explorer import QKExplorer, qk_explorer
from qk_lens.attribution.projection import ProjectedSide, project_side
from qk_lens.attribution.result import QKAttribution, QKAttributions
from qk_lens.attribution.table import qk_attribution_table, qk_attribution_table_chunks
from qk_lens.attribution.terms import CompletenessError, tolerance

__all__ = [
    "BASIS_NAMES",
    "CompletenessError",
    "Components",
    "GroupedTerms",
    "ProjectedSide",
    "QKAttribution",
    "QKAttributions",
    "QKContrast",
    "QKExplorer",
    "attribute",
    "components",
    "contrast",
    "contrast_attribution",
    "contrast_row",
    "group_terms",
    "inhibitors",
    "project_side",
    "qk_attribution",
    "qk_explorer",
    "qk_attribution_table",
    "qk_attribution_table_chunks",
    "resolve_basis",
    "tolerance",
]
