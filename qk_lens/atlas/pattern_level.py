"""Pattern-level head scores: one batched forward over probes (or the user's prompts), pooled
attention statistics per head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from qk_lens.arch import arch_of
from qk_lens.capture import prompt_to_tokens

PATTERN_COLUMNS = (
    "previous_token",
    "induction",
    "duplicate_token",
    "first_token",
    "self",
    "offset",
    "offset_score",
    "entropy",
)


def pattern_stats(
    pattern: Float[Tensor, "batch head q k"],
    tokens: Int[Tensor, "batch q"],
    local_end: int,
) -> dict[str, Float[Tensor, "batch head"]]:
    """Per-probe sums and counts of each score (so batches and prompts can be pooled)."""
    n, _, seq, _ = pattern.shape
    q = torch.arange(1, seq)
    dt = pattern.dtype
    out: dict[str, Tensor] = {}
    for name, keys in (("previous_token", q - 1), ("self", q), ("first_token", q * 0)):
        out[name] = pattern[:, :, q, keys].sum(-1)
        out[name + "#"] = torch.full((n,), float(len(q)), dtype=dt)
    pos = torch.arange(seq)
    before = pos[None, :] < pos[:, None]  # [q, k]: k < q
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, q, k]
    not_first = pos[None, :] >= 1
    dup = same & before & not_first
    # induction: key k follows an earlier copy of the query's token (k − 1 ≥ 1, k < q)
    shifted = torch.zeros_like(same)
    shifted[:, :, 1:] = same[:, :, :-1]
    ind = shifted & before & (pos[None, :] >= 2)
    for name, mask in (("duplicate_token", dup), ("induction", ind)):
        has = mask.any(-1)  # [b, q]
        mass = (pattern * mask[:, None].to(dt)).sum(-1)  # [b, h, q]
        out[name] = (mass * has[:, None].to(dt)).sum(-1)
        out[name + "#"] = has.sum(-1).to(dt)
    # local (non-repeated) part: queries 1..local_end
    lq = torch.arange(1, local_end + 1)
    p_local = pattern[:, :, lq]  # [b, h, lq, k]
    ent = -(p_local * p_local.clamp_min(1e-30).log()).sum(-1) / (lq + 1).to(dt).log()
    out["entropy"] = ent.sum(-1)
    out["entropy#"] = torch.full((n,), float(len(lq)), dtype=dt)
    for d in range(1, local_end // 2 + 1):  # so that at least half the queries count
        qd = torch.arange(d + 1, local_end + 1)
        out[f"offset{d}"] = pattern[:, :, qd, qd - d].sum(-1)
        out[f"offset{d}#"] = torch.full((n,), float(len(qd)), dtype=dt)
    return out


@torch.no_grad()
def pooled_pattern_scores(
    model: Any,
    sequences: Sequence[Int[Tensor, "batch seq"]],
    local_ends: Sequence[int],
    batch_size: int,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Pooled pattern scores [layer, head] over batches of equal-length sequences."""
    arch = arch_of(model)
    n_layers = arch.n_layers
    names = {f"blocks.{layer}.{arch.layer(layer).hooks.pattern}" for layer in range(n_layers)}
    sums: dict[tuple[int, str], Tensor] = {}
    jobs = [
        (tokens[i : i + batch_size], end)
        for tokens, end in zip(sequences, local_ends, strict=True)
        for i in range(0, len(tokens), batch_size)
    ]
    for chunk, end in tqdm(jobs, desc="patterns", disable=not progress, leave=False):
        # stop after the last block: the unembedding (d_vocab wide) is not needed for patterns
        _, cache = model.run_with_cache(
            chunk.to(arch.device), names_filter=names.__contains__, stop_at_layer=n_layers
        )
        for layer in range(n_layers):
            pat = cache["pattern", layer].detach().to("cpu", torch.float64)
            for name, v in pattern_stats(pat, chunk, end).items():
                total = v.sum(0)
                sums[layer, name] = sums.get((layer, name), 0) + total
        del cache
    scores: dict[str, np.ndarray] = {}
    base = ("previous_token", "self", "first_token", "duplicate_token", "induction", "entropy")
    max_d = max(local_ends) // 2
    for name in base:
        scores[name] = np.stack([pooled_ratio(sums, layer, name) for layer in range(n_layers)])
    if max_d >= 1:
        profile = np.stack(
            [
                np.stack([pooled_ratio(sums, layer, f"offset{d}") for d in range(1, max_d + 1)], -1)
                for layer in range(n_layers)
            ]
        )  # [layer, head, d]
        best = np.nanargmax(np.nan_to_num(profile, nan=-1.0), -1)
        scores["offset"] = best + 1
        scores["offset_score"] = np.take_along_axis(profile, best[..., None], -1)[..., 0]
    else:
        shape = scores["self"].shape
        scores["offset"] = np.zeros(shape, dtype=int)
        scores["offset_score"] = np.full(shape, np.nan)
    return scores


def pooled_ratio(sums: dict[tuple[int, str], Any], layer: int, name: str) -> np.ndarray:
    total, count = sums.get((layer, name)), sums.get((layer, name + "#"))
    if total is None or count is None:
        return np.nan
    total = np.asarray(total, dtype=np.float64)
    count = float(np.asarray(count))
    return total / count if count > 0 else np.full_like(total, np.nan)


def prompt_list(model: Any, prompts: Any) -> list[Tensor]:
    if isinstance(prompts, str) or (isinstance(prompts, Tensor) and prompts.ndim == 1):
        prompts = [prompts]
    elif isinstance(prompts, Tensor) and prompts.ndim == 2:
        prompts = list(prompts)
    elif (
        isinstance(prompts, (list, tuple))
        and prompts
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts)
    ):
        prompts = [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise TypeError(
            "prompts must be a str, a list of str / token-id lists / 1-D LongTensors, or a 2-D "
            f"LongTensor [n, seq]; got {type(prompts).__name__}"
        )
    out = []
    for i, p in enumerate(prompts):
        tokens = prompt_to_tokens(model, p)
        if len(tokens) < 2:
            raise ValueError(f"prompts[{i}] has {len(tokens)} token; give at least 2")
        if len(tokens) > arch_of(model).n_ctx:
            raise ValueError(
                f"prompts[{i}] has {len(tokens)} tokens, more than n_ctx={arch_of(model).n_ctx}"
            )
        out.append(tokens[None])
    return out
