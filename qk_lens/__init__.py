"""qk_lens: explain why attention heads attend where they do, in the terms of SAELens dictionaries.

>>> import qk_lens
>>> model = qk_lens.attach(model)          # any HookedTransformer; same object, new methods
>>> model.add_dictionary(sae)              # a SAELens SAE on the residual entering a layer
>>> attr = model.qk_attribution(prompt, layer, head, q_pos, k_pos)
>>> attr.top(10)
"""

from qk_lens.attribution import CompletenessError, QKAttribution, QKAttributions
from qk_lens.bases import DictionaryBasis, PartsBatch, UpstreamBasis
from qk_lens.capture import Capture
from qk_lens.dictionaries import Decomposition, Dictionary
from qk_lens.mixin import HookedQKTransformer, QKLensMixin, attach

__all__ = [
    "Capture",
    "CompletenessError",
    "Decomposition",
    "Dictionary",
    "DictionaryBasis",
    "HookedQKTransformer",
    "PartsBatch",
    "QKAttribution",
    "QKAttributions",
    "QKLensMixin",
    "UpstreamBasis",
    "attach",
]

__version__ = "0.1.0"
