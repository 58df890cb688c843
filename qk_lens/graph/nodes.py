"""Graph nodes: their ids (the same as circuit-tracer's / Neuronpedia's), their kinds and columns,
and the node set of one layer with its source vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int
from torch import Tensor

NODE_KINDS = ("feature", "error", "bias", "embedding", "logit")
READOUTS = ("encoder", "decoder")
NODE_FLOAT_COLUMNS = (
    "activation",
    "coefficient",
    "readout",
    "offset",
    "prob",
    "weight",
    "influence",
    "cumulative_influence",
)
NODE_INT_COLUMNS = ("layer", "position", "feature", "feature_b")
NODE_STR_COLUMNS = ("node_id", "kind", "token", "label")
NODE_COLUMNS = list(NODE_STR_COLUMNS[:2]) + [
    "layer",
    "position",
    "feature",
    "feature_b",
    "token",
    "label",
    *NODE_FLOAT_COLUMNS,
]


# ============================================================================ node ids
# The same ids as circuit-tracer / Neuronpedia graph JSON, so that exports need no remapping.
def feature_id(layer: int, feature: int, pos: int) -> str:
    return f"{layer}_{feature}_{pos}"


def error_id(layer: int, pos: int) -> str:
    return f"{layer}_-1_{pos}"


def bias_id(layer: int, pos: int) -> str:
    return f"{layer}_-2_{pos}"


def embedding_id(token: int, pos: int) -> str:
    return f"E_{token}_{pos}"


def logit_id(n_layers: int, token: int, pos: int, token_b: int = -1) -> str:
    # circuit-tracer puts logits at layer n_layers + 1; a difference gets "a-b" in the id
    tok = f"{token}" if token_b < 0 else f"{token}-{token_b}"
    return f"{n_layers + 1}_{tok}_{pos}"


# ============================================================================ node sets
@dataclass
class NodeSet:
    """The nodes of one residual layer (or the embeddings, or the logits), with their vectors.

    ``vectors`` are the source vectors (they sum to ``x_K[p]`` over the nodes at ``p``); feature
    nodes come first, so ``n_features`` rows are the layer's targets.
    """

    layer: int
    ids: list[str]
    kind: np.ndarray
    positions: Int[Tensor, "n"]
    feature: np.ndarray
    activation: np.ndarray
    coefficient: np.ndarray
    label: list[str]
    vectors: Float[Tensor, "n d_model"] | None
    n_features: int
    feature_b: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Targets:
    """Readouts of the targets of one layer: ``r_t = w_t · x[p_t] + const_t``."""

    readout: Float[Tensor, "n d_model"]
    const: Float[Tensor, "n"]
    positions: Int[Tensor, "n"]
    value: Float[Tensor, "n"]
