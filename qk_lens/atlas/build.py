"""The head atlas, end to end: weight-level scores, composition, pattern-level scores, labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from qk_lens.arch import arch_of, supported
from qk_lens.atlas.composition import Composition, best_partners, composition_scores, virtual_heads
from qk_lens.atlas.pattern_level import PATTERN_COLUMNS, pooled_pattern_scores, prompt_list
from qk_lens.atlas.probes import probe_token_ids, repeated_random_tokens
from qk_lens.atlas.result import THRESHOLDS, HeadAtlas, label_frame
from qk_lens.atlas.weights import WEIGHT_COLUMNS, HeadWeights, TokenMoments, weight_scores
from qk_lens.checks import check_int


def head_atlas(
    model: Any,
    prompts: Any = None,
    n_probes: int = 32,
    probe_length: int | None = None,
    seed: int = 0,
    composition: bool = True,
    progress: bool = False,
    thresholds: Mapping[str, float] | None = None,
    batch_size: int = 16,
) -> HeadAtlas:
    """What every head of ``model`` does, from its weights and its patterns (module docstring).

    ``n_probes`` repeated random probes ``BOS, s, s`` of ``probe_length`` tokens per segment
    (default: min(32, (n_ctx − 1) // 2, usable vocabulary)) feed the pattern scores; ``prompts``
    (strings, token-id lists or tensors) add ``prompt_*`` columns; ``composition=False`` skips the
    composition scores and virtual heads; ``thresholds`` overrides entries of :data:`THRESHOLDS`.
    """
    if not supported(model):
        raise TypeError(
            f"head_atlas needs a transformer_lens HookedTransformer, got {type(model).__name__}"
        )
    arch = arch_of(model)
    if not isinstance(composition, bool):
        raise TypeError(f"composition must be a bool, got {composition!r}")
    n_probes = check_int("n_probes", n_probes, 1)
    seed = check_int("seed", seed, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    n_ids = len(probe_token_ids(model))
    max_length = min((arch.n_ctx - 1) // 2, n_ids)
    if max_length < 2:
        raise ValueError(
            f"this model cannot hold a probe: n_ctx={arch.n_ctx}, {n_ids} usable token ids "
            "(need n_ctx ≥ 5 and ≥ 2 ids)"
        )
    if probe_length is None:
        probe_length = min(32, max_length)
    probe_length = check_int("probe_length", probe_length, 2, max_length)
    merged = dict(THRESHOLDS)
    if thresholds is not None:
        unknown = sorted(set(thresholds) - set(THRESHOLDS))
        if unknown:
            raise ValueError(f"unknown thresholds {unknown}; known: {sorted(THRESHOLDS)}")
        merged.update({k: float(v) for k, v in thresholds.items()})
    prompt_tokens = prompt_list(model, prompts) if prompts is not None else []

    steps = tqdm(total=4 + int(composition), desc="head atlas", disable=not progress)
    dtype = arch.dtype
    with torch.no_grad():
        weights = HeadWeights.from_model(model, dtype)
        moments = TokenMoments.from_model(model, dtype)
        factors = weights.factors()
        steps.update()
        w_scores, spectra = weight_scores(weights, factors, moments)
        steps.update()
        comp = None
        virtual = pd.DataFrame()
        if composition:
            # LN readers centre: writes are seen in the (d_model − 1)-dim mean-zero subspace
            comp = Composition.from_scores(
                composition_scores(weights, factors),
                spectra.qk_singular,
                spectra.ov_singular,
                arch.d_model - int(arch.centred_residual),
            )
            virtual = virtual_heads(
                weights, moments, comp, w_scores["ov_copying"], merged["composition_z"]
            )
            steps.update()
        vocab_used = moments.n_tokens
        del factors, weights, moments

    probes = repeated_random_tokens(model, n=n_probes, length=probe_length, seed=seed)
    p_scores = pooled_pattern_scores(model, [probes], [probe_length], batch_size, progress)
    steps.update()
    prompt_scores = None
    if prompt_tokens:
        prompt_scores = pooled_pattern_scores(
            model, prompt_tokens, [t.shape[1] - 1 for t in prompt_tokens], 1, progress
        )

    partners = best_partners(comp, arch.n_layers, arch.n_heads) if comp is not None else None
    rows = []
    for layer in range(arch.n_layers):
        for head in range(arch.n_heads):
            row: dict[str, Any] = {"layer": layer, "head": head, "name": f"L{layer}H{head}"}
            for name in PATTERN_COLUMNS:
                value = p_scores[name][layer, head]
                row[name] = int(value) if name == "offset" else float(value)
            for name in WEIGHT_COLUMNS:
                row[name] = float(w_scores[name][layer, head])
            if partners is not None:
                row.update(partners[layer * arch.n_heads + head])
            if prompt_scores is not None:
                for name in PATTERN_COLUMNS:
                    value = prompt_scores[name][layer, head]
                    row["prompt_" + name] = int(value) if name == "offset" else float(value)
            rows.append(row)
    frame = label_frame(pd.DataFrame(rows), merged)
    steps.update()
    steps.close()
    info = {
        "model": getattr(model.cfg, "model_name", None) or "model",
        "n_layers": arch.n_layers,
        "n_heads": arch.n_heads,
        "d_model": arch.d_model,
        "d_head": arch.d_head,
        "d_vocab": arch.d_vocab,
        "normalization": arch.layer(0).attn_in.kind,
        "positional_embedding": arch.positional,
        "n_key_value_heads": arch.layer(0).n_kv,
        "probe": {"n": n_probes, "length": probe_length, "seed": seed},
        "n_prompts": len(prompt_tokens),
        "vocab_used": vocab_used,
    }
    return HeadAtlas(frame, spectra, comp, virtual, merged, info)
