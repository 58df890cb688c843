"""The fused top-k term kernel against a brute-force reference and against the torch path; the
attribution table with and without it on HookedTransformer variants (stack (a)) and bridges."""

import os
import platform
import time

import numpy as np
import pandas as pd
import pytest
import torch

import qk_lens
import qk_lens.attribution.topk as tt
from tests.models import BRIDGE_CORE, HOOKED, make_any, make_tokens
from tests.saes import make_sae

# No torch.set_num_threads(1) here: the fused kernel sizes its thread pool by
# torch.get_num_threads(), and this module tests that pool.

needs_c = pytest.mark.skipif(
    not tt.fused_available(torch.zeros(1)), reason="no C compiler: the fused kernel is unavailable"
)


def _inputs(dtype, seed=0, n_h=3, T=9, Pq=7, Pk=5, d=6):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n_h, T, Pq, d, generator=g, dtype=dtype)
    K = torch.randn(n_h, T, Pk, d, generator=g, dtype=dtype)
    Q[:, :, -1] = 0  # padding slots give exact-zero terms
    hh, qq, kk = torch.nonzero(torch.ones(n_h, T, T, dtype=torch.bool).tril(), as_tuple=True)
    return Q, K, hh, qq, kk


def _reference(Q, K, hh, qq, kk, top_k):
    """Every term written out by a Python loop, sorted by |value|."""
    out_v, out_i = [], []
    for h, q, k in zip(hh.tolist(), qq.tolist(), kk.tolist(), strict=True):
        terms = [
            (float(K[h, k, a] @ Q[h, q, b]), a * Q.shape[2] + b)
            for a in range(K.shape[2])
            for b in range(Q.shape[2])
        ]
        terms.sort(key=lambda t: -abs(t[0]))
        out_v.append([t[0] for t in terms[:top_k]])
        out_i.append([t[1] for t in terms[:top_k]])
    return np.array(out_v), np.array(out_i)


@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_c), False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("top_k", [1, 4, 35, 100])
def test_top_terms_match_brute_force(fused, dtype, top_k):
    if fused and dtype != torch.float32:
        pytest.skip("the fused kernel is float32")
    Q, K, hh, qq, kk = _inputs(dtype)
    vals, idx = tt.top_terms(Q, K, hh, qq, kk, top_k, fused=fused)
    ref_v, ref_i = _reference(Q, K, hh, qq, kk, top_k)
    assert vals.shape == (len(hh), min(top_k, 35))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert np.allclose(vals.numpy(), ref_v, atol=tol, rtol=0)
    # indices agree wherever |values| are not tied (the zeros of padding slots tie)
    distinct = np.abs(ref_v) > 1e-9
    assert (idx.numpy()[distinct] == ref_i[distinct]).all()


@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_c), False])
def test_top_terms_any_pair_order_and_repeats(fused):
    """Pairs in any order, repeated, with gaps between keys: each row still answers its pair."""
    Q, K, hh, qq, kk = _inputs(torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    pick = torch.randint(0, len(hh), (60,), generator=g)
    pick = torch.cat([pick, pick[:7]])  # repeats
    hh, qq, kk = hh[pick], qq[pick], kk[pick]
    # one (head, query) whose keys 3, 3, 5 span as many positions as a run 3, 4, 5 would
    hh = torch.cat([hh, torch.tensor([0, 0, 0])])
    qq = torch.cat([qq, torch.tensor([6, 6, 6])])
    kk = torch.cat([kk, torch.tensor([3, 3, 5])])
    vals, idx = tt.top_terms(Q, K, hh, qq, kk, 5, fused=fused)
    ref_v, _ = _reference(Q, K, hh, qq, kk, 5)
    assert np.allclose(vals.numpy(), ref_v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_c), False])
