"""Head atlas: constructed weights with known answers, a full-matrix reference, the toy models.

Every expected value here comes from somewhere other than qk_lens.atlas: weights built so the
answer is known in closed form, d_vocab × d_vocab / d_model × d_model matrices built and
decomposed directly (fine at vocab 100), TransformerLens's own ``all_composition_scores``, the
existing ``pattern_scores``, explicit loops over cached patterns, and the toy models' training
metrics (written by the training script, not by the atlas).

Each test runs on HookedTransformer test models where this TransformerLens has them (stack (a))
and on TransformerBridge models (both stacks). The full-matrix reference reads a bridge's
weights from its Hugging Face modules (their own layouts: GPT-2's fused Conv1D, NeoX's per-head
interleaved qkv, Llama-style projections), not through qk_lens's adapter.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from qk_lens import toy
from qk_lens.arch import arch_of
from qk_lens.atlas import (
    LABELS,
    SCORE_INFO,
    THRESHOLDS,
    WEIGHT_COLUMNS,
    Composition,
    HeadAtlas,
    effective_rank,
    eigen_skew,
    head_atlas,
)
from qk_lens.atlas.probes import pattern_scores, repeated_random_tokens
from tests.bridges import BRIDGE_CONFIGS, BRIDGE_NAMES
from tests.models import BRIDGE_CORE, HOOKED, MODEL_NAMES, make_any, needs_hooked

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)

F64 = torch.float64
# The bundled toys as a HookedTransformer (stack (a)) and as a TransformerBridge (both stacks).
TOY_KINDS = ["hooked", "bridge"] if HOOKED else ["bridge"]
TOYS = [(name, kind) for name in toy.NAMES for kind in TOY_KINDS]


def hooked_only(*names: str) -> list[Any]:
    """HookedTransformer variants as parameters that skip where HookedTransformer is missing."""
    return [pytest.param(n, marks=needs_hooked) for n in names]


def load_toy(name: str, kind: str, **kwargs: Any) -> Any:
    return toy.load(name, dictionaries=False, bridge=kind == "bridge", **kwargs)


def own_patterns(model: Any, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's ``hook_pattern`` [batch, head, q, k] in float64, from the model's own forward
    (a bridge's: its exact norm path)."""
    with torch.no_grad(), arch_of(model).exact_forward():
        _, cache = model.run_with_cache(tokens)
    return [
        cache[f"blocks.{layer}.attn.hook_pattern"].double() for layer in range(model.cfg.n_layers)
    ]


# --------------------------------------------------------------------------- constructed weights
def _orthonormal(gen: torch.Generator, d: int, k: int, avoid_ones: bool) -> torch.Tensor:
    """k orthonormal columns in R^d (orthogonal to the all-ones vector if asked: LN centres)."""
    x = torch.randn(d, k + 1, generator=gen, dtype=F64)
    if avoid_ones:
        x = torch.cat([torch.ones(d, 1, dtype=F64), x], 1)
    q, _ = torch.linalg.qr(x)
    return q[:, 1 : k + 1] if avoid_ones else q[:, :k]


D_HEAD, N_HEADS, D_VOCAB, D_EMB = 16, 3, 12, 8


def _constructed_weights(d_model: int, centred: bool) -> dict[str, torch.Tensor]:
    """Layer 0: OV = +Π and −Π (Π projects on the embedding subspace); layer 1: W_Q W_Kᵀ = ±B A Bᵀ
    with A symmetric positive definite; W_U = W_Eᵀ (tied). Every other weight is zero."""
    gen = torch.Generator().manual_seed(1)
    basis = _orthonormal(gen, d_model, D_EMB, centred)  # the embedding subspace
    emb = torch.randn(D_VOCAB, D_EMB, generator=gen, dtype=F64) @ basis.T
    # Norm √d_model per row: LN/RMS leave these embeddings exactly as they are.
    emb = emb / emb.norm(dim=-1, keepdim=True) * math.sqrt(d_model)
    b_qk = _orthonormal(gen, d_model, D_HEAD, centred)
    a = torch.randn(D_HEAD, D_HEAD, generator=gen, dtype=F64)
    spd = a @ a.T + 0.1 * torch.eye(D_HEAD, dtype=F64)
    skew = a - a.T  # A + S still has x·(A+S)x > 0: eigenvalues with positive real parts
    w_v = torch.zeros(d_model, D_HEAD, dtype=F64)
    w_v[:, :D_EMB] = basis
    W = {n: torch.zeros(2, N_HEADS, d_model, D_HEAD, dtype=F64) for n in ("W_Q", "W_K", "W_V")}
    W["W_O"] = torch.zeros(2, N_HEADS, D_HEAD, d_model, dtype=F64)
    W["W_V"][0, 0], W["W_O"][0, 0] = w_v, w_v.T  # +Π
    W["W_V"][0, 1], W["W_O"][0, 1] = w_v, -w_v.T  # −Π
    W["W_Q"][1, 0], W["W_K"][1, 0] = b_qk @ spd, b_qk  # +B A Bᵀ
    W["W_Q"][1, 1], W["W_K"][1, 1] = -b_qk @ spd, b_qk  # −B A Bᵀ
    W["W_Q"][1, 2], W["W_K"][1, 2] = b_qk @ (spd + skew), b_qk  # positive definite, not symmetric
    W["W_V"][1, 2], W["W_O"][1, 2] = w_v, w_v.T
    W["W_Q"][0, 2] = basis @ torch.randn(D_EMB, D_HEAD, generator=gen, dtype=F64)
    W["W_K"][0, 2] = b_qk
    return {"W_E": emb, **W}


