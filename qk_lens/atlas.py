"""Head atlas: what every attention head does, read from its weights and from its patterns.

:func:`head_atlas` gives one row per (layer, head) with the scores below, the labels they earn
(:data:`THRESHOLDS`) and the evidence behind each label, plus the spectra, the composition scores
and the strongest virtual heads. Views (heatmaps, a labelled grid, a one-file HTML report) only
format the finished table (:mod:`qk_lens.views.atlas`).

Weight level (no forward pass; every vocabulary-sized matrix is handled through its factors)
-------------------------------------------------------------------------------------------
Norms are folded in at a frozen unit scale, whether or not the model was processed with
``fold_ln``: a head reads ``x P diag(w) W_Q`` (P centres, for LayerNorm only; ``w`` is ln1's
gain; the per-token 1/σ and the norm bias are dropped), qk-norm gains multiply ``W_Q``/``W_K``,
a post-attention norm's gain (Gemma-2 ``ln1_post``) multiplies ``W_O``, writes are centred when
every reader centres (LayerNorm), and the unembedding reads through ``ln_final`` and is centred
over the vocabulary (a constant logit shift changes nothing). Tokens enter as their embeddings
normalized the way the first norm would (``Ê``; positions left out: the direct token path). So
a model gives the same weight-level atlas before and after ``process_weights_(fold_ln=True,
center_writing_weights=True, center_unembed=True)``. Biases, rotary and ALiBi are not part of
these matrices: with rotary, ``W_Q W_Kᵀ`` is the form at zero relative offset, and positional
behaviour is read from the patterns instead. Under GQA each query head is paired with its
(shared) key/value head. No embedding-unembedding tie is assumed: W_E and W_U enter separately.

* ``qk_eff_rank``/``ov_eff_rank``: exp(entropy of σ/Σσ) (Roy & Vetterli) of the singular values
  of ``W_Q W_Kᵀ / attn_scale`` and ``W_V W_O`` (:class:`Spectra`), from 1 (one direction) to
  d_head (flat); ``qk_norm``/``ov_norm``: their Frobenius norms.
* ``ov_copying`` = Re Σλ / Σ|λ| over the eigenvalues λ of ``Ê W_V W_O W_U``, a d_vocab × d_vocab
  matrix never built: its nonzero eigenvalues are those of the d_head × d_head
  ``W_O (W_U Ê) W_V``. +1 when attending to a token only ever raises that token's logit
  (copying), −1 for suppression. ``ov_positive_frac``: the share of Σ|λ| on eigenvalues with
  Re λ > 0 (weighted by |λ|, so the numerically-zero eigenvalues of a rank-deficient head do
  not count as coin flips).
* ``qk_skew``/``qk_positive_frac``: the same statistics for ``W_Q W_Kᵀ`` (residual basis).
  Positive: the head prefers keys that match its query ("concordance-like"); negative: keys
  that mismatch it. Kamath, Ameisen et al. (2025) saw this skew separate concordance from
  discordance heads, but it is not universal (a small model trained here grew both with
  skew ≈ 0): a score, never proof.
* ``same_token``: does ``Ê W_QK Êᵀ`` favour its diagonal? Each row (query token) is centred over
  the key tokens (softmax ignores a row's offset); ``same_token`` is the mean centred diagonal
  in units of the RMS of all centred entries (≈ 0 for unrelated Q and K, ≫ 1 when a token looks
  for itself). Computed from the tokens' second moments, never from the d_vocab² matrix.
* Composition (:class:`Composition`): the scores of Elhage et al. (2021), as TransformerLens's
  ``all_composition_scores`` (``‖W_OV¹ R²‖_F / (‖W_OV¹‖_F ‖R²‖_F)``, R² the later head's
  ``W_QK`` for Q-, ``W_QKᵀ`` for K- and ``W_OV`` for V-composition), on the norm-folded weights.
  ``*_comp`` is each head's strongest earlier partner; ``*_comp_z`` compares it with the score
  the same two heads would get with the residual basis between them randomly rotated (mean
  ≈ 1/√d_model; a spread that grows as the heads' spectra concentrate): the random-weights
  baseline that tells signal from noise. Cost: one d_head × d_model × d_head product per pair
  of heads (``composition=False`` skips it).
* Virtual heads (:attr:`HeadAtlas.virtual_heads`): for each head its strongest V-composition
  partner, and the copying score of the composed path ``Ê W_OV¹ W_OV² W_U``.

Pattern level (one batched forward over probes the atlas builds itself)
------------------------------------------------------------------------
Probes are ``BOS, s, s`` with ``s`` ``probe_length`` distinct random tokens
(:func:`qk_lens.patterns.repeated_random_tokens`). Scores are mean attention over queries
q ≥ 1: ``previous_token`` (to q − 1), ``self`` (to q), ``first_token`` (to position 0, the BOS
sink), ``duplicate_token`` (to earlier copies of the query's token), ``induction`` (to the token
right after an earlier copy of the query's token), the last two over the queries that have such
a key; on these probes they equal :func:`qk_lens.patterns.pattern_scores`. On the first,
non-repeated half only (so that induction and duplicate offsets do not pass for fixed ones):
``offset``/``offset_score``, the offset 1 ≤ d ≤ L/2 with the most mean attention from q to
q − d (position 0 excluded; the bound keeps half the queries behind every offset, so a sink on
an early position does not pass for a long offset), and ``entropy``, each query's pattern
entropy over its q + 1 keys divided by log(q + 1) (1 = uniform). With ``prompts``, the same
scores on the user's prompts come as ``prompt_*`` columns (they do not affect labels).

Labels (:data:`THRESHOLDS`; the row keeps every score, and ``evidence`` says which fired)
----------------------------------------------------------------------------------------
previous-token: previous_token ≥ 0.3 · induction: induction ≥ 0.3 · duplicate:
duplicate_token ≥ 0.3 · BOS sink: first_token ≥ 0.5 · self: self ≥ 0.3 · fixed offset:
offset ≥ 2 and offset_score ≥ 0.3 · diffuse: entropy ≥ 0.85 · copying: ov_copying ≥ 0.5 ·
suppression: ov_copying ≤ −0.5 · concordance-like: qk_skew ≥ 0.5 · discordance-like:
qk_skew ≤ −0.5. A composition partner counts as above baseline when its ``*_comp_z`` ≥ 3.
An attention target needs 0.3, about five times the average share per key of a uniform causal
pattern on the default 65-token probe, and low enough that a head sharing its role with a
partner (as in the toy models) still qualifies; a BOS sink needs 0.5, as many heads park
attention there. Gaussian random heads have a qk_skew spread (std) of about 0.1 at d_model 64 /
d_head 16 and 0.02 at gpt2-small's shape, so ±0.5 is far outside chance there.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Complex, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import FactoredMatrix
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from qk_lens.attention import OLMO_QK_NORM, compute_dtype, norm_kind
from qk_lens.capture import prompt_to_tokens
from qk_lens.patterns import probe_token_ids, repeated_random_tokens

__all__ = [
    "LABELS",
    "THRESHOLDS",
    "Composition",
    "HeadAtlas",
    "Spectra",
    "copying_score",
    "effective_rank",
    "eigen_skew",
    "head_atlas",
    "participation_ratio",
]

# label -> (score column, comparison, threshold key). Order = display order.
LABEL_RULES: dict[str, tuple[str, str, str]] = {
    "previous-token": ("previous_token", ">=", "previous_token"),
    "induction": ("induction", ">=", "induction"),
    "duplicate": ("duplicate_token", ">=", "duplicate_token"),
    "BOS sink": ("first_token", ">=", "first_token"),
    "self": ("self", ">=", "self"),
    "fixed offset": ("offset_score", ">=", "offset_score"),  # and offset >= min_offset
    "diffuse": ("entropy", ">=", "entropy"),
    "copying": ("ov_copying", ">=", "ov_copying"),
    "suppression": ("ov_copying", "<=-", "ov_copying"),
    "concordance-like": ("qk_skew", ">=", "qk_skew"),
    "discordance-like": ("qk_skew", "<=-", "qk_skew"),
}
LABELS: tuple[str, ...] = tuple(LABEL_RULES)

THRESHOLDS: dict[str, float] = {
    "previous_token": 0.3,  # mean attention to q-1
    "induction": 0.3,  # mean attention to the token after the earlier occurrence
    "duplicate_token": 0.3,  # mean attention to earlier copies of the query's token
    "first_token": 0.5,  # mean attention to position 0
    "self": 0.3,  # mean attention to q itself
    "offset_score": 0.3,  # mean attention at the dominant offset ...
    "min_offset": 2,  # ... which must be >= 2 (offset 1 is previous-token)
    "entropy": 0.85,  # normalized pattern entropy (1 = uniform)
    "ov_copying": 0.5,  # |Re Σλ / Σ|λ|| of the OV token map; sign picks copying / suppression
    "qk_skew": 0.5,  # |Re Σλ / Σ|λ|| of W_Q W_K^T; sign picks concordance / discordance-like
    "composition_z": 3.0,  # a partner is above the random-rotation baseline at this z
}

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
WEIGHT_COLUMNS = (
    "qk_norm",
    "ov_norm",
    "qk_eff_rank",
    "ov_eff_rank",
    "qk_skew",
    "qk_positive_frac",
    "ov_copying",
    "ov_positive_frac",
    "same_token",
)
COMPOSITION_MODES = ("q", "k", "v")

# For views: score -> (short description, signed, fixed colour scale or None = column's max |v|)
SCORE_INFO: dict[str, tuple[str, bool, float | None]] = {
    "previous_token": ("mean attention to the previous token", False, 1.0),
    "induction": ("mean attention to the token after an earlier copy", False, 1.0),
    "duplicate_token": ("mean attention to an earlier copy of the token", False, 1.0),
    "first_token": ("mean attention to position 0 (BOS sink)", False, 1.0),
    "self": ("mean attention to the query's own position", False, 1.0),
    "offset_score": ("mean attention at the dominant offset", False, 1.0),
    "entropy": ("pattern entropy / log(#keys): 1 = uniform", False, 1.0),
    "ov_copying": ("OV token map eigenvalues Re Σλ/Σ|λ|: +1 copy, −1 suppress", True, 1.0),
    "ov_positive_frac": ("share of |λ| of the OV token map with Re λ > 0", False, 1.0),
    "qk_skew": ("W_QK eigenvalues Re Σλ/Σ|λ| (a score, not proof)", True, 1.0),
    "qk_positive_frac": ("share of |λ| of W_QK with Re λ > 0", False, 1.0),
    "same_token": ("row-centred diagonal of Ê W_QK Êᵀ in RMS units", True, None),
    "qk_eff_rank": ("effective rank of W_QK", False, None),
    "ov_eff_rank": ("effective rank of W_OV", False, None),
    "qk_norm": ("Frobenius norm of W_QK / attn_scale", False, None),
    "ov_norm": ("Frobenius norm of W_OV", False, None),
    "q_comp": ("strongest Q-composition score with an earlier head", False, None),
    "k_comp": ("strongest K-composition score with an earlier head", False, None),
    "v_comp": ("strongest V-composition score with an earlier head", False, None),
    "q_comp_z": ("strongest Q-composition, z vs random rotation", True, None),
    "k_comp_z": ("strongest K-composition, z vs random rotation", True, None),
    "v_comp_z": ("strongest V-composition, z vs random rotation", True, None),
}

# Rows of the embedding normalized per chunk: bounds memory for 256k vocabularies.
_VOCAB_CHUNK = 8192
# Elements of one [l1-chunk, head, head, d_head, d_head*3] composition product buffer.
_COMP_BLOCK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- statistics
def eigen_skew(
    eigenvalues: Complex[Tensor, "*batch n"],
) -> tuple[Float[Tensor, "*batch"], Float[Tensor, "*batch"]]:
    """(Re Σλ / Σ|λ|, share of Σ|λ| with Re λ > 0); NaN for an all-zero spectrum.

    Both lie in [−1, 1] / [0, 1]; +1 / 1 for a positive semi-definite matrix."""
    mag = eigenvalues.abs()
    total = mag.sum(-1)
    signed = eigenvalues.real.sum(-1) / total
    positive = (mag * (eigenvalues.real > 0)).sum(-1) / total
    nan = torch.full_like(total, float("nan"))
    return torch.where(total > 0, signed, nan), torch.where(total > 0, positive, nan)


def effective_rank(singular_values: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """exp(entropy of σ / Σσ) (Roy & Vetterli 2007): 1 for one direction, n for a flat spectrum."""
    total = singular_values.sum(-1, keepdim=True)
    p = singular_values / total
    entropy = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(-1)
    out = entropy.exp()
    return torch.where(total[..., 0] > 0, out, torch.full_like(out, float("nan")))


def participation_ratio(singular_values: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """(Σσ²)² / Σσ⁴: how many directions carry the squared spectrum (1 to n)."""
    sq = singular_values.double().pow(2)
    return sq.sum(-1).pow(2) / sq.pow(2).sum(-1)


def copying_score(
    token_map: FactoredMatrix,
) -> tuple[Float[Tensor, "*batch"], Float[Tensor, "*batch"]]:
    """:func:`eigen_skew` of a square factored map, from its small product ``FactoredMatrix.BA``."""
    return eigen_skew(token_map.eigenvalues.to(torch.complex128))


# --------------------------------------------------------------------------- norm-folded weights
def _read_norm(model: Any, layer: int) -> Any:
    # Post-norm architectures (OLMo-2/3) read the raw residual; ln1 normalizes the output instead.
    if model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return None
    return model.blocks[layer].ln1


def _fold_read(
    weight: Float[Tensor, "... d_model d_out"], norm: Any, dtype: torch.dtype
) -> Float[Tensor, "... d_model d_out"]:
    """``P diag(w) W``: what a map reading through ``norm`` (frozen unit scale) applies."""
    kind = norm_kind(norm)
    if kind in ("LN", "RMS"):
        weight = norm.w.detach().to(dtype)[:, None] * weight
    if kind in ("LN", "LNPre"):
        weight = weight - weight.mean(-2, keepdim=True)
    return weight


def _fold_write(
    weight: Float[Tensor, "... d_in d_model"], norm: Any, dtype: torch.dtype
) -> Float[Tensor, "... d_in d_model"]:
    """``W P diag(w)``: a write that passes through ``norm`` (frozen unit scale)."""
    if norm is None or isinstance(norm, torch.nn.Identity):
        return weight
    kind = norm_kind(norm)
    if kind in ("LN", "LNPre"):
        weight = weight - weight.mean(-1, keepdim=True)
    if kind in ("LN", "RMS"):
        weight = weight * norm.w.detach().to(dtype)
    return weight


def _normalize_rows(x: Float[Tensor, "n d"], kind: str, eps: float) -> Float[Tensor, "n d"]:
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    if kind != "none":
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return x


def _centred_residual(cfg: Any) -> bool:
    """Whether every reader of the residual stream centres it (LayerNorm before each read)."""
    return (
        cfg.normalization_type in ("LN", "LNPre")
        and cfg.original_architecture not in POST_NORM_ARCHITECTURES
    )


def _expand_kv(w: Tensor, n_heads: int) -> Tensor:
    # TransformerLens's W_K/W_V are already per query head; a bridge's may be per kv head.
    return w if w.shape[0] == n_heads else torch.repeat_interleave(w, n_heads // w.shape[0], 0)


@dataclass
class HeadWeights:
    """Every head's norm-folded weights, stacked (see the module docstring for what is folded)."""

    W_Q: Float[Tensor, "layer head d_model d_head"]  # includes 1 / attn_scale
    W_K: Float[Tensor, "layer head d_model d_head"]  # GQA: each query head's kv head
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]

    @classmethod
    def from_model(cls, model: Any, dtype: torch.dtype) -> HeadWeights:
        cfg = model.cfg
        qs, ks, vs, os_ = [], [], [], []
        post_norm_arch = cfg.original_architecture in POST_NORM_ARCHITECTURES
        centred_residual = _centred_residual(cfg)
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            read = _read_norm(model, layer)
            w_q = _fold_read(attn.W_Q.detach().to(dtype), read, dtype)
            w_k = _fold_read(_expand_kv(attn.W_K.detach().to(dtype), cfg.n_heads), read, dtype)
            w_v = _fold_read(_expand_kv(attn.W_V.detach().to(dtype), cfg.n_heads), read, dtype)
            w_q, w_k = _fold_qk_norm(model, attn, w_q, w_k, dtype)
            w_q = w_q / float(attn.attn_scale)
            write = block.ln1 if post_norm_arch else getattr(block, "ln1_post", None)
            w_o = _fold_write(attn.W_O.detach().to(dtype), write, dtype)
            if centred_residual:  # every reader centres: the mean direction of a write is unseen
                w_o = w_o - w_o.mean(-1, keepdim=True)
            for stack, w in ((qs, w_q), (ks, w_k), (vs, w_v), (os_, w_o)):
                stack.append(w)
        return cls(torch.stack(qs), torch.stack(ks), torch.stack(vs), torch.stack(os_))

    @property
    def qk(self) -> FactoredMatrix:
        """``W_Q W_Kᵀ`` per head, [layer, head, d_model, d_model] (factored)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def ov(self) -> FactoredMatrix:
        """``W_V W_O`` per head, [layer, head, d_model, d_model] (factored)."""
        return FactoredMatrix(self.W_V, self.W_O)

    def factors(self) -> GramFactors:
        """The d_head × d_head stand-ins of the four factors (see :class:`GramFactors`)."""

        def gram(x: Tensor, pattern: str) -> Tensor:
            return einops.einsum(x, x, pattern).double()

        return GramFactors(
            q=_gram_factor(gram(self.W_Q, "l h d_m a, l h d_m b -> l h a b")),
            k=_gram_factor(gram(self.W_K, "l h d_m a, l h d_m b -> l h a b")),
            v=_gram_factor(gram(self.W_V, "l h d_m a, l h d_m b -> l h a b")),
            o=_gram_factor(gram(self.W_O, "l h a d_m, l h b d_m -> l h a b")),
        )


def _gram_factor(gram: Float[Tensor, "*batch n n"]) -> Float[Tensor, "*batch n n"]:
    """F with Fᵀ F = G for a PSD Gram matrix: Lᵀ from a Cholesky factorization, falling back to
    an eigendecomposition (√Λ Vᵀ) where G is singular. Cholesky is also the robust choice on busy
    CPUs: batched eigh slows down by 40× under thread contention, Cholesky does not."""
    chol, info = torch.linalg.cholesky_ex(gram)
    out = chol.mT.contiguous()
    bad = info != 0
    if bad.any():  # rank-deficient heads (e.g. unused head dimensions)
        evals, evecs = torch.linalg.eigh(gram[bad])
        out[bad] = evals.clamp_min(0).sqrt()[..., :, None] * evecs.mT
    return out


@dataclass
class GramFactors:
    """F with Fᵀ F = Wᵀ W for W_Q, W_K, W_V (F_Oᵀ F_O = W_O W_Oᵀ for W_O), d_head × d_head per head.

    W = U F with U orthonormal on W's column space, so ‖W X‖_F = ‖F X‖_F for every X: the norms
    and singular values of products of the tall d_model × d_head factors come from these small
    matrices (σ(W_Q W_Kᵀ) = σ(F_Q F_Kᵀ), σ(W_V W_O) = σ(F_V F_Oᵀ)) with no SVD of the factors.
    """

    q: Float[Tensor, "layer head d_head d_head"]
    k: Float[Tensor, "layer head d_head d_head"]
    v: Float[Tensor, "layer head d_head d_head"]
    o: Float[Tensor, "layer head d_head d_head"]


def _fold_qk_norm(
    model: Any, attn: Any, w_q: Tensor, w_k: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """qk-norm gains multiply the query/key maps (per-head norms; OLMo's full-width norm sliced)."""
    cfg = model.cfg
    full = cfg.original_architecture in OLMO_QK_NORM and getattr(attn, "q_norm", None) is not None
    if not (cfg.use_qk_norm or full):
        return w_q, w_k
    out = []
    for w, norm in ((w_q, attn.q_norm), (w_k, attn.k_norm)):
        gain = norm.w.detach().to(dtype) if hasattr(norm, "w") else None
        if gain is not None:
            if full:  # [n_heads * d_head] (keys: per kv head) -> [head, 1, d_head]
                gain = _expand_kv(gain.reshape(-1, cfg.d_head), cfg.n_heads)[:, None, :]
            w = w * gain
        out.append(w)
    return out[0], out[1]


@dataclass
class TokenMoments:
    """Vocabulary-sized products reduced to d_model × d_model, from chunks of the embedding."""

    unembed_embed: Float[Tensor, "d_model d_model"]  # W_U_eff Ê (tokens shared by W_E and W_U)
    second_moment: Float[Tensor, "d_model d_model"]  # Êᵀ Ê / n
    covariance: Float[Tensor, "d_model d_model"]  # (Ê − mean)ᵀ (Ê − mean) / n
    n_tokens: int
    tokens: Float[Tensor, "n d_model"] | None = None  # Ê itself, kept when n < d_model

    @classmethod
    def from_model(cls, model: Any, dtype: torch.dtype) -> TokenMoments:
        cfg = model.cfg
        norm = _read_norm(model, 0)
        kind = "none" if norm is None else norm_kind(norm)
        embed_ln = getattr(model.embed, "ln", None)  # BLOOM: a norm right after the embedding
        W_E, W_U = model.W_E.detach(), model.W_U.detach()
        n = min(W_E.shape[0], W_U.shape[1])  # models whose two vocabularies differ: shared ids
        d = cfg.d_model
        u_mean = W_U.to(dtype).mean(-1)  # centre over the vocabulary: logit shifts are free
        device = W_E.device
        kept = []  # small vocabularies: Ê is a cheaper factor of the moments than they are
        ue = torch.zeros(d, d, dtype=dtype, device=device)
        second = torch.zeros(d, d, dtype=dtype, device=device)
        total = torch.zeros(d, dtype=dtype, device=device)
        for start in range(0, n, _VOCAB_CHUNK):
            e = W_E[start : start + _VOCAB_CHUNK].to(dtype)
            if embed_ln is not None:
                e = _normalize_rows(e, norm_kind(embed_ln), cfg.eps)
                e = e * embed_ln.w.detach().to(dtype) if hasattr(embed_ln, "w") else e
            e = _normalize_rows(e, kind, cfg.eps)
            u = W_U[:, start : start + len(e)].to(dtype)
            ue += einops.einsum(u, e, "d_res tok, tok d_emb -> d_res d_emb")
            second += einops.einsum(e, e, "tok d_a, tok d_b -> d_a d_b")
            total += e.sum(0)
            if n < d:
                kept.append(e)
        ue -= torch.outer(u_mean, total)
        final = getattr(model, "ln_final", None)
        ue = _fold_read(ue, final, dtype) if final is not None else ue
        mean = total / n
        second /= n
        tokens = torch.cat(kept) if kept else None
        return cls(ue, second, second - torch.outer(mean, mean), n, tokens)


# --------------------------------------------------------------------------- results
@dataclass
class Spectra:
    """Per-head spectra of the norm-folded circuits (see the module docstring)."""

    qk_singular: Float[Tensor, "layer head d_head"]  # of W_Q W_Kᵀ / attn_scale
    ov_singular: Float[Tensor, "layer head d_head"]  # of W_V W_O
    qk_eigenvalues: Complex[Tensor, "layer head d_head"]  # nonzero ones of W_Q W_Kᵀ
    ov_eigenvalues: Complex[Tensor, "layer head d_head"]  # nonzero ones of Ê W_V W_O W_U

    def head(self, layer: int, head: int) -> dict[str, Tensor]:
        """The four spectra of one head."""
        return {
            "qk_singular": self.qk_singular[layer, head],
            "ov_singular": self.ov_singular[layer, head],
            "qk_eigenvalues": self.qk_eigenvalues[layer, head],
            "ov_eigenvalues": self.ov_eigenvalues[layer, head],
        }


@dataclass
class Composition:
    """Composition scores ``[l1, h1, l2, h2]`` (writer, reader; 0 unless l1 < l2, the
    TransformerLens convention) and, per pair, the score's random-rotation baseline.

    Baseline: the same two heads with the residual basis between them randomly rotated. Then
    score² has mean 1/d (d = residual dimension seen, d_model − 1 when norms centre) and, to
    leading order in 1/d, variance 2 / (d² r₁ r₂) with r = (Σσ²)² / Σσ⁴ the participation ratio of
    each head's spectrum (writer: W_OV; reader: W_QK for Q/K, W_OV for V). So the baseline is
    1/√d · (1 − 1/(4 r₁ r₂)) ± 1/√(2 d r₁ r₂): low-rank heads compose by chance more often."""

    q: Float[Tensor, "layer head layer head"]
    k: Float[Tensor, "layer head layer head"]
    v: Float[Tensor, "layer head layer head"]
    baseline_mean: dict[str, Float[Tensor, "layer head layer head"]]
    baseline_std: dict[str, Float[Tensor, "layer head layer head"]]
    d_residual: int

    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, Tensor],
        qk_sv: Float[Tensor, "layer head r"],
        ov_sv: Float[Tensor, "layer head r"],
        d_residual: int,
    ) -> Composition:
        pr_qk, pr_ov = participation_ratio(qk_sv), participation_ratio(ov_sv)
        means, stds = {}, {}
        for mode in COMPOSITION_MODES:
            reader = pr_ov if mode == "v" else pr_qk
            pair = pr_ov[:, :, None, None] * reader[None, None, :, :]  # r₁ r₂
            means[mode] = (1 - 1 / (4 * pair)) / math.sqrt(d_residual)
            stds[mode] = 1 / (2 * d_residual * pair).sqrt()
        return cls(**scores, baseline_mean=means, baseline_std=stds, d_residual=d_residual)

    def scores(self, mode: str) -> Float[Tensor, "layer head layer head"]:
        mode = _check_mode(mode)
        return getattr(self, mode)

    def z(self, mode: str) -> Float[Tensor, "layer head layer head"]:
        """(score − baseline mean) / baseline std; NaN where no composition is possible."""
        mode = _check_mode(mode)
        scores = self.scores(mode)
        n_layers = scores.shape[0]
        possible = (torch.arange(n_layers)[:, None] < torch.arange(n_layers)[None, :])[
            :, None, :, None
        ].expand_as(scores)
        out = (scores - self.baseline_mean[mode]) / self.baseline_std[mode]
        return torch.where(possible, out, torch.full_like(out, float("nan")))

    def baseline_summary(self) -> pd.DataFrame:
        """Per mode: the baseline mean (1/√d) and the range of its per-pair std."""
        n_layers = self.q.shape[0]
        later = torch.triu(torch.ones(n_layers, n_layers, dtype=torch.bool), 1)[:, None, :, None]
        rows = {}
        for mode in COMPOSITION_MODES:
            std = self.baseline_std[mode].masked_select(later.expand_as(self.q))
            rows[mode] = {
                "mean": 1 / math.sqrt(self.d_residual),
                "std_min": float(std.min()) if std.numel() else float("nan"),
                "std_median": float(std.median()) if std.numel() else float("nan"),
                "std_max": float(std.max()) if std.numel() else float("nan"),
                "d_residual": self.d_residual,
            }
        return pd.DataFrame(rows).T.rename_axis("mode")

    def partners(self, layer: int, head: int, mode: str, k: int = 3) -> pd.DataFrame:
        """The ``k`` earlier heads whose writes this head's ``mode`` input reads most."""
        mode = _check_mode(mode)
        n_layers, n_heads = self.q.shape[:2]
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"(layer, head)=({layer}, {head}) outside {n_layers}×{n_heads} heads")
        scores = self.scores(mode)[:layer, :, layer, head].reshape(-1)
        z = self.z(mode)[:layer, :, layer, head].reshape(-1)
        order = torch.argsort(scores, descending=True)[:k]
        return pd.DataFrame(
            {
                "layer": (order // n_heads).tolist(),
                "head": (order % n_heads).tolist(),
                "score": scores[order].tolist(),
                "z": z[order].tolist(),
            }
        )


def _check_mode(mode: str) -> str:
    m = str(mode).lower()
    if m not in COMPOSITION_MODES:
        raise ValueError(f"mode must be one of 'q', 'k', 'v', got {mode!r}")
    return m


@dataclass
class HeadAtlas:
    """One row per (layer, head): scores, labels and evidence; see :func:`head_atlas`."""

    frame: pd.DataFrame
    spectra: Spectra
    composition: Composition | None
    virtual_heads: pd.DataFrame
    thresholds: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.frame["layer"].max()) + 1

    @property
    def n_heads(self) -> int:
        return int(self.frame["head"].max()) + 1

    def _row(self, layer: int, head: int) -> pd.Series:
        for name, value, n in (("layer", layer, self.n_layers), ("head", head, self.n_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if not 0 <= value < n:
                raise ValueError(f"{name}={value} is out of range 0..{n - 1}")
        return self.frame.iloc[int(layer) * self.n_heads + int(head)]

    def labels(self, layer: int, head: int) -> list[str]:
        """The labels of one head (in :data:`LABELS` order)."""
        return list(self._row(layer, head)["labels"])

    def evidence(self, layer: int, head: int) -> str:
        """The scores and thresholds behind one head's labels."""
        return str(self._row(layer, head)["evidence"])

    def heads_with(self, label: str) -> list[tuple[int, int]]:
        """(layer, head) of every head carrying ``label`` (one of :data:`LABELS`)."""
        if label not in LABEL_RULES:
            raise ValueError(f"unknown label {label!r}; labels are: {', '.join(LABELS)}")
        mask = self.frame["labels"].map(lambda labels: label in labels)
        return [(int(r.layer), int(r.head)) for r in self.frame[mask].itertuples()]

    def relabel(self, **thresholds: float) -> HeadAtlas:
        """A copy labelled with some thresholds changed (scores are reused, nothing recomputed)."""
        unknown = sorted(set(thresholds) - set(THRESHOLDS))
        if unknown:
            raise ValueError(f"unknown thresholds {unknown}; known: {sorted(THRESHOLDS)}")
        merged = {**self.thresholds, **{k: float(v) for k, v in thresholds.items()}}
        return replace(self, frame=_label(self.frame, merged), thresholds=merged)

    def top(self, score: str, k: int = 5) -> pd.DataFrame:
        """The ``k`` heads with the highest ``score``."""
        _check_score(self.frame, score)
        cols = ["layer", "head", "name", score, "label_str"]
        return self.frame.nlargest(k, score)[cols].reset_index(drop=True)

    # ----------------------------------------------------------------- views
    def heatmap(self, score: str, title: str | None = None) -> str:
        """A layer × head HTML heatmap of one score column."""
        from qk_lens.views.atlas import score_heatmap

        _check_score(self.frame, score)
        description, signed, scale = SCORE_INFO.get(score, (score, True, None))
        return score_heatmap(
            self.frame, score, title=title or score, caption=description, signed=signed,
            scale=scale,
        )  # fmt: skip

    def grid(self) -> str:
        """A compact layer × head grid of labels (the evidence in each cell's tooltip)."""
        from qk_lens.views.atlas import label_grid

        return label_grid(self.frame, LABELS)

    def report(self, title: str | None = None) -> Any:
        """A :class:`qk_lens.views.Report` with the grid, heatmaps and tables."""
        from qk_lens.views.atlas import atlas_report

        return atlas_report(self, title or f"Head atlas: {self.info.get('model', 'model')}")

    def to_html(self, title: str | None = None) -> str:
        """A self-contained HTML document (inline CSS, no scripts, no network)."""
        return self.report(title).to_html()

    def save(self, path: str | Path, title: str | None = None) -> Path:
        return self.report(title).save(path)

    def _repr_html_(self) -> str:
        return self.report()._repr_html_()


def _check_score(frame: pd.DataFrame, score: str) -> None:
    if score not in frame.columns or not pd.api.types.is_numeric_dtype(frame[score]):
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        raise ValueError(f"unknown score {score!r}; numeric columns: {', '.join(numeric)}")


# --------------------------------------------------------------------------- weight level
def _same_token(w: HeadWeights, moments: TokenMoments) -> Float[Tensor, "layer head"]:
    """Row-centred diagonal of Ê W_QK Êᵀ over its RMS, from d_head × d_head products only.

    mean_i of the row-centred M_ii = tr(W_Kᵀ Σ W_Q); mean of the squared centred entries =
    tr(W_Kᵀ Σ W_K · W_Qᵀ S W_Q), with S the tokens' second moment and Σ their covariance."""
    if moments.tokens is not None:  # n < d_model: use the factors F (S = FᵀF, Σ = F_cᵀF_c)
        f = moments.tokens / math.sqrt(moments.n_tokens)
        f_c = f - f.mean(0, keepdim=True)
        k_c = einops.einsum(f_c, w.W_K, "tok d_m, l h d_m c -> l h tok c")
        q_c = einops.einsum(f_c, w.W_Q, "tok d_m, l h d_m c -> l h tok c")
        q_s = einops.einsum(f, w.W_Q, "tok d_m, l h d_m c -> l h tok c")
        diag = einops.einsum(k_c, q_c, "l h tok c, l h tok c -> l h")
        kk = einops.einsum(k_c, k_c, "l h tok c, l h tok e -> l h c e")
        qq = einops.einsum(q_s, q_s, "l h tok c, l h tok e -> l h c e")
    else:
        k_sigma = einops.einsum(w.W_K, moments.covariance, "l h d_a c, d_a d_b -> l h d_b c")
        diag = einops.einsum(k_sigma, w.W_Q, "l h d_m c, l h d_m c -> l h")
        kk = einops.einsum(k_sigma, w.W_K, "l h d_m c, l h d_m e -> l h c e")
        q_s = einops.einsum(w.W_Q, moments.second_moment, "l h d_a c, d_a d_b -> l h d_b c")
        qq = einops.einsum(q_s, w.W_Q, "l h d_m c, l h d_m e -> l h c e")
    mean_sq = einops.einsum(kk, qq, "l h c e, l h e c -> l h")
    return diag / mean_sq.clamp_min(1e-300).sqrt()


def _weight_scores(
    w: HeadWeights, f: GramFactors, moments: TokenMoments
) -> tuple[dict[str, Tensor], Spectra]:
    qk_sv = torch.linalg.svdvals(f.q @ f.k.mT)
    ov_sv = torch.linalg.svdvals(f.v @ f.o.mT)
    qk_eig = w.qk.eigenvalues.to(torch.complex128)  # eig of the small W_Kᵀ W_Q
    # Ê W_V W_O W_U_eff has the nonzero eigenvalues of W_V W_O (W_U_eff Ê), a d_model map.
    n = moments.unembed_embed.to(w.W_O.dtype)
    token_ov = FactoredMatrix(w.W_V, einops.einsum(w.W_O, n, "l h c d_a, d_a d_b -> l h c d_b"))
    ov_eig = token_ov.eigenvalues.to(torch.complex128)
    qk_skew, qk_pos = eigen_skew(qk_eig)
    ov_copy, ov_pos = eigen_skew(ov_eig)
    scores = {
        "qk_norm": qk_sv.pow(2).sum(-1).sqrt(),
        "ov_norm": ov_sv.pow(2).sum(-1).sqrt(),
        "qk_eff_rank": effective_rank(qk_sv),
        "ov_eff_rank": effective_rank(ov_sv),
        "qk_skew": qk_skew,
        "qk_positive_frac": qk_pos,
        "ov_copying": ov_copy,
        "ov_positive_frac": ov_pos,
        "same_token": _same_token(w, moments),
    }
    scores = {k: v.double().cpu() for k, v in scores.items()}
    return scores, Spectra(qk_sv.cpu(), ov_sv.cpu(), qk_eig.cpu(), ov_eig.cpu())


def _composition_factors(
    w: HeadWeights, f: GramFactors
) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """Small factors with ‖W_OV¹ R²‖_F = ‖left¹ · right²‖_F, and the two Frobenius norms.

    left = F_V W_O (TransformerLens's ``collapse_l`` up to a rotation); right = W_Q F_Kᵀ (Q),
    W_K F_Qᵀ (K), W_V F_Oᵀ (V), like ``collapse_r`` of W_QK, W_QKᵀ and W_OV."""
    dt = w.W_O.dtype
    left = f.v.to(dt) @ w.W_O  # [l, h, d_head, d_model]
    rights = {
        "q": w.W_Q @ f.k.mT.to(dt),
        "k": w.W_K @ f.q.mT.to(dt),
        "v": w.W_V @ f.o.mT.to(dt),
    }
    ov_norm = torch.linalg.matrix_norm(f.v @ f.o.mT)
    qk_norm = torch.linalg.matrix_norm(f.q @ f.k.mT)
    return left, rights, ov_norm, {"q": qk_norm, "k": qk_norm, "v": ov_norm}


def _composition_scores(
    w: HeadWeights, f: GramFactors
) -> dict[str, Float[Tensor, "layer head layer head"]]:
    """TransformerLens's composition scores (``utils.composition_scores``) on the folded weights,
    for l1 < l2 only, in blocks: one d_head × d_model × d_head product per pair of heads."""
    left, rights, left_norm, right_norm = _composition_factors(w, f)
    n_layers, n_heads, d_head = left.shape[:3]
    out = {
        m: torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=torch.float64)
        for m in COMPOSITION_MODES
    }
    width = sum(r.shape[-1] for r in rights.values())
    step = max(1, _COMP_BLOCK_ELEMENTS // (n_heads * n_heads * d_head * width))
    for l2 in range(1, n_layers):
        right = torch.cat([rights[m][l2] for m in COMPOSITION_MODES], -1)  # [h2, d_model, 3r]
        for l1 in range(0, l2, step):
            stop = min(l1 + step, l2)
            prod = einops.einsum(left[l1:stop], right, "l1 h1 r1 d_m, h2 d_m r2 -> l1 h1 h2 r1 r2")
            offset = 0
            for m in COMPOSITION_MODES:
                r = rights[m].shape[-1]
                norm = torch.linalg.vector_norm(prod[..., offset : offset + r], dim=(-2, -1))
                offset += r
                denom = left_norm[l1:stop, :, None] * right_norm[m][l2][None, None, :]
                out[m][l1:stop, :, l2, :] = (norm.double() / denom).cpu()
    return out


def _virtual_heads(
    w: HeadWeights,
    moments: TokenMoments,
    comp: Composition,
    ov_copy: Float[Tensor, "layer head"],
    z_min: float,
) -> pd.DataFrame:
    """For every head its strongest V-composition partner, and the composed path's copying score."""
    columns = [
        "first", "second", "first_layer", "first_head", "second_layer", "second_head", "v_comp",
        "v_comp_z", "above_baseline", "copying", "positive_frac", "first_copying",
        "second_copying",
    ]  # fmt: skip
    n_layers, n_heads = w.W_Q.shape[:2]
    if n_layers < 2:
        return pd.DataFrame(columns=columns)
    z = comp.z("v")
    ov_copy = ov_copy.cpu()
    pairs = []
    for l2 in range(1, n_layers):
        for h2 in range(n_heads):
            l1, h1 = divmod(int(torch.argmax(comp.v[:l2, :, l2, h2].reshape(-1))), n_heads)
            pairs.append((l1, h1, l2, h2))
    l1, h1, l2, h2 = (torch.tensor(c) for c in zip(*pairs, strict=True))
    # Ê W_V¹ W_O¹ W_V² W_O² W_U: its nonzero eigenvalues are those of the d_head × d_head
    # (W_O² W_U Ê) W_V¹ (W_O¹ W_V²), the small product FactoredMatrix.eigenvalues takes.
    middle = w.W_O[l1, h1] @ w.W_V[l2, h2]  # [pair, d_head, d_head]
    n = moments.unembed_embed.to(w.W_O.dtype)
    path = FactoredMatrix(w.W_V[l1, h1] @ middle, w.W_O[l2, h2] @ n)
    copy, pos = copying_score(path)
    rows = [
        {
            "first": f"L{a}H{b}",
            "second": f"L{c}H{d}",
            "first_layer": a,
            "first_head": b,
            "second_layer": c,
            "second_head": d,
            "v_comp": float(comp.v[a, b, c, d]),
            "v_comp_z": float(z[a, b, c, d]),
            "above_baseline": bool(z[a, b, c, d] >= z_min),
            "copying": float(copy[i]),
            "positive_frac": float(pos[i]),
            "first_copying": float(ov_copy[a, b]),
            "second_copying": float(ov_copy[c, d]),
        }
        for i, (a, b, c, d) in enumerate(pairs)
    ]
    df = pd.DataFrame(rows, columns=columns)
    return df.sort_values("v_comp", ascending=False, kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- pattern level
def _pattern_stats(
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
def _pattern_scores(
    model: Any,
    sequences: Sequence[Int[Tensor, "batch seq"]],
    local_ends: Sequence[int],
    batch_size: int,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Pooled pattern scores [layer, head] over batches of equal-length sequences."""
    n_layers = model.cfg.n_layers
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)}
    sums: dict[tuple[int, str], Tensor] = {}
    jobs = [
        (tokens[i : i + batch_size], end)
        for tokens, end in zip(sequences, local_ends, strict=True)
        for i in range(0, len(tokens), batch_size)
    ]
    for chunk, end in tqdm(jobs, desc="patterns", disable=not progress, leave=False):
        # stop after the last block: the unembedding (d_vocab wide) is not needed for patterns
        _, cache = model.run_with_cache(
            chunk.to(model.cfg.device), names_filter=names.__contains__, stop_at_layer=n_layers
        )
        for layer in range(n_layers):
            pat = cache["pattern", layer].detach().to("cpu", torch.float64)
            for name, v in _pattern_stats(pat, chunk, end).items():
                total = v.sum(0)
                sums[layer, name] = sums.get((layer, name), 0) + total
        del cache
    scores: dict[str, np.ndarray] = {}
    base = ("previous_token", "self", "first_token", "duplicate_token", "induction", "entropy")
    max_d = max(local_ends) // 2
    for name in base:
        scores[name] = np.stack([_ratio(sums, layer, name) for layer in range(n_layers)])
    if max_d >= 1:
        profile = np.stack(
            [
                np.stack([_ratio(sums, layer, f"offset{d}") for d in range(1, max_d + 1)], -1)
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


def _ratio(sums: dict[tuple[int, str], Any], layer: int, name: str) -> np.ndarray:
    total, count = sums.get((layer, name)), sums.get((layer, name + "#"))
    if total is None or count is None:
        return np.nan
    total = np.asarray(total, dtype=np.float64)
    count = float(np.asarray(count))
    return total / count if count > 0 else np.full_like(total, np.nan)


def _prompt_list(model: Any, prompts: Any) -> list[Tensor]:
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
        if len(tokens) > model.cfg.n_ctx:
            raise ValueError(
                f"prompts[{i}] has {len(tokens)} tokens, more than n_ctx={model.cfg.n_ctx}"
            )
        out.append(tokens[None])
    return out


# --------------------------------------------------------------------------- labels
def _label(frame: pd.DataFrame, thresholds: Mapping[str, float]) -> pd.DataFrame:
    frame = frame.copy()
    labels_col, evidence_col = [], []
    for row in frame.itertuples(index=False):
        row = row._asdict()
        labels, evidence = [], []
        for label, (column, op, key) in LABEL_RULES.items():
            value = row.get(column, float("nan"))
            if value is None or not np.isfinite(value):
                continue
            t = float(thresholds[key])
            hit = value >= t if op == ">=" else value <= -t
            if label == "fixed offset":
                hit = hit and row.get("offset", 0) >= thresholds["min_offset"]
            if hit:
                labels.append(label)
                sign = "≥" if op == ">=" else "≤"
                shown = t if op == ">=" else -t
                extra = f" at offset {int(row['offset'])}" if label == "fixed offset" else ""
                evidence.append(f"{label}: {column}={value:.3g} {sign} {shown:g}{extra}")
        labels_col.append(labels)
        evidence_col.append("; ".join(evidence))
    frame["labels"] = labels_col
    frame["label_str"] = [", ".join(labels) for labels in labels_col]
    frame["evidence"] = evidence_col
    return frame


# --------------------------------------------------------------------------- entry point
def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f"..{high}"
        raise ValueError(f"{name}={value} is out of range: valid values are {low}{upper}")
    return value


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
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise TypeError(
            f"head_atlas needs a transformer_lens HookedTransformer, got {type(model).__name__}"
        )
    cfg = model.cfg
    n_probes = _check_int("n_probes", n_probes, 1)
    seed = _check_int("seed", seed, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    n_ids = len(probe_token_ids(model))
    max_length = min((cfg.n_ctx - 1) // 2, n_ids)
    if max_length < 2:
        raise ValueError(
            f"this model cannot hold a probe: n_ctx={cfg.n_ctx}, {n_ids} usable token ids "
            "(need n_ctx ≥ 5 and ≥ 2 ids)"
        )
    if probe_length is None:
        probe_length = min(32, max_length)
    probe_length = _check_int("probe_length", probe_length, 2, max_length)
    merged = dict(THRESHOLDS)
    if thresholds is not None:
        unknown = sorted(set(thresholds) - set(THRESHOLDS))
        if unknown:
            raise ValueError(f"unknown thresholds {unknown}; known: {sorted(THRESHOLDS)}")
        merged.update({k: float(v) for k, v in thresholds.items()})
    prompt_tokens = _prompt_list(model, prompts) if prompts is not None else []

    steps = tqdm(total=4 + int(composition), desc="head atlas", disable=not progress)
    dtype = compute_dtype(model)
    with torch.no_grad():
        weights = HeadWeights.from_model(model, dtype)
        moments = TokenMoments.from_model(model, dtype)
        factors = weights.factors()
        steps.update()
        w_scores, spectra = _weight_scores(weights, factors, moments)
        steps.update()
        comp = None
        virtual = pd.DataFrame()
        if composition:
            # LN readers centre: writes are seen in the (d_model − 1)-dim mean-zero subspace
            centred = _centred_residual(cfg)
            comp = Composition.from_scores(
                _composition_scores(weights, factors),
                spectra.qk_singular,
                spectra.ov_singular,
                cfg.d_model - int(centred),
            )
            virtual = _virtual_heads(
                weights, moments, comp, w_scores["ov_copying"], merged["composition_z"]
            )
            steps.update()
        vocab_used = moments.n_tokens
        del factors, weights, moments

    probes = repeated_random_tokens(model, n=n_probes, length=probe_length, seed=seed)
    p_scores = _pattern_scores(model, [probes], [probe_length], batch_size, progress)
    steps.update()
    prompt_scores = None
    if prompt_tokens:
        prompt_scores = _pattern_scores(
            model, prompt_tokens, [t.shape[1] - 1 for t in prompt_tokens], 1, progress
        )

    partners = _best_partners(comp, cfg.n_layers, cfg.n_heads) if comp is not None else None
    rows = []
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            row: dict[str, Any] = {"layer": layer, "head": head, "name": f"L{layer}H{head}"}
            for name in PATTERN_COLUMNS:
                value = p_scores[name][layer, head]
                row[name] = int(value) if name == "offset" else float(value)
            for name in WEIGHT_COLUMNS:
                row[name] = float(w_scores[name][layer, head])
            if partners is not None:
                row.update(partners[layer * cfg.n_heads + head])
            if prompt_scores is not None:
                for name in PATTERN_COLUMNS:
                    value = prompt_scores[name][layer, head]
                    row["prompt_" + name] = int(value) if name == "offset" else float(value)
            rows.append(row)
    frame = _label(pd.DataFrame(rows), merged)
    steps.update()
    steps.close()
    info = {
        "model": getattr(cfg, "model_name", None) or "model",
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_vocab": cfg.d_vocab,
        "normalization": cfg.normalization_type,
        "positional_embedding": cfg.positional_embedding_type,
        "n_key_value_heads": cfg.n_key_value_heads,
        "probe": {"n": n_probes, "length": probe_length, "seed": seed},
        "n_prompts": len(prompt_tokens),
        "vocab_used": vocab_used,
    }
    return HeadAtlas(frame, spectra, comp, virtual, merged, info)


def _best_partners(comp: Composition, n_layers: int, n_heads: int) -> list[dict[str, Any]]:
    """Per head (row-major), its strongest earlier partner in each mode, with the z-score."""
    rows: list[dict[str, Any]] = [{} for _ in range(n_layers * n_heads)]
    for mode in COMPOSITION_MODES:
        key = f"{mode}_comp"
        scores, z = comp.scores(mode), comp.z(mode)
        for layer in range(n_layers):
            for head in range(n_heads):
                row = rows[layer * n_heads + head]
                if layer == 0:
                    row.update({f"{key}_partner": "", key: float("nan"), f"{key}_z": float("nan")})
                    continue
                flat = scores[:layer, :, layer, head].reshape(-1)
                l1, h1 = divmod(int(torch.argmax(flat)), n_heads)
                row[f"{key}_partner"] = f"L{l1}H{h1}"
                row[key] = float(scores[l1, h1, layer, head])
                row[f"{key}_z"] = float(z[l1, h1, layer, head])
    return rows