@pytest.mark.parametrize("top_k", [1, 3, 40])
def test_top_terms_with_many_ties(fused, top_k):
    """Small-integer parts: hundreds of equal |terms|, so the k-th value is tied many times and
    the kernel's buffer is cut back (past 1.5·k) several times per pair."""
    g = torch.Generator().manual_seed(5)
    Q = torch.randint(-2, 3, (2, 5, 21, 3), generator=g).float()
    K = torch.randint(-2, 3, (2, 5, 19, 3), generator=g).float()
    hh, qq, kk = torch.nonzero(torch.ones(2, 5, 5, dtype=torch.bool), as_tuple=True)
    vals, idx = tt.top_terms(Q, K, hh, qq, kk, top_k, fused=fused)
    ref_v, _ = _reference(Q, K, hh, qq, kk, top_k)
    assert np.array_equal(np.abs(vals.numpy()), np.abs(ref_v))  # the same magnitudes, in order
    # every index names a real term with that value
    a, b = idx // 21, idx % 21
    for p in range(len(hh)):
        h, q, k = int(hh[p]), int(qq[p]), int(kk[p])
        recomputed = (K[h, k, a[p]] * Q[h, q, b[p]]).sum(-1)
        assert torch.equal(recomputed, vals[p])
        assert len(set(idx[p].tolist())) == top_k  # no term listed twice