def _constructed_hooked(normalization_type: str | None) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d_model = 32
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=d_model, n_ctx=16, d_head=D_HEAD, n_heads=N_HEADS, d_vocab=D_VOCAB,
        attn_only=True, normalization_type=normalization_type, act_fn=None, dtype=F64,
        init_weights=False, device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    w = _constructed_weights(d_model, normalization_type == "LN")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.fill_(1.0)
        model.embed.W_E.copy_(w["W_E"])
        model.unembed.W_U.copy_(w["W_E"].T)
        for layer, block in enumerate(model.blocks):
            for name in ("W_Q", "W_K", "W_V", "W_O"):
                getattr(block.attn, name).copy_(w[name][layer])
    return model.eval()


# Hugging Face class -> (config overrides for 2 layers of 3 heads of 16, d_model)
_CONSTRUCTED_BRIDGES = {
    "GPT2LMHeadModel": (dict(n_embd=48, n_head=3, n_positions=16, n_inner=8), 48),  # LN
    "LlamaForCausalLM": (
        dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=16,
             intermediate_size=8, max_position_embeddings=16),
        48,
    ),  # RMS, rotary
    "Gemma2ForCausalLM": (
        dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=16,
             query_pre_attn_scalar=16, intermediate_size=8, max_position_embeddings=16),
        48,
    ),  # RMS (1 + w), post-attention norms, softcap, √d embedding scale
}  # fmt: skip


def _constructed_bridge(name: str) -> Any:
    """The same construction written into a Hugging Face model's own modules, then bridged."""
    import transformers
    from transformer_lens.model_bridge import sources

    overrides, d_model = _CONSTRUCTED_BRIDGES[name]
    config_cls, kwargs = BRIDGE_CONFIGS[name]
    cfg = getattr(transformers, config_cls)(**{**kwargs, **overrides, "vocab_size": D_VOCAB})
    hf = getattr(transformers, name)(cfg).to(F64).eval()
    w = _constructed_weights(d_model, name == "GPT2LMHeadModel")
    gemma = "Gemma" in name
    H, d = N_HEADS, d_model
    with torch.no_grad():
        for pname, p in hf.named_parameters():  # zeros, norm gains 1 (Gemma: its 1 + w, w = 0)
            gain = p.ndim == 1 and ("norm" in pname or "ln" in pname) and "bias" not in pname
            p.fill_(1.0 if gain and not gemma else 0.0)
        hf.get_input_embeddings().weight.copy_(w["W_E"])
        hf.get_output_embeddings().weight.copy_(w["W_E"])  # tied: W_U = W_Eᵀ
        for layer in range(2):
            q, k, v, o = (w[n][layer] for n in ("W_Q", "W_K", "W_V", "W_O"))
            if name == "GPT2LMHeadModel":  # Conv1D: x @ weight; c_attn = [q | k | v]
                attn = hf.transformer.h[layer].attn
                fused = [t.permute(1, 0, 2).reshape(d, H * D_HEAD) for t in (q, k, v)]
                attn.c_attn.weight.copy_(torch.cat(fused, 1))
                attn.c_proj.weight.copy_(o.reshape(H * D_HEAD, d))
            else:  # nn.Linear: weight [out, in], heads along out
                attn = hf.model.layers[layer].self_attn
                for proj, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    getattr(attn, proj).weight.copy_(t.transpose(1, 2).reshape(H * D_HEAD, d))
                attn.o_proj.weight.copy_(o.permute(2, 0, 1).reshape(d, H * D_HEAD))
    return sources.build_bridge_from_module(hf, name, hf_config=cfg)


# HookedTransformer normalization types (stack (a)), then bridges of each norm family
CONSTRUCTED = [*hooked_only(None, "LN", "RMS"), *_CONSTRUCTED_BRIDGES]


