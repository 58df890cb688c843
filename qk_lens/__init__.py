"""qk_lens: explain why attention heads attend where they do, in the terms of SAELens dictionaries.

>>> import qk_lens
>>> model = qk_lens.attach(model)          # a HookedTransformer or TransformerBridge
>>> model.add_dictionary(sae)              # a SAELens SAE (or its saved directory) on the
>>>                                        # residual entering a layer
>>> attr = model.qk_attribution(prompt, layer, head, q_pos, k_pos)
>>> attr.top(10)

The package reads as its data flows (docs/README.md): ``arch`` (how a model family is wired) →
``capture`` (one forward) → ``dictionaries`` / ``bases`` (the residual as a sum of parts) →
``attribution`` (terms, contrasts, tables) → ``graph`` / ``steering`` / ``atlas`` → ``views`` →
``mixin`` (the methods on the model) → ``demo`` / ``cli``.
"""

from qk_lens import views as views  # registers the renderers results use for their HTML
from qk_lens.atlas import HeadAtlas, head_atlas, pattern_scores
from qk_lens.attribution import (
    CompletenessError,
    Components,
    GroupedTerms,
    QKAttribution,
    QKAttributions,
    QKContrast,
    QKExplorer,
    inhibitors,
    qk_explorer,
)
from qk_lens.bases import DictionaryBasis, PartsBatch, TranscoderBasis, UpstreamBasis
from qk_lens.capture import Capture
from qk_lens.dictionaries import Decomposition, Dictionary
from qk_lens.graph import (
    Graph,
    HeadLoadings,
    TranscoderGraph,
    TranscoderLoadings,
    attribution_graph,
    head_loadings,
    load_graph_json,
    save_neuronpedia,
    save_transcoder_neuronpedia,
    to_neuronpedia,
    transcoder_graph,
    transcoder_loadings,
    transcoder_to_neuronpedia,
)
from qk_lens.labels import FeatureLabel, LabelSet, label_dictionary, label_features, load_labels
from qk_lens.mixin import HookedQKTransformer, QKLensMixin, attach
from qk_lens.moved import install as _install_moved_modules
from qk_lens.sae_files import SavedSAE, load_sae, load_saved_sae
from qk_lens.state import capture_scope
from qk_lens.steering import QKSteering, QKSteeringSweep, ResidSteering
from qk_lens.transcoders import Transcoders, load_transcoders

__all__ = [
    "capture_scope",
    "Capture",
    "CompletenessError",
    "Components",
    "Decomposition",
    "Dictionary",
    "DictionaryBasis",
    "FeatureLabel",
    "Graph",
    "GroupedTerms",
    "HeadAtlas",
    "HeadLoadings",
    "HookedQKTransformer",
    "LabelSet",
    "PartsBatch",
    "QKAttribution",
    "QKAttributions",
    "QKContrast",
    "QKExplorer",
    "QKLensMixin",
    "SavedSAE",
    "TranscoderBasis",
    "TranscoderGraph",
    "TranscoderLoadings",
    "Transcoders",
    "QKSteering",
    "QKSteeringSweep",
    "ResidSteering",
    "UpstreamBasis",
    "attach",
    "attribution_graph",
    "head_atlas",
    "head_loadings",
    "inhibitors",
    "label_dictionary",
    "label_features",
    "load_graph_json",
    "load_labels",
    "load_sae",
    "load_saved_sae",
    "load_transcoders",
    "pattern_scores",
    "qk_explorer",
    "save_neuronpedia",
    "save_transcoder_neuronpedia",
    "to_neuronpedia",
    "transcoder_graph",
    "transcoder_loadings",
    "transcoder_to_neuronpedia",
]

__version__ = "0.1.0"

_install_moved_modules()