def _heavy_tailed(seed=3, n_h=2, T=12, Pq=70, Pk=45, d=16):
    """Parts whose norms span three orders of magnitude, a few large ones among many small:
    most blocks of terms are provably below the k-th and the kernel skips them."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n_h, T, Pq, d, generator=g) * torch.rand(n_h, T, Pq, 1, generator=g) ** 6
    K = torch.randn(n_h, T, Pk, d, generator=g) * torch.rand(n_h, T, Pk, 1, generator=g) ** 6
    Q[:, :, 3] *= 30  # one dominant part per side, as an error term or a bias often is
    K[:, :, 7] *= 30
    hh, qq, kk = torch.nonzero(torch.ones(n_h, T, T, dtype=torch.bool).tril(), as_tuple=True)
    return Q, K, hh, qq, kk


@needs_c
@pytest.mark.parametrize("top_k", [1, 8, 50])
def test_kernel_skips_blocks_without_changing_the_selection(top_k):
    Q, K, hh, qq, kk = _heavy_tailed()
    stats = {}
    vals, idx = tt.top_terms(Q, K, hh, qq, kk, top_k, fused=True, stats=stats)
    assert stats["fraction_multiplied"] < 0.6  # the bound really skipped work here
    ref_v, ref_i = _reference(Q, K, hh, qq, kk, top_k)
    assert np.allclose(vals.numpy(), ref_v, atol=1e-5, rtol=1e-5)  # float32 products
    assert (idx.numpy() == ref_i).all()  # no ties among these: the same terms, in order
    plain = {}
    vals_t, idx_t = tt.top_terms(Q, K, hh, qq, kk, top_k, fused=False, stats=plain)
    assert plain["fraction_multiplied"] == 1.0
    assert torch.equal(idx_t, idx)


@needs_c
@pytest.mark.skipif(platform.machine() != "x86_64", reason="-mno-avx512f is an x86 flag")
@pytest.mark.parametrize(
    "flags", [["-mno-avx512f"], ["-mno-avx"]], ids=["avx2-or-less", "sse-vectors"]
)
def test_portable_kernel_branch(monkeypatch, tmp_path, flags):
    """The kernel built without AVX-512 (GCC vector extensions of 8 or 4 floats) selects the
    same terms."""
    monkeypatch.setattr(tt, "_C_FLAGS", [*tt._C_FLAGS, *flags])
    monkeypatch.setenv("QK_LENS_CACHE", str(tmp_path))
    monkeypatch.setattr(tt, "_C_LIB", None)
    Q, K, hh, qq, kk = _inputs(torch.float32, Pq=40, Pk=9)  # two column blocks, a partial one
    vals, idx = tt.top_terms(Q, K, hh, qq, kk, 6, fused=True)
    assert len(list(tmp_path.glob("top_terms_*.so"))) == 1  # built here, with the extra flag
    ref_v, ref_i = _reference(Q, K, hh, qq, kk, 6)
    assert np.allclose(vals.numpy(), ref_v, atol=1e-5, rtol=0)
    distinct = np.abs(ref_v) > 1e-9
    assert (idx.numpy()[distinct] == ref_i[distinct]).all()
    Q, K, hh, qq, kk = _heavy_tailed()  # with skipped blocks
    vals, idx = tt.top_terms(Q, K, hh, qq, kk, 8, fused=True)
    assert (idx.numpy() == _reference(Q, K, hh, qq, kk, 8)[1]).all()


def test_top_terms_bad_input():
    Q, K, hh, qq, kk = _inputs(torch.float32)
    with pytest.raises(ValueError, match="must be .head, pos, slot, d_head. with the same heads"):
        tt.top_terms(Q, K[..., :-1], hh, qq, kk, 3)
    with pytest.raises(ValueError, match="kk must lie in 0..8; got 0..9"):
        tt.top_terms(Q, K, hh, qq, torch.where(kk == kk.max(), 9, kk), 3)
    with pytest.raises(ValueError, match="need one each"):
        tt.top_terms(Q, K, hh, qq[:-1], kk, 3)


@needs_c
def test_fused_kernel_refuses_what_it_cannot_run():
    Q, K, hh, qq, kk = _inputs(torch.float64)
    with pytest.raises(ValueError, match="needs float32 CPU tensors \\(got torch.float64"):
        tt.top_terms(Q, K, hh, qq, kk, 3, fused=True)
    vals, _ = tt.top_terms(Q, K, hh, qq, kk, 3)  # falls back to torch
    assert vals.dtype == torch.float64


def test_no_compiler_means_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setattr(tt, "_C_LIB", None)
    monkeypatch.setenv("QK_LENS_NO_C", "1")
    Q, K, hh, qq, kk = _inputs(torch.float32)
    assert tt.backend(Q) == "torch"
    with pytest.raises(ValueError, match="and a C compiler"):
        tt.top_terms(Q, K, hh, qq, kk, 3, fused=True)
    monkeypatch.delenv("QK_LENS_NO_C")
    monkeypatch.setattr(tt, "_C_LIB", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert tt.backend(Q) == "torch"  # a compiler that fails to run: no kernel, no crash
    monkeypatch.setattr(tt, "_C_LIB", None)  # let later tests build the real one


@needs_c
@pytest.mark.parametrize("arch", (["gpt2", "alibi"] if HOOKED else []) + BRIDGE_CORE)
def test_table_same_with_and_without_the_kernel(arch, monkeypatch):
    model = qk_lens.attach(make_any(arch, dtype=torch.float32))
    layer = model.cfg.n_layers - 1
    d = model.cfg.d_model
    model.add_dictionary(make_sae("topk", hook=f"blocks.{layer}.hook_resid_pre", d_in=d, d_sae=90))
    tokens = make_tokens(model, 12)[0]
    assert tt.backend(torch.zeros(1)) == "c"
    fused = model.qk_attribution_table(tokens, layer, top_k=7)
    monkeypatch.setattr(tt, "_C_LIB", False)
    plain = model.qk_attribution_table(tokens, layer, top_k=7)
    pd.testing.assert_frame_equal(
        fused.drop(columns="term"), plain.drop(columns="term"), check_exact=True
    )
    assert np.allclose(fused.term, plain.term, atol=1e-4, rtol=0)


@needs_c
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kernel_runs_in_a_forked_child():
    """The kernel's thread pool outlives a call; a forked child must not wait on the parent's
    (absent) threads."""
    Q, K, hh, qq, kk = _inputs(torch.float32)
    want, _ = tt.top_terms(Q, K, hh, qq, kk, 4, fused=True)  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if the kernel answers correctly
        try:
            got, _ = tt.top_terms(Q, K, hh, qq, kk, 4, fused=True)
            os._exit(0 if torch.equal(got, want) else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the kernel hung in a forked child")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_c), False])
def test_progress_counts_every_pair(fused):
    Q, K, hh, qq, kk = _inputs(torch.float32)
    seen = []
    tt.top_terms(Q, K, hh, qq, kk, 3, fused=fused, progress=seen.append)
    assert sum(seen) == len(hh) and all(n > 0 for n in seen)
