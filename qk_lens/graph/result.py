"""The attribution graph as a result: nodes, signed edges, how it was made; files without pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from qk_lens.arch import arch_of
from qk_lens.attribution import QKAttribution, qk_attribution
from qk_lens.checks import as_int, check_count, renamed
from qk_lens.files import atomic_path
from qk_lens.graph.checkpoints import check_model
from qk_lens.graph.nodes import (
    NODE_COLUMNS,
    NODE_FLOAT_COLUMNS,
    NODE_INT_COLUMNS,
    NODE_KINDS,
    NODE_STR_COLUMNS,
)
from qk_lens.state import state_of

FORMAT = "qk_lens.graph"
FORMAT_VERSION = 1
META_KEY = "qk_lens_graph"


@dataclass
class Graph:
    """A pruned checkpointed attribution graph: nodes, signed edges, and how it was made.

    ``nodes``: one row per node (columns in ``NODE_COLUMNS``: node_id, kind, layer, position,
    feature (token id for embeddings and logits), feature_b (the subtracted token of a logit
    difference, else −1), token, label, activation, coefficient, readout and offset (targets:
    ``readout = Σ incoming edges + offset`` exactly for attention-only models), prob (logits),
    weight (a logit's weight in the influence), influence and cumulative_influence).
    ``edge_source`` / ``edge_target`` index ``nodes``; ``edge_weight`` is the attribution.
    Every edge into a node at layer K crosses attention layer K−1 (see :meth:`edge_layers`).
    """

    nodes: pd.DataFrame
    edge_source: Int[Tensor, "edge"]
    edge_target: Int[Tensor, "edge"]
    edge_weight: Float[Tensor, "edge"]
    tokens: Int[Tensor, "pos"]
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ basics
    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return int(self.edge_weight.numel())

    @property
    def str_tokens(self) -> list[str]:
        return list(self.metadata.get("str_tokens", []))

    def __repr__(self) -> str:
        counts = self.nodes["kind"].value_counts().to_dict()
        kinds = ", ".join(f"{counts.get(k, 0)} {k}" for k in NODE_KINDS)
        return (
            f"Graph({self.metadata.get('model_name', '?')}, {len(self.tokens)} tokens, "
            f"{self.n_nodes} nodes ({kinds}), {self.n_edges} edges, "
            f"readout={self.metadata.get('readout')!r})"
        )

    def edge_layers(self) -> Int[Tensor, "edge"]:
        """The attention layer each edge crosses (its target's layer − 1; −1: embedding →
        layer-0 feature, no layer crossed)."""
        layer = torch.from_numpy(self.nodes["layer"].to_numpy(np.int64, copy=True))
        return layer[self.edge_target] - 1

    @property
    def edges(self) -> pd.DataFrame:
        """One row per edge: ids, labels, positions, the layer crossed and the weight."""
        n = self.nodes
        s, t = self.edge_source.numpy(), self.edge_target.numpy()
        return pd.DataFrame(
            {
                "source": n["node_id"].to_numpy()[s],
                "target": n["node_id"].to_numpy()[t],
                "weight": self.edge_weight.double().numpy(),
                "layer": self.edge_layers().numpy(),
                "source_pos": n["position"].to_numpy()[s],
                "target_pos": n["position"].to_numpy()[t],
                "source_label": n["label"].to_numpy()[s],
                "target_label": n["label"].to_numpy()[t],
                "source_index": s,
                "target_index": t,
            }
        )

    def node_index(self, node: Any) -> int:
        """Index of a node given by its row index or its node_id."""
        if isinstance(node, str):
            hits = np.nonzero(self.nodes["node_id"].to_numpy() == node)[0]
            if len(hits) == 0:
                raise ValueError(f"no node {node!r} in this graph (ids look like '3_1234_7')")
            return int(hits[0])
        i = as_int("node", node)
        if not 0 <= i < self.n_nodes:
            raise ValueError(f"node index {i} is outside [0, {self.n_nodes})")
        return i

    def edge_index(self, edge: Any) -> int:
        """Index of an edge given by its index or by (source, target) node ids/indices."""
        if isinstance(edge, tuple):
            if len(edge) != 2:
                raise ValueError(f"an edge is an index or a (source, target) pair, got {edge!r}")
            s, t = self.node_index(edge[0]), self.node_index(edge[1])
            hits = torch.nonzero((self.edge_source == s) & (self.edge_target == t))[:, 0]
            if len(hits) == 0:
                ids = self.nodes["node_id"]
                raise ValueError(
                    f"no edge {ids.iloc[s]!r} → {ids.iloc[t]!r} in this graph (pruned, or not "
                    "between adjacent layers)"
                )
            return int(hits[0])
        i = as_int("edge", edge)
        if not 0 <= i < self.n_edges:
            raise ValueError(f"edge index {i} is outside [0, {self.n_edges})")
        return i

    def incoming(self, node: Any) -> pd.DataFrame:
        """The edges into ``node``, strongest (|weight|) first."""
        i = self.node_index(node)
        e = self.edges
        e = e[e["target_index"] == i]
        return e.reindex(e["weight"].abs().sort_values(ascending=False).index)

    def outgoing(self, node: Any) -> pd.DataFrame:
        """The edges out of ``node``, strongest (|weight|) first."""
        i = self.node_index(node)
        e = self.edges
        e = e[e["source_index"] == i]
        return e.reindex(e["weight"].abs().sort_values(ascending=False).index)

    @renamed(k="top_k")
    def top_edges(self, top_k: int = 20) -> pd.DataFrame:
        """The ``top_k`` strongest (|weight|) edges."""
        top_k = check_count("top_k", top_k)
        e = self.edges
        return e.reindex(e["weight"].abs().sort_values(ascending=False).index).head(top_k)

    # ------------------------------------------------------------------ into QK attributions
    def qk_attribution(self, model: Any, edge: Any, head: int) -> QKAttribution:
        """The QK attribution of ``head`` at the pair this edge crosses: layer K−1, query = the
        target's position, key = the source's position — why the head fetched what it moved."""
        i = self.edge_index(edge)
        s, t = int(self.edge_source[i]), int(self.edge_target[i])
        layer = int(self.nodes["layer"].iloc[t]) - 1
        if layer < 0:
            raise ValueError(
                f"edge {i} runs from an embedding to a layer-0 feature: it crosses no attention "
                "layer, so no head carried it"
            )
        self.check_model(model)
        q_pos = int(self.nodes["position"].iloc[t])
        k_pos = int(self.nodes["position"].iloc[s])
        basis = "dictionary" if layer in state_of(model).dictionaries else "upstream"
        return qk_attribution(model, self.tokens, layer, head, q_pos, k_pos, basis=basis)

    def check_model(self, model: Any) -> None:
        """Raise ValueError unless ``model`` looks like the one this graph was built with."""
        check_model(model)
        want = self.metadata.get("model", {})
        have = model_fingerprint(model)
        bad = {k: (want[k], have.get(k)) for k in want if have.get(k) != want[k]}
        if bad:
            raise ValueError(f"this graph was built with another model: {bad} (graph, model)")
        vocab = arch_of(model).d_vocab
        if int(self.tokens.max()) >= vocab:
            raise ValueError(f"the graph's tokens exceed this model's vocabulary ({vocab})")

    # ------------------------------------------------------------------ files (no pickle)
    def save(self, path: str | PathLike[str]) -> Path:
        """Write one safetensors file: edges, tokens and numeric node columns as tensors, the
        string columns and the metadata as JSON in its header."""
        path = Path(path)
        tensors = {
            "edge_source": self.edge_source.to(torch.int64).contiguous(),
            "edge_target": self.edge_target.to(torch.int64).contiguous(),
            "edge_weight": self.edge_weight.contiguous(),
            "tokens": self.tokens.to(torch.int64).contiguous(),
        }
        for c in NODE_FLOAT_COLUMNS:
            tensors[f"node_{c}"] = torch.tensor(self.nodes[c].to_numpy(np.float64, copy=True))
        for c in NODE_INT_COLUMNS:
            tensors[f"node_{c}"] = torch.tensor(self.nodes[c].to_numpy(np.int64, copy=True))
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "metadata": self.metadata,
            "nodes": {c: self.nodes[c].astype(str).tolist() for c in NODE_STR_COLUMNS},
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Graph:
        """Read a file written by :meth:`save`; a corrupt or foreign file raises ValueError."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"graph file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header_json = (f.metadata() or {}).get(META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        if header_json is None:
            raise ValueError(f"{path} is a safetensors file but not a qk_lens graph (no header)")
        try:
            header = json.loads(header_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: the graph header is not valid JSON ({e})") from None
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} holds format {header.get('format')!r} version {header.get('version')!r}; "
                f"this qk_lens reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        try:
            cols: dict[str, Any] = {c: header["nodes"][c] for c in NODE_STR_COLUMNS}
            for c in (*NODE_INT_COLUMNS, *NODE_FLOAT_COLUMNS):
                cols[c] = tensors[f"node_{c}"].numpy()
            src, tgt = tensors["edge_source"], tensors["edge_target"]
            weight, tokens = tensors["edge_weight"], tensors["tokens"]
        except KeyError as e:
            raise ValueError(f"{path} is missing {e} — the file is truncated or edited") from None
        n = len(cols["node_id"])
        lengths = {c: len(v) for c, v in cols.items()}
        if any(v != n for v in lengths.values()):
            raise ValueError(f"{path}: node columns have different lengths {lengths}")
        if not (len(src) == len(tgt) == len(weight)):
            raise ValueError(f"{path}: edge arrays have different lengths")
        if len(src) and (int(src.min()) < 0 or int(max(src.max(), tgt.max())) >= n):
            raise ValueError(f"{path}: edges point outside the {n} nodes")
        nodes = pd.DataFrame(cols)[NODE_COLUMNS]
        return cls(nodes, src, tgt, weight, tokens, header.get("metadata", {}))


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What must match between a graph and a model used with it."""
    arch = arch_of(model)
    return {
        "model_name": str(model.cfg.model_name),
        "n_layers": arch.n_layers,
        "d_model": arch.d_model,
        "n_heads": arch.n_heads,
        "d_vocab": arch.d_vocab,
    }
