"""QK attributions against the model's own hooks and an independent reference, on every model
kind this stack builds: HookedTransformer variants (stack (a)) and TransformerBridge models.

References never come from qk_lens. HookedTransformer variants: tests/archs.py::reference_scores
recomputes each score by hand from ``hook_resid_pre`` and the weights. Bridges: the bridge's own
``hook_attn_scores`` (after the softcap; masked entries ``finfo.min``) and, for the raw score
under a softcap and for float32 tolerances, its own post-rotary ``hook_rot_q``/``hook_rot_k``.
Bridge forwards run as qk_lens runs them (``arch_of(model).exact_forward()``).
"""

import math

import pytest
import torch

import qk_lens
from tests.models import (
    BRIDGE_CORE,
    HOOKED,
    MODEL_NAMES,
    bridge_scores,
    hooks_of,
    is_bridge_name,
    make_any,
    make_tokens,
    needs_hooked,
)
from tests.saes import make_sae

torch.set_num_threads(1)
DTYPES = {"float64": torch.float64, "float32": torch.float32}
N_TOK = 20


def hooked(*names: str) -> list[str]:
    """HookedTransformer variants, where this stack has them."""
    return list(names) if HOOKED else []


if HOOKED:
    from tests.archs import SOFTCAP_NAMES
else:
    SOFTCAP_NAMES = []


def layer_under_test(model) -> int:
    return model.cfg.n_layers - 1  # the last layer sees every upstream component


def hooked_reference(model, cache, layer):
    """(raw, final, scales) of a HookedTransformer variant from the hand-written reference."""
    from tests.archs import expected_attn_scale, reference_qk, reference_scores

    raw, final = reference_scores(model, cache, layer)
    parts = reference_qk(model, cache, layer)
    qn, kn = parts["q_rot"].norm(dim=-1), parts["k_rot"].norm(dim=-1)  # [head, pos]
    # ‖q‖·‖k‖/attn_scale per (head, q, k): float32 rounding scales with it
    scales = qn[:, :, None] * kn[:, None, :] / expected_attn_scale(model, layer)
    return raw, final, scales


def reference(name, model, cache, layer):
    """(raw, final, scales), each [head, q, k], of ``layer``'s scores, independent of qk_lens."""
    if is_bridge_name(name):
        return bridge_scores(model, cache, layer)
    return hooked_reference(model, cache, layer)


_MODELS: dict = {}


def attached(name: str, dtype: torch.dtype):
    """One model per (name, dtype) for the module, with a randomized SAE on the tested layer:
    (model, tokens, cache, raw, final, scales) of the tested layer."""
    key = (name, dtype)
    if key not in _MODELS:
        model = qk_lens.attach(make_any(name, dtype))
        layer = layer_under_test(model)
        sae = make_sae(
            "topk",
            dtype="float64" if dtype == torch.float64 else "float32",
            hook=f"blocks.{layer}.hook_resid_pre",
            d_in=model.cfg.d_model,
            d_sae=4 * model.cfg.d_model,
            seed=3,
        )
        model.add_dictionary(sae)
        tokens = make_tokens(model, N_TOK)[0]
        cache = hooks_of(model, tokens)
        _MODELS[key] = (model, tokens, cache, *reference(name, model, cache, layer))
    return _MODELS[key]


