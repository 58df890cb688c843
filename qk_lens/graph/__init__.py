"""Checkpointed attribution graphs: node sets and readouts at each layer, edges through one frozen
block, circuit-tracer's pruning, the graph result, head loadings, and the Neuronpedia export."""

from qk_lens.graph.build import attribution_graph
from qk_lens.graph.export import save_neuronpedia, to_neuronpedia
from qk_lens.graph.graph_view import GraphView, graph_view
from qk_lens.graph.loadings import HeadLoadings, head_loadings
from qk_lens.graph.neuronpedia_schema import NEURONPEDIA_SCHEMA, validate_neuronpedia
from qk_lens.graph.nodes import NODE_COLUMNS, NODE_KINDS, READOUTS
from qk_lens.graph.result import Graph
from qk_lens.graph.transcoder_build import transcoder_graph, transcoder_loadings
from qk_lens.graph.transcoder_json import (
    load_graph_json,
    save_transcoder_neuronpedia,
    transcoder_to_neuronpedia,
)
from qk_lens.graph.transcoder_result import TranscoderGraph, TranscoderLoadings

__all__ = [
    "NEURONPEDIA_SCHEMA",
    "NODE_COLUMNS",
    "NODE_KINDS",
    "READOUTS",
    "Graph",
    "GraphView",
    "HeadLoadings",
    "TranscoderGraph",
    "TranscoderLoadings",
    "attribution_graph",
    "graph_view",
    "head_loadings",
    "load_graph_json",
    "save_transcoder_neuronpedia",
    "save_neuronpedia",
    "to_neuronpedia",
    "transcoder_graph",
    "transcoder_loadings",
    "transcoder_to_neuronpedia",
    "validate_neuronpedia",
]
