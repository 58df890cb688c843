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
(:func:`qk_lens.atlas.probes.repeated_random_tokens`). Scores are mean attention over queries
q ≥ 1: ``previous_token`` (to q − 1), ``self`` (to q), ``first_token`` (to position 0, the BOS
sink), ``duplicate_token`` (to earlier copies of the query's token), ``induction`` (to the token
right after an earlier copy of the query's token), the last two over the queries that have such
a key; on these probes they equal :func:`qk_lens.atlas.probes.pattern_scores`. On the first,
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

from qk_lens.atlas.build import head_atlas
from qk_lens.atlas.composition import COMPOSITION_MODES, Composition
from qk_lens.atlas.pattern_level import PATTERN_COLUMNS
from qk_lens.atlas.probes import SCORE_COLUMNS, pattern_scores, repeated_random_tokens
from qk_lens.atlas.result import LABEL_RULES, LABELS, SCORE_INFO, THRESHOLDS, HeadAtlas
from qk_lens.atlas.weights import (
    WEIGHT_COLUMNS,
    Spectra,
    copying_score,
    effective_rank,
    eigen_skew,
    participation_ratio,
)

__all__ = [
    "COMPOSITION_MODES",
    "LABELS",
    "LABEL_RULES",
    "PATTERN_COLUMNS",
    "SCORE_COLUMNS",
    "SCORE_INFO",
    "THRESHOLDS",
    "WEIGHT_COLUMNS",
    "Composition",
    "HeadAtlas",
    "Spectra",
    "copying_score",
    "effective_rank",
    "eigen_skew",
    "head_atlas",
    "participation_ratio",
    "pattern_scores",
    "repeated_random_tokens",
]
