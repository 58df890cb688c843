"""Top-k QK terms of many (head, query, key) pairs: the selection behind the table.

The table needs, for every pair, the ``top_k`` largest |k_a · q_b| among all Pk × Pq part
products. ``torch.topk`` over every materialized term costs ≈ 3 ns per term on a 2-core CPU,
several times the multiply. The fused path is a small C kernel (``csrc/top_terms.c``) that keeps
each 4 × 32 block of terms in registers, compares it with the pair's running k-th largest |term|
in one vector instruction and buffers the few that beat it, cutting the buffer back to k by
quickselect when it fills: only candidates reach memory. It is compiled
once per machine with the system C compiler (``cc -O3 -march=native``) into
``~/.cache/qk_lens`` (``QK_LENS_CACHE``), and used for float32 CPU tensors; set
``QK_LENS_NO_C=1`` to turn it off. Everywhere else the same selection runs with ``torch.topk``
in chunks. Both return the same terms (ties aside); ``tests/test_topk_terms.py`` checks them
against a brute-force loop and each other.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
) -> tuple[Float[Tensor, "pair top"], Int[Tensor, "pair top"]]:
    """For each pair p, the ``top_k`` terms ``K[hh, kk, a] · Q[hh, qq, b]`` of largest |value|,
    sorted by |value| descending, and their flat part index ``a * q_slots + b``.
    ``fused``: None picks the fused kernel where it runs; True insists on it; False uses torch."""
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
    vals, idx = (_fused if fused else _chunked)(Q, K, hh, qq, kk, top_k)
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
    fn.argtypes = [f, f, f, i64, i64, i64, i64] + [ctypes.c_int64] * 9 + [f, i64]
    fn.restype = ctypes.c_int64
    return fn


_BLOCK_COLUMNS = 32  # CB in the C source: query parts are padded to a multiple of it


def _fused(Q, K, hh, qq, kk, top_k):
    fn = _c_library()
    _, Tq, Pq, d = Q.shape
    Tk, Pk = K.shape[1], K.shape[2]
    Pqp = -(-Pq // _BLOCK_COLUMNS) * _BLOCK_COLUMNS
    Qt = torch.zeros(Q.shape[0], Tq, d, Pqp, dtype=torch.float32)
    Qt[..., :Pq] = Q.detach().transpose(-1, -2)
    Qt = Qt.numpy()
    Kc = K.detach().contiguous().numpy()
    zero = np.zeros(d, dtype=np.float32)
    # largest key parts first: the running k-th largest |term| rises early (see the C source)
    rows = torch.argsort(K.detach().norm(dim=-1), dim=-1, descending=True).contiguous().numpy()
    # pairs sharing a (head, query) run back to back, so that query's parts stay in cache
    order = torch.argsort(hh * Tq + qq, stable=True)
    h, q, k = (np.ascontiguousarray(x[order].numpy(), dtype=np.int64) for x in (hh, qq, kk))
    n = len(h)
    vals = np.empty((n, top_k), dtype=np.float32)
    idx = np.empty((n, top_k), dtype=np.int64)
    fp, ip = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
    args = [a.ctypes.data_as(fp) for a in (Qt, Kc, zero)]
    args += [a.ctypes.data_as(ip) for a in (rows, h, q, k)]
    out = [vals.ctypes.data_as(fp), idx.ctypes.data_as(ip)]

    def run(span: tuple[int, int]) -> int:
        return fn(*args, span[0], span[1], Tq, Tk, Pk, Pq, Pqp, d, top_k, *out)

    threads = max(1, torch.get_num_threads())
    bounds = np.linspace(0, n, 8 * threads + 1).astype(np.int64)
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    # ctypes releases the GIL during the call, so the threads run the kernel in parallel
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(run, spans))
    if min(done) < 0:
        raise MemoryError(f"the top-k kernel could not allocate its buffers (top_k={top_k})")
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return torch.from_numpy(vals)[inverse], torch.from_numpy(idx)[inverse]
