"""Weight-level head scores: norm-folded Q/K/V/O weights, token moments, spectra and the scores
read from them (no forward pass; vocabulary-sized matrices only through their factors).
See :mod:`qk_lens.atlas` for what each score means."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Complex, Float
from torch import Tensor
from transformer_lens import FactoredMatrix

from qk_lens.arch import LayerArch, arch_of

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
# Rows of the embedding normalized per chunk: bounds memory for 256k vocabularies.
VOCAB_CHUNK = 8192


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


@dataclass
class HeadWeights:
    """Every head's norm-folded weights, stacked (see the module docstring for what is folded)."""

    W_Q: Float[Tensor, "layer head d_model d_head"]  # includes 1 / attn_scale
    W_K: Float[Tensor, "layer head d_model d_head"]  # GQA: each query head's kv head
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]

    @classmethod
    def from_model(cls, model: Any, dtype: torch.dtype) -> HeadWeights:
        arch = arch_of(model)
        qs, ks, vs, os_ = [], [], [], []
        for la in arch.layers():
            read = la.attn_in  # identity in post-norm blocks: attention reads the raw residual
            w_q = read.fold_read(la.W_Q.to(dtype))
            w_k = read.fold_read(la.per_query_head(la.W_K).to(dtype))
            w_v = read.fold_read(la.per_query_head(la.W_V).to(dtype))
            w_q, w_k = fold_qk_norm(la, w_q, w_k)
            w_q = w_q / la.attn_scale
            w_o = la.W_O.to(dtype)
            if la.attn_out is not None:
                w_o = la.attn_out.fold_write(w_o)
            if (
                arch.centred_residual
            ):  # every reader centres: the mean direction of a write is unseen
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
            q=gram_factor(gram(self.W_Q, "l h d_m a, l h d_m b -> l h a b")),
            k=gram_factor(gram(self.W_K, "l h d_m a, l h d_m b -> l h a b")),
            v=gram_factor(gram(self.W_V, "l h d_m a, l h d_m b -> l h a b")),
            o=gram_factor(gram(self.W_O, "l h a d_m, l h b d_m -> l h a b")),
        )


def gram_factor(gram: Float[Tensor, "*batch n n"]) -> Float[Tensor, "*batch n n"]:
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


def fold_qk_norm(la: LayerArch, w_q: Tensor, w_k: Tensor) -> tuple[Tensor, Tensor]:
    """qk-norm gains multiply the query/key maps (per-head norms; OLMo's full-width norm sliced)."""
    qn = la.qk_norm
    if qn is None:
        return w_q, w_k
    out = []
    for w, gain in ((w_q, qn.q_weight), (w_k, qn.k_weight)):
        if gain is not None:
            gain = gain.to(w.dtype)
            if qn.kind == "full":  # [heads * d_head] (keys: per kv head) -> [head, 1, d_head]
                per_head = gain.reshape(-1, la.d_head)
                if per_head.shape[0] != la.n_heads:
                    per_head = la.per_query_head(per_head)
                gain = per_head[:, None, :]
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
        arch = arch_of(model)
        first = arch.layer(0).attn_in  # how the first reader normalizes a token's embedding
        embed_norm = arch.embed_norm  # BLOOM: a norm right after the embedding
        W_E, W_U = arch.W_E, arch.W_U
        n = min(W_E.shape[0], W_U.shape[1])  # models whose two vocabularies differ: shared ids
        d = arch.d_model
        u_mean = W_U.to(dtype).mean(-1)  # centre over the vocabulary: logit shifts are free
        device = W_E.device
        kept = []  # small vocabularies: Ê is a cheaper factor of the moments than they are
        ue = torch.zeros(d, d, dtype=dtype, device=device)
        second = torch.zeros(d, d, dtype=dtype, device=device)
        total = torch.zeros(d, dtype=dtype, device=device)
        for start in range(0, n, VOCAB_CHUNK):
            e = W_E[start : start + VOCAB_CHUNK].to(dtype)
            if embed_norm is not None:
                e = embed_norm.normalize_rows(e)
                e = e * embed_norm.weight.to(dtype) if embed_norm.weight is not None else e
            e = first.normalize_rows(e)
            u = W_U[:, start : start + len(e)].to(dtype)
            ue += einops.einsum(u, e, "d_res tok, tok d_emb -> d_res d_emb")
            second += einops.einsum(e, e, "tok d_a, tok d_b -> d_a d_b")
            total += e.sum(0)
            if n < d:
                kept.append(e)
        ue -= torch.outer(u_mean, total)
        ue = arch.final_norm.fold_read(ue)
        mean = total / n
        second /= n
        tokens = torch.cat(kept) if kept else None
        return cls(ue, second, second - torch.outer(mean, mean), n, tokens)


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


def same_token(w: HeadWeights, moments: TokenMoments) -> Float[Tensor, "layer head"]:
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


def weight_scores(
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
        "same_token": same_token(w, moments),
    }
    scores = {k: v.double().cpu() for k, v in scores.items()}
    return scores, Spectra(qk_sv.cpu(), ov_sv.cpu(), qk_eig.cpu(), ov_eig.cpu())
