"""Running the model for a steering call: the clean state from the capture, the steered forward
with its hooks, and the whole query/key through the frozen maps (the prediction's other side)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from qk_lens.arch import LayerQK, Side, arch_of
from qk_lens.attribution.projection import project_side
from qk_lens.bases import PartsBatch, part_meta
from qk_lens.capture import Capture, recorder
from qk_lens.checks import check_position, check_positions, is_int
from qk_lens.steering.edits import Setup


class WholeResidual:
    """The residual entering the layer as one part: project_side then gives the full q or k."""

    key = ("residual",)

    def parts(self, model: Any, cap: Capture, layer: int, positions: Tensor) -> PartsBatch:
        arch = arch_of(model)
        x = cap.layer_act(layer, arch.layer(layer).hooks.resid_pre).to(arch.dtype)[positions]
        n = len(positions)
        meta = part_meta("residual", layer, -1, positions.numpy(), -1, np.nan, "residual")
        return PartsBatch(positions, x[:, None], torch.ones(n, 1, dtype=torch.bool), meta, "resid")


def full_side(model: Any, qk: LayerQK, side: Side, heads: Tensor) -> Float[Tensor, "h pos d_head"]:
    """The model's whole query (÷ attn_scale) or key at every position, through the frozen maps."""
    positions = torch.arange(qk.cap.n_tokens)
    ps = project_side(model, qk, side, WholeResidual(), positions, heads)
    return (ps.vectors * ps.valid[None, :, :, None]).sum(2)


def hook_name(layer: int, hook: str) -> str:
    return f"blocks.{layer}.{hook}"


def qk_norm_hooks(s: Setup) -> list[str]:
    """The qk-norm scale hooks of the layer (none without qk-norm)."""
    qn = s.qk.arch.qk_norm
    if qn is None:
        return []
    return [hook_name(s.layer, qn.q_scale_hook), hook_name(s.layer, qn.k_scale_hook)]


def attn_in_scale_hooks(s: Setup) -> list[str]:
    """The scale hook of the norm attention reads through (none without one)."""
    norm = s.qk.arch.attn_in
    return [] if norm.is_identity else [hook_name(s.layer, norm.scale_hook)]


@dataclass
class Run:
    raw: Float[Tensor, "b h q k"]  # chosen heads' raw (pre-softcap) scores
    pattern: Float[Tensor, "b h q k"]
    logits: Float[Tensor, "b n_readout vocab"]
    loss: Float[Tensor, "b pos_minus_1"]
    acts: dict[str, Tensor]


def forward(
    s: Setup,
    n_batch: int,
    hooks: list[tuple[str, Callable]],
    record: Sequence[str],
    readout: list[int],
) -> Run:
    """The steered forward, batched: each query head gets its own key/value copy (GQA), so only
    the chosen heads see an edit of their group's key."""
    model, qk = s.model, s.qk
    arch = arch_of(model)
    acts, saving = recorder(model, [*qk.score_hooks(), *record])
    tokens = s.cap.tokens.to(arch.device)[None].expand(n_batch, -1)
    ungrouped = arch.ungrouped() if arch.ungrouped is not None else nullcontext()
    points = arch.points()
    edits = [(arch.run_name(name, points), fn) for name, fn in hooks]
    with torch.no_grad(), ungrouped, arch.exact_forward():
        logits = model.run_with_hooks(tokens, fwd_hooks=[*edits, *saving], return_type="logits")
    return make_run(s, logits, acts, qk.raw_scores(acts), readout)


def clean_run(s: Setup, record: Sequence[str], readout: list[int]) -> Run:
    """The unsteered run, from the capture (its one forward): no second forward."""
    cap = s.cap
    acts = {name: as_ungrouped(s, name, cap.batched(name)) for name in record}
    return make_run(s, cap.logits()[None], acts, s.qk.raw_scores()[None], readout)


def as_ungrouped(s: Setup, name: str, t: Tensor) -> Tensor:
    """A clean per-kv-head k-norm scale as the steered (ungrouped) run records it: one per query
    head, each its group's."""
    arch = s.qk.arch
    qn = arch.qk_norm
    if qn is None or qn.kind != "per_head" or arch.group == 1:
        return t
    if arch_of(s.model).ungrouped is None:  # this model's steered runs stay grouped
        return t
    if name != hook_name(s.layer, qn.k_scale_hook):
        return t
    per_pos = t.reshape(s.n_tokens, arch.n_kv)
    return per_pos.repeat_interleave(arch.group, dim=1).reshape(-1, 1)


def make_run(
    s: Setup, logits: Tensor, acts: dict[str, Tensor], raw: Tensor, readout: list[int]
) -> Run:
    qk = s.qk
    n_batch = logits.shape[0]
    # next-token losses on the device, then only the readout rows of the logits come back
    target = s.cap.tokens[1:].to(logits.device)[None].expand(n_batch, -1)
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).to(qk.dtype), target, reduction="none")
    heads = s.head_t
    raw = raw[:, heads].to(qk.dtype).cpu()
    pattern_hook = hook_name(s.layer, qk.arch.hooks.pattern)
    pattern = acts[pattern_hook] if pattern_hook in acts else s.cap.batched(pattern_hook)
    pattern = pattern[:, heads].to(qk.dtype).cpu()
    kept = logits[:, readout].detach().to(qk.dtype).cpu()
    return Run(raw, pattern, kept, loss.detach().cpu(), acts)


def replace_with_clean(clean: Tensor, rows: Tensor | None = None) -> Callable:
    """A hook that swaps in the clean value (batch repeated; optionally only some batch rows)."""

    def hook(t: Tensor, hook: Any) -> Tensor:
        n_batch = t.shape[0] // clean.shape[0]
        full = clean.to(t.device, t.dtype).repeat(n_batch, *[1] * (t.ndim - 1))
        if rows is None:
            return full
        # qk-norm scales are flattened [batch·pos·head, 1]: view every hook as [batch, -1]
        out = t.clone().reshape(n_batch, -1)
        out[rows] = full.reshape(n_batch, -1)[rows]
        return out.reshape(t.shape)

    return hook


def freeze_pattern_hook(clean: Tensor, keep: list[int]) -> Callable:
    def hook(t: Tensor, hook: Any) -> Tensor:
        out = clean.to(t.device, t.dtype).expand_as(t).clone()
        out[:, keep] = t[:, keep]
        return out

    return hook


def freeze_hooks(s: Setup, clean: Run) -> list[tuple[str, Callable]]:
    """Every head other than the chosen ones, at this layer and after, keeps its clean pattern."""
    out = []
    for layer in range(s.layer, arch_of(s.model).n_layers):
        keep = s.heads if layer == s.layer else []
        name = hook_name(layer, arch_of(s.model).layer(layer).hooks.pattern)
        out.append((name, freeze_pattern_hook(clean.acts[name], keep)))
    return out


def pattern_record(s: Setup, freeze: bool) -> list[str]:
    if not freeze:
        return []
    return [
        hook_name(layer, "attn.hook_pattern") for layer in range(s.layer, arch_of(s.model).n_layers)
    ]


def masked(raw: Tensor) -> Tensor:
    return torch.isneginf(raw)


def readout_positions(v: Any, n_tokens: int) -> list[int]:
    if is_int(v):
        return [check_position("readout", v, n_tokens)]
    return check_positions("readout", v, n_tokens)


def prediction_scale(q: Tensor, k: Tensor) -> Tensor:
    """‖q‖·‖k‖ per (head, q, k): what float32 rounding of the scores is proportional to."""
    return q.norm(dim=-1)[:, :, None] * k.norm(dim=-1)[:, None, :]
