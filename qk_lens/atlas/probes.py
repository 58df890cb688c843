"""Pattern-level head signatures, measured on probe prompts the module builds itself.

A probe prompt is ``BOS, s, s`` with ``s`` a segment of distinct random tokens. On it a
previous-token head attends from q to q−1, a duplicate-token head from the second copy to the
same token in the first, and an induction head from the second copy to the token *after* the
earlier occurrence (q − L + 1 for segment length L).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.checks import check_count, check_int

SCORE_COLUMNS = ("previous_token", "induction", "duplicate_token", "first_token", "self")


def probe_token_ids(model: Any) -> Int[Tensor, " n"]:
    """Ids random probes may use: the whole vocabulary except the tokenizer's special tokens."""
    ids = torch.arange(model.cfg.d_vocab)
    tok = getattr(model, "tokenizer", None)
    special = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    if special:
        ids = ids[~torch.isin(ids, torch.tensor(sorted(special)))]
    return ids


def default_probe_length(model: Any) -> int:
    """Segment length of the default probes: 16, or what fits twice in the context."""
    return min(16, (model.cfg.n_ctx - 1) // 2)


def bos_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    return 0


def repeated_random_tokens(
    model: Any,
    n: int = 32,
    length: int = 16,
    seed: int = 0,
    token_ids: Int[Tensor, " n_ids"] | None = None,
) -> Int[Tensor, "n seq"]:
    """``n`` probes ``BOS, s, s`` with ``s`` ``length`` distinct random tokens (seeded)."""
    ids = probe_token_ids(model) if token_ids is None else torch.as_tensor(token_ids)
    if length > len(ids):
        raise ValueError(f"length={length} exceeds the {len(ids)} distinct probe tokens available")
    if 1 + 2 * length > model.cfg.n_ctx:
        raise ValueError(
            f"length={length} gives {1 + 2 * length} tokens, more than n_ctx={model.cfg.n_ctx}; "
            f"use length <= {(model.cfg.n_ctx - 1) // 2}"
        )
    gen = torch.Generator().manual_seed(seed)
    # distinct tokens per segment: a repeat inside s would make the induction target ambiguous
    seg = torch.stack([ids[torch.randperm(len(ids), generator=gen)[:length]] for _ in range(n)])
    bos = torch.full((n, 1), bos_id(model), dtype=torch.long)
    return torch.cat([bos, seg, seg], dim=1)


def _scores(
    pattern: Float[Tensor, "batch head q k"], length: int
) -> dict[str, Float[Tensor, " head"]]:
    seq = pattern.shape[-1]
    q_all = torch.arange(1, seq)
    q_rep = torch.arange(length + 1, seq)  # the second copy
    return {
        "previous_token": pattern[:, :, q_all, q_all - 1].mean((0, 2)),
        "induction": pattern[:, :, q_rep, q_rep - length + 1].mean((0, 2)),
        "duplicate_token": pattern[:, :, q_rep, q_rep - length].mean((0, 2)),
        "first_token": pattern[:, :, q_all, 0].mean((0, 2)),
        "self": pattern[:, :, q_all, q_all].mean((0, 2)),
    }


@torch.no_grad()
def pattern_scores(
    model: Any,
    n: int = 32,
    length: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    tokens: Int[Tensor, "n seq"] | None = None,
) -> pd.DataFrame:
    """One row per (layer, head): mean attention to the previous token, to the induction target,
    to the duplicate token, to the first token and to itself, on repeated random probes
    (``tokens`` of shape ``BOS, s, s`` may be given instead; ``length`` is then ``len(s)``)."""
    batch_size = check_count("batch_size", batch_size)
    if tokens is None:
        n = check_count("n", n)
        length = default_probe_length(model) if length is None else check_int("length", length, 1)
        tokens = repeated_random_tokens(model, n=n, length=length, seed=seed)
    else:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 2 or tokens.shape[1] % 2 != 1:
            raise ValueError(
                f"tokens must be [n, 1 + 2 * length] (BOS, segment, segment), got {tuple(tokens.shape)}"
            )
        length = (tokens.shape[1] - 1) // 2
        if not torch.equal(tokens[:, 1 : 1 + length], tokens[:, 1 + length :]):
            raise ValueError(
                "tokens must repeat their segment: tokens[:, 1:1+L] == tokens[:, 1+L:]"
            )
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)}
    sums: dict[str, Tensor] = {}
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(chunk, names_filter=lambda h: h in names)
        for layer in range(model.cfg.n_layers):
            pat = cache["pattern", layer].double().cpu()
            for name, v in _scores(pat, length).items():
                key = f"{layer}:{name}"
                sums[key] = sums.get(key, 0) + v * len(chunk)
    rows = []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            row: dict[str, Any] = {"layer": layer, "head": head}
            for name in SCORE_COLUMNS:
                row[name] = float(sums[f"{layer}:{name}"][head] / len(tokens))
            rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["probe"] = {"n": len(tokens), "length": length, "seed": seed}
    return out


def strongest(scores: pd.DataFrame, column: str, layers: Any = None) -> tuple[int, int, float]:
    """(layer, head, score) with the highest ``column`` (optionally among ``layers``)."""
    df = scores if layers is None else scores[scores["layer"].isin(list(layers))]
    if df.empty:
        raise ValueError(f"no heads in layers {list(layers)}")
    i = int(np.argmax(df[column].to_numpy()))
    row = df.iloc[i]
    return int(row["layer"]), int(row["head"]), float(row[column])
