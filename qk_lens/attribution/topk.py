"""Top-k QK terms of many (head, query, key) pairs: the selection behind the table.

The table needs, for every pair, the ``top_k`` largest |k_a · q_b| among all Pk × Pq part
products. ``torch.topk`` over every materialized term costs ≈ 3 ns per term on a 2-core CPU,
several times the multiply. The fused path is a small C kernel (``csrc/top_terms.c``): both sides'
parts are taken largest-norm first, blocks of terms are computed in registers best bound first,
and a block is skipped unmultiplied when |k|·|q| (Cauchy–Schwarz) shows none of its terms can beat
the pair's running k-th largest |term|; the few computed terms that beat it go to a small buffer
cut back to k by a branch-free quickselect. Skipping changes nothing in the result: a skipped term
could not have been selected. The kernel is compiled once per machine with the system C compiler
(``cc -O3 -march=native``) into ``~/.cache/qk_lens`` (``QK_LENS_CACHE``), and used for float32 CPU
tensors; set ``QK_LENS_NO_C=1`` to turn it off. Everywhere else the same selection runs with
``torch.topk`` in chunks. Both return the same terms (ties aside) in the same order;
``tests/test_topk_terms.py`` checks them against a brute-force loop and each other.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

# Elements of the per-chunk term tensor in the torch path: small enough to stay near the caches,
# large enough that the batched matmul runs near full speed.
_CHUNK_ELEMENTS = 8_000_000


def backend(t: Tensor) -> str:
    """Which path ``top_terms`` takes for tensors like ``t``: 'c' (the fused kernel) or 'torch'."""
    return "c" if fused_available(t) else "torch"


def fused_available(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and _c_library() is not None


def top_terms(
    Q: Float[Tensor, "head pos_q q_slot d_head"],
    K: Float[Tensor, "head pos_k k_slot d_head"],
    hh: Int[Tensor, " pair"],
    qq: Int[Tensor, " pair"],
    kk: Int[Tensor, " pair"],
    top_k: int,
    fused: bool | None = None,
    stats: dict | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[Float[Tensor, "pair top"], Int[Tensor, "pair top"]]:
    """For each pair p, the ``top_k`` terms ``K[hh, kk, a] · Q[hh, qq, b]`` of largest |value|,
    sorted by |value| descending, and their flat part index ``a * q_slots + b``.
    ``fused``: None picks the fused kernel where it runs; True insists on it; False uses torch.
    ``stats``: a dict that receives ``fraction_multiplied``, the share of the Pk × Pq term products
    actually computed (the kernel skips blocks that provably cannot enter; 1.0 on the torch path).
    ``progress``: called with a number of pairs each time that many are done (a progress bar's
    ``update``)."""
    if Q.ndim != 4 or K.ndim != 4 or Q.shape[0] != K.shape[0] or Q.shape[3] != K.shape[3]:
        raise ValueError(
            f"Q {tuple(Q.shape)} and K {tuple(K.shape)} must be [head, pos, slot, d_head] with the"
            " same heads and d_head"
        )
    if not len(hh) == len(qq) == len(kk):
        raise ValueError(f"hh, qq, kk have lengths {len(hh)}, {len(qq)}, {len(kk)}; need one each")
    # the C kernel indexes raw memory: an index out of range must stop here
    for name, x, n in (("hh", hh, Q.shape[0]), ("qq", qq, Q.shape[1]), ("kk", kk, K.shape[1])):
        if len(x) and (int(x.min()) < 0 or int(x.max()) >= n):
            raise ValueError(f"{name} must lie in 0..{n - 1}; got {int(x.min())}..{int(x.max())}")
    n_slots = Q.shape[2] * K.shape[2]
    top_k = min(top_k, n_slots)
    if fused is None:
        fused = fused_available(Q)
    if fused and not fused_available(Q):
        raise ValueError(
            f"the fused kernel needs float32 CPU tensors (got {Q.dtype} on {Q.device}) and a C"
            " compiler (cc/gcc on PATH, or CC); use fused=None to fall back to torch"
        )
    if len(hh) == 0:
        return Q.new_zeros(0, top_k), torch.zeros(0, top_k, dtype=torch.long)
    progress = progress or (lambda n: None)
    if fused:
        return _fused(Q, K, hh, qq, kk, top_k, stats, progress)  # sorted by the kernel
    vals, idx = _chunked(Q, K, hh, qq, kk, top_k, progress)
    if stats is not None:
        stats["fraction_multiplied"] = 1.0
    # by |value| descending, ties by flat index (as the kernel orders them)
    by_index = idx.argsort(dim=-1)
    vals, idx = vals.gather(-1, by_index), idx.gather(-1, by_index)
    order = vals.abs().argsort(dim=-1, descending=True, stable=True)
    return vals.gather(-1, order), idx.gather(-1, order)


def _chunked(Q, K, hh, qq, kk, top_k, progress):
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
        progress(len(rows))
    return vals, idx


# ------------------------------------------------------------------ the fused C kernel
_C_SOURCE = Path(__file__).parent / "csrc" / "top_terms.c"
_C_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_C_LIB: object = None  # None: not tried yet; False: unavailable


def _cpu_fingerprint() -> str:
    """-march=native code must not be reused on another kind of CPU (a shared home directory)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor() or platform.machine()