@pytest.mark.parametrize("norm", CONSTRUCTED)
def test_constructed_copying_and_skew(norm):
    model = _constructed_bridge(norm) if norm in _CONSTRUCTED_BRIDGES else _constructed_hooked(norm)
    frame = head_atlas(model, n_probes=2, probe_length=4).frame.set_index("name")
    assert frame.loc["L0H0", "ov_copying"] == pytest.approx(1.0, abs=1e-9)
    assert frame.loc["L0H0", "ov_positive_frac"] == pytest.approx(1.0, abs=1e-9)
    assert frame.loc["L0H1", "ov_copying"] == pytest.approx(-1.0, abs=1e-9)
    assert frame.loc["L0H1", "ov_positive_frac"] == pytest.approx(0.0, abs=1e-9)
    assert frame.loc["L1H0", "qk_skew"] == pytest.approx(1.0, abs=1e-9)
    assert frame.loc["L1H1", "qk_skew"] == pytest.approx(-1.0, abs=1e-9)
    assert 0 < frame.loc["L1H2", "qk_skew"] < 1
    assert frame.loc["L1H2", "qk_positive_frac"] == pytest.approx(1.0, abs=1e-9)
    # OV = Π on an 8-dim subspace: 8 equal singular values → effective rank 8
    assert frame.loc["L0H0", "ov_eff_rank"] == pytest.approx(8.0, abs=1e-6)
    assert "copying" in frame.loc["L0H0", "labels"]
    assert "suppression" in frame.loc["L0H1", "labels"]
    assert "concordance-like" in frame.loc["L1H0", "labels"]
    assert "discordance-like" in frame.loc["L1H1", "labels"]


def test_statistics_helpers():
    lam = torch.tensor([[3.0, 1.0, 0.0], [2.0, -2.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    signed, pos = eigen_skew(lam.to(torch.complex128))
    assert signed[:2].tolist() == pytest.approx([1.0, 0.0])
    assert pos[:2].tolist() == pytest.approx([1.0, 0.5])
    assert torch.isnan(signed[2]) and torch.isnan(pos[2])
    # a complex pair counts its real part: (1 ± 1i) → Re Σλ / Σ|λ| = 2 / (2√2)
    s, _ = eigen_skew(torch.tensor([1 + 1j, 1 - 1j], dtype=torch.complex128))
    assert float(s) == pytest.approx(1 / math.sqrt(2))
    sv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]], dtype=F64)
    assert effective_rank(sv).tolist() == pytest.approx([4.0, 1.0])


# --------------------------------------------------------------------------- full-matrix reference
@dataclass
class Read:
    """A norm as the reference applies it at unit scale: centring (LayerNorm) and gain."""

    centres: bool
    gain: torch.Tensor | float = 1.0
    eps: float = 0.0


@dataclass
class Heads:
    """What the reference reads from a model: per-head weights ([layer, head, ...]; GQA keys and
    values repeated per query head), the norms each head reads through, and the token path."""

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    reads: list[Read]  # ln1 of each layer
    q_gain: list[Any]  # qk-norm gains per layer ([d_head] or 1.0)
    k_gain: list[Any]
    post_gain: list[Any]  # a post-attention norm's gain per layer ([d_model] or 1.0)
    attn_scale: list[float]  # what q·k is divided by
    embed: torch.Tensor  # [d_vocab, d_model]: the token vectors the first norm sees
    embed_read: Read | None  # how the first norm normalizes them (None: not at all)
    W_U: torch.Tensor
    final: Read
    centring: bool  # every reader of the residual centres (LayerNorm)


def _hooked_heads(model: Any) -> Heads:
    from transformer_lens.components import LayerNorm, LayerNormPre

    cfg = model.cfg

    def norm(ln: Any) -> Read:
        return Read(isinstance(ln, (LayerNorm, LayerNormPre)), ln.w if hasattr(ln, "w") else 1.0)

    qs, ks, vs, os_ = [], [], [], []
    reads, qg, kg, pg, scales = [], [], [], [], []
    for block in model.blocks:
        attn = block.attn
        for head in range(cfg.n_heads):
            kv = head // (cfg.n_heads // attn._W_K.shape[0]) if hasattr(attn, "_W_K") else head
            ks.append(attn._W_K[kv] if hasattr(attn, "_W_K") else attn.W_K[head])
            vs.append(attn._W_V[kv] if hasattr(attn, "_W_V") else attn.W_V[head])
            qs.append(attn.W_Q[head])
            os_.append(attn.W_O[head])
        reads.append(norm(block.ln1))
        qg.append(attn.q_norm.w if cfg.use_qk_norm else 1.0)
        kg.append(attn.k_norm.w if cfg.use_qk_norm else 1.0)
        post = getattr(block, "ln1_post", None)
        pg.append(post.w if post is not None and hasattr(post, "w") else 1.0)
        scales.append(attn.attn_scale)
    shape = (cfg.n_layers, cfg.n_heads)
    centring = cfg.normalization_type in ("LN", "LNPre")
    W_Q, W_K, W_V, W_O = (
        torch.stack(w).reshape(*shape, *w[0].shape).detach() for w in (qs, ks, vs, os_)
    )
    return Heads(
        W_Q=W_Q,
        W_K=W_K,
        W_V=W_V,
        W_O=W_O,
        reads=reads,
        q_gain=qg,
        k_gain=kg,
        post_gain=pg,
        attn_scale=scales,
        embed=model.W_E.detach(),
        embed_read=None if cfg.normalization_type is None else Read(centring, 1.0, cfg.eps),
        W_U=model.W_U.detach(),
        final=norm(model.ln_final),
        centring=centring,
    )


