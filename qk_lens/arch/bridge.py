"""The TransformerBridge adapter: a ``transformer_lens.model_bridge.TransformerBridge`` (a Hugging
Face model wrapped with TransformerLens hooks) described as a ModelArch.

What differs from a HookedTransformer, and how it is read here:

* the weights are Hugging Face's own (norms not folded): each norm is linearized at its
  captured ``hook_scale`` with its own gain and bias, Gemma's RMSNorm gain being ``1 + w``;
* Hugging Face's RMSNorm rounds through float32. For exact hooks the capture runs the bridge's
  own norm path (``use_native_layernorm_autograd=False``), in the model's dtype;
* GQA keys and values stay per kv head (``W_K [kv_head, d_model, d_head]``);
* rotary (cos, sin) are read per layer from ``attn.hook_cos`` / ``attn.hook_sin`` (partial
  rotary: their width; the pairing is Hugging Face's ``rotate_half``);
* the score scale is the attention module's ``scaling`` (Gemma: ``query_pre_attn_scalar``),
  softcap its ``attn_logit_softcapping``, the local window its ``sliding_window``;
* qk-norm scales are recorded as ``[batch, head, pos, 1]``;
* masked scores are ``finfo.min`` (not −inf) outside compatibility mode;
* hook points answer to an alias (``attn.hook_q``) and a canonical name (``attn.q.hook_out``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

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

# Hugging Face architectures whose bridges are read and tested here.
SUPPORTED = (
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)


def is_bridge(model: Any) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # a TransformerLens without bridges
        return False
    return isinstance(model, TransformerBridge)


def architecture_name(model: Any) -> str:
    return str(getattr(model.cfg, "architecture", None) or type(model.original_model).__name__)


def _norm(bridge_module: Any, dtype: torch.dtype, scale_hook: str, offset: bool) -> FrozenNorm:
    """A bridge norm (LayerNorm or an RMSNorm) at its frozen scale."""
    hf = bridge_module.original_component
    weight = getattr(hf, "weight", None)
    bias = getattr(hf, "bias", None)
    eps = getattr(hf, "eps", None) or getattr(hf, "variance_epsilon", None) or 1e-5
    kind = "LN" if isinstance(hf, torch.nn.LayerNorm) else "RMS"
    w = None if weight is None else weight.detach().to(dtype)
    if w is not None and offset and kind == "RMS":
        w = 1.0 + w  # Gemma's RMSNorm multiplies by (1 + weight)
    if w is None:
        kind = "LNPre" if kind == "LN" else "RMSPre"
    b = None if bias is None or kind != "LN" else bias.detach().to(dtype)
    return FrozenNorm(kind, w, b, float(eps), scale_hook)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Hugging Face's pairing: dimension i with i + rotary_dim/2.
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _layer(model: Any, layer: int, dtype: torch.dtype) -> LayerArch:
    cfg = model.cfg
    block = model.blocks[layer]
    attn = block.attn
    hf_attn = attn.original_component
    offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))
    d_model, n_heads = cfg.d_model, cfg.n_heads

    W_Q = attn.W_Q.detach().to(dtype)
    W_K = attn.W_K.detach().to(dtype)
    W_V = attn.W_V.detach().to(dtype)
    W_O = attn.W_O.detach().to(dtype)
    n_kv, d_head = W_K.shape[0], W_Q.shape[-1]

    def bias(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        b = getattr(attn, name)  # None where the Hugging Face module has no bias
        return torch.zeros(shape, dtype=dtype) if b is None else b.detach().to(dtype)

    b_Q = bias("b_Q", (n_heads, d_head))
    b_K = bias("b_K", (n_kv, d_head))
    b_V = bias("b_V", (n_kv, d_head))
    b_O = bias("b_O", (d_model,))

    children = dict(block.named_children())
    attn_out = None
    if "ln1_post" in children:
        attn_out = _norm(block.ln1_post, dtype, "ln1_post.hook_scale", offset)
    qk_norm = None
    if hasattr(attn, "q_norm"):
        qn = _norm(attn.q_norm, dtype, "attn.q_norm.hook_scale", offset)
        kn = _norm(attn.k_norm, dtype, "attn.k_norm.hook_scale", offset)
        qk_norm = QKNorm("per_head", qn.weight, kn.weight, scale_layout="head_pos")

    rotary = None
    if cfg.positional_embedding_type == "rotary":
        cos_hook, sin_hook = f"blocks.{layer}.attn.hook_cos", f"blocks.{layer}.attn.hook_sin"

        def tables(cap: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return cap.get(cos_hook).reshape(cap.n_tokens, -1), cap.get(sin_hook).reshape(
                cap.n_tokens, -1
            )

        rotary = Rotary(tables, _rotate_half)
    softcap = getattr(hf_attn, "attn_logit_softcapping", None)
    window = getattr(hf_attn, "sliding_window", None)
    if getattr(hf_attn, "layer_type", "sliding_attention") != "sliding_attention":
        window = None
    mlp_mode = "parallel" if getattr(cfg, "parallel_attn_mlp", False) else "sequential"
    mlp = block.mlp
    mdt = next((p.dtype for p in mlp.parameters()), dtype)
    mlp_out = None
    if "ln2_post" in children:
        mlp_out = _norm(block.ln2_post, mdt, "ln2_post.hook_scale", offset)
    return LayerArch(
        layer=layer,
        dtype=dtype,
        n_heads=n_heads,
        n_kv=n_kv,
        d_head=d_head,
        attn_in=_norm(block.ln1, dtype, "ln1.hook_scale", offset),
        attn_out=attn_out,
        W_Q=W_Q,
        b_Q=b_Q,
        W_K=W_K,
        b_K=b_K,
        W_V=W_V,
        b_V=b_V,
        W_O=W_O,
        b_O=b_O,
        attn_scale=1.0 / float(hf_attn.scaling),
        causal=True,
        window=int(window) if window else None,
        qk_norm=qk_norm,
        rotary=rotary,
        softcap=float(softcap) if softcap else None,
        mlp=mlp,
        mlp_mode=mlp_mode,
        mlp_in=_norm(block.ln2, mdt, "ln2.hook_scale", offset),
        mlp_out=mlp_out,
        hooks=LayerHooks(
            rot_q="attn.hook_rot_q" if rotary is not None else None,
            rot_k="attn.hook_rot_k" if rotary is not None else None,
        ),
    )


def _layer_key(model: Any, layer: int) -> tuple:
    block = model.blocks[layer]
    return (
        tuple(id(m) for m in block._modules.values()),
        tuple(p._version for p in block.parameters()),
    )


def bridge_arch(model: Any) -> ModelArch:
    """Describe a TransformerBridge (see the module docstring)."""
    name = architecture_name(model)
    if name not in SUPPORTED:
        raise TypeError(
            f"qk_lens has not verified the TransformerBridge adapter for {name!r} against its "
            f"hooks; supported architectures: {', '.join(SUPPORTED)}"
        )
    if getattr(model, "compatibility_mode", False) and getattr(model, "_weights_processed", False):
        raise ValueError(
            "this bridge's weights were processed by enable_compatibility_mode() (norms folded, "
            "weights rounded through float32); qk_lens reads a bridge's raw weights: load it "
            "again, or use enable_compatibility_mode(no_processing=True)"
        )
    cfg = model.cfg
    dtype = compute_dtype(cfg.dtype)
    offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))
    final_norm = _norm(model.ln_final, dtype, "ln_final.hook_scale", offset)
    soft = getattr(cfg, "output_logits_soft_cap", -1.0)
    logits_softcap = float(soft) if soft and soft > 0 else None

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = model.unembed(x)
        if logits_softcap is not None:  # as Hugging Face's Gemma-2 forward applies it
            out = torch.tanh(out / logits_softcap) * logits_softcap
        return out

    norms = [m for m in model.modules() if hasattr(m, "use_native_layernorm_autograd")]

    @contextmanager
    def exact_forward() -> Iterator[None]:
        # Hugging Face's RMSNorm rounds through float32: the bridge's own path is exact.
        saved = [m.use_native_layernorm_autograd for m in norms]
        for m in norms:
            m.use_native_layernorm_autograd = False
        try:
            yield
        finally:
            for m, value in zip(norms, saved, strict=True):
                m.use_native_layernorm_autograd = value

    from transformer_lens.model_bridge import TransformerBridge

    def hook_points() -> dict[str, Any]:
        # TransformerBridge's own hook_dict has the aliases; SAELens's subclass drops them
        return TransformerBridge.hook_dict.fget(model)

    def capture_hooks() -> set[str]:
        # and each layer's rotary (cos, sin), which a bridge's hooks record
        return capture_hook_names(
            hook_points(),
            cfg.n_layers,
            extra_layer_hooks=("attn.hook_cos", "attn.hook_sin"),
            extra_model_hooks=("unembed.hook_in",),
        )

    positional = cfg.positional_embedding_type
    if positional not in ("standard", "rotary"):
        positional = "none"
    # Every reader of the residual a LayerNorm: writes count only up to their mean.
    readers = [model.ln_final, *(b.ln1 for b in model.blocks), *(b.ln2 for b in model.blocks)]
    centred = all(isinstance(m.original_component, torch.nn.LayerNorm) for m in readers)
    embedding = model.embed.original_component

    def embed_weight() -> torch.Tensor:
        # Gemma's embedding multiplies its rows by embed_scale (√d_model) in its forward
        w = embedding.weight.detach()
        scale = getattr(embedding, "embed_scale", None)
        return w if scale is None else w * torch.as_tensor(scale).to(w.dtype)

    return ModelArch(
        model=model,
        name=name,
        dtype=dtype,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        positional=positional,
        attn_only=False,
        post_norm=False,
        moe=bool(getattr(cfg, "num_experts", None)),
        final_norm=final_norm,
        embed_norm=None,
        logits_softcap=logits_softcap,
        build_layer=lambda layer: _layer(model, layer, dtype),
        layer_key=lambda layer: _layer_key(model, layer),
        ungrouped=None,
        capture_hooks=capture_hooks,
        hook_points=hook_points,
        exact_forward=exact_forward,
        logits=logits,
        logits_input="unembed.hook_in",
        model_dtype=cfg.dtype,
        centred_residual=centred,
        embed_weight=embed_weight,
    )
