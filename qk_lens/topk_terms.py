"""Top-k QK terms of many (head, query, key) pairs, selected while they are multiplied.

The table needs, for every pair, the ``top_k`` largest |k_a · q_b| among all Pk × Pq part
products. Materializing every product and calling ``torch.topk`` spends most of its time
writing and re-reading terms that are then discarded (≈ 4 ns per term against ≈ 1 ns for the
multiply). The fused kernel here computes one key part's row of products at a time into a small
buffer that stays in L1, and keeps a k-entry min-heap on |term|: almost every term is rejected by
a single comparison with the heap's minimum, so it runs near the speed of the multiply alone.

It is compiled with numba when numba is installed (CPU tensors only); otherwise, and on other
devices, the same selection is done with ``torch.topk`` in chunks. Both return the same terms
(ties aside); ``tests/test_table.py`` checks them against each other and against
``qk_attribution``.
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
_CHUNK_ELEMENTS = 4_000_000


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
    n_slots = Q.shape[2] * K.shape[2]
    step = max(1, _CHUNK_ELEMENTS // n_slots)
    vals, idx = [], []
    for s in range(0, len(hh), step):
        h, q, k = hh[s : s + step], qq[s : s + step], kk[s : s + step]
        # [pair, Pk, d] @ [pair, d, Pq]: each pair's Pk×Pq block, rows = key parts
        terms = torch.bmm(K[h, k], Q[h, q].transpose(-1, -2)).flatten(1)
        i = torch.topk(terms.abs(), top_k, dim=-1).indices
        vals.append(terms.gather(-1, i))
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def _fused(Q, K, hh, qq, kk, top_k):
    kernel = _compiled()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    # pairs sharing a (head, query) run back to back, so that query's parts stay in cache
    order = torch.argsort(hh * Q.shape[1] + qq, stable=True)
    Qt = Q.transpose(-1, -2).contiguous().numpy()  # [head, pos, d, Pq]: rows vectorize over b
    Kc = K.contiguous().numpy()
    h, q, k = (x[order].numpy().astype(np.int64) for x in (hh, qq, kk))
    vals = np.empty((len(h), top_k), dtype=Kc.dtype)
    idx = np.empty((len(h), top_k), dtype=np.int64)
    kernel(Qt, Kc, h, q, k, vals, idx)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return torch.from_numpy(vals)[inverse], torch.from_numpy(idx)[inverse]


_KERNEL = None


def _compiled():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = numba.njit(parallel=True, fastmath=True, cache=True)(_kernel_py)
    return _KERNEL


def _kernel_py(Qt, K, hh, qq, kk, out_vals, out_idx):  # pragma: no cover - compiled by numba
    n_pairs, top_k = out_vals.shape
    Pk, d = K.shape[2], K.shape[3]
    Pq = Qt.shape[3]
    for p in numba.prange(n_pairs):
        Qp = Qt[hh[p], qq[p]]  # [d, Pq]
        Kp = K[hh[p], kk[p]]  # [Pk, d]
        acc = np.empty(Pq, dtype=Qt.dtype)
        # min-heap on |value| of the best top_k so far
        heap_abs = np.empty(top_k, dtype=Qt.dtype)
        heap_val = np.empty(top_k, dtype=Qt.dtype)
        heap_idx = np.empty(top_k, dtype=np.int64)
        n = 0
        for a in range(Pk):
            for b in range(Pq):
                acc[b] = 0.0
            for j in range(d):
                kaj = Kp[a, j]
                for b in range(Pq):
                    acc[b] += kaj * Qp[j, b]
            for b in range(Pq):
                v = acc[b]
                av = abs(v)
                if n < top_k:
                    # sift up
                    i = n
                    n += 1
                    while i > 0:
                        parent = (i - 1) // 2
                        if heap_abs[parent] <= av:
                            break
                        heap_abs[i] = heap_abs[parent]
                        heap_val[i] = heap_val[parent]
                        heap_idx[i] = heap_idx[parent]
                        i = parent
                    heap_abs[i] = av
                    heap_val[i] = v
                    heap_idx[i] = a * Pq + b
                elif av > heap_abs[0]:
                    # replace the minimum, sift down
                    i = 0
                    while True:
                        c = 2 * i + 1
                        if c >= top_k:
                            break
                        if c + 1 < top_k and heap_abs[c + 1] < heap_abs[c]:
                            c += 1
                        if heap_abs[c] >= av:
                            break
                        heap_abs[i] = heap_abs[c]
                        heap_val[i] = heap_val[c]
                        heap_idx[i] = heap_idx[c]
                        i = c
                    heap_abs[i] = av
                    heap_val[i] = v
                    heap_idx[i] = a * Pq + b
        for i in range(top_k):
            out_vals[p, i] = heap_val[i]
            out_idx[p, i] = heap_idx[i]
