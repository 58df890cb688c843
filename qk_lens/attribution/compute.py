"""Computing QK attributions: validation at the boundary, then one batched projection per side.

:func:`qk_attribution` is what ``model.qk_attribution`` runs; :func:`resolve_basis` turns the
user's basis arguments into bases; :func:`attribute` does the work for one query.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from qk_lens.arch import LayerQK, arch_of
from qk_lens.attribution.projection import project_side
from qk_lens.attribution.result import QKAttribution, QKAttributions
from qk_lens.attribution.terms import ALIBI_LABEL, AttributionSource
from qk_lens.bases import (
    Basis,
    DictionaryBasis,
    TranscoderBasis,
    UpstreamBasis,
    concat_meta,
    part_meta,
    take_meta,
)
from qk_lens.capture import Capture
from qk_lens.checks import check_index, check_position
from qk_lens.dictionaries import Dictionary
from qk_lens.state import capture, layer_qk, state_of
from qk_lens.transcoders import Transcoders

BASIS_NAMES = ("dictionary", "upstream", "transcoders")


def resolve_basis(model: Any, basis: Any, layer: int, side: str) -> Basis:
    """A basis object from ``"dictionary"``, ``"upstream"``, ``"transcoders"``, a Dictionary,
    a Transcoders or a basis."""
    if isinstance(basis, (DictionaryBasis, UpstreamBasis)):
        return basis
    if isinstance(basis, Transcoders):
        return TranscoderBasis(basis)
    if basis == "transcoders":
        tc = state_of(model).transcoders
        if tc is None:
            raise ValueError(
                "no transcoders on this model; add them with model.add_transcoders(path or "
                "list of SAELens transcoders), or use basis='upstream' or 'dictionary'"
            )
        return TranscoderBasis(tc)
    if isinstance(basis, Dictionary):
        if basis.layer != layer:
            raise ValueError(f"the {side} dictionary serves layer {basis.layer}, not layer {layer}")
        return DictionaryBasis(basis)
    if basis == "upstream":
        return UpstreamBasis()
    if basis == "dictionary":
        dictionaries = state_of(model).dictionaries
        if layer not in dictionaries:
            have = sorted(dictionaries) or "none"
            raise ValueError(
                f"no dictionary for layer {layer} (layers with one: {have}); add one with "
                f"model.add_dictionary(sae) for an SAE on blocks.{layer}.hook_resid_pre, or use "
                "basis='upstream' to split the residual into embeddings, heads and MLPs"
            )
        return DictionaryBasis(dictionaries[layer])
    raise ValueError(
        f"{side}_basis must be one of {BASIS_NAMES}, a Dictionary or a Transcoders, got {basis!r}"
    )


def setup(
    model: Any, prompt: Any, layer: Any, query_basis: Any, key_basis: Any, basis: Any
) -> tuple[int, Capture, LayerQK, Basis, Basis]:
    """Validated (layer, capture, frozen maps, query basis, key basis) for one call."""
    n_layers = arch_of(model).n_layers
    layer = check_index("layer", layer, n_layers, "layers")
    cap = capture(model, prompt)
    qb = resolve_basis(model, query_basis if query_basis is not None else basis, layer, "query")
    kb = resolve_basis(model, key_basis if key_basis is not None else basis, layer, "key")
    return layer, cap, layer_qk(model, cap, layer), qb, kb


def qk_attribution(
    model: Any,
    prompt: Any,
    layer: int,
    head: int,
    q_pos: int,
    k_pos: int | list[int] | None = None,
    basis: Any = "dictionary",
    query_basis: Any = None,
    key_basis: Any = None,
) -> QKAttribution | QKAttributions:
    """Split head ``head`` of ``layer``'s pre-softmax score at (q_pos, k_pos) into terms
    (``model.qk_attribution``; see its docstring)."""
    layer, cap, qk, qb, kb = setup(model, prompt, layer, query_basis, key_basis, basis)
    head = check_index("head", head, qk.n_heads, "heads per layer")
    T = cap.n_tokens
    q = check_position("q_pos", q_pos, T)
    allowed = qk.key_allowed(torch.tensor([q]), torch.arange(T))[0].tolist()
    single = not isinstance(k_pos, (list, tuple, type(None)))
    if k_pos is None:
        keys = [k for k in range(T) if allowed[k]]
    else:
        raw_keys = [k_pos] if single else list(k_pos)
        if not raw_keys:
            raise ValueError(
                "k_pos is an empty list; give at least one key position or None for all"
            )
        keys = []
        for k in raw_keys:
            kk = check_position("k_pos", k, T)
            if not allowed[kk]:
                raise ValueError(
                    f"k_pos={k} is masked for q_pos={q_pos} in layer {layer}: the head can only "
                    f"attend to {qk.describe_mask(q)}"
                )
            keys.append(kk)
    items = attribute(model, cap, qk, head, q, keys, qb, kb)
    source = AttributionSource(weakref.ref(model), prompt, qk_attribution)
    for item in items:
        item.source = source
    if single:
        return items[0]
    return QKAttributions(layer, head, q, items, cap.pattern(layer)[head, q].detach().clone())


def attribute(
    model: Any,
    cap: Capture,
    qk: LayerQK,
    head: int,
    q_pos: int,
    k_positions: list[int],
    query_basis: Basis,
    key_basis: Basis,
) -> list[QKAttribution]:
    """Attributions of one query against the given (validated, unmasked) keys, in one batch."""
    heads = torch.tensor([head])
    if query_basis.key == key_basis.key and hasattr(query_basis, "prepare"):
        # both sides' positions through the dictionary at once: one read of its encoder
        query_basis.prepare(model, cap, qk.layer, torch.tensor(sorted({q_pos, *k_positions})))
    q_side = project_side(model, qk, "query", query_basis, torch.tensor([q_pos]), heads)
    k_side = project_side(model, qk, "key", key_basis, torch.tensor(k_positions), heads)
    qv = q_side.vectors[0, 0][q_side.valid[0]]  # [n_q, d_head]
    raw = qk.raw_scores()[head]
    final = cap.scores(qk.layer)[head]
    pattern = cap.pattern(qk.layer)[head]
    has_alibi = qk.arch.alibi is not None
    if has_alibi:
        alibi = qk.alibi_terms(heads, torch.tensor([q_pos]), torch.tensor(k_positions))[0, 0]
    tokens = cap.str_tokens
    q_meta = q_side.meta
    if has_alibi:
        q_meta = concat_meta(
            [q_meta, part_meta("alibi", qk.layer, head, np.array([q_pos]), -1, np.nan, ALIBI_LABEL)]
        )
        qv = torch.cat([qv, qv.new_zeros(1, qv.shape[1])])
    q_norm = float(qv.sum(0).norm())
    out = []
    for i, k in enumerate(k_positions):
        kv = k_side.vectors[0, i][k_side.valid[i]]
        terms = qv @ kv.T
        scale = q_norm * float(kv.sum(0).norm())
        if has_alibi:
            scale += float(alibi[i].abs())
        k_meta = k_side.meta if len(k_positions) == 1 else take_meta(k_side.meta, k_side.rows_of(i))
        if has_alibi:
            # ALiBi is additive, not bilinear: one labelled query part × one key part holds it.
            terms = torch.cat([terms, terms.new_zeros(terms.shape[0], 1)], dim=1)
            terms[-1, -1] = alibi[i]
            k_meta = concat_meta(
                [k_meta, part_meta("alibi", qk.layer, head, np.array([k]), -1, np.nan, ALIBI_LABEL)]
            )
            kv = torch.cat([kv, kv.new_zeros(1, kv.shape[1])])
        out.append(
            QKAttribution(
                layer=qk.layer,
                head=head,
                q_pos=q_pos,
                k_pos=k,
                terms=terms,
                query_meta=q_meta,
                key_meta=k_meta,
                query_vectors=qv,
                key_vectors=kv,
                model_raw_score=float(raw[q_pos, k]),
                model_score=float(final[q_pos, k]),
                prob=float(pattern[q_pos, k]),
                softcap=qk.softcap,
                scale=scale,
                q_token=tokens[q_pos] if tokens else None,
                k_token=tokens[k] if tokens else None,
                meta={"query_basis": query_basis.key[0], "key_basis": key_basis.key[0]},
            )
        )
    return out
