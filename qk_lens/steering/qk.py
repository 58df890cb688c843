"""QK-only steering: scale features inside chosen heads' queries or keys, nowhere else."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import einops
from torch import Tensor

from qk_lens.arch import arch_of
from qk_lens.checks import check_position, check_positions, is_int, is_real, renamed
from qk_lens.steering.edits import (
    EditPlan,
    FeatureKey,
    QKNorm,
    Setup,
    Side,
    check_active,
    check_qk_norm,
    check_side,
    coefficients,
    edit_map,
    plan_edits,
    setup,
)
from qk_lens.steering.results import QKSteering, QKSteeringSweep
from qk_lens.steering.runs import (
    Run,
    clean_run,
    forward,
    freeze_hooks,
    freeze_pattern_hook,
    full_side,
    hook_name,
    masked,
    pattern_record,
    prediction_scale,
    qk_norm_hooks,
    readout_positions,
    replace_with_clean,
)


def qk_steering(
    s: Setup,
    side: str,
    plan: EditPlan,
    clean: Run,
    run: Run,
    b: int,
    predicted: Tensor,
    scale: Tensor,
    freeze: bool,
    qk_norm: str,
    readout_pos: list[int],
) -> QKSteering:
    is_masked = masked(clean.raw[0])
    return QKSteering(
        layer=s.layer,
        heads=s.heads,
        side=side,
        edits=plan.edits,
        tokens=s.cap.tokens,
        str_tokens=s.cap.str_tokens,
        scores_before=clean.raw[0],
        scores_after=run.raw[b],
        predicted_change=predicted.masked_fill(is_masked, float("nan")),
        patterns_before=clean.pattern[0],
        patterns_after=run.pattern[b],
        readout_pos=readout_pos,
        logits_before=clean.logits[0],
        logits_after=run.logits[b],
        loss_before=clean.loss[0],
        loss_after=run.loss[b],
        freeze_other_patterns=freeze,
        qk_norm=qk_norm,
        scale=scale,
        tokenizer=getattr(s.model, "tokenizer", None),
    )


def run_qk(
    s: Setup,
    side: Side,
    plans: list[EditPlan],
    freeze: bool,
    qk_norm: QKNorm,
    readout: list[int],
    batch_size: int,
) -> list[QKSteering]:
    # A shared (GQA) key without the adapter's switch to ungroup it for a run (a bridge): the
    # edit goes into the kv head, and the group's other query heads keep their clean patterns.
    # That is what ungrouping gives: they would see the clean key, and values are not edited.
    grouped = side == "key" and s.qk.arch.group > 1 and arch_of(s.model).ungrouped is None
    held = group_mates(s) if grouped else []
    model, qk, layer = s.model, s.qk, s.layer
    heads = s.head_t
    norm_hooks = qk_norm_hooks(s) if qk_norm == "frozen" else []
    own_pattern = [hook_name(s.layer, qk.arch.hooks.pattern)] if held else []
    clean = clean_run(s, [*norm_hooks, *pattern_record(s, freeze), *own_pattern], readout)

    # The prediction: the other side stays clean, so Δs = q·Δk (or Δq·k), in the frozen maps.
    q_full = full_side(model, qk, "query", heads)
    k_full = full_side(model, qk, "key", heads)
    clean_scale = prediction_scale(q_full, k_full)
    T = s.n_tokens
    hooks_ = qk.arch.hooks
    edited = hook_name(layer, hooks_.q if side == "query" else hooks_.k)
    out: list[QKSteering] = []
    for start in range(0, len(plans), batch_size):
        chunk = plans[start : start + batch_size]
        deltas = q_full.new_zeros(len(chunk), T, len(s.heads), qk.d_head)
        predicted, scales = [], []
        for b, plan in enumerate(chunk):
            pred = q_full.new_zeros(len(s.heads), T, T)
            # float32 rounding of the steered score scales with the steered side's norm too
            scale = clean_scale.clone()
            if len(plan.positions):
                pre = qk.pre_rotary(side, plan.delta, plan.positions, heads, s.dictionary.space)
                deltas[b, plan.positions] = pre.permute(1, 0, 2)
                fin = qk.project(side, plan.delta, plan.positions, heads, s.dictionary.space)
                if side == "key":
                    pred[:, :, plan.positions] = einops.einsum(q_full, fin, "h q d, h k d -> h q k")
                    scale[:, :, plan.positions] += prediction_scale(q_full, fin)
                else:
                    pred[:, plan.positions, :] = einops.einsum(fin, k_full, "h q d, h k d -> h q k")
                    scale[:, plan.positions, :] += prediction_scale(fin, k_full)
            predicted.append(pred.cpu())
            scales.append(scale.cpu())

        def edit(t: Tensor, hook: Any, deltas: Tensor = deltas) -> Tensor:
            out = t.clone()
            if grouped:  # one edit per kv head (query heads of one group share W_K: same delta)
                kv, first = unique_kv(qk.arch.kv_heads(heads))
                out[:, :, kv] += deltas[:, :, first].to(t.device, t.dtype)
            else:
                out[:, :, heads] += deltas.to(t.device, t.dtype)
            return out

        hooks = [(edited, edit)]
        hooks += [(n, replace_with_clean(clean.acts[n])) for n in norm_hooks]
        if freeze:
            hooks += freeze_hooks(s, clean)
        elif held:
            name = own_pattern[0]
            keep = [h for h in range(qk.n_heads) if h not in held]
            hooks.append((name, freeze_pattern_hook(clean.acts[name], keep)))
        run = forward(s, len(chunk), hooks, [], readout)
        for b, plan in enumerate(chunk):
            out.append(
                qk_steering(
                    s, side, plan, clean, run, b, predicted[b], scales[b], freeze, qk_norm, readout
                )
            )
    return out


def group_mates(s: Setup) -> list[int]:
    """Query heads outside ``s.heads`` that share a key/value head with one of them."""
    kv = set(s.qk.arch.kv_heads(s.head_t).tolist())
    g = s.qk.arch.group
    return [h for h in range(s.qk.n_heads) if h // g in kv and h not in s.heads]


def unique_kv(kv: Tensor) -> tuple[list[int], list[int]]:
    """(each distinct kv head, the index of its first query head in ``kv``)."""
    seen: dict[int, int] = {}
    for i, g in enumerate(kv.tolist()):
        seen.setdefault(g, i)
    return list(seen), list(seen.values())


@renamed(readout="readout_pos")
def steer_qk(
    model: Any,
    prompt: Any,
    layer: int,
    heads: int | Sequence[int],
    side: Side = "key",
    features: Mapping[FeatureKey, float] | None = None,
    *,
    positions: int | Sequence[int] | None = None,
    add: Mapping[FeatureKey, float] | None = None,
    freeze_other_patterns: bool = False,
    qk_norm: QKNorm = "frozen",
    readout_pos: int | Sequence[int] = -1,
) -> QKSteering:
    """Scale dictionary features inside chosen heads' queries or keys only; measure and predict.

    ``features`` maps a feature (an id, an exact label meaning every feature with it, or an
    ``(id, position)`` tuple) to a scale: its coefficient at each steered position is multiplied
    by it (0 removes it from these heads' keys/queries). ``add`` maps features to a coefficient
    added at the positions (injection, also where the feature is inactive; in units of the
    decomposition's coefficients). ``positions`` (None: all) applies to non-tuple keys.
    Only ``heads`` of ``layer`` see the change, only on ``side``; values, other heads and other
    layers' inputs are untouched. ``readout_pos`` chooses where logits are kept (default: last).
    """
    s = setup(model, prompt, layer, heads)
    side = check_side(side)
    qk_norm = check_qk_norm(qk_norm)
    if not isinstance(freeze_other_patterns, bool):
        raise TypeError(f"freeze_other_patterns must be a bool, got {freeze_other_patterns!r}")
    if features is None and add is None:
        raise ValueError("give features={feature_id: scale} and/or add={feature_id: coefficient}")
    T = s.n_tokens
    pos = check_positions("positions", positions, T)
    scales, groups = edit_map("features", features, s.dictionary, pos, T)
    adds, _ = edit_map("add", add, s.dictionary, pos, T)
    coeffs = coefficients(s, list(range(T)))
    check_active(groups, coeffs, s.dictionary)
    plan = plan_edits(s, scales, adds, coeffs)
    return run_qk(
        s, side, [plan], freeze_other_patterns, qk_norm, readout_positions(readout_pos, T), 1
    )[0]


@renamed(readout="readout_pos")
def steer_qk_sweep(
    model: Any,
    prompt: Any,
    layer: int,
    heads: int | Sequence[int],
    features: FeatureKey | Sequence[FeatureKey],
    scales: Sequence[float],
    *,
    side: Side = "key",
    positions: int | Sequence[int] | None = None,
    freeze_other_patterns: bool = False,
    qk_norm: QKNorm = "frozen",
    readout_pos: int | Sequence[int] = -1,
    target: tuple[int, int] | None = None,
    batch_size: int = 16,
) -> QKSteeringSweep:
    """:func:`steer_qk` with every feature in ``features`` at each scale of ``scales``, batched.

    ``features``: an id, a label, a list of them, or a dict ``{feature: factor}`` (each feature
    then scaled by ``factor × scale``).

    ``target=(q_pos, k_pos)`` is where the table reports the chosen heads' attention and score;
    by default the first readout position and the key the first chosen head attended to most.
    """
    s = setup(model, prompt, layer, heads)
    side = check_side(side)
    qk_norm = check_qk_norm(qk_norm)
    if not isinstance(freeze_other_patterns, bool):
        raise TypeError(f"freeze_other_patterns must be a bool, got {freeze_other_patterns!r}")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise TypeError(f"scales must be a list of numbers, got {type(scales).__name__}")
    scale_list = list(scales)
    if not scale_list or not all(is_real(x) for x in scale_list):
        raise ValueError(f"scales must be a non-empty list of finite numbers, got {scales!r}")
    if not is_int(batch_size) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(features, Mapping):
        weights = dict(features)  # feature → its own factor, multiplied by each scale
    else:
        feats = (
            [features] if isinstance(features, (str, tuple)) or is_int(features) else list(features)
        )
        weights = dict.fromkeys(feats, 1.0)
    if not weights:
        raise ValueError("features is empty; give at least one feature id or label")
    T = s.n_tokens
    pos = check_positions("positions", positions, T)
    base, groups = edit_map("features", weights, s.dictionary, pos, T)
    coeffs = coefficients(s, list(range(T)))
    check_active(groups, coeffs, s.dictionary)
    plans = [
        plan_edits(s, {fp: float(x) * w for fp, w in base.items()}, {}, coeffs) for x in scale_list
    ]
    ro = readout_positions(readout_pos, T)
    items = run_qk(s, side, plans, freeze_other_patterns, qk_norm, ro, int(batch_size))
    if target is None:
        q = ro[0]
        k = int(items[0].patterns_before[0, q].argmax())
        target = (q, k)
    else:
        if not isinstance(target, tuple) or len(target) != 2:
            raise TypeError(f"target must be a (q_pos, k_pos) tuple, got {target!r}")
        target = (
            check_position("target q_pos", target[0], T),
            check_position("target k_pos", target[1], T),
        )
    return QKSteeringSweep([float(x) for x in scale_list], items, target)
