"""Top-k QK terms of many (head, query, key) pairs: the selection behind the table.

The table needs, for every pair, the ``top_k`` largest |k_a · q_b| among all Pk × Pq part
products. ``torch.topk`` over every materialized term costs ≈ 3 ns per term on a 2-core CPU,
several times the multiply. The fused path (numba, CPU) multiplies the keys of one (head, query)
with one matmul, then per pair takes the column maxima of |term| (a vectorized pass), uses the
k-th largest of them as a threshold that at least k terms reach, collects the few terms above it
(≈ 40 of 4,500 at 67 × 67 parts) and sorts only those. Where numba is missing, or on other
devices, the same selection runs with ``torch.topk`` in chunks. Both return the same terms (ties
aside); ``tests/test_topk_terms.py`` checks them against a brute-force loop and each other.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

try:  # optional accelerator: numba compiles the fused kernel
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

# Elements of the per-chunk term tensor in the torch path: small enough to stay near the caches,
# large enough that the batched matmul runs near full speed.
_CHUNK_ELEMENTS = 8_000_000


def fused_available(t: Tensor) -> bool:
    return (
        numba is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
    )


def top_terms(
    Q: Float[Tensor, "head pos q_slot d_head"],
    K: Float[Tensor, "head pos k_slot d_head"],
    hh: Int[Tensor, " pair"],
    qq: Int[Tensor, " pair"],
    kk: Int[Tensor, " pair"],
    top_k: int,
    fused: bool | None = None,
) -> tuple[Float[Tensor, "pair top"], Int[Tensor, "pair top"]]:
    """For each pair p, the ``top_k`` terms ``K[hh, kk, a] · Q[hh, qq, b]`` of largest |value|,
    sorted by |value| descending, and their flat part index ``a * q_slots + b``."""
    n_slots = Q.shape[2] * K.shape[2]
    top_k = min(top_k, n_slots)
    if fused is None:
        fused = fused_available(Q)
    if len(hh) == 0:
        return Q.new_zeros(0, top_k), torch.zeros(0, top_k, dtype=torch.long)
    if fused:
        if not fused_available(Q):
            raise ValueError("the fused kernel needs numba and float32/float64 CPU tensors")
        vals, idx = _fused(Q, K, hh, qq, kk, top_k)
    else:
        vals, idx = _chunked(Q, K, hh, qq, kk, top_k)
    order = vals.abs().argsort(dim=-1, descending=True, stable=True)
    return vals.gather(-1, order), idx.gather(-1, order)


def _chunked(Q, K, hh, qq, kk, top_k):
    n_h, T_q, Pq, d = Q.shape
    Pk = K.shape[2]
    vals = Q.new_empty(len(hh), top_k)
    idx = torch.empty(len(hh), top_k, dtype=torch.long)
    # a few query positions at a time: one batched matmul gives their terms against a run of
    # keys for every head, [head, q, k, Pk·Pq] with each pair's block contiguous
    step = max(1, _CHUNK_ELEMENTS // max(1, n_h * K.shape[1] * Pk * Pq))
    for q0 in range(0, T_q, step):
        rows = torch.nonzero((qq >= q0) & (qq < q0 + step))[:, 0]
        if len(rows) == 0:
            continue
        h, q, k = hh[rows], qq[rows] - q0, kk[rows]
        k0, k1 = int(k.min()), int(k.max()) + 1
        q1 = min(T_q, q0 + step)
        keys = K[:, None, k0:k1].reshape(n_h, 1, (k1 - k0) * Pk, d)
        terms = torch.matmul(keys, Q[:, q0:q1].transpose(-1, -2))  # [h, q, k·Pk, Pq]
        chosen = terms.view(n_h, q1 - q0, k1 - k0, Pk * Pq)[h, q, k - k0]
        i = torch.topk(chosen.abs(), top_k, dim=-1).indices
        vals[rows] = chosen.gather(-1, i)
        idx[rows] = i
    return vals, idx


def _fused(Q, K, hh, qq, kk, top_k):
    kernel = _compiled()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    Pq, Pk = Q.shape[2], K.shape[2]
    # pairs sharing a (head, query) go together: one matmul gives all their terms
    group = hh * Q.shape[1] + qq
    order = torch.argsort(group, stable=True)
    h_o, q_o, k_o = hh[order], qq[order], kk[order]
    ends = torch.cumsum(torch.bincount(group[order]), 0)
    ends = torch.unique_consecutive(ends[ends > 0]).tolist()
    spans = list(zip([0, *ends[:-1]], ends, strict=True))
    vals = torch.empty(len(hh), top_k, dtype=Q.dtype).numpy()
    idx = np.empty((len(hh), top_k), dtype=np.int64)
    buf = torch.empty(max(b - a for a, b in spans) * Pk * Pq, dtype=Q.dtype)
    for a, b in spans:
        h, q = int(h_o[a]), int(q_o[a])
        k_first = int(k_o[a])
        if torch.equal(k_o[a:b], torch.arange(k_first, k_first + b - a)):
            # a run of keys (the usual case): a view, no copy
            keys = K[h, k_first : k_first + b - a].reshape(-1, K.shape[3])  # [n·Pk, d]
        else:
            keys = K[h, k_o[a:b]].reshape(-1, K.shape[3])
        terms = buf[: (b - a) * Pk * Pq].view(-1, Pq)
        torch.matmul(keys, Q[h, q].T, out=terms)  # [n·Pk, Pq]: each pair's block contiguous
        kernel(terms.view(b - a, Pk, Pq).numpy(), vals[a:b], idx[a:b])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return torch.from_numpy(vals)[inverse], torch.from_numpy(idx)[inverse]


_KERNEL = None


def _compiled():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = numba.njit(parallel=True, fastmath=True, cache=True)(_select_py)
    return _KERNEL


def _select_py(terms, out_vals, out_idx):  # pragma: no cover - compiled by numba
    """Top-k by |value| of each pair's [Pk, Pq] block, in passes that vectorize or stay short:
    (1) column maxima of |term| (elementwise across rows, no reduction chain); (2) t = the k-th
    largest of them, ≤ the k-th largest term; (3) collect the few terms ≥ t (≈ 40 of 4,500 at
    67 × 67 parts), 16 at a time behind a vectorized count; (4) sort just those."""
    n, Pk, Pq = terms.shape
    top_k = out_vals.shape[1]
    for p in numba.prange(n):
        x = terms[p]
        colmax = np.zeros(Pq, dtype=terms.dtype)
        for a in range(Pk):
            for b in range(Pq):
                colmax[b] = max(colmax[b], abs(x[a, b]))
        # the k-th largest column maximum: k distinct terms reach it, so it is ≤ the k-th
        # largest term, and few terms lie above it
        t = np.sort(colmax)[Pq - top_k] if top_k <= Pq else colmax[0] * 0
        flat = x.reshape(Pk * Pq)
        S = flat.size
        cand = np.empty(S, dtype=np.int64)
        c = 0
        nb = S // 16
        for blk in range(nb):
            hits = 0
            for j in range(16):
                hits += abs(flat[blk * 16 + j]) >= t
            if hits:
                for j in range(blk * 16, blk * 16 + 16):
                    if abs(flat[j]) >= t:
                        cand[c] = j
                        c += 1
        for j in range(nb * 16, S):
            if abs(flat[j]) >= t:
                cand[c] = j
                c += 1
        # top_k of the c ≥ top_k candidates (c < top_k only when there are fewer terms than k)
        mags = np.empty(c, dtype=terms.dtype)
        for i in range(c):
            mags[i] = -abs(flat[cand[i]])
        best = np.argsort(mags, kind="mergesort")
        for i in range(top_k):
            j = cand[best[i]]
            out_vals[p, i] = flat[j]
            out_idx[p, i] = j
