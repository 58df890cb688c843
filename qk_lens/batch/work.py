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


def part_tables(model: Any, cfg: RunConfig, part: Part) -> Iterator[pa.Table]:
    """The rows of every prompt of ``part`` (all the config's layers), in chunks of
    ``compute.table.query_chunk`` query positions: what is held at once is one chunk's rows."""
    t = cfg.compute.table
    layers = table_layers(cfg, model.cfg.n_layers)
    for j, prompt in enumerate(part.prompts):
        tokens = prompt_tokens(model, prompt, cfg.prompts.max_tokens)
        # only these layers' [head, q, k] scores and patterns are recorded (long prompts)
        with capture_scope(model, layers):
            for layer in layers:
                min_prob = pair_threshold(model, tokens, layer, t.heads, t.min_prob, t.max_pairs)
                chunks = qk_attribution_table_chunks(
                    model, tokens, layer, heads=t.heads, top_k=t.top_k, min_prob=min_prob,
                    basis=t.basis, chunk_size=t.query_chunk,
                )  # fmt: skip
                if t.max_pairs is not None:  # a per-prompt cut: the chunks are few then
                    chunks = iter([keep_top_pairs(pd.concat(list(chunks)), t.max_pairs)])
                for df in chunks:
                    df.insert(0, "prompt", part.first + j)
                    yield to_arrow([df])
        model.clear_qk_cache()  # one prompt at a time: memory stays flat over a long part


def compute_part(model: Any, cfg: RunConfig, part: Part) -> pa.Table:
    """All of :func:`part_tables` as one table."""
    tables = list(part_tables(model, cfg, part))
    return pa.concat_tables(tables) if tables else TABLE_SCHEMA.empty_table()


def to_arrow(frames: list[pd.DataFrame]) -> pa.Table:
    """The rows as an Arrow table of :data:`TABLE_SCHEMA`; categorical columns (labels, kinds)
    are decoded by Arrow, not through Python strings (millions of rows at long context)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return TABLE_SCHEMA.empty_table()
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    arrays = []
    for fld in TABLE_SCHEMA:
        col = df[fld.name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            codes = pa.array(col.cat.codes.to_numpy(), type=pa.int32())
            values = pa.array([str(c) for c in col.cat.categories], type=pa.string())
            arrays.append(pa.DictionaryArray.from_arrays(codes, values).dictionary_decode())
        else:
            arrays.append(pa.array(col.to_numpy(), type=fld.type))
    return pa.Table.from_arrays(arrays, schema=TABLE_SCHEMA)
