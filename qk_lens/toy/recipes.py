"""The bundled toy models: architecture, training and dictionary settings, one recipe each.

A recipe is everything needed to rebuild a shipped model from nothing with
``python -m qk_lens.toy.train --model NAME`` (fixed seeds; a few minutes on 2 CPU cores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qk_lens.toy.tokenizer import vocab_size


@dataclass(frozen=True)
class SAERecipe:
    """A TopK SAE on ``blocks.L.hook_resid_pre`` of every layer, trained with SAELens."""

    d_sae: int = 256
    k: int = 4
    steps: int = 3000
    batch_tokens: int = 1024
    lr: float = 3e-3
    seed: int = 1


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    normalization_type: str  # "LN" or "RMS"
    positional_embedding_type: str  # "standard" or "rotary"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    n_ctx: int = 48
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of lr
    seed: int = 0
    sae: SAERecipe = field(default_factory=SAERecipe)

    def hooked_config(self) -> dict[str, Any]:
        """Keyword arguments of ``HookedTransformerConfig`` (JSON-serializable)."""
        cfg: dict[str, Any] = dict(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            n_ctx=self.n_ctx,
            d_vocab=vocab_size(),
            attn_only=True,
            act_fn=None,
            normalization_type=self.normalization_type,
            positional_embedding_type=self.positional_embedding_type,
            seed=self.seed,
            model_name=self.name,
            default_prepend_bos=True,
        )
        if self.positional_embedding_type == "rotary":
            cfg["rotary_dim"] = self.d_head
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="attn2-ln",
            description="2-layer attention-only, LayerNorm, learned positional embeddings",
            normalization_type="LN",
            positional_embedding_type="standard",
        ),
        Recipe(
            name="attn2-rope",
            description="2-layer attention-only, RMSNorm, rotary embeddings (no learned positions)",
            normalization_type="RMS",
            positional_embedding_type="rotary",
        ),
    )
}
DEFAULT_MODEL = "attn2-ln"
