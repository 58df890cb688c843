"""The bundled toy models: architecture, training and dictionary settings, one recipe each.

A recipe is everything needed to rebuild a shipped model from nothing with
``python -m qk_lens.toy.train --model NAME`` (fixed seeds; a few minutes on 2 CPU cores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qk_lens.toy.tokenizer import WORDS, vocab_size


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
class TranscoderRecipe:
    """A TopK per-layer transcoder on every MLP (``mlp_input`` → ``mlp_out``), trained here."""

    d_transcoder: int = 1024
    k: int = 16
    steps: int = 2000
    batch_tokens: int = 1024
    lr: float = 2e-3
    seed: int = 2


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    normalization_type: str  # "LN" or "RMS"
    positional_embedding_type: str  # "standard" or "rotary"
    # "repeats": random words with a repeated segment (qk_lens.toy.data); "casebook": the
    # case-study grammar (qk_lens.toy.casebook_corpus)
    corpus: str = "repeats"
    attn_only: bool = True
    d_mlp: int | None = None
    act_fn: str | None = None
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
    transcoder: TranscoderRecipe | None = None
    # casebook corpus: how many times an item's answer counts in the loss (answers are ~1 word
    # in 15; without it the cases are learned late)
    answer_weight: float = 1.0
    # torch threads while training the model: the summation order, hence the weights, depend on it
    threads: int = 1

    def hooked_config(self) -> dict[str, Any]:
        """Keyword arguments of ``HookedTransformerConfig`` (JSON-serializable)."""
        cfg: dict[str, Any] = dict(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            n_ctx=self.n_ctx,
            d_vocab=vocab_size(self.words()),
            attn_only=self.attn_only,
            act_fn=self.act_fn,
            normalization_type=self.normalization_type,
            positional_embedding_type=self.positional_embedding_type,
            seed=self.seed,
            model_name=self.name,
            default_prepend_bos=True,
        )
        if not self.attn_only:
            cfg["d_mlp"] = self.d_mlp
        if self.positional_embedding_type == "rotary":
            cfg["rotary_dim"] = self.d_head
        return cfg

    def words(self) -> tuple[str, ...]:
        """The tokenizer's words (after the specials)."""
        if self.corpus == "casebook":
            from qk_lens.toy.casebook_corpus import vocabulary

            return vocabulary()
        return WORDS

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
        Recipe(
            name="casebook",
            description=(
                "4-layer GPT-2-style model with MLPs (LayerNorm, learned positions, GELU) trained "
                "on the casebook grammar: induction over titled names, antonyms, multiple "
                "choice, color checks and sum checks"
            ),
            normalization_type="LN",
            positional_embedding_type="standard",
            corpus="casebook",
            attn_only=False,
            d_mlp=512,
            act_fn="gelu_new",
            n_layers=4,
            d_model=128,
            n_heads=4,
            d_head=32,
            n_ctx=64,
            # 4,500 steps, and 1,000 for each dictionary: the whole recipe within 45 minutes on
            # 2 cores (0.31 s a step here)
            steps=4500,
            batch_size=64,
            lr=3e-3,
            weight_decay=0.1,
            answer_weight=5.0,
            threads=2,
            sae=SAERecipe(d_sae=1024, k=16, steps=1000, batch_tokens=1024, lr=2e-3, seed=1),
            transcoder=TranscoderRecipe(steps=1000),
        ),
    )
}
DEFAULT_MODEL = "attn2-ln"
