"""The fields of Neuronpedia's / circuit-tracer's graph JSON that the graph frontend reads, as a
JSON Schema, with the QK fields (``qk_tracing_results`` on nodes, top-level ``qk_only_nodes``)
and qk_lens's extra ``head_loadings`` on links (which the frontend ignores)."""

from __future__ import annotations

from typing import Any

_PAIRS = {"type": "array", "items": {"type": "array", "minItems": 3, "maxItems": 3,
                                     "prefixItems": [{"type": "string"}, {"type": "string"},
                                                     {"type": "number"}]}}  # fmt: skip
_MARGINALS = {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                         "prefixItems": [{"type": "string"}, {"type": "number"}]}}  # fmt: skip
QK_TRACING = {
    "type": "object",
    "required": ["pair_wise_contributors", "top_q_marginal_contributors",
                 "top_k_marginal_contributors"],
    "properties": {
        "pair_wise_contributors": _PAIRS,
        "top_q_marginal_contributors": _MARGINALS,
        "top_k_marginal_contributors": _MARGINALS,
    },
}  # fmt: skip
NODE = {
    "type": "object",
    "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
    "properties": {
        "node_id": {"type": "string"},
        "feature": {"type": ["integer", "null"]},
        "layer": {"type": ["string", "integer"]},
        "ctx_idx": {"type": "integer"},
        "feature_type": {"type": "string"},
        "jsNodeId": {"type": "string"},
        "clerp": {"type": "string"},
        "influence": {"type": ["number", "null"]},
        "activation": {"type": ["number", "null"]},
        "token_prob": {"type": "number"},
        "is_target_logit": {"type": "boolean"},
        "qk_tracing_results": QK_TRACING,
    },
}
NEURONPEDIA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "prompt_tokens", "prompt"],
            "properties": {
                "slug": {"type": "string"},
                "scan": {"type": ["string", "null"]},
                "prompt_tokens": {"type": "array", "items": {"type": "string"}},
                "prompt": {"type": "string"},
                "node_threshold": {"type": ["number", "null"]},
                "schema_version": {"type": "integer"},
            },
        },
        "qParams": {"type": "object"},
        "nodes": {"type": "array", "items": NODE},
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "weight"],
                "properties": {
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                    "weight": {"type": "number"},
                    # qk_lens's split of the link (the frontend ignores it): residual + mlp
                    # (+ multi_head for transcoder graphs) + the heads (a list for one layer, or
                    # {layer: list}) = weight
                    "head_loadings": {
                        "type": "object",
                        "required": ["residual", "mlp", "heads"],
                        "properties": {
                            "residual": {"type": "number"},
                            "mlp": {"type": "number"},
                            "multi_head": {"type": "number"},
                            "heads": {"type": ["object", "array"]},
                        },
                    },
                },
            },
        },
        "qk_only_nodes": {"type": "object", "additionalProperties": NODE},
    },
}


def validate_neuronpedia(data: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``data`` has the fields the frontend reads
    (needs the ``jsonschema`` package)."""
    import jsonschema

    jsonschema.validate(data, NEURONPEDIA_SCHEMA)