def _hf(module: Any) -> Any:
    """The Hugging Face module a bridge component wraps (the module itself if it wraps none)."""
    return getattr(module, "original_component", None) or module


def _bridge_heads(model: Any) -> Heads:
    """Read a bridge's Hugging Face modules directly, each family in its own layout."""
    hf = model.original_model
    family = type(hf).__name__
    c = hf.config
    gemma = "Gemma" in family

    def norm(module: Any) -> Read:
        m = _hf(module)
        gain = m.weight.detach()
        eps = getattr(m, "eps", None) or getattr(m, "variance_epsilon", None)
        return Read(isinstance(m, torch.nn.LayerNorm), 1.0 + gain if gemma else gain, float(eps))

    qs, ks, vs, os_ = [], [], [], []
    reads, qg, kg, pg, scales = [], [], [], [], []
    if family == "GPT2LMHeadModel":
        H, d = c.n_head, c.n_embd
        dh = d // H
        assert c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx
        for block in hf.transformer.h:
            w = _hf(block.attn.c_attn).weight  # Conv1D: x @ w, columns [q | k | v]
            for i, out in enumerate((qs, ks, vs)):
                out.append(w[:, i * d : (i + 1) * d].reshape(d, H, dh).permute(1, 0, 2))
            os_.append(_hf(block.attn.c_proj).weight.reshape(H, dh, d))
            reads.append(norm(block.ln_1))
            qg.append(1.0), kg.append(1.0), pg.append(1.0), scales.append(dh**0.5)
        final = hf.transformer.ln_f
    elif family == "GPTNeoXForCausalLM":
        H, d = c.num_attention_heads, c.hidden_size
        dh = d // H
        for block in hf.gpt_neox.layers:
            # nn.Linear [3·H·dh, d]: each head's rows are its [q | k | v]
            w = _hf(block.attention.query_key_value).weight.reshape(H, 3, dh, d)
            for i, out in enumerate((qs, ks, vs)):
                out.append(w[:, i].transpose(1, 2))
            os_.append(_hf(block.attention.dense).weight.reshape(d, H, dh).permute(1, 2, 0))
            reads.append(norm(block.input_layernorm))
            qg.append(1.0), kg.append(1.0), pg.append(1.0), scales.append(dh**0.5)
        final = hf.gpt_neox.final_layer_norm
    else:  # Llama, Mistral, Qwen2/3, Gemma2/3: q/k/v/o_proj as nn.Linear [out, in]
        H, KV, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
        dh = getattr(c, "head_dim", None) or d // H

        def per_head(proj: Any, n: int) -> torch.Tensor:  # [n·dh, d] -> [H, d, dh]
            w = _hf(proj).weight.reshape(n, dh, d).transpose(1, 2)
            return w.repeat_interleave(H // n, 0)  # query head h reads kv head h // (H / n)

        for block in hf.model.layers:
            attn = _hf(block.self_attn)
            qs.append(per_head(attn.q_proj, H))
            ks.append(per_head(attn.k_proj, KV))
            vs.append(per_head(attn.v_proj, KV))
            os_.append(_hf(attn.o_proj).weight.reshape(d, H, dh).permute(1, 2, 0))
            reads.append(norm(block.input_layernorm))
            qk_norm = hasattr(attn, "q_norm")
            qg.append(norm(attn.q_norm).gain if qk_norm else 1.0)
            kg.append(norm(attn.k_norm).gain if qk_norm else 1.0)
            # Gemma's post_attention_layernorm normalizes the attention output
            pg.append(norm(block.post_attention_layernorm).gain if gemma else 1.0)
            scales.append((c.query_pre_attn_scalar if gemma else dh) ** 0.5)
        final = hf.model.norm
    embed = _hf(hf.get_input_embeddings()).weight
    W_U = _hf(hf.get_output_embeddings()).weight.T
    if gemma:  # Gemma multiplies the embedding by √d_model before the first block
        embed = embed * d**0.5
    first, final = reads[0], norm(final)
    return Heads(
        W_Q=torch.stack(qs).detach(),
        W_K=torch.stack(ks).detach(),
        W_V=torch.stack(vs).detach(),
        W_O=torch.stack(os_).detach(),
        reads=reads,
        q_gain=qg,
        k_gain=kg,
        post_gain=pg,
        attn_scale=scales,
        embed=embed.detach(),
        embed_read=Read(first.centres, 1.0, first.eps),
        W_U=W_U.detach(),
        final=final,
        centring=all(r.centres for r in reads) and final.centres,
    )


def _heads(model: Any) -> Heads:
    return _bridge_heads(model) if hasattr(model, "original_model") else _hooked_heads(model)


def _reference(model: Any) -> dict[str, Any]:
    """Every weight-level score from full d_vocab × d_vocab and d_model × d_model matrices."""
    hw = _heads(model)
    n_layers, n_heads = hw.W_Q.shape[:2]
    d, d_head = hw.W_Q.shape[2:]

    def centre(x):
        return x - x.mean(-1, keepdim=True) if hw.centring else x

    def read(r: Read, x):  # a norm at a frozen unit scale, bias dropped
        if r.centres:
            x = x - x.mean(-1, keepdim=True)
        return x * r.gain

    def head_maps(layer, head):
        r = hw.reads[layer]

        def q(x):
            return read(r, x) @ hw.W_Q[layer, head] * hw.q_gain[layer] / hw.attn_scale[layer]

        def k(x):
            return read(r, x) @ hw.W_K[layer, head] * hw.k_gain[layer]

        def ov(x):
            o = read(r, x) @ hw.W_V[layer, head] @ hw.W_O[layer, head]
            return centre(o * hw.post_gain[layer])

        return q, k, ov

    x = hw.embed.detach().to(F64)
    if hw.embed_read is not None:
        if hw.embed_read.centres:
            x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + hw.embed_read.eps).sqrt()
    eye = torch.eye(d, dtype=x.dtype)

    def logits(o):
        out = read(hw.final, o) @ hw.W_U.detach()
        return out - out.mean(-1, keepdim=True)  # constant logit shifts are irrelevant

    def stat(matrix):
        lam = torch.linalg.eigvals(matrix)
        return float(lam.real.sum() / lam.abs().sum()), float(
            (lam.abs() * (lam.real > 0)).sum() / lam.abs().sum()
        )

    out: dict[str, Any] = {k: torch.zeros(n_layers, n_heads, dtype=F64) for k in WEIGHT_COLUMNS}
    qk_full, ov_full, ov_maps = {}, {}, {}
    with torch.no_grad():
        for layer in range(n_layers):
            for head in range(n_heads):
                q, k, ov = head_maps(layer, head)
                qk = q(eye) @ k(eye).T  # [d_model, d_model]
                ovm = ov(eye)
                qk_full[layer, head], ov_full[layer, head], ov_maps[layer, head] = qk, ovm, ov
                out["qk_skew"][layer, head], out["qk_positive_frac"][layer, head] = stat(qk)
                copy = stat(logits(ov(x)))  # Ê W_V W_O W_U: d_vocab × d_vocab
                out["ov_copying"][layer, head], out["ov_positive_frac"][layer, head] = copy
                sv_qk = torch.linalg.svdvals(qk)[:d_head]
                sv_ov = torch.linalg.svdvals(ovm)[:d_head]
                out["qk_norm"][layer, head] = torch.linalg.matrix_norm(qk)
                out["ov_norm"][layer, head] = torch.linalg.matrix_norm(ovm)
                for key, sv in (("qk_eff_rank", sv_qk), ("ov_eff_rank", sv_ov)):
                    p = sv / sv.sum()
                    out[key][layer, head] = torch.exp(-(p * p.log()).nansum())
                scores = q(x) @ k(x).T  # token × token
                scores = scores - scores.mean(-1, keepdim=True)
                out["same_token"][layer, head] = (
                    scores.diagonal().mean() / scores.pow(2).mean().sqrt()
                )
        comp = {m: torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=F64) for m in "qkv"}
        for (l1, h1), ov1 in ov_full.items():
            for (l2, h2), qk2 in qk_full.items():
                if l1 >= l2:
                    continue
                for m, right in (("q", qk2), ("k", qk2.T), ("v", ov_full[l2, h2])):
                    comp[m][l1, h1, l2, h2] = torch.linalg.matrix_norm(ov1 @ right) / (
                        torch.linalg.matrix_norm(ov1) * torch.linalg.matrix_norm(right)
                    )
    out["comp"] = comp
    out["path"] = lambda a, b: stat(logits(ov_maps[b](ov_maps[a](x))))  # virtual head
    out["d_residual"] = d - int(hw.centring)
    return out