def heads_under_test(model) -> list[int]:
    """Every head of the small models; for real-shaped ones, heads spanning several kv groups."""
    H = model.cfg.n_heads
    if H <= 8:
        return list(range(H))
    rep = H // (model.cfg.n_key_value_heads or H)
    return sorted({0, 1, rep, H // 2 + 1, H - 1})


def tol(dtype, scale):
    return 1e-9 if dtype == torch.float64 else 1e-4 * float(scale)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("basis", ["dictionary", "upstream", "mixed"])
def test_terms_sum_to_reference_score_every_pair(name, dtype, basis):
    """Σ terms = the reference raw score for every head and every unmasked (q, k)."""
    model, tokens, cache, raw, final, scales = attached(name, dtype)
    layer = layer_under_test(model)
    kwargs = {"basis": basis}
    if basis == "mixed":
        kwargs = {"query_basis": "dictionary", "key_basis": "upstream"}
    if model.cfg.positional_embedding_type == "alibi":
        # ALiBi is one labelled part of the attribution; the reference's raw score excludes it.
        alibi = torch.where(final.isfinite(), final - raw, 0.0)
        raw, scales = raw + alibi, scales + alibi.abs()
    n_pairs = 0
    for head in heads_under_test(model):
        for q in range(N_TOK):
            row = model.qk_attribution(tokens, layer, head, q, None, **kwargs)
            unmasked = torch.isfinite(final[head, q])
            assert row.k_positions == torch.nonzero(unmasked)[:, 0].tolist()
            for a in row:
                ref = float(raw[head, q, a.k_pos])
                t = tol(dtype, scales[head, q, a.k_pos])
                err = abs(float(a.terms.to(torch.float64).sum()) - ref)
                assert err <= t, (head, q, a.k_pos, err, t)
                assert abs(a.model_score - float(final[head, q, a.k_pos])) <= t
                a.check()
                n_pairs += 1
    assert n_pairs >= len(heads_under_test(model)) * N_TOK  # the mask left every diagonal


@pytest.mark.parametrize(
    "name", hooked("gemma2", "gemma3") + ["Gemma2ForCausalLM", "Gemma3ForCausalLM"]
)
def test_sliding_window_layer_lists_only_the_window(name):
    """Layer 0 attends through a sliding window of 4: each row lists exactly the keys the
    model's own mask leaves, and sums to the model's scores."""
    model, tokens, cache, *_ = attached(name, torch.float64)
    raw, final, _ = reference(name, model, cache, 0)
    for head in range(model.cfg.n_heads):
        for q in range(N_TOK):
            row = model.qk_attribution(tokens, 0, head, q, None, basis="upstream")
            assert row.k_positions == torch.nonzero(torch.isfinite(final[head, q]))[:, 0].tolist()
            assert row.k_positions == list(range(max(0, q - 3), q + 1))  # the window bites
            for a in row:
                assert abs(float(a.terms.sum()) - float(raw[head, q, a.k_pos])) <= 1e-9
                assert abs(a.model_score - float(final[head, q, a.k_pos])) <= 1e-9


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bases_sum_to_the_residual(name):
    """A basis is valid only if its parts sum to the residual entering the layer (hook)."""
    from qk_lens.bases import DictionaryBasis, UpstreamBasis

    model, tokens, cache, *_ = attached(name, torch.float64)
    layer = layer_under_test(model)
    cap = model.qk_capture(tokens)
    resid = cache[f"blocks.{layer}.hook_resid_pre"][0]
    positions = torch.arange(N_TOK)
    for basis in (UpstreamBasis(), DictionaryBasis(model.qk_dictionaries[layer])):
        pb = basis.parts(model, cap, layer, positions)
        total = (pb.vectors * pb.valid[..., None]).sum(1)
        assert torch.allclose(total, resid, atol=1e-10, rtol=0), type(basis).__name__


def head_output(name, model, cache, head):
    """What head ``head`` of layer 0 writes to the residual, from the model itself: z·W_O (post-
    normed at the model's own scale where there is a post-attention norm)."""
    z = cache["blocks.0.attn.hook_z"][0]  # [pos, head, d_head]
    if not is_bridge_name(name):
        out = z[:, head] @ model.blocks[0].attn.W_O[head]
        if model.cfg.use_normalization_before_and_after:
            post = model.blocks[0].ln1_post
            out = out / cache["blocks.0.ln1_post.hook_scale"][0] * post.w
        return out
    # the Hugging Face output projection on z with every other head zeroed, less its bias
    o_proj = model.blocks[0].attn.o.original_component
    alone = torch.zeros_like(z)
    alone[:, head] = z[:, head]
    with torch.no_grad():
        out = o_proj(alone.flatten(1)) - o_proj(torch.zeros_like(z).flatten(1))
    if "ln1_post" in dict(model.blocks[0].named_children()):
        norm = model.blocks[0].ln1_post.original_component
        gain = norm.weight + 1.0 if "Gemma" in type(norm).__name__ else norm.weight  # (1 + w)
        out = out / cache["blocks.0.ln1_post.hook_scale"][0] * gain
    return out


@pytest.mark.parametrize("name", hooked("gpt2", "llama", "gemma2", "qwen3") + BRIDGE_CORE)
def test_upstream_head_parts_match_the_heads_own_output(name):
    """Each upstream 'head' part equals z·W_O for that head (post-normed for Gemma-2/3)."""
    from qk_lens.bases import UpstreamBasis

    model, tokens, cache, *_ = attached(name, torch.float64)
    layer = layer_under_test(model)
    pb = UpstreamBasis().parts(model, model.qk_capture(tokens), layer, torch.arange(N_TOK))
    kinds, layers, heads = pb.meta["kind"], pb.meta["layer"], pb.meta["head"]
    slot = [
        i for i in range(len(kinds)) if kinds[i] == "head" and layers[i] == 0 and heads[i] == 1
    ][0]
    out = head_output(name, model, cache, 1)
    assert out.abs().max() > 1e-3  # a real contribution
    assert torch.allclose(pb.vectors[:, slot], out, atol=1e-10)


@pytest.mark.parametrize("name", SOFTCAP_NAMES + ["Gemma2ForCausalLM"])
def test_softcap_reported_and_rescaled(name):
    model, tokens, cache, raw, final, _ = attached(name, torch.float64)
    layer = layer_under_test(model)
    cap = model.cfg.attn_scores_soft_cap
    assert cap == 5.0 if name in ("gemma2", "Gemma2ForCausalLM") else cap > 0
    worst_gap = 0.0
    for q in range(N_TOK):
        for a in model.qk_attribution(tokens, layer, 0, q, None):
            assert abs(a.score - float(raw[0, q, a.k_pos])) < 1e-9
            assert abs(a.model_score - float(final[0, q, a.k_pos])) < 1e-9
            assert abs(float(a.capped_terms().sum()) - a.model_score) < 1e-9
            assert abs(a.capped_score - cap * math.tanh(a.score / cap)) < 1e-12
            worst_gap = max(worst_gap, abs(a.score - a.model_score))
    # The softcap really bends these scores (cap 5 in the small models, 50 in the real shape).
    assert worst_gap > (0.1 if name in ("gemma2", "Gemma2ForCausalLM") else 1e-4)


@needs_hooked  # ALiBi (Bloom) is among the HookedTransformer variants only
def test_alibi_is_its_own_labelled_part():
    model, tokens, *_ = attached("alibi", torch.float64)
    layer = layer_under_test(model)
    a = model.qk_attribution(tokens, layer, 2, 15, 3)
    q_alibi = a.query_parts.index[a.query_parts.kind == "alibi"]
    k_alibi = a.key_parts.index[a.key_parts.kind == "alibi"]
    assert len(q_alibi) == len(k_alibi) == 1
    slope = 2 ** (-8 * 3 / model.cfg.n_heads)
    assert abs(float(a.terms[q_alibi[0], k_alibi[0]]) - slope * (3 - 15)) < 1e-6
    assert a.terms[q_alibi[0]].abs().sum() == a.terms[q_alibi[0], k_alibi[0]].abs()


@pytest.mark.parametrize(
    "name",
    hooked("gpt2", "gpt2_folded", "llama", "qwen3")
    + ["GPT2LMHeadModel", "GPTNeoXForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"],
)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_normalized_hook_dictionary(name, dtype):
    """A dictionary on ln1.hook_normalized needs no LN step and still sums exactly."""
    model = qk_lens.attach(make_any(name, dtype))
    layer = 1
    sae = make_sae(
        "topk",
        dtype="float64" if dtype == torch.float64 else "float32",
        hook=f"blocks.{layer}.ln1.hook_normalized",
        d_in=model.cfg.d_model,
        d_sae=3 * model.cfg.d_model,
    )
    d = model.add_dictionary(sae)
    assert d.layer == layer and d.space == "normalized"
    tokens = make_tokens(model, N_TOK)[0]
    raw, _, scales = reference(name, model, hooks_of(model, tokens), layer)
    n = 0
    for q in (0, 7, N_TOK - 1):
        for a in model.qk_attribution(tokens, layer, 1, q, None):
            assert abs(a.score - float(raw[1, q, a.k_pos])) <= tol(dtype, scales[1, q, a.k_pos])
            assert (a.query_parts.kind == "feature").any()
            n += 1
    assert n == 1 + 8 + N_TOK


@pytest.mark.parametrize("name", hooked("gpt2") + ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_resid_post_dictionary_serves_next_layer(name):
    model = qk_lens.attach(make_any(name))
    sae = make_sae("standard", hook="blocks.0.hook_resid_post", d_in=model.cfg.d_model, d_sae=80)
    assert model.add_dictionary(sae).layer == 1
    tokens = make_tokens(model, N_TOK)[0]
    raw, _, _ = reference(name, model, hooks_of(model, tokens), 1)
    a = model.qk_attribution(tokens, 1, 0, -1, -3)
    assert (a.q_pos, a.k_pos) == (N_TOK - 1, N_TOK - 3)
    assert abs(a.score - float(raw[0, -1, -3])) < 1e-9
    assert (a.query_parts.kind == "feature").any() and (a.key_parts.kind == "feature").any()


@pytest.mark.parametrize("name", hooked("llama") + ["LlamaForCausalLM"])
@pytest.mark.parametrize(
    "arch", ["standard", "gated", "jumprelu", "topk", "topk_rescale", "abstopk", "matching_pursuit"]
)
@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_every_sae_architecture_and_norm_mode(arch, norm, apply_b_dec, name):
    model = qk_lens.attach(make_any(name))
    layer = 1
    sae = make_sae(
        arch, norm=norm, apply_b_dec=apply_b_dec, hook=f"blocks.{layer}.hook_resid_pre",
        d_in=model.cfg.d_model, d_sae=96,
    )  # fmt: skip
    model.add_dictionary(sae)
    tokens = make_tokens(model, 12)[0]
    cache = hooks_of(model, tokens)
    raw, _, _ = reference(name, model, cache, layer)
    a = model.qk_attribution(tokens, layer, 3, 11, 4)
    assert abs(a.score - float(raw[3, 11, 4])) < 1e-9
    # Feature parts are the SAE's own active features with its own activations.
    resid = cache[f"blocks.{layer}.hook_resid_pre"][0, [11]].to(sae.W_dec.dtype)
    with torch.no_grad():
        acts = sae.encode(resid)[0]
    q_feats = a.query_parts[a.query_parts.kind == "feature"]
    assert len(q_feats) > 0
    assert sorted(q_feats.feature) == torch.nonzero(acts)[:, 0].tolist()
    for f, act in zip(q_feats.feature, q_feats.activation, strict=True):
        assert abs(act - float(acts[f])) < 1e-9


@pytest.mark.parametrize("name", hooked("gpt2") + BRIDGE_CORE)
def test_negative_positions_and_token_list_prompt(name):
    model, tokens, _, raw, _, _ = attached(name, torch.float64)
    layer = layer_under_test(model)
    a = model.qk_attribution(tokens.tolist(), layer, 2, -1, -N_TOK)
    assert (a.q_pos, a.k_pos) == (N_TOK - 1, 0)
    assert abs(a.score - float(raw[2, -1, 0])) < 1e-9


@pytest.mark.parametrize(
    "arch", hooked("gpt2", "gpt2_folded", "llama", "gemma2", "gemma3", "qwen3") + BRIDGE_CORE
)
@pytest.mark.parametrize("hook", ["hook_resid_pre", "ln1.hook_normalized"])
def test_factored_projection_equals_projecting_each_vector(arch, hook):
    """project_side maps each distinct decoder row once and scales it per position; projecting
    every (position, slot) vector through LayerQK.project must give the same parts."""
    from dataclasses import replace

    from qk_lens.attribution import project_side
    from qk_lens.attribution.projection import FACTOR_MIN_POSITIONS
    from qk_lens.bases import DictionaryBasis
    from qk_lens.state import layer_qk

    model = qk_lens.attach(make_any(arch))
    layer = model.cfg.n_layers - 1
    if hook == "ln1.hook_normalized" and model.cfg.normalization_type not in ("LN", "LNPre"):
        pytest.skip("ln1.hook_normalized dictionaries are for LayerNorm models")
    # a small dictionary with top-k 12 over 20 features: every feature recurs across positions
    sae = make_sae("topk", hook=f"blocks.{layer}.{hook}", d_in=model.cfg.d_model, d_sae=20)
    model.add_dictionary(sae)
    tokens = make_tokens(model, 10)[0]
    cap = model.qk_capture(tokens)
    qk = layer_qk(model, cap, layer)
    basis = DictionaryBasis(model.qk_dictionaries[layer])
    positions, heads = torch.arange(10), torch.arange(model.cfg.n_heads)

    assert len(positions) >= FACTOR_MIN_POSITIONS

    class Unfactored:
        def parts(self, *args):
            return replace(basis.parts(*args), rows=None, row_ids=None, coeffs=None)

    for side in ("query", "key"):
        pb = basis.parts(model, cap, layer, positions)
        assert (
            pb.row_ids is not None
            and len(pb.row_ids[pb.row_ids >= 0].unique()) < (pb.row_ids >= 0).sum()
        )  # rows really are shared
        fast = project_side(model, qk, side, basis, positions, heads).vectors
        slow = project_side(model, qk, side, Unfactored(), positions, heads).vectors
        assert torch.allclose(fast, slow, rtol=0, atol=1e-12 * slow.abs().max())
