"""Small TransformerBridge models built offline: a Hugging Face model from a config class with
random weights (norm gains and biases randomized too), wrapped by TransformerLens's bridge."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

# Hugging Face class → (config class, config kwargs): 2 layers, d_model 64, 4 heads of 16.
_SHAPE = dict(vocab_size=100, max_position_embeddings=64)
BRIDGE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "GPT2LMHeadModel": (
        "GPT2Config",
        dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
    ),
    "GPTNeoXForCausalLM": (
        "GPTNeoXConfig",
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            rotary_pct=0.25, use_parallel_residual=True, **_SHAPE,
        ),
    ),
    "LlamaForCausalLM": (
        "LlamaConfig",
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attention_bias=True, **_SHAPE,
        ),
    ),
    "MistralForCausalLM": (
        "MistralConfig",
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, **_SHAPE,
        ),
    ),
    "Qwen2ForCausalLM": (
        "Qwen2Config",
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **_SHAPE,
        ),
    ),
    "Qwen3ForCausalLM": (
        "Qwen3Config",
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, **_SHAPE,
        ),
    ),
    "Gemma2ForCausalLM": (
        "Gemma2Config",
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
            attn_logit_softcapping=5.0, final_logit_softcapping=30.0, **_SHAPE,
        ),
    ),
    "Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"], **_SHAPE,
        ),
    ),
}  # fmt: skip
BRIDGE_NAMES = list(BRIDGE_CONFIGS)
GQA_BRIDGES = [n for n in BRIDGE_NAMES if "num_key_value_heads" in BRIDGE_CONFIGS[n][1]]
_CACHE: dict[tuple, Any] = {}


def make_bridge(
    name: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides: Any
) -> Any:
    """A fresh random bridge of the Hugging Face class ``name`` in ``dtype`` (``overrides``
    change its config)."""
    import transformers
    from transformer_lens.model_bridge import sources

    config_cls, kwargs = BRIDGE_CONFIGS[name]
    cfg = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    hf = getattr(transformers, name)(cfg).to(dtype).eval()
    gemma = "Gemma" in name
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if p.ndim == 1:  # norm gains around 1 (Gemma: its 1 + w), biases around 0
                gain = ("norm" in pname or "ln" in pname) and "bias" not in pname and not gemma
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if gain else 0.0))
            else:
                p.normal_(0, 0.2)
    return sources.build_bridge_from_module(hf, name, hf_config=cfg)


HAVE_SAE_LENS = importlib.util.find_spec("sae_lens") is not None


def tiny_bridge(rotary: bool = False, dtype: torch.dtype = torch.float32) -> Any:
    """2 layers, d_model 16, 4 heads of 4, vocab 20: GPT-2 (learned positions) or Llama (rotary)."""
    if rotary:
        return make_bridge(
            "LlamaForCausalLM", dtype, hidden_size=16, intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, head_dim=4, vocab_size=20,
            max_position_embeddings=16,
        )  # fmt: skip
    return make_bridge("GPT2LMHeadModel", dtype, n_embd=16, n_head=4, vocab_size=20, n_positions=16)


def attached_bridge(name: str, dtype: torch.dtype = torch.float64, n_tok: int = 10) -> Any:
    """(attached bridge, tokens, layer 1), cached; a random TopK SAE on layer 1's resid_pre is
    its dictionary (a SAELens SAE, or beside TransformerLens 4 qk_lens's reader of its format)."""
    import qk_lens

    key = (name, dtype, n_tok)
    if key not in _CACHE:
        model = qk_lens.attach(make_bridge(name, dtype))
        from tests.saes import make_sae

        sae = make_sae(
            "topk",
            dtype="float64" if dtype == torch.float64 else "float32",
            hook="blocks.1.hook_resid_pre",
            d_in=model.cfg.d_model,
            d_sae=256,
            seed=3,
        )
        model.add_dictionary(sae)
        tokens = torch.randint(0, 100, (n_tok,), generator=torch.Generator().manual_seed(5))
        _CACHE[key] = (model, tokens, 1)
    return _CACHE[key]