# HookedTransformer variants (stack (a)), every bridge, and the toys of each kind; the attn2
# toys' 40-token vocabulary is smaller than d_model: the other same-token code path.
FULL_MATRIX = [
    *hooked_only("gpt2", "llama", "qwen3", "gemma2", "attn_only"),
    *BRIDGE_NAMES,
    *(f"toy:{name}:{kind}" for name, kind in TOYS),
]


def _full_matrix_model(name: str) -> Any:
    if name.startswith("toy:"):
        _, toy_name, kind = name.split(":")
        return load_toy(toy_name, kind, dtype=F64)
    return make_any(name, F64, seed=3)


@pytest.mark.parametrize("name", FULL_MATRIX)
def test_weight_scores_match_full_matrices(name):
    model = _full_matrix_model(name)
    atlas = head_atlas(model, n_probes=2, probe_length=4)
    ref = _reference(model)
    frame = atlas.frame
    for col in WEIGHT_COLUMNS:
        got = torch.tensor(frame[col].to_numpy(), dtype=F64).reshape(ref[col].shape)
        torch.testing.assert_close(got, ref[col], rtol=1e-7, atol=1e-9, msg=col)
    for m in "qkv":
        torch.testing.assert_close(
            atlas.composition.scores(m), ref["comp"][m], rtol=1e-7, atol=1e-9
        )
    assert atlas.composition.d_residual == ref["d_residual"]
    row = atlas.virtual_heads.iloc[0]
    a, b = (row.first_layer, row.first_head), (row.second_layer, row.second_head)
    assert row.copying == pytest.approx(ref["path"](a, b)[0], rel=1e-7, abs=1e-9)
    assert row.positive_frac == pytest.approx(ref["path"](a, b)[1], rel=1e-7, abs=1e-9)


