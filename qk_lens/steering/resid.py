"""Residual edits: delete or scale features in the residual entering a layer (every head sees it);
the frozen-norm prediction beside the frozen-norm and live-norm measurements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import einops
import torch
from torch import Tensor

from qk_lens.checks import check_positions, is_int, renamed
from qk_lens.steering.edits import (
    FeatureKey,
    check_active,
    coefficients,
    edit_map,
    plan_edits,
    setup,
)
from qk_lens.steering.qk import qk_steering
from qk_lens.steering.results import ResidSteering
from qk_lens.steering.runs import (
    attn_in_scale_hooks,
    clean_run,
    forward,
    freeze_hooks,
    full_side,
    hook_name,
    masked,
    pattern_record,
    prediction_scale,
    qk_norm_hooks,
    readout_positions,
    replace_with_clean,
)


@renamed(readout="readout_pos")
def steer_resid(
    model: Any,
    prompt: Any,
    layer: int,
    features: Mapping[FeatureKey, float] | Sequence[FeatureKey] | FeatureKey,
    *,
    heads: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    add: Mapping[FeatureKey, float] | None = None,
    freeze_other_patterns: bool = False,
    readout_pos: int | Sequence[int] = -1,
) -> ResidSteering:
    """Edit features in the residual stream entering ``layer`` (all heads and later layers see it).

    ``features`` as a list (or one id/label) deletes them (scale 0); as a dict it scales them.
    Reports, for ``heads`` (default all), the raw-score change predicted with norms frozen
    (exact: ``Δq·k + q·Δk + Δq·Δk``), the model's change with ln1/qk-norm scales frozen at the
    layer (equal to the prediction: a check), and the change with live norms, plus the live run's
    logits and losses (``.live``).
    """
    s = setup(model, prompt, layer, heads)
    if s.dictionary.space != "resid":
        raise ValueError(
            f"the layer-{s.layer} dictionary reconstructs {s.dictionary.hook_name!r}, not the "
            "residual stream; residual edits need an SAE on blocks.L.hook_resid_pre (or "
            "blocks.{L-1}.hook_resid_post). steer_qk works with this dictionary."
        )
    if not isinstance(freeze_other_patterns, bool):
        raise TypeError(f"freeze_other_patterns must be a bool, got {freeze_other_patterns!r}")
    if features is None:
        raise ValueError(
            "give features: a feature id, a label, a list of them, or a dict of scales"
        )
    if not isinstance(features, Mapping):
        feats = (
            [features] if isinstance(features, (str, tuple)) or is_int(features) else list(features)
        )
        if not feats:
            raise ValueError("features is empty; give at least one feature id or label")
        features = dict.fromkeys(feats, 0.0)
    T = s.n_tokens
    pos = check_positions("positions", positions, T)
    scales, groups = edit_map("features", features, s.dictionary, pos, T)
    adds, _ = edit_map("add", add, s.dictionary, pos, T)
    coeffs = coefficients(s, list(range(T)))
    check_active(groups, coeffs, s.dictionary)
    plan = plan_edits(s, scales, adds, coeffs)
    ro = readout_positions(readout_pos, T)

    model_, qk, heads_t = s.model, s.qk, s.head_t
    norm_hooks = attn_in_scale_hooks(s) + qk_norm_hooks(s)
    clean = clean_run(s, [*norm_hooks, *pattern_record(s, freeze_other_patterns)], ro)

    # Prediction with every scale frozen: both sides move where the residual moved.
    q_full = full_side(model_, qk, "query", heads_t)
    k_full = full_side(model_, qk, "key", heads_t)
    dq = torch.zeros_like(q_full)
    dk = torch.zeros_like(k_full)
    if len(plan.positions):
        dq[:, plan.positions] = qk.project("query", plan.delta, plan.positions, heads_t, "resid")
        dk[:, plan.positions] = qk.project("key", plan.delta, plan.positions, heads_t, "resid")
    predicted = (
        einops.einsum(dq, k_full, "h q d, h k d -> h q k")
        + einops.einsum(q_full, dk, "h q d, h k d -> h q k")
        + einops.einsum(dq, dk, "h q d, h k d -> h q k")
    )
    predicted = predicted.cpu()
    scale = (prediction_scale(q_full + dq, k_full + dk) + prediction_scale(q_full, k_full)).cpu()

    delta = plan.delta

    def edit(t: Tensor, hook: Any) -> Tensor:
        out = t.clone()
        out[:, plan.positions] += delta.to(t.device, t.dtype)
        return out

    # Batch row 0: ln1 / qk-norm scales frozen at the layer (the check); row 1: live.
    frozen_row = torch.tensor([0])
    hooks = [(hook_name(s.layer, qk.arch.hooks.resid_pre), edit)]
    hooks += [(n, replace_with_clean(clean.acts[n], frozen_row)) for n in norm_hooks]
    if freeze_other_patterns:
        hooks += freeze_hooks(s, clean)
    run = forward(s, 2, hooks, [], ro)
    is_masked = masked(clean.raw[0])
    nan = float("nan")
    live = qk_steering(
        s, "resid", plan, clean, run, 1, predicted, scale, freeze_other_patterns, "live", ro
    )
    return ResidSteering(
        layer=s.layer,
        heads=s.heads,
        edits=plan.edits,
        tokens=s.cap.tokens,
        str_tokens=s.cap.str_tokens,
        scores_before=clean.raw[0],
        predicted_change=predicted.masked_fill(is_masked, nan),
        frozen_change=(run.raw[0] - clean.raw[0]).masked_fill(is_masked, nan),
        live_change=(run.raw[1] - clean.raw[0]).masked_fill(is_masked, nan),
        patterns_before=clean.pattern[0],
        patterns_after=run.pattern[1],
        live=live,
        scale=scale,
    )
