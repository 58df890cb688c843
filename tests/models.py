"""One model factory over both kinds of model qk_lens attaches to.

* HookedTransformer variants (``tests/archs.py``): stack (a) only, TransformerLens 4 has none.
* TransformerBridge models of Hugging Face classes (``tests/bridges.py``): both stacks.

``hooks_of`` and ``bridge_scores`` read a model's own activations and scores: the references
the tests compare qk_lens with. ``MODEL_NAMES`` lists what this stack can build; a test parametrized over it runs every model
kind the installed TransformerLens has. ``BRIDGE_CORE`` is a subset of the bridges covering
each wiring difference (learned positions, parallel + partial rotary, GQA with biases, qk-norm,
softcap + sliding window + pre/post norms) for the slower tests.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from qk_lens.arch import arch_of
from qk_lens.toy import hooked_transformer_available
from tests.bridges import BRIDGE_CONFIGS, BRIDGE_NAMES, make_bridge

HOOKED = hooked_transformer_available()
needs_hooked = pytest.mark.skipif(
    not HOOKED, reason="a HookedTransformer test model (TransformerLens 3 with SAELens)"
)
BRIDGE_CORE = [
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
]


def hooked_names() -> list[str]:
    if not HOOKED:
        return []
    from tests.archs import ARCH_NAMES

    return list(ARCH_NAMES)


MODEL_NAMES = hooked_names() + BRIDGE_NAMES


def is_bridge_name(name: str) -> bool:
    return name in BRIDGE_CONFIGS


def make_any(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Any:
    """A random model: a bridge for a Hugging Face class name, else a HookedTransformer variant."""
    if is_bridge_name(name):
        return make_bridge(name, dtype, seed=seed)
    from tests.archs import make_model

    return make_model(name, dtype, seed=seed)


def make_tokens(model: Any, n_tokens: int = 24, seed: int = 0) -> torch.Tensor:
    """Random token ids, shape [1, n_tokens], in [0, d_vocab)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (1, n_tokens), generator=g)


def hooks_of(model: Any, tokens: torch.Tensor) -> Any:
    """The model's own activations for a 1-D prompt, from a forward as qk_lens runs it (a
    bridge's: its exact norm path)."""
    with torch.no_grad(), arch_of(model).exact_forward():
        _, cache = model.run_with_cache(tokens[None])
    return cache


def bridge_scores(model: Any, cache: Any, layer: int) -> tuple[torch.Tensor, ...]:
    """(raw, final, scales) [head, q, k] of a bridge's layer from its own hooks: ``final`` is
    ``hook_attn_scores`` with masked entries −inf; ``raw`` the score before the softcap (NaN where
    masked): ``final`` without a softcap, else ``hook_rot_q · hook_rot_k · scaling``; ``scales``
    ‖q‖·‖k‖·scaling (a rotation keeps the norm, so before rotary where there is no rot hook)."""
    attn = f"blocks.{layer}.attn"
    final = cache[f"{attn}.hook_attn_scores"][0]
    masked = final <= torch.finfo(final.dtype).min / 2
    final = final.masked_fill(masked, float("-inf"))
    scaling = float(model.blocks[layer].attn.original_component.scaling)
    rot = f"{attn}.hook_rot_q" in cache
    q = cache[f"{attn}.hook_rot_q" if rot else f"{attn}.hook_q"][0].transpose(0, 1)  # [H, T, d]
    k = cache[f"{attn}.hook_rot_k" if rot else f"{attn}.hook_k"][0].transpose(0, 1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # GQA: head h reads kv h // group
    scales = q.norm(dim=-1)[:, :, None] * k.norm(dim=-1)[:, None, :] * abs(scaling)
    cap = model.cfg.attn_scores_soft_cap
    if cap is not None and cap > 0:
        assert rot, "a softcapped bridge without hook_rot_q: no raw score to compare with"
        raw = torch.einsum("hid,hjd->hij", q, k) * scaling
        # the reference itself: the softcap of the raw score is the model's own score
        capped = torch.where(masked, final, cap * torch.tanh(raw / cap))
        assert torch.allclose(capped, final, atol=1e-9 if raw.dtype == torch.float64 else 1e-4)
    else:
        raw = final.clone()
    return raw.masked_fill(masked, float("nan")), final, scales