@needs_hooked
def test_composition_matches_transformer_lens():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3, d_model=48, n_ctx=16, d_head=8, n_heads=3, d_vocab=50, attn_only=True,
        normalization_type=None, act_fn=None, dtype=F64, seed=5, device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    atlas = head_atlas(model, n_probes=2, probe_length=4)
    for mode in "QKV":
        torch.testing.assert_close(
            atlas.composition.scores(mode), model.all_composition_scores(mode).double()
        )


@pytest.mark.parametrize(
    "name", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"]
)
def test_composition_matches_the_bridge(name):
    """With unit norm gains (Gemma: w = 0) the folded weights are the raw ones: the atlas's
    composition is TransformerLens's ``all_composition_scores`` of the bridge (GQA, qk-norm and
    Gemma's post-attention norms included)."""
    model = make_any(name, F64, seed=5)
    with torch.no_grad():
        for pname, p in model.original_model.named_parameters():
            if "norm" in pname:
                p.fill_(0.0 if "Gemma" in name else 1.0)
    atlas = head_atlas(model, n_probes=2, probe_length=4)
    for mode in "QKV":
        want = model.all_composition_scores(mode).detach().double()
        assert want[0, :, 1].abs().min() > 0.01  # a real score to compare, not zeros
        torch.testing.assert_close(atlas.composition.scores(mode), want)


@needs_hooked
def test_fold_invariance():
    """The same weights before and after process_weights_ (fold_ln, centring) give one atlas."""
    from tests.archs import make_model

    for base in ("gpt2", "llama", "gemma2"):
        a = head_atlas(make_model(base, F64), n_probes=2, probe_length=4, composition=True)
        b = head_atlas(make_model(base + "_folded", F64), n_probes=2, probe_length=4)
        cols = [*WEIGHT_COLUMNS, "q_comp", "k_comp", "v_comp"]
        np.testing.assert_allclose(
            a.frame[cols].to_numpy(float), b.frame[cols].to_numpy(float), rtol=1e-5, atol=1e-6
        )


@needs_hooked
@pytest.mark.parametrize("name", toy.NAMES)
def test_bridge_and_hooked_toy_give_one_atlas(name):
    """The bundled toy as a HookedTransformer and as a bridge (the same weights) give one atlas:
    every weight-level score, the composition and its baseline exactly; the pattern scores to
    float32 rounding (a bridge's Hugging Face RMSNorm computes in float32)."""
    hooked, bridge = (load_toy(name, kind, dtype=F64) for kind in ("hooked", "bridge"))
    a, b = (head_atlas(m, n_probes=4, probe_length=6) for m in (hooked, bridge))
    numeric = a.frame.select_dtypes("number").columns
    weights = [c for c in numeric if c in WEIGHT_COLUMNS or "comp" in c]
    patterns = [c for c in numeric if c not in weights]
    for cols, atol in ((weights, 1e-12), (patterns, 1e-6)):
        np.testing.assert_allclose(
            b.frame[cols].to_numpy(float), a.frame[cols].to_numpy(float), rtol=1e-9, atol=atol
        )
    assert list(b.frame["labels"]) == list(a.frame["labels"])
    assert b.composition.d_residual == a.composition.d_residual
    for m in "qkv":
        torch.testing.assert_close(b.composition.scores(m), a.composition.scores(m))


@pytest.mark.parametrize("name", [*hooked_only("attn_only"), "GPT2LMHeadModel", "Qwen3ForCausalLM"])
def test_random_rotation_baseline(name):
    """Monte Carlo: rotate the residual basis between two real heads at random; the score's mean
    and spread match the per-pair baseline the atlas reports (leading order in 1/d)."""
    model = make_any(name, F64, seed=2)
    atlas = head_atlas(model, n_probes=2, probe_length=4)
    gen = torch.Generator().manual_seed(0)
    hw = _heads(model)
    ov1 = (hw.W_V[0, 1] @ hw.W_O[0, 1]).detach()
    d = model.cfg.d_model
    for low_rank in (False, True):
        qk2 = (hw.W_Q[1, 2] @ hw.W_K[1, 2].T).detach()
        if low_rank:  # a rank-2 reader: chance composition spreads much more
            u, s, vh = torch.linalg.svd(qk2)
            qk2 = u[:, :2] * s[:2] @ vh[:2]
        sv1 = torch.linalg.svdvals(ov1)
        sv2 = torch.linalg.svdvals(qk2)
        comp = Composition.from_scores(
            {m: torch.zeros(2, 1, 2, 1, dtype=F64) for m in "qkv"},
            torch.stack([sv2, sv2]).reshape(2, 1, -1),
            torch.stack([sv1, sv1]).reshape(2, 1, -1),
            d,
        )
        samples = []
        for _ in range(400):
            rot, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
            m = ov1 @ rot @ qk2
            samples.append(float(m.norm() / (ov1.norm() * qk2.norm())))
        samples = torch.tensor(samples)
        mean, std = (
            float(comp.baseline_mean["q"][0, 0, 1, 0]),
            float(comp.baseline_std["q"][0, 0, 1, 0]),
        )
        assert float(samples.mean()) == pytest.approx(mean, rel=0.05)
        assert float(samples.std()) == pytest.approx(std, rel=0.35)
    # LN: writes seen in the centred subspace; RMS: the whole residual
    assert atlas.composition.d_residual == d - int(hw.centring)
    assert hw.centring == (name != "Qwen3ForCausalLM")


