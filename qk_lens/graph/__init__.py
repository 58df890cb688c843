"""Checkpointed attribution graphs: node sets and readouts at each layer, edges through one frozen
block, circuit-tracer's pruning, the graph result, head loadings, and the Neuronpedia export."""

from qk_lens.graph.build import attribution_graph
from qk_lens.graph.export import save_neuronpedia, to_neuronpedia
from qk_lens.graph.loadings import HeadLoadings, head_loadings
from qk_lens.graph.nodes import NODE_COLUMNS, NODE_KINDS, READOUTS
from qk_lens.graph.result import Graph
from qk_lens.graph.transcoder_build import transcoder_graph, transcoder_loadings
from qk_lens.graph.transcoder_result import TranscoderGraph, TranscoderLoadings

__all__ = [
    "NODE_COLUMNS",
    "NODE_KINDS",
    "READOUTS",
    "Graph",
    "HeadLoadings",
    "TranscoderGraph",
    "TranscoderLoadings",
    "attribution_graph",
    "head_loadings",
    "save_neuronpedia",
    "to_neuronpedia",
    "transcoder_graph",
    "transcoder_loadings",
]
