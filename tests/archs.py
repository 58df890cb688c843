"""Small random-init TransformerLens models, one per attention variant, for qk_lens tests.

Every model is a ``HookedTransformer`` (TransformerLens 3.9) built from a config with no
tokenizer (pass token ids; see :func:`make_tokens`). Random init in TransformerLens leaves every
bias at 0 and every norm weight at 1, which hides bugs (a forgotten ``b_Q`` or ``ln1.w`` changes
nothing), so :func:`make_model` fills *every* parameter from a seeded generator:

* weight matrices ``W_*`` ~ N(0, 1/fan_in) (``W_E`` ~ N(0, 1), ``W_pos`` ~ N(0, 0.5²)), so
  activations and attention scores are O(1);
* biases (``b_Q``, ``_b_K``, ``_b_V``, ``b_O``, ``b_in``, ``b_out``, ``b_U``, ``ln*.b``) ~ N(0, 0.3²);
* norm gains (``ln1.w``, ``ln2.w``, ``ln*_post.w``, ``ln_final.w``, ``q_norm.w``, ``k_norm.w``,
  ``embed.ln.w``) ~ 1 + N(0, 0.3²).

Values are drawn in float32 and cast, so ``make_model(name, torch.float32)`` and
``make_model(name, torch.float64)`` hold the same numbers (except for the ``*_folded`` variants,
whose processing TransformerLens does in float32 — see :func:`make_model`).

:func:`reference_scores` is a slow, hand-written recomputation of one layer's attention scores
from ``blocks.{L}.hook_resid_pre``; ``tests/test_archs.py`` checks it against
``hook_attn_scores`` for every variant, so it can serve as ground truth elsewhere.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

BIAS_STD = 0.3
NORM_W_STD = 0.3
EMBED_STD = 1.0
POS_STD = 0.5

# Shared by the hand-built variants: 2 layers, d_model 64, 4 heads of 16, n_ctx 64, vocab 100.
_SMALL: dict[str, Any] = dict(
    n_layers=2,
    d_model=64,
    d_head=16,
    n_heads=4,
    d_mlp=128,
    d_vocab=100,
    n_ctx=64,
    tokenizer_name=None,
    init_weights=False,  # make_model fills every parameter itself
    device="cpu",
)


def _gpt2() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
    )


def _neox() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=8,  # partial: 8 of d_head 16
        rotary_adjacent_pairs=False,  # NeoX: pairs (i, i + rotary_dim/2)
        rotary_base=10000,
        parallel_attn_mlp=True,
        original_architecture="GPTNeoXForCausalLM",
    )


def _gptj() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=8,
        rotary_adjacent_pairs=True,  # GPT-J: pairs (2i, 2i+1)
        rotary_base=10000,
        parallel_attn_mlp=True,
        original_architecture="GPTJForCausalLM",
    )


def _llama() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_base=10000,
        n_key_value_heads=2,
        # Llama-3 NTK-by-parts, with a small original context so that all three regimes occur
        # at rotary_dim 16 (wavelengths 6.3, 20, 63, ..., 2e4): pair 0 kept (< 32/4), pairs 1-2
        # smoothed, pairs 3+ divided by the factor (> 32/1).
        use_NTK_by_parts_rope=True,
        NTK_by_parts_factor=8.0,
        NTK_by_parts_low_freq_factor=1.0,
        NTK_by_parts_high_freq_factor=4.0,
        NTK_original_ctx_len=32,
        eps=1e-5,
        original_architecture="LlamaForCausalLM",
    )


def _mqa() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_base=10000,
        n_key_value_heads=1,
    )


def _qwen2() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_base=1_000_000.0,
        n_key_value_heads=2,
        eps=1e-6,
        original_architecture="Qwen2ForCausalLM",
    )


def _gemma2() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_base=10000.0,
        n_key_value_heads=2,
        use_normalization_before_and_after=True,  # ln1_post, ln2_post
        attn_scores_soft_cap=5.0,
        output_logits_soft_cap=5.0,
        use_local_attn=True,
        attn_types=["local", "global"],  # HF Gemma-2: even layers sliding
        window_size=4,
        use_attn_scale=True,
        attn_scale=2.0,  # set directly; sqrt(d_head) would be 4
        eps=1e-6,
        original_architecture="Gemma2ForCausalLM",
    )


def _gemma3() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_base=1_000_000,  # global layers
        rotary_base_local=10_000,  # local layers
        rotary_scaling_factor=8.0,  # linear RoPE scaling on global layers (Gemma-3 4B+)
        n_key_value_heads=2,
        use_qk_norm=True,
        use_normalization_before_and_after=True,
        use_local_attn=True,
        attn_types=["local", "global"],
        window_size=4,
        eps=1e-6,
        original_architecture="Gemma3ForCausalLM",
    )


def _qwen3() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_base=1_000_000,
        n_key_value_heads=2,
        use_qk_norm=True,
        eps=1e-6,
        original_architecture="Qwen3ForCausalLM",
    )


def _alibi() -> dict[str, Any]:
    return dict(
        _SMALL,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="alibi",
        post_embedding_ln=True,  # Bloom: LayerNorm right after the embedding
        original_architecture="BloomForCausalLM",
    )


def _inverse_layer_idx() -> dict[str, Any]:
    return dict(_gpt2(), n_layers=3, scale_attn_by_inverse_layer_idx=True)


def _attn_only() -> dict[str, Any]:
    return dict(
        _SMALL,
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
    )


def _pretrained_shape(official_name: str, **overrides: Any) -> Callable[[], dict[str, Any]]:
    """Real config of a hub model (hard-coded in TransformerLens, works offline), shrunk."""

    def build() -> dict[str, Any]:
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = get_pretrained_model_config(official_name, device="cpu")
        d = dict(cfg.to_dict())
        d.update(
            n_layers=2,
            d_vocab=128,
            d_vocab_out=128,
            n_ctx=128,
            # The real d_mlp (8192 / 9216) makes each build ~7 s and ~1 GB in float64 for no
            # attention-relevant gain; MLP width does not enter the QK computation.
            d_mlp=256,
            tokenizer_name=None,
            init_weights=False,
            device="cpu",
        )
        if d.get("attn_types") is not None:
            d["attn_types"] = list(d["attn_types"][: d["n_layers"]])
        d.update(overrides)
        return d

    return build


_CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "gpt2": _gpt2,
    "neox": _neox,
    "gptj": _gptj,
    "llama": _llama,
    "mqa": _mqa,
    "qwen2": _qwen2,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "qwen3": _qwen3,
    "alibi": _alibi,
    "inverse_layer_idx": _inverse_layer_idx,
    "attn_only": _attn_only,
    "llama32_1b_shape": _pretrained_shape("meta-llama/Llama-3.2-1B"),
    # Real window is 4096 > n_ctx; shrink it so the local mask bites at 24+ tokens.
    "gemma2_2b_shape": _pretrained_shape("google/gemma-2-2b", window_size=16),
}

# name -> (base variant, kwargs for HookedTransformer.process_weights_)
_FOLDED: dict[str, tuple[str, dict[str, bool]]] = {
    "gpt2_folded": (
        "gpt2",
        dict(fold_ln=True, center_writing_weights=True, center_unembed=True),
    ),
    # What HookedTransformer.from_pretrained does to Llama by default: RMS -> RMSPre.
    "llama_folded": (
        "llama",
        dict(fold_ln=True, center_writing_weights=True, center_unembed=True),
    ),
    # from_pretrained on Gemma-2: ln1/ln2 -> RMSPre, ln*_post stay RMS; no center_unembed
    # (from_pretrained turns it off under a logit softcap; process_weights_ does not).
    "gemma2_folded": (
        "gemma2",
        dict(fold_ln=True, center_writing_weights=True, center_unembed=False),
    ),
}

ARCH_NAMES: list[str] = [
    "gpt2",
    "gpt2_folded",
    "neox",
    "gptj",
    "llama",
    "llama_folded",
    "mqa",
    "qwen2",
    "gemma2",
    "gemma2_folded",
    "gemma3",
    "qwen3",
    "alibi",
    "inverse_layer_idx",
    "attn_only",
    "llama32_1b_shape",
    "gemma2_2b_shape",
]
assert set(ARCH_NAMES) == set(_CONFIGS) | set(_FOLDED)

# Feature groups (tests/test_archs.py checks these against the built configs).
ROTARY_NAMES: list[str] = [
    n
    for n in ARCH_NAMES
    if n not in ("gpt2", "gpt2_folded", "alibi", "inverse_layer_idx", "attn_only")
]
QK_NORM_NAMES: list[str] = ["gemma3", "qwen3"]
LOCAL_ATTN_NAMES: list[str] = ["gemma2", "gemma2_folded", "gemma3", "gemma2_2b_shape"]
SOFTCAP_NAMES: list[str] = ["gemma2", "gemma2_folded", "gemma2_2b_shape"]
GQA_NAMES: list[str] = [
    "llama",
    "llama_folded",
    "mqa",
    "qwen2",
    "gemma2",
    "gemma2_folded",
    "gemma3",
    "qwen3",
    "llama32_1b_shape",
    "gemma2_2b_shape",
]
FOLDED_NAMES: list[str] = list(_FOLDED)


def config_dict(name: str, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """The HookedTransformerConfig kwargs for ``name`` (for folded variants: before folding)."""
    base = _FOLDED[name][0] if name in _FOLDED else name
    if base not in _CONFIGS:
        raise KeyError(f"unknown architecture {name!r}; known: {ARCH_NAMES}")
    d = _CONFIGS[base]()
    d["dtype"] = dtype
    return d


def _fill_(model: HookedTransformer, seed: int) -> None:
    """Overwrite every parameter with seeded random values (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            bare = leaf.lstrip("_")
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if bare == "W_E":
                value = noise * EMBED_STD
            elif bare == "W_pos":
                value = noise * POS_STD
            elif bare == "W_O":  # [n_heads, d_head, d_model]
                value = noise / math.sqrt(p.shape[0] * p.shape[1])
            elif bare in ("W_Q", "W_K", "W_V"):  # [heads, d_model, d_head]
                value = noise / math.sqrt(p.shape[1])
            elif bare.startswith("W_"):  # W_in, W_gate, W_out, W_U: [d_in, d_out]
                value = noise / math.sqrt(p.shape[0])
            elif leaf == "w":  # LayerNorm / RMSNorm gain (ln1, ln1_post, ..., q_norm, k_norm)
                value = 1.0 + noise * NORM_W_STD
            elif leaf == "b" or bare.startswith("b_"):
                value = noise * BIAS_STD
            else:
                raise ValueError(f"make_model does not know how to fill parameter {name}")
            p.copy_(value.to(p.dtype))


def make_model(
    name: str,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    device: str = "cpu",
    **overrides: Any,
) -> HookedTransformer:
    """A fresh small random ``HookedTransformer`` of variant ``name`` (one of ARCH_NAMES).

    Deterministic in (name, dtype, seed); does not touch the global RNG.

    ``*_folded`` variants are the base variant's model after ``model.process_weights_(...)``
    (the in-place TL 3.9 API). Note: TransformerLens 3.9 runs weight processing in float32 even
    for a float64 model (``ProcessWeights.process_weights`` casts every non-fp32 state-dict
    tensor to fp32 and back, the ``rotary_cos``/``rotary_sin`` buffers included), so a folded
    float64 model agrees with its unfolded twin only to ~1e-6; the folded model itself is still
    an exact float64 computation of its (fp32-rounded) weights. ``overrides`` change the config
    (not for folded variants).
    """
    if name in _FOLDED:
        base, kwargs = _FOLDED[name]
        model = make_model(base, dtype=dtype, seed=seed, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.process_weights_(**kwargs)
        return model
    d = {**config_dict(name, dtype), **overrides}
    d["device"] = device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's 3.x DeprecationWarning
        cfg = HookedTransformerConfig(**d)
        model = HookedTransformer(cfg)
    _fill_(model, seed)
    model.eval()
    return model


def make_tokens(model: HookedTransformer, n_tokens: int = 24, seed: int = 0) -> torch.Tensor:
    """Random token ids, shape [1, n_tokens], in [0, d_vocab).

    The default 24 exceeds every local ``window_size`` in this module (4, or 16 for
    gemma2_2b_shape), so local masks actually remove entries.
    """
    if n_tokens > model.cfg.n_ctx:
        raise ValueError(f"n_tokens {n_tokens} > n_ctx {model.cfg.n_ctx}")
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, model.cfg.d_vocab, (1, n_tokens), generator=g)
    return toks.to(model.cfg.device)


# ---------------------------------------------------------------------------------------------
# Hand-written reference for attention scores
# ---------------------------------------------------------------------------------------------


def is_local(model: HookedTransformer, layer: int) -> bool:
    cfg = model.cfg
    return (
        bool(cfg.use_local_attn)
        and cfg.attn_types is not None
        and (cfg.attn_types[layer] == "local")
    )


def score_mask(model: HookedTransformer, layer: int, n_tokens: int) -> torch.Tensor:
    """Bool [T, T]: True where query i may attend to key j (causal, plus the local window)."""
    i = torch.arange(n_tokens)[:, None]
    j = torch.arange(n_tokens)[None, :]
    allowed = j <= i
    if is_local(model, layer):
        allowed = allowed & (j > i - model.cfg.window_size)
    return allowed


def expected_attn_scale(model: HookedTransformer, layer: int) -> float:
    """What scores are divided by, derived from the config (not read off the module)."""
    cfg = model.cfg
    scale = float(cfg.attn_scale) if cfg.use_attn_scale else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale *= layer + 1
    return scale


def alibi_bias(n_heads: int, n_tokens: int) -> torch.Tensor:
    """ALiBi bias [H, T, T] in float64 from the formula: m_h * min(j - i, 0), m_h = 2^(-8(h+1)/H)."""
    m = torch.tensor(
        [2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)], dtype=torch.float64
    )
    i = torch.arange(n_tokens, dtype=torch.float64)[:, None]
    j = torch.arange(n_tokens, dtype=torch.float64)[None, :]
    return m[:, None, None] * (j - i).clamp(max=0)[None]


