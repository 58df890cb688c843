"""The HookedTransformer adapter: the only code that reads a TransformerLens config.

It turns a ``HookedTransformer`` (or ``HookedSAETransformer``) into a
:class:`~qk_lens.arch.layer.ModelArch` and its :class:`~qk_lens.arch.layer.LayerArch` s:
which norm sits where (LN / LNPre / RMS / RMSPre, Gemma-2/3 pre+post norms, OLMo-2/3 post-norm
blocks), GQA's per-kv-head ``_W_K``/``_W_V``, qk-norm (per head or OLMo's full width), rotary
(the model's own buffers and pairing), softcap, ALiBi, local windows, ``clip_qkv``, log-n
scaling, shortformer positions, and the MLP layout (none, sequential, parallel).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from transformer_lens.utilities.activation_functions import apply_softcap, softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from qk_lens.arch.layer import (
    LayerArch,
    LayerHooks,
    ModelArch,
    QKNorm,
    Rotary,
    capture_hook_names,
    compute_dtype,
)
from qk_lens.arch.norms import FrozenNorm

OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


try:
    from transformer_lens import HookedTransformer
    from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
except ImportError:  # TransformerLens 4 removed HookedTransformer: this adapter reads nothing
    HookedTransformer = None


def is_hooked(model: Any) -> bool:
    return HookedTransformer is not None and isinstance(model, HookedTransformer)


def norm_kind(module: Any) -> str:
    """Classify a TransformerLens norm module; linearization depends only on this."""
    if isinstance(module, LayerNorm):
        return "LN"
    if isinstance(module, LayerNormPre):
        return "LNPre"
    if isinstance(module, RMSNorm):
        return "RMS"
    if isinstance(module, RMSNormPre):
        return "RMSPre"
    if isinstance(module, torch.nn.Identity) or module is None:
        return "none"
    raise ValueError(
        f"unsupported norm module {type(module).__name__}; qk_lens knows LayerNorm, "
        "LayerNormPre, RMSNorm, RMSNormPre and Identity"
    )


def frozen_norm(module: Any, dtype: torch.dtype, scale_hook: str | None) -> FrozenNorm:
    kind = norm_kind(module)
    if kind == "none":
        return FrozenNorm.identity()
    w = module.w.detach().to(dtype) if kind in ("LN", "RMS") else None
    b = module.b.detach().to(dtype) if kind == "LN" else None
    return FrozenNorm(kind, w, b, float(getattr(module, "eps", 1e-5)), scale_hook)


def _param_dtype(module: Any) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _layer(model: Any, layer: int, dtype: torch.dtype) -> LayerArch:
    cfg = model.cfg
    if cfg.positional_embedding_type == "relative_positional_bias":
        raise ValueError("relative positional bias (T5) is not supported by qk_lens")
    block = model.blocks[layer]
    attn = block.attn
    post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES
    # OLMo-2/3 attention reads the raw residual and ln1 normalizes its output instead.
    attn_in = (
        FrozenNorm.identity() if post_norm else frozen_norm(block.ln1, dtype, "ln1.hook_scale")
    )
    attn_out = None
    if cfg.use_normalization_before_and_after:
        attn_out = frozen_norm(block.ln1_post, dtype, "ln1_post.hook_scale")
    elif post_norm:
        attn_out = frozen_norm(block.ln1, dtype, "ln1.hook_scale")

    def kv(name: str) -> torch.Tensor:
        # Under GQA TransformerLens keeps one map per kv head (_W_K) and repeats it in W_K.
        t = getattr(attn, f"_{name}", None)
        return (t if t is not None else getattr(attn, name)).detach().to(dtype)

    W_K, b_K, W_V, b_V = kv("W_K"), kv("b_K"), kv("W_V"), kv("b_V")
    n_kv = W_K.shape[0]

    qk_norm = None
    full_qk_norm = cfg.original_architecture in OLMO_QK_NORM and attn.q_norm is not None
    if cfg.use_qk_norm or full_qk_norm:

        def gain(norm: Any) -> torch.Tensor | None:
            return norm.w.detach().to(dtype) if hasattr(norm, "w") else None

        qk_norm = QKNorm(
            "full" if full_qk_norm and not cfg.use_qk_norm else "per_head",
            gain(attn.q_norm),
            gain(attn.k_norm),
        )
    rotary = None
    if cfg.positional_embedding_type == "rotary":
        # The buffers after the forward (they may grow during it), cut to rotary_dim.
        def tables(cap: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return attn.rotary_cos[:, : cfg.rotary_dim], attn.rotary_sin[:, : cfg.rotary_dim]

        rotary = Rotary(tables, attn.rotate_every_two)
    alibi = None
    if cfg.positional_embedding_type == "alibi":
        # The cached table only grows; slice it exactly as TransformerLens does.
        def alibi(n_tokens: int) -> torch.Tensor:
            return attn.alibi[:, -n_tokens:, :n_tokens]

    softcap = cfg.attn_scores_soft_cap if softcap_enabled(cfg.attn_scores_soft_cap) else None
    if alibi is not None and softcap is not None:
        raise ValueError("ALiBi together with attention softcap is not supported")
    logn = bool(cfg.use_logn_attn) and not model.training

    mlp = mlp_in = mlp_out = mlp_mode = None
    if not cfg.attn_only:
        mlp = block.mlp
        mdt = _param_dtype(mlp)  # the MLP runs (and is differentiated) in its own dtype
        mlp_mode = "parallel" if cfg.parallel_attn_mlp else "sequential"
        mlp_in = frozen_norm(block.ln2, mdt, "ln2.hook_scale")
        if cfg.use_normalization_before_and_after:
            mlp_out = frozen_norm(block.ln2_post, mdt, "ln2_post.hook_scale")
    return LayerArch(
        layer=layer,
        dtype=dtype,
        n_heads=cfg.n_heads,
        n_kv=n_kv,
        d_head=cfg.d_head,
        attn_in=attn_in,
        attn_out=attn_out,
        W_Q=attn.W_Q.detach().to(dtype),
        b_Q=attn.b_Q.detach().to(dtype),
        W_K=W_K,
        b_K=b_K,
        W_V=W_V,
        b_V=b_V,
        W_O=attn.W_O.detach().to(dtype),
        b_O=attn.b_O.detach().to(dtype),
        attn_scale=float(attn.attn_scale),
        causal=(attn._attention_dir_override or cfg.attention_dir) == "causal",
        window=cfg.window_size if attn.attn_type == "local" else None,
        qk_norm=qk_norm,
        rotary=rotary,
        softcap=softcap,
        alibi=alibi,
        clip=cfg.clip_qkv,
        logn_length=(cfg.train_seq_length or cfg.n_ctx) if logn else None,
        shortformer=cfg.positional_embedding_type == "shortformer",
        mlp=mlp,
        mlp_mode=mlp_mode,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        hooks=LayerHooks(mlp_out=None if cfg.attn_only else "hook_mlp_out"),
    )


def _layer_key(model: Any, layer: int) -> tuple:
    block = model.blocks[layer]
    return (
        tuple(id(m) for m in block._modules.values()),
        tuple(p._version for p in block.parameters()),
        model.training,
    )


def hooked_arch(model: Any) -> ModelArch:
    """Describe a HookedTransformer (see the module docstring)."""
    cfg = model.cfg
    dtype = compute_dtype(cfg.dtype)
    positional = cfg.positional_embedding_type
    if positional not in ("standard", "rotary", "alibi", "shortformer"):
        positional = "none"
    ln_final = getattr(model, "ln_final", None)
    final_norm = (
        frozen_norm(ln_final, dtype, "ln_final.hook_scale")
        if ln_final is not None
        else FrozenNorm.identity()
    )
    embed_ln = getattr(model.embed, "ln", None)  # BLOOM: a norm right after the embedding
    gqa = cfg.n_key_value_heads is not None and cfg.n_key_value_heads != cfg.n_heads

    @contextmanager
    def ungrouped() -> Iterator[None]:
        # Each query head gets its own copy of its group's key/value (TransformerLens's switch).
        if not gqa or cfg.ungroup_grouped_query_attention:
            yield
            return
        cfg.ungroup_grouped_query_attention = True
        try:
            yield
        finally:
            cfg.ungroup_grouped_query_attention = False

    def capture_hooks() -> set[str]:
        return capture_hook_names(model.hook_dict, cfg.n_layers, extra_model_hooks=(logits_input,))

    post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES
    soft = cfg.output_logits_soft_cap
    logits_softcap = float(soft) if softcap_enabled(soft) else None

    # The capture's forward stops before the unembedding (return_type=None), so it records
    # ln_final's normalized output; logits() finishes ln_final (gain, bias) and unembeds with the
    # model's own modules, the same ops as the forward, so the same numbers.
    kind = final_norm.kind
    if kind != "none" and "ln_final.hook_normalized" in model.hook_dict:
        logits_input = "ln_final.hook_normalized"
    else:
        kind, logits_input = "none", f"blocks.{cfg.n_layers - 1}.hook_resid_post"

    def logits(x: torch.Tensor) -> torch.Tensor:
        if kind in ("LN", "RMS"):
            x = x * ln_final.w
        if kind == "LN":
            x = x + ln_final.b
        return apply_softcap(model.unembed(x), cfg.output_logits_soft_cap)  # as forward does

    return ModelArch(
        model=model,
        name=str(cfg.original_architecture or cfg.model_name),
        dtype=dtype,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        positional=positional,
        attn_only=bool(cfg.attn_only),
        post_norm=post_norm,
        moe=bool(getattr(cfg, "num_experts", None)),
        final_norm=final_norm,
        embed_norm=(
            None if embed_ln is None else frozen_norm(embed_ln, dtype, "embed.ln.hook_scale")
        ),
        logits_softcap=logits_softcap,
        build_layer=lambda layer: _layer(model, layer, dtype),
        layer_key=lambda layer: _layer_key(model, layer),
        ungrouped=ungrouped,
        capture_hooks=capture_hooks,
        exact_forward=nullcontext,
        logits=logits,
        logits_input=logits_input,
        model_dtype=cfg.dtype,
        centred_residual=cfg.normalization_type in ("LN", "LNPre") and not post_norm,
    )
