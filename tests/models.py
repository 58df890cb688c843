"""One model factory over both kinds of model qk_lens attaches to.

* HookedTransformer variants (``tests/archs.py``): stack (a) only, TransformerLens 4 has none.
* TransformerBridge models of Hugging Face classes (``tests/bridges.py``): both stacks.

``MODEL_NAMES`` lists what this stack can build; a test parametrized over it runs every model
kind the installed TransformerLens has. ``BRIDGE_CORE`` is a subset of the bridges covering
each wiring difference (learned positions, parallel + partial rotary, GQA with biases, qk-norm,
softcap + sliding window + pre/post norms) for the slower tests.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

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