def _norm(
    x: torch.Tensor, kind: str | None, module: torch.nn.Module, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ln1 by hand. Returns (output, scale) with scale [T, 1] (None without a norm)."""
    if kind is None:
        return x, None
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    elif kind not in ("RMS", "RMSPre"):
        raise NotImplementedError(f"normalization_type {kind!r}")
    scale = torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    y = x / scale
    if kind in ("LN", "RMS"):
        y = y * module.w
    if kind == "LN":
        y = y + module.b
    return y, scale


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rotary_pairs(model: HookedTransformer) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (a, b) that rotary rotates together: adjacent (GPT-J) or halves (NeoX)."""
    rd = model.cfg.rotary_dim
    if model.cfg.rotary_adjacent_pairs:
        return torch.arange(0, rd, 2), torch.arange(1, rd, 2)
    return torch.arange(rd // 2), torch.arange(rd // 2, rd)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, a, b) -> torch.Tensor:
    """x [H, T, d_head]; cos/sin [T, rotary_dim]. (x_a, x_b) -> R(theta) (x_a, x_b)."""
    out = x.clone()
    xa, xb = x[..., a], x[..., b]
    out[..., a] = xa * cos[:, a] - xb * sin[:, a]
    out[..., b] = xb * cos[:, b] + xa * sin[:, b]
    return out


def reference_qk(
    model: HookedTransformer, cache, layer: int, batch: int = 0
) -> dict[str, torch.Tensor]:
    """Hand-written q/k for one layer from ``blocks.{layer}.hook_resid_pre``.

    Returns a dict: ``ln1_scale`` ([T, 1], = ``ln1.hook_scale``; None without a norm),
    ``normed`` ([T, d_model], ln1 output), and [H, T, d_head] tensors with K expanded to all
    query heads: ``q`` (= hook_q), ``k`` (``k_unexpanded`` [n_kv, T, d_head] = hook_k),
    ``q_normed``/``k_normed`` (after qk-norm, if any), ``q_rot``/``k_rot`` (after rotary,
    = hook_rot_q/hook_rot_k, expanded) — the last two enter the dot product in every case.
    """
    cfg = model.cfg
    unsupported = [
        f
        for f in (
            "use_split_qkv_input",
            "use_attn_in",
            "use_logn_attn",
            "use_dynamic_ntk_rope",
            "ungroup_grouped_query_attention",
        )
        if getattr(cfg, f, False)
    ]
    if cfg.positional_embedding_type in ("shortformer", "relative_positional_bias"):
        unsupported.append(cfg.positional_embedding_type)
    if cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        unsupported.append(cfg.original_architecture)
    if unsupported:
        raise NotImplementedError(f"reference_qk does not handle {unsupported}")

    block = model.blocks[layer]
    attn = block.attn
    x = cache[f"blocks.{layer}.hook_resid_pre"][batch]  # [T, d_model]
    T = x.shape[0]
    H = cfg.n_heads
    n_kv = cfg.n_key_value_heads or H
    kv_of_head = torch.arange(H) // (H // n_kv)  # GQA: query head h reads kv head h // group

    y, scale = _norm(x, cfg.normalization_type, block.ln1, cfg.eps)

    if cfg.n_key_value_heads is None:
        W_K, b_K = attn.W_K, attn.b_K
    else:
        W_K, b_K = attn._W_K, attn._b_K  # [n_kv, d_model, d_head]
    q = torch.einsum("td,hde->hte", y, attn.W_Q) + attn.b_Q[:, None, :]
    k = torch.einsum("td,hde->hte", y, W_K) + b_K[:, None, :]  # [n_kv, T, d_head]
    out = {"ln1_scale": scale, "normed": y, "q": q, "k_unexpanded": k}
    k = k[kv_of_head]
    out["k"] = k

    if cfg.use_qk_norm:
        q = _rms(q, attn.q_norm.w, cfg.eps)
        k = _rms(k, attn.k_norm.w, cfg.eps)
    if cfg.clip_qkv is not None:
        q = q.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        k = k.clamp(-cfg.clip_qkv, cfg.clip_qkv)
    out["q_normed"], out["k_normed"] = q, k

    if cfg.positional_embedding_type == "rotary":
        cos = attn.rotary_cos[:T].to(q.dtype)
        sin = attn.rotary_sin[:T].to(q.dtype)
        a, b = rotary_pairs(model)
        q = _rotate(q, cos, sin, a, b)
        k = _rotate(k, cos, sin, a, b)
    out["q_rot"], out["k_rot"] = q, k
    return out


def reference_scores(
    model: HookedTransformer, cache, layer: int, batch: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference for layer ``layer``'s attention scores, each [n_heads, T, T].

    ``raw``: q_rot . k_rot / attn_scale — the bilinear score, before softcap and ALiBi;
    NaN where masked.
    ``final``: what ``blocks.{layer}.attn.hook_attn_scores`` holds: softcap(raw) (Gemma-2
    ``cap * tanh(raw / cap)``), then + ALiBi, then −inf where masked (causal and local window).

    ALiBi: if the layer has built its ``alibi`` buffer (it does on the first forward), the bias is
    sliced from it the way TransformerLens does (``alibi[:, -T:, :T]``; the buffer only grows, so
    after a longer prompt the rows are offset by a per-row constant); otherwise the formula.
    """
    cfg = model.cfg
    parts = reference_qk(model, cache, layer, batch)
    q, k = parts["q_rot"], parts["k_rot"]
    T = q.shape[1]
    raw = torch.einsum("hid,hjd->hij", q, k) / expected_attn_scale(model, layer)

    cap = cfg.attn_scores_soft_cap
    final = cap * torch.tanh(raw / cap) if cap is not None and cap > 0 else raw.clone()

    if cfg.positional_embedding_type == "alibi":
        buf = getattr(model.blocks[layer].attn, "alibi", None)
        if isinstance(buf, torch.Tensor):
            bias = buf[:, -T:, :T]
        else:
            bias = alibi_bias(cfg.n_heads, T)
        final = final + bias.to(device=final.device, dtype=final.dtype)

    allowed = score_mask(model, layer, T).to(raw.device)[None]
    raw = raw.masked_fill(~allowed, float("nan"))
    final = final.masked_fill(~allowed, float("-inf"))
    return raw, final
