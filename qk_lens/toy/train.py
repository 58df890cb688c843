"""Train a bundled toy model and its dictionaries from nothing: ``python -m qk_lens.toy.train``.

Stages (each reproducible from the recipe's fixed seeds):
1. the model, on repeated-segment sequences (see ``qk_lens.toy.data``), evaluated on held-out
   sequences: induction and previous-token attention per head, loss on repeated vs fresh tokens;
2. a TopK SAE with SAELens on ``blocks.L.hook_resid_pre`` of every layer;
3. feature labels from probe data (``qk_lens.labels``).
Everything is written to the model's directory (safetensors + JSON; SAEs in SAELens's format).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

try:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError as e:  # TransformerLens 4: no HookedTransformer, no SAELens beside it
    raise ImportError(
        "training the toy models needs HookedTransformer and SAELens's trainer (TransformerLens "
        "3.x with SAELens: pip install 'qk_lens[saelens]'); the models it trains then load as "
        f"bridges on TransformerLens 4 too ({e})"
    ) from e

from qk_lens.arch import arch_of
from qk_lens.labels import LabelSet
from qk_lens.toy.data import RepeatSpec, repeated_batch
from qk_lens.toy.recipes import Recipe
from qk_lens.toy.tokenizer import BOS, SPECIALS, WORDS, build_tokenizer

MODELS_DIR = Path(__file__).parent / "models"
# held-out data never shares a seed with training data
EVAL_SEED = 12345
WORD_IDS = torch.arange(len(SPECIALS), len(SPECIALS) + len(WORDS))
BOS_ID = SPECIALS.index(BOS)


def new_model(recipe: Recipe) -> HookedTransformer:
    torch.manual_seed(recipe.seed)
    return HookedTransformer(HookedTransformerConfig(**recipe.hooked_config()))


def _norm(x: Tensor, norm: Any, kind: str) -> Tensor:
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.w + norm.b
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.w


def training_logits(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """``model(tokens)`` for the toy recipes' architecture, with fused kernels (one QKV matmul,
    ``scaled_dot_product_attention``) and no hooks: 1.3–1.6× faster per training step on CPU.

    It reads and trains the model's own parameters; ``tests/test_toy.py`` checks it against
    ``model(tokens)``.
    """
    arch = arch_of(model)
    norm = arch.layer(0).attn_in.kind
    if not arch.attn_only or norm not in ("LN", "RMS"):
        raise ValueError("training_logits supports attention-only models with LN or RMS norms")
    if arch.positional not in ("standard", "rotary"):
        raise ValueError(f"unsupported positional embedding {arch.positional!r}")
    batch, seq = tokens.shape
    x = model.embed.W_E[tokens]
    if arch.positional == "standard":
        x = x + model.pos_embed.W_pos[:seq]
    for block in model.blocks:
        attn = block.attn
        h = _norm(x, block.ln1, norm)
        w_qkv = torch.cat([attn.W_Q, attn.W_K, attn.W_V], dim=0)  # [3*head, d_model, d_head]
        b_qkv = torch.cat([attn.b_Q, attn.b_K, attn.b_V], dim=0)
        qkv = torch.einsum("bpm,nmd->bpnd", h, w_qkv) + b_qkv
        q, k, v = qkv.split(arch.n_heads, dim=2)  # each [batch, pos, head, d_head]
        if arch.positional == "rotary":
            q, k = attn.apply_rotary(q), attn.apply_rotary(k)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=1.0 / attn.attn_scale,
        )  # [batch, head, pos, d_head]
        x = x + torch.einsum("bnpd,ndm->bpm", z, attn.W_O) + attn.b_O
    x = _norm(x, model.ln_final, norm)
    return x @ model.unembed.W_U + model.unembed.b_U


def _lr_factor(recipe: Recipe, step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to ``final_lr_fraction``."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, steps - recipe.warmup_steps)
    lo = recipe.final_lr_fraction
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_model(
    recipe: Recipe, steps: int | None = None, progress: bool = True
) -> tuple[HookedTransformer, list[float]]:
    """Next-token training on repeated-segment sequences; returns the model and its loss curve.

    Runs on one CPU thread: multi-threaded backward passes sum in a varying order, and the
    recipe promises the same weights on every run (the model is too small to gain from more).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_model(recipe, steps, progress)
    finally:
        torch.set_num_threads(threads)