def _c_library():
    """The compiled kernel, built once per machine into the cache (``QK_LENS_CACHE`` or
    ``~/.cache/qk_lens``) with the system C compiler; None where there is none or it fails."""
    global _C_LIB
    if _C_LIB is None:
        _C_LIB = _build_c_library() or False
    return _C_LIB or None


def _build_c_library():
    if os.environ.get("QK_LENS_NO_C"):
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or not _C_SOURCE.exists():
        return None
    key = hashlib.sha256(
        b"|".join([_C_SOURCE.read_bytes(), " ".join([cc, *_C_FLAGS]).encode(),
                   _cpu_fingerprint().encode()])
    ).hexdigest()[:16]  # fmt: skip
    cache = Path(os.environ.get("QK_LENS_CACHE", Path.home() / ".cache" / "qk_lens"))
    lib = cache / f"top_terms_{key}.so"
    try:
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
            done = subprocess.run(
                [cc, *_C_FLAGS, "-o", str(tmp), str(_C_SOURCE)], capture_output=True, timeout=120
            )
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                return None
            os.replace(tmp, lib)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    f, i64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
    fn = dll.qk_top_terms_f32
    fn.argtypes = [f, f, i64, f, f, i64, f, i64, i64, i64] + [ctypes.c_int64] * 9
    fn.argtypes += [i64, f, i64, i64]
    fn.restype = ctypes.c_int64
    dll.qk_block_columns.restype = dll.qk_block_rows.restype = ctypes.c_int64
    return _Kernel(fn, int(dll.qk_block_rows()), int(dll.qk_block_columns()))


@dataclass(frozen=True)
class _Kernel:
    fn: Any
    block_rows: int  # key parts per block (the C source's RB)
    block_columns: int  # query parts per block (CB): they are padded to a multiple of it


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """One lasting pool per thread count (no thread start-up per call), and per process: a
    forked child inherits the pool object but not its threads."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="qk_lens_top_terms")
    return _POOLS[key]


def _by_norm(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each [.., slot, d] group's slots by decreasing norm: (order, norms in that order)."""
    norms, order = x.norm(dim=-1).sort(dim=-1, descending=True, stable=True)
    return order, norms


def _fused(Q, K, hh, qq, kk, top_k, stats, progress):
    kernel = _c_library()
    n_h, Tq, Pq, d = Q.shape
    Tk, Pk = K.shape[1], K.shape[2]
    Q, K = Q.detach(), K.detach()
    cb = kernel.block_columns
    Pqp = -(-Pq // cb) * cb
    # Both sides largest-norm first: the kernel skips blocks whose |k|·|q| bound cannot enter.
    q_order, q_norms = _by_norm(Q)
    Qs = torch.zeros(n_h, Tq, Pqp, d, dtype=torch.float32)
    Qs[:, :, :Pq] = Q.gather(2, q_order[..., None].expand(-1, -1, -1, d))
    # [h, q, column block, d, CB]: the kernel streams one column block contiguously
    Qt = Qs.view(n_h, Tq, Pqp // cb, cb, d).transpose(-1, -2).contiguous()
    qn = torch.zeros(n_h, Tq, Pqp, dtype=torch.float32)
    qn[..., :Pq] = q_norms
    qc = torch.full((n_h, Tq, Pqp), -1, dtype=torch.int64)
    qc[..., :Pq] = q_order
    rows, kn = _by_norm(K)
    Kc = K.contiguous().numpy()
    zero = np.zeros(d, dtype=np.float32)
    # pairs sharing a (head, query) run back to back, so that query's parts stay in cache
    order = torch.argsort(hh * Tq + qq, stable=True)
    h, q, k = (np.ascontiguousarray(x[order].numpy(), dtype=np.int64) for x in (hh, qq, kk))
    n = len(h)
    vals = np.empty((n, top_k), dtype=np.float32)
    idx = np.empty((n, top_k), dtype=np.int64)
    fp, ip = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
    out_row = np.ascontiguousarray(order.numpy(), dtype=np.int64)  # kernel pair → output row
    # the arrays must outlive the calls: the kernel reads them through raw pointers
    arrays = [Qt.numpy(), qn.numpy(), qc.numpy(), Kc, zero, rows.contiguous().numpy()]
    arrays += [kn.contiguous().numpy(), h, q, k, out_row, vals, idx]
    ptr = [a.ctypes.data_as(ip if a.dtype == np.int64 else fp) for a in arrays]
    dims = [Tq, Tk, Pk, Pq, Pqp, d, top_k]

    def run(span: tuple[int, int]) -> tuple[int, int]:
        blocks = ctypes.c_int64(0)
        done = kernel.fn(*ptr[:10], *span, *dims, *ptr[10:], ctypes.byref(blocks))
        return done, blocks.value

    threads = max(1, torch.get_num_threads())
    bounds = np.linspace(0, n, 8 * threads + 1).astype(np.int64)
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    # ctypes releases the GIL during the call, so the threads run the kernel in parallel
    done = []
    for (a, b), result in zip(spans, _pool(threads).map(run, spans), strict=True):
        done.append(result)
        progress(b - a)
    if min(x[0] for x in done) < 0:
        raise MemoryError(f"the top-k kernel could not allocate its buffers (top_k={top_k})")
    if stats is not None:
        blocks_per_pair = -(-Pk // kernel.block_rows) * (Pqp // cb)
        stats["fraction_multiplied"] = sum(x[1] for x in done) / (n * blocks_per_pair)
    return torch.from_numpy(vals), torch.from_numpy(idx)