# --------------------------------------------------------------------------- pattern level
@pytest.mark.parametrize("kind", TOY_KINDS)
def test_pattern_scores_agree_with_patterns_module(kind):
    model = load_toy("attn2-ln", kind)
    atlas = head_atlas(model, n_probes=8, probe_length=12, seed=4, composition=False)
    ref = pattern_scores(model, n=8, length=12, seed=4)
    for col in ("previous_token", "induction", "duplicate_token", "first_token", "self"):
        np.testing.assert_allclose(atlas.frame[col], ref[col], atol=1e-12)
        assert np.isfinite(atlas.frame[col]).all()


@pytest.mark.parametrize("name", [*hooked_only("neox"), *BRIDGE_CORE])
def test_offset_and_entropy_by_explicit_loops(name):
    model = make_any(name, torch.float32, seed=1)
    length = 10
    atlas = head_atlas(model, n_probes=3, probe_length=length, seed=7, composition=False)
    tokens = repeated_random_tokens(model, n=3, length=length, seed=7)
    patterns = own_patterns(model, tokens)
    for layer in range(model.cfg.n_layers):
        pat = patterns[layer]
        for head in range(model.cfg.n_heads):
            p = pat[:, head]
            ent = [
                float(-torch.xlogy(p[b, q, : q + 1], p[b, q, : q + 1]).sum() / math.log(q + 1))
                for b in range(3)
                for q in range(1, length + 1)
            ]
            prof = {
                d: np.mean(
                    [float(p[b, q, q - d]) for b in range(3) for q in range(d + 1, length + 1)]
                )
                for d in range(1, length // 2 + 1)
            }
            best = max(prof, key=prof.get)
            row = atlas.frame.iloc[layer * model.cfg.n_heads + head]
            assert row.entropy == pytest.approx(np.mean(ent), abs=1e-6)
            assert row.offset == best
            assert row.offset_score == pytest.approx(prof[best], abs=1e-6)


@pytest.mark.parametrize("name", [*hooked_only("gpt2"), *BRIDGE_CORE])
def test_prompt_columns(name):
    model = make_any(name, torch.float32, seed=0)
    prompts = [[5, 6, 7, 5, 6, 7, 8], [1, 2, 3, 4, 9]]
    atlas = head_atlas(model, prompts=prompts, n_probes=2, probe_length=4, composition=False)
    prev, dup = [], []
    for p in prompts:
        pat = own_patterns(model, torch.tensor([p]))[1][0, 2]
        prev += [float(pat[q, q - 1]) for q in range(1, len(p))]
        dup += [
            float(sum(pat[q, k] for k in range(1, q) if p[k] == p[q]))
            for q in range(1, len(p))
            if any(p[k] == p[q] for k in range(1, q))
        ]
    row = atlas.frame.set_index("name").loc["L1H2"]
    assert row.prompt_previous_token == pytest.approx(np.mean(prev), abs=1e-6)
    assert row.prompt_duplicate_token == pytest.approx(np.mean(dup), abs=1e-6)
    assert math.isnan(row.prompt_induction) or row.prompt_induction >= 0


# --------------------------------------------------------------------------- the toy models
@pytest.fixture(
    scope="module",
    params=[(n, k) for n in toy.INDUCTION_NAMES for k in TOY_KINDS],
    ids="-".join,
)
def toy_atlas(request):
    model = load_toy(*request.param)
    return model, head_atlas(model)


def test_toy_models_labelled(toy_atlas):
    """Heads named from the training script's own metrics get the matching atlas labels.

    A retrained toy may split the previous-token role over two layer-0 heads of about equal
    strength; every head within 80% of the strongest counts as a previous-token head."""
    model, atlas = toy_atlas
    metrics = model.toy.metrics
    prev_attn = np.asarray(metrics["previous_token_attention"][0])
    ind_attn = metrics["induction_attention"][1]
    prev_heads = [(0, h) for h in np.flatnonzero(prev_attn >= 0.8 * prev_attn.max()).tolist()]
    ind = (1, int(np.argmax(ind_attn)))
    for head in prev_heads:
        assert "previous-token" in atlas.labels(*head), (head, atlas.evidence(*head))
    for head, value in enumerate(ind_attn):
        if value > 0.5:
            assert "induction" in atlas.labels(1, head), (head, atlas.evidence(1, head))
    assert all(layer == 1 for layer, _ in atlas.heads_with("induction"))
    row = atlas.frame.set_index("name").loc[f"L{ind[0]}H{ind[1]}"]
    assert row.ov_copying > 0.5 and "copying" in row["labels"]
    assert row.k_comp_partner in {f"L{layer}H{head}" for layer, head in prev_heads}
    assert row.k_comp_z > THRESHOLDS["composition_z"]
    partners = atlas.composition.partners(*ind, mode="k", k=1)
    assert (int(partners["layer"][0]), int(partners["head"][0])) in prev_heads


@pytest.mark.parametrize("kind", TOY_KINDS)
def test_toy_user_prompts(kind):
    """String prompts (the toy tokenizer) give prompt_* columns; a repeat shows induction."""
    model = load_toy("attn2-ln", kind)
    prompt = "owl cat jay fox hen elk owl cat jay fox hen elk"
    atlas = head_atlas(model, prompts=[prompt], n_probes=4, composition=False)
    ind = (1, int(np.argmax(model.toy.metrics["induction_attention"][1])))
    row = atlas.frame.iloc[ind[0] * model.cfg.n_heads + ind[1]]
    assert row.prompt_induction > 0.5 and atlas.info["n_prompts"] == 1


# --------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_architecture_finite(name):
    model = make_any(name, torch.float32, seed=0)
    atlas = head_atlas(model, n_probes=2, probe_length=6)
    cfg = model.cfg
    assert len(atlas.frame) == cfg.n_layers * cfg.n_heads
    later = atlas.frame[atlas.frame.layer > 0]
    numeric = later.select_dtypes("number")
    assert np.isfinite(numeric.to_numpy(float)).all(), numeric.columns[
        ~np.isfinite(numeric.to_numpy(float)).all(0)
    ].tolist()
    assert atlas.spectra.qk_singular.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head)
    assert atlas.composition.q.shape == (cfg.n_layers, cfg.n_heads) * 2
    assert len(atlas.virtual_heads) == (cfg.n_layers - 1) * cfg.n_heads