def _train_model(
    recipe: Recipe, steps: int | None, progress: bool
) -> tuple[HookedTransformer, list[float]]:
    model = new_model(recipe)
    steps = recipe.steps if steps is None else steps
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    spec = RepeatSpec(n_ctx=recipe.n_ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(recipe, s, steps))
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=f"training {recipe.name}", disable=not progress):
        batch = repeated_batch(recipe.batch_size, WORD_IDS, BOS_ID, gen, spec)
        logits = training_logits(model, batch.tokens)[:, :-1]
        scored = batch.scored[:, 1:]  # the filler after the copy is not trained on
        loss = F.cross_entropy(logits[scored], batch.tokens[:, 1:][scored])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return model, losses


@torch.no_grad()
def evaluate_model(model: HookedTransformer, n: int = 512, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Held-out figures: per-head previous-token and induction attention, loss by token kind."""
    gen = torch.Generator().manual_seed(seed)
    batch = repeated_batch(n, WORD_IDS, BOS_ID, gen, RepeatSpec(n_ctx=model.cfg.n_ctx))
    logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda h: "pattern" in h)
    nll = -F.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    repeated = batch.repeated[:, 1:]
    fresh = batch.scored[:, 1:] & ~repeated  # the words before the copy, and the copy's first
    pos = torch.arange(model.cfg.n_ctx)
    has_target = batch.induction_target >= 0
    prev_token, induction = [], []
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer]  # [batch, head, q, k]
        prev = pattern[:, :, pos[1:], pos[:-1]].mean((0, 2))
        b, q = has_target.nonzero(as_tuple=True)
        ind = pattern[b, :, q, batch.induction_target[b, q]].mean(0)
        prev_token.append([round(float(v), 4) for v in prev])
        induction.append([round(float(v), 4) for v in ind])
    return {
        "n_sequences": n,
        "loss_repeated": round(float(nll[repeated].mean()), 4),
        "loss_fresh": round(float(nll[fresh].mean()), 4),
        "log_vocab_words": round(math.log(len(WORDS)), 4),
        "previous_token_attention": prev_token,
        "induction_attention": induction,
    }


def save_model(
    model: HookedTransformer, recipe: Recipe, directory: Path, extra: dict[str, Any]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    build_tokenizer(directory / "tokenizer")
    config = {
        "name": recipe.name,
        "description": recipe.description,
        "hooked_transformer_config": recipe.hooked_config(),
        "recipe": recipe.to_dict(),
        **extra,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def activation_batches(
    model: HookedTransformer, hook: str, batch_tokens: int, seed: int, n_ctx: int
) -> Iterator[Tensor]:
    """Endless shuffled batches of ``hook`` activations on fresh repeated-segment sequences."""
    gen = torch.Generator().manual_seed(seed)
    n_seq = 16 * math.ceil(batch_tokens / n_ctx)  # one forward feeds ~16 steps
    while True:
        tokens = repeated_batch(n_seq, WORD_IDS, BOS_ID, gen, RepeatSpec(n_ctx=n_ctx)).tokens
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=hook)
        acts = cache[hook].reshape(-1, model.cfg.d_model).float()
        acts = acts[torch.randperm(len(acts), generator=gen)]
        for start in range(0, len(acts) - batch_tokens + 1, batch_tokens):
            yield acts[start : start + batch_tokens]


@torch.no_grad()
def evaluate_sae(sae: SAE, batches: Iterator[Tensor], n_batches: int = 8) -> dict[str, Any]:
    """Held-out reconstruction: variance explained, L0, features never active."""
    x = torch.cat([next(batches) for _ in range(n_batches)])
    acts = sae.encode(x)
    recon = sae.decode(acts)
    resid_var = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return {
        "variance_explained": round(float(1 - resid_var), 4),
        "l0": round(float((acts > 0).sum(-1).float().mean()), 3),
        "dead_features": int(((acts > 0).sum(0) == 0).sum()),
        "n_tokens": len(x),
    }


def train_saes(
    model: HookedTransformer,
    recipe: Recipe,
    directory: Path,
    steps: int | None = None,
) -> dict[str, dict[str, Any]]:
    """A TopK SAE with SAELens on every layer's ``hook_resid_pre``, saved in SAELens's format
    under ``directory/saes/<hook>/``; returns held-out figures per hook."""
    from sae_lens import SAE, SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    r = recipe.sae
    steps = r.steps if steps is None else steps
    figures = {}
    for layer in range(model.cfg.n_layers):
        hook = f"blocks.{layer}.hook_resid_pre"
        t0 = time.perf_counter()
        torch.manual_seed(r.seed + layer)
        cfg = TopKTrainingSAEConfig(
            d_in=model.cfg.d_model,
            d_sae=r.d_sae,
            k=r.k,
            dtype="float32",
            device="cpu",
            metadata=SAEMetadata(hook_name=hook, model_name=recipe.name),
        )
        sae = TopKTrainingSAE(cfg)
        batches = activation_batches(
            model, hook, r.batch_tokens, r.seed + 100 + layer, model.cfg.n_ctx
        )
        trainer = SAETrainer(
            cfg=SAETrainerConfig(
                total_training_samples=steps * r.batch_tokens,
                train_batch_size_samples=r.batch_tokens,
                lr=r.lr,
                lr_end=r.lr,
                lr_decay_steps=steps // 5,
                dead_feature_window=500,
                feature_sampling_window=1000,
            ),
            sae=sae,
            data_provider=batches,
        )
        trained = trainer.fit()
        path = directory / "saes" / hook
        trained.save_inference_model(path)
        inference = SAE.load_from_disk(str(path))
        held_out = activation_batches(
            model, hook, r.batch_tokens, EVAL_SEED + layer, model.cfg.n_ctx
        )
        figures[hook] = evaluate_sae(inference, held_out)
        figures[hook]["seconds"] = round(time.perf_counter() - t0, 1)
    return figures


def label_saes(model: Any, recipe: Recipe, n_sequences: int = 512) -> dict[str, LabelSet]:
    """Labels for every dictionary of an attached model, from held-out probe sequences."""
    from qk_lens.labels import label_dictionary

    gen = torch.Generator().manual_seed(EVAL_SEED + 7)
    tokens = repeated_batch(
        n_sequences, WORD_IDS, BOS_ID, gen, RepeatSpec(n_ctx=recipe.n_ctx)
    ).tokens
    return {d.hook_name: label_dictionary(model, d, tokens) for d in model.qk_dictionaries.values()}


def _update_config(directory: Path, **entries: Any) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(entries)
    path.write_text(json.dumps(config, indent=2) + "\n")


STAGES = ("model", "saes", "labels")


def build(
    recipe: Recipe,
    out: Path,
    stages: Iterable[str] = STAGES,
    steps: int | None = None,
    sae_steps: int | None = None,
    probe_sequences: int = 512,
) -> Iterator[dict[str, Any]]:
    """Run ``stages`` of ``recipe`` into ``out`` (the model's directory), yielding each stage's
    summary as it finishes (also recorded in ``out/config.json``)."""
    stages = list(stages)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    if "model" in stages:
        t0 = time.perf_counter()
        model, losses = train_model(recipe, steps=steps)
        seconds = time.perf_counter() - t0
        metrics = evaluate_model(model)
        training = {
            "steps": len(losses),
            "seconds": round(seconds, 1),
            "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
            "torch": torch.__version__,
        }
        save_model(model, recipe, out, {"training": training, "metrics": metrics})
        yield {"training": training, "metrics": metrics}
    if "saes" in stages:
        from qk_lens.toy import load_model

        model = load_model(out, dictionaries=False)
        figures = train_saes(model, recipe, out, steps=sae_steps)
        _update_config(out, saes=figures)
        yield {"saes": figures}
    if "labels" in stages:
        from qk_lens.toy import LABELS_FILE, load_model

        model = load_model(out)
        label_sets = label_saes(model, recipe, n_sequences=probe_sequences)
        summary = {}
        for hook, labels in label_sets.items():
            labels.save(out / "saes" / hook / LABELS_FILE)
            summary[hook] = labels.frame()["kind"].value_counts().to_dict()
        _update_config(out, labels=summary)
        yield {"labels": summary}


if __name__ == "__main__":
    # The command lives with the others (``qk-lens train``); this entry point stays for a release.
    import runpy
    import warnings

    warnings.warn(
        "`python -m qk_lens.toy.train` is deprecated; use `qk-lens train` (or `python -m qk_lens "
        "train`)",
        DeprecationWarning,
        stacklevel=1,
    )
    sys.argv[1:1] = ["train"]
    runpy.run_module("qk_lens", run_name="__main__", alter_sys=True)
