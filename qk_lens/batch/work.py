"""One part of a run: the rows of a chunk of prompts, computed by whichever worker holds the model.

The rows of a part depend only on the config and its prompts, never on which process or machine
computes them, so every executor writes the same dataset (with the same threads per worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import torch

from qk_lens.attribution import qk_attribution_table_chunks
from qk_lens.batch.config import RunConfig, table_layers
from qk_lens.capture import prompt_to_tokens
from qk_lens.state import capture_scope, capture_tokens
from qk_lens.steering import FeatureNotActive

# The table's columns, in order, with the types every part is written with (a part with no
# rows has the same schema as one with many).
TABLE_SCHEMA = pa.schema(
    [
        ("prompt", pa.int64()),
        ("layer", pa.int64()),
        ("head", pa.int64()),
        ("q_pos", pa.int64()),
        ("k_pos", pa.int64()),
        ("prob", pa.float64()),
        ("score", pa.float64()),
        ("model_score", pa.float64()),
        ("rank", pa.int64()),
        ("q_kind", pa.string()),
        ("q_feature", pa.int64()),
        ("q_label", pa.string()),
        ("k_kind", pa.string()),
        ("k_part_pos", pa.int64()),
        ("k_feature", pa.int64()),
        ("k_label", pa.string()),
        ("term", pa.float64()),
    ]
)


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([("prompt", pa.int64()), *fields])


I64, F64, STR = pa.int64(), pa.float64(), pa.string()
SCHEMAS = {
    "table": TABLE_SCHEMA,
    "graph_nodes": _schema(
        ("node_id", STR), ("kind", STR), ("layer", I64), ("position", I64), ("feature", I64),
        ("feature_b", I64), ("token", STR), ("label", STR), ("activation", F64),
        ("coefficient", F64), ("readout", F64), ("offset", F64), ("prob", F64), ("weight", F64),
        ("influence", F64), ("cumulative_influence", F64),
    ),
    "graph_edges": _schema(
        ("source", STR), ("target", STR), ("weight", F64), ("layer", I64), ("source_pos", I64),
        ("target_pos", I64), ("source_label", STR), ("target_label", STR),
        ("source_index", I64), ("target_index", I64),
    ),
    "head_loadings": _schema(
        ("edge", I64), ("source", STR), ("target", STR), ("source_label", STR),
        ("target_label", STR), ("layer", I64), ("component", STR), ("head", I64),
        ("loading", F64), ("share", F64),
    ),
    "steering": _schema(
        ("sweep", I64), ("layer", I64), ("head", I64), ("feature", I64), ("side", STR),
        ("scale", F64), ("q_pos", I64), ("k_pos", I64), ("score_after", F64), ("prob_after", F64),
        ("top_before", STR), ("top_after", STR), ("top_after_prob", F64),
        ("clean_top_prob", F64), ("mean_loss_change", F64), ("max_error", F64),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Part:
    """Prompts ``first .. first + len(prompts) - 1`` of the run, as part ``index``."""

    index: int
    first: int
    prompts: tuple[Any, ...]  # what prompt_to_tokens takes: text, or token ids


def split_parts(prompts: list[str], chunk_size: int) -> list[Part]:
    return [
        Part(i // chunk_size, i, tuple(prompts[i : i + chunk_size]))
        for i in range(0, len(prompts), chunk_size)
    ]


def prompt_tokens(model: Any, prompt: str, max_tokens: int | None) -> torch.Tensor:
    tokens = prompt_to_tokens(model, prompt)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def pair_threshold(model: Any, tokens: torch.Tensor, layer: int, heads: list[int] | None,
                   min_prob: float, max_pairs: int | None) -> float:  # fmt: skip
    """The probability the ``max_pairs``-th most attended pair reaches (or ``min_prob``)."""
    if max_pairs is None:
        return min_prob
    pattern = capture_tokens(model, tokens).pattern(layer)
    if heads is not None:
        pattern = pattern[heads]
    probs = pattern.reshape(-1)
    if probs.numel() <= max_pairs:
        return min_prob
    kth = float(probs.double().topk(max_pairs).values[-1])
    return max(min_prob, kth)


def keep_top_pairs(df: pd.DataFrame, max_pairs: int | None) -> pd.DataFrame:
    """At most ``max_pairs`` pairs (ties at the threshold broken by position order)."""
    if max_pairs is None or df.empty:
        return df
    pairs = df[["head", "q_pos", "k_pos", "prob"]].drop_duplicates(["head", "q_pos", "k_pos"])
    if len(pairs) <= max_pairs:
        return df
    keep = pairs.sort_values("prob", ascending=False, kind="stable").head(max_pairs)
    key = ["head", "q_pos", "k_pos"]
    return df.merge(keep[key], on=key, how="inner", sort=False)


def part_tables(model: Any, cfg: RunConfig, part: Part) -> Iterator[tuple[str, pa.Table]]:
    """``(dataset, rows)`` for every prompt of ``part``: the table in chunks of
    ``compute.table.query_chunk`` query positions (what is held at once is one chunk's rows),
    then the graph and the steering sweeps of the prompt."""
    c = cfg.compute
    layers = table_layers(cfg, model.cfg.n_layers)
    for j, prompt in enumerate(part.prompts):
        index = part.first + j
        tokens = prompt_tokens(model, prompt, cfg.prompts.max_tokens)
        if c.table is not None:
            t = c.table
            # only these layers' [head, q, k] scores and patterns are recorded (long prompts)
            with capture_scope(model, layers):
                for layer in layers:
                    p_min = pair_threshold(model, tokens, layer, t.heads, t.min_prob, t.max_pairs)
                    chunks = qk_attribution_table_chunks(
                        model, tokens, layer, heads=t.heads, top_k=t.top_k, min_prob=p_min,
                        basis=t.basis, chunk_size=t.query_chunk,
                    )  # fmt: skip
                    if t.max_pairs is not None:  # a per-prompt cut: the chunks are few then
                        chunks = iter([keep_top_pairs(pd.concat(list(chunks)), t.max_pairs)])
                    for df in chunks:
                        yield "table", to_arrow([df.assign(prompt=index)], TABLE_SCHEMA)
            model.clear_qk_cache()
        if c.graphs is not None:
            yield from graph_tables(model, c.graphs, tokens, index)
        for i, st in enumerate(c.steering):
            yield "steering", steering_table(model, st, i, tokens, index)
        model.clear_qk_cache()  # one prompt at a time: memory stays flat over a long part


def graph_tables(
    model: Any, spec: Any, tokens: torch.Tensor, index: int
) -> Iterator[tuple[str, pa.Table]]:
    g = model.attribution_graph(
        tokens, spec.targets, target_pos=spec.target_pos, max_n_logits=spec.max_n_logits,
        desired_logit_prob=spec.desired_logit_prob, readout=spec.readout,
        node_threshold=spec.node_threshold, edge_threshold=spec.edge_threshold,
        max_feature_nodes=spec.max_feature_nodes,
    )  # fmt: skip
    loadings = model.head_loadings(g, through_mlp=spec.through_mlp)
    loadings.check()  # residual + MLP + Σ heads = edge: never write a split that is not exact
    yield "graph_nodes", to_arrow([g.nodes.assign(prompt=index)], SCHEMAS["graph_nodes"])
    yield "graph_edges", to_arrow([g.edges.assign(prompt=index)], SCHEMAS["graph_edges"])
    frame = loadings.frame(min_abs=spec.min_abs_loading).assign(prompt=index)
    yield "head_loadings", to_arrow([frame], SCHEMAS["head_loadings"])


def steering_table(model: Any, spec: Any, sweep: int, tokens: torch.Tensor, index: int) -> pa.Table:
    """One row per scale where the feature is active in the prompt; no rows where it is not."""
    schema = SCHEMAS["steering"]
    try:
        sw = model.steer_qk_sweep(
            tokens, spec.layer, spec.head, spec.feature, scales=spec.scales, side=spec.side
        )
    except FeatureNotActive:
        return schema.empty_table()
    sw.check()  # measured score changes equal the attribution's prediction
    q, k = sw.target
    rows = []
    for s, item in zip(sw.scales, sw.items, strict=True):
        summary = item.summary(sw.target)
        rows.append({
            "prompt": index, "sweep": sweep, "layer": spec.layer, "head": spec.head,
            "feature": spec.feature, "side": spec.side, "scale": float(s), "q_pos": q, "k_pos": k,
            "score_after": summary[f"L{spec.layer}H{spec.head} score"],
            "prob_after": summary[f"L{spec.layer}H{spec.head} prob"],
            **{c: summary[c] for c in ("top_before", "top_after", "top_after_prob",
                                        "clean_top_prob", "mean_loss_change", "max_error")},
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schema)


def compute_part(model: Any, cfg: RunConfig, part: Part) -> dict[str, pa.Table]:
    """All of :func:`part_tables`, one table per dataset."""
    out: dict[str, list[pa.Table]] = {name: [] for name in cfg.compute.datasets()}
    for name, table in part_tables(model, cfg, part):
        out[name].append(table)
    return {n: pa.concat_tables(t) if t else SCHEMAS[n].empty_table() for n, t in out.items()}


def to_arrow(frames: list[pd.DataFrame], schema: pa.Schema) -> pa.Table:
    """The rows as an Arrow table of ``schema``; categorical columns (labels, kinds) are
    decoded by Arrow, not through Python strings (millions of rows at long context)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return schema.empty_table()
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    arrays = []
    for fld in schema:
        col = df[fld.name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            codes = pa.array(col.cat.codes.to_numpy(), type=pa.int32())
            values = pa.array([str(c) for c in col.cat.categories], type=pa.string())
            arrays.append(pa.DictionaryArray.from_arrays(codes, values).dictionary_decode())
        elif fld.type == pa.string():
            arrays.append(pa.array(col.astype(object).to_numpy(), type=fld.type, from_pandas=True))
        else:
            arrays.append(pa.array(col.to_numpy(), type=fld.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)