# --------------------------------------------------------------------------- API and views
ATLAS_MODELS = [*hooked_only("gpt2"), "GPT2LMHeadModel", "Qwen3ForCausalLM"]


@pytest.fixture(scope="module", params=ATLAS_MODELS)
def small_atlas(request):
    return head_atlas(make_any(request.param, torch.float32, seed=0), n_probes=4, probe_length=6)


def test_api(small_atlas):
    atlas = small_atlas
    assert isinstance(atlas, HeadAtlas)
    for layer, head in atlas.heads_with("diffuse"):
        assert "diffuse" in atlas.labels(layer, head)
    with pytest.raises(ValueError, match="unknown label"):
        atlas.heads_with("copier")
    with pytest.raises(ValueError, match="out of range"):
        atlas.labels(5, 0)
    strict = atlas.relabel(entropy=2.0)
    assert strict.heads_with("diffuse") == [] and strict.thresholds["entropy"] == 2.0
    with pytest.raises(ValueError, match="unknown thresholds"):
        atlas.relabel(nonsense=1.0)
    assert set(atlas.frame["labels"].explode().dropna()) <= set(LABELS)
    assert (
        list(atlas.top("ov_copying", 3)["ov_copying"])
        == sorted(atlas.frame["ov_copying"], reverse=True)[:3]
    )


@pytest.mark.parametrize("name", ATLAS_MODELS)
def test_validation(name):
    model = make_any(name, torch.float32, seed=0)
    with pytest.raises(ValueError, match="n_probes"):
        head_atlas(model, n_probes=0)
    with pytest.raises(ValueError, match="probe_length"):
        head_atlas(model, probe_length=500)
    with pytest.raises(TypeError, match="seed"):
        head_atlas(model, seed=1.5)
    with pytest.raises(ValueError, match="no tokenizer"):
        head_atlas(model, prompts="a string")
    with pytest.raises(ValueError, match="unknown thresholds"):
        head_atlas(model, thresholds={"inducton": 0.2})
    with pytest.raises(TypeError, match="HookedTransformer"):
        head_atlas(object())


def test_views_self_contained(small_atlas):
    atlas = small_atlas
    atlas.info["model"] = "<script>alert(1)</script>"
    doc = atlas.to_html()
    assert doc.startswith("<!doctype html>")
    assert "<script" not in doc and "&lt;script&gt;" in doc
    assert not re.search(r"(src|href)\s*=", doc) and "http" not in doc.split("<body>")[1]
    for name in atlas.frame["name"]:
        assert name in doc
    for score in SCORE_INFO:
        if score in atlas.frame.columns:
            assert "qkl-fig" in atlas.heatmap(score)
    with pytest.raises(ValueError, match="unknown score"):
        atlas.heatmap("labels")
    assert "L1H3" in atlas.grid() and atlas._repr_html_().startswith('<div class="qkl">')
