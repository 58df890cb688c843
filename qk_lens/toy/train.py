"""Train a bundled toy model and its dictionaries from nothing: ``python -m qk_lens.toy.train``.

Stages (each reproducible from the recipe's fixed seeds):
1. the model, on its corpus: repeated-segment sequences (``qk_lens.toy.data``), evaluated on
   held-out sequences (induction and previous-token attention per head, loss on repeated vs
   fresh tokens), or the casebook grammar (``qk_lens.toy.casebook_corpus``), evaluated by
   held-out accuracy per case;
2. a TopK SAE with SAELens on ``blocks.L.hook_resid_pre`` of every layer;
3. for models with MLPs, a TopK transcoder per layer (circuit-tracer's format);
4. feature labels from probe data (``qk_lens.labels``), with the casebook's roles.
Everything is written to the model's directory (safetensors + JSON; SAEs in SAELens's format).
"""

from __future__ import annotations

import json
import math
import shutil
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
from qk_lens.toy import TRANSCODER_DIR
from qk_lens.toy.data import RepeatSpec, repeated_batch
from qk_lens.toy.recipes import Recipe
from qk_lens.toy.tokenizer import BOS, SPECIALS, WORDS, build_tokenizer, token_ids

MODELS_DIR = Path(__file__).parent / "models"
# held-out data never shares a seed with training data
EVAL_SEED = 12345
WORD_IDS = torch.arange(len(SPECIALS), len(SPECIALS) + len(WORDS))
BOS_ID = SPECIALS.index(BOS)


class Stream:
    """Endless batches of training text for a recipe's corpus, reproducible from a seed.

    ``next(n)`` gives token ids ``[n, n_ctx]`` and loss weights ``[n, n_ctx − 1]`` for the
    next-token targets: on the repeats corpus 1 through the copy and 0 on the filler after it; on
    the casebook corpus ``answer_weight`` on each item's answer and 1 elsewhere.
    """

    def __init__(
        self,
        recipe: Recipe,
        seed: int,
        held_out: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.recipe = recipe
        self.n_ctx = recipe.n_ctx
        if recipe.corpus == "casebook":
            from qk_lens.toy.casebook_corpus import Grammar

            self.grammar = Grammar(seed, held_out=held_out)
            self.ids = token_ids(recipe.words())
        elif recipe.corpus == "repeats":  # a caller's generator: its other draws interleave
            self.gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        else:
            raise ValueError(f"unknown corpus {recipe.corpus!r}; corpora: repeats, casebook")

    def roles(self, n: int) -> tuple[Int[Tensor, "n n_ctx"], Int[Tensor, "n n_ctx"], list[str]]:
        """``n`` casebook texts with each token's role (an index into the returned names, -1
        for none; BOS has none)."""
        if self.recipe.corpus != "casebook":
            raise ValueError("only the casebook corpus annotates roles")
        docs = [self.grammar.document(self.n_ctx) for _ in range(n)]
        names = sorted({r for d in docs for r in d.roles if r is not None})
        index = {r: i for i, r in enumerate(names)}
        tokens = torch.tensor([[BOS_ID] + [self.ids[w] for w in d.words] for d in docs])
        roles = torch.tensor([[-1] + [index.get(r, -1) for r in d.roles] for d in docs])
        return tokens, roles, names

    def next(self, n: int) -> tuple[Int[Tensor, "n n_ctx"], Tensor]:
        if self.recipe.corpus == "repeats":
            batch = repeated_batch(n, WORD_IDS, BOS_ID, self.gen, RepeatSpec(n_ctx=self.n_ctx))
            return batch.tokens, batch.scored[:, 1:].float()
        docs = [self.grammar.document(self.n_ctx) for _ in range(n)]
        tokens = torch.tensor([[BOS_ID] + [self.ids[w] for w in d.words] for d in docs])
        answers = torch.tensor([d.answers for d in docs])
        return tokens, 1 + (self.recipe.answer_weight - 1) * answers.float()


def new_model(recipe: Recipe) -> HookedTransformer:
    torch.manual_seed(recipe.seed)
    return HookedTransformer(HookedTransformerConfig(**recipe.hooked_config()))


def _norm(x: Tensor, norm: Any, kind: str) -> Tensor:
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.w + norm.b
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.w


# TransformerLens's activations (gelu_new is GPT-2's tanh approximation)
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def training_logits(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """``model(tokens)`` for the toy recipes' architecture, with fused kernels (one QKV matmul,
    ``scaled_dot_product_attention``) and no hooks: 1.3–1.6× faster per training step on CPU.

    It reads and trains the model's own parameters; ``tests/test_toy.py`` checks it against
    ``model(tokens)``.
    """
    arch = arch_of(model)
    norm = arch.layer(0).attn_in.kind
    if norm not in ("LN", "RMS"):
        raise ValueError("training_logits supports models with LN or RMS norms")
    act = model.cfg.act_fn
    if not arch.attn_only and (act not in _ACTIVATIONS or model.cfg.gated_mlp):
        raise ValueError(
            f"training_logits supports ungated MLPs with act_fn in {sorted(_ACTIVATIONS)}, "
            f"not act_fn={act!r}, gated_mlp={model.cfg.gated_mlp}"
        )
    if arch.positional not in ("standard", "rotary"):
        raise ValueError(f"unsupported positional embedding {arch.positional!r}")
    batch, seq = tokens.shape
    if torch.get_num_threads() > 1 and torch.is_grad_enabled():
        # a one-hot product: its backward is a matrix product, the same from run to run at a
        # given thread count, where the gather's (an accumulating index_put) sums in whatever
        # order the threads finish; the same values forward
        x = F.one_hot(tokens, model.cfg.d_vocab).to(model.embed.W_E.dtype) @ model.embed.W_E
    else:  # one thread is deterministic as it is (the attn2 recipes' weights were built so)
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
        if not arch.attn_only:
            mlp = block.mlp
            h = _ACTIVATIONS[act](_norm(x, block.ln2, norm) @ mlp.W_in + mlp.b_in)
            x = x + h @ mlp.W_out + mlp.b_out
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
    """Next-token training on the recipe's corpus; returns the model and its loss curve.

    Runs on ``recipe.threads`` CPU threads: the summation order of the matrix products depends on
    the thread count, and the recipe promises the same weights on every run.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    # On several threads training_logits embeds by a one-hot product (the gather's backward sums
    # in thread order); deterministic kernels stay on as well, as the shipped casebook weights
    # were trained (one thread is deterministic as it is: the attn2 recipes' weights)
    torch.use_deterministic_algorithms(deterministic or recipe.threads > 1)
    try:
        return _train_model(recipe, steps, progress)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train_model(
    recipe: Recipe, steps: int | None, progress: bool
) -> tuple[HookedTransformer, list[float]]:
    model = new_model(recipe)
    steps = recipe.steps if steps is None else steps
    stream = Stream(recipe, recipe.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(recipe, s, steps))
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=f"training {recipe.name}", disable=not progress):
        tokens, weights = stream.next(recipe.batch_size)
        logits = training_logits(model, tokens)[:, :-1]
        if recipe.corpus == "repeats":  # the filler after the copy is not trained on
            scored = weights.bool()
            loss = F.cross_entropy(logits[scored], tokens[:, 1:][scored])
        else:
            nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
            loss = (nll * weights).sum() / weights.sum()
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


def item_tokens(items: list[Any], words: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Prompts of casebook items as one right-padded batch, and each prompt's last position."""
    ids = token_ids(words)
    rows = [[BOS_ID] + [ids[w] for w in it.words[:-1]] for it in items]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), BOS_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens, torch.tensor([len(r) - 1 for r in rows])


@torch.no_grad()
def evaluate_cases(model: Any, recipe: Recipe, n: int = 500, seed: int = EVAL_SEED) -> dict:
    """Accuracy of the top prediction on ``n`` held-out items per case (the model's own forward;
    padding is on the right, so causal attention never sees it)."""
    from qk_lens.toy.casebook_corpus import CASES, held_out_items

    ids = token_ids(recipe.words())
    out = {}
    for case in CASES:
        items = held_out_items(case, n, seed=seed)
        tokens, last = item_tokens(items, recipe.words())
        logits = model(tokens)[torch.arange(n), last]
        answers = torch.tensor([ids[it.answer] for it in items])
        out[case] = round(float((logits.argmax(-1) == answers).float().mean()), 4)
    return {"n_per_case": n, "held_out_accuracy": out}


@torch.no_grad()
def check_margins(model: Any, recipe: Recipe) -> dict:
    """How decidedly the checks are answered: the yes − no logit after "?" of every color
    check (each object with each color) and of every sum check with a stated sum within 3 of
    the right one: the true checks of held-out objects and operand pairs one by one, of the
    checked ones as their mean and minimum, and the false checks' (all objects, all pairs)
    mean and maximum.

    Accuracy only says whether a held-out object's true checks land above zero; a model that
    checks a table of objects rather than comparing the stated color with the recalled one
    gives its held-out objects margins far below the checked ones' (docs/casebook.md §4).
    """
    from qk_lens.toy.casebook_corpus import (
        COLOR_WORDS,
        COLORS,
        N_LEFT,
        N_NUMBERS,
        N_RIGHT,
        color_check,
        held_out_objects,
        held_out_sums,
        sum_check,
    )

    ids = token_ids(recipe.words())
    yes, no = ids["yes"], ids["no"]

    def summary(checks: list[tuple[str, bool, Any]]) -> dict:
        """checks: (key, held out, the check's item)."""
        tokens = torch.tensor([[BOS_ID] + [ids[w] for w in it.words[:-1]] for *_, it in checks])
        logits = model(tokens)[:, -1]  # every check of a kind has the same length
        margins = (logits[:, yes] - logits[:, no]).tolist()
        rows = [
            (k, h, it.answer == "yes", m) for (k, h, it), m in zip(checks, margins, strict=True)
        ]
        held = {k: round(m, 2) for k, h, t, m in rows if h and t}
        checked = [m for _, h, t, m in rows if not h and t]
        false = [m for _, h, t, m in rows if not t]
        return {
            "held_out_true": held,
            "checked_true_mean": round(sum(checked) / len(checked), 2),
            "checked_true_min": round(min(checked), 2),
            "false_mean": round(sum(false) / len(false), 2),
            "false_max": round(max(false), 2),
        }

    held_objects, held_sums = set(held_out_objects()), held_out_sums()
    colors = summary(
        [(o, o in held_objects, color_check(o, c)) for o, _ in COLORS for c in COLOR_WORDS]
    )
    sums = summary(
        [
            (f"{a} + {b}", (a, b) in held_sums, sum_check(a, b, c))
            for a in range(N_LEFT)
            for b in range(N_RIGHT)
            for c in range(max(0, a + b - 3), min(N_NUMBERS, a + b + 4))
        ]
    )
    return {"colors": colors, "sums": sums}


def save_model(
    model: HookedTransformer, recipe: Recipe, directory: Path, extra: dict[str, Any]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    build_tokenizer(directory / "tokenizer", recipe.words())
    config = {
        "name": recipe.name,
        "description": recipe.description,
        "hooked_transformer_config": recipe.hooked_config(),
        "recipe": recipe.to_dict(),
        **extra,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def activation_batches(
    model: HookedTransformer,
    hook: str,
    batch_tokens: int,
    seed: int,
    recipe: Recipe,
) -> Iterator[Tensor]:
    """Endless shuffled batches of ``hook`` activations on fresh text of the recipe's corpus."""
    gen = torch.Generator().manual_seed(seed)
    stream = Stream(recipe, seed, generator=gen)
    n_seq = 16 * math.ceil(batch_tokens / recipe.n_ctx)  # one forward feeds ~16 steps
    while True:
        tokens, _ = stream.next(n_seq)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=hook)
        acts = cache[hook].reshape(-1, cache[hook].shape[-1]).float()
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
        batches = activation_batches(model, hook, r.batch_tokens, r.seed + 100 + layer, recipe)
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
        # SAELens writes cfg.json's keys in set order, which varies between processes: sorted,
        # a rebuild is the same file byte for byte
        cfg_path = path / "cfg.json"
        cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()), sort_keys=True))
        inference = SAE.load_from_disk(str(path))
        held_out = activation_batches(model, hook, r.batch_tokens, EVAL_SEED + layer, recipe)
        figures[hook] = evaluate_sae(inference, held_out)
        figures[hook]["seconds"] = round(time.perf_counter() - t0, 1)
    return figures


def transcoder_batches(
    model: HookedTransformer, layer: int, batch_tokens: int, seed: int, recipe: Recipe
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled batches of (MLP input, MLP output) at ``layer``, BOS positions left out
    (the transcoders zero them, as circuit-tracer does). The MLP input is the ``mlp_input``
    point: ``ln2``'s output."""
    gen = torch.Generator().manual_seed(seed)
    stream = Stream(recipe, seed)
    n_seq = 16 * math.ceil(batch_tokens / recipe.n_ctx)
    names = (f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out")
    while True:
        tokens, _ = stream.next(n_seq)
        with torch.no_grad():
            _, cache = model.run_with_cache(
                tokens, names_filter=lambda n: n in names, stop_at_layer=layer + 1
            )
            # the block's own norm module gives its MLP's input, whatever kind of norm it is
            x = model.blocks[layer].ln2(cache[names[0]])[:, 1:].reshape(-1, model.cfg.d_model)
            y = cache[names[1]][:, 1:].reshape(-1, model.cfg.d_model)
            x, y = x.float(), y.float()
        order = torch.randperm(len(x), generator=gen)
        x, y = x[order], y[order]
        for start in range(0, len(x) - batch_tokens + 1, batch_tokens):
            yield x[start : start + batch_tokens], y[start : start + batch_tokens]


def _topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> Tensor:
    from qk_lens.transcoders import topk_activation  # the inference formula, so they agree

    return topk_activation(x @ W_enc + b_enc, k)


def train_transcoders(
    model: HookedTransformer, recipe: Recipe, directory: Path, steps: int | None = None
) -> dict[str, dict[str, Any]]:
    """A TopK transcoder per layer (``mlp_input`` → ``mlp_out``), trained with Adam on the
    normalized squared error, decoder rows kept at unit norm; saved in circuit-tracer's format
    under ``directory/transcoders``. Returns held-out figures per layer."""
    from qk_lens.transcoders import Transcoders

    r = recipe.transcoder
    if r is None:
        raise ValueError(f"recipe {recipe.name!r} has no transcoder recipe")
    steps = r.steps if steps is None else steps
    d, n = model.cfg.d_model, r.d_transcoder
    weights: dict[str, list[Tensor]] = {"W_enc": [], "b_enc": [], "W_dec": [], "b_dec": []}
    figures = {}
    for layer in range(model.cfg.n_layers):
        t0 = time.perf_counter()
        torch.manual_seed(r.seed + layer)
        batches = transcoder_batches(model, layer, r.batch_tokens, r.seed + 200 + layer, recipe)
        x0, y0 = next(batches)
        W_dec = torch.randn(n, d)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        # encoder starts as the decoder's transpose, scaled to the input's size (as SAELens does)
        W_enc = (W_dec.T * (y0.norm(dim=-1).mean() / x0.norm(dim=-1).mean())).clone()
        params = [p.requires_grad_() for p in (W_enc, torch.zeros(n), W_dec, y0.mean(0))]
        opt = torch.optim.Adam(params, lr=r.lr)
        scale = (y0 - y0.mean(0)).pow(2).sum(-1).mean()
        for _ in tqdm(range(steps), desc=f"transcoder L{layer}", leave=False):
            x, y = next(batches)
            acts = _topk_encode(x, params[0], params[1], r.k)
            loss = (acts @ params[2] + params[3] - y).pow(2).sum(-1).mean() / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                params[2] /= params[2].norm(dim=-1, keepdim=True)
        for name, p in zip(weights, params, strict=True):
            weights[name].append(p.detach().clone())
        held_out = transcoder_batches(model, layer, r.batch_tokens, EVAL_SEED + 50 + layer, recipe)
        xs, ys = zip(*(next(held_out) for _ in range(8)), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        with torch.no_grad():
            acts = _topk_encode(x, params[0], params[1], r.k)
            err = (acts @ params[2] + params[3] - y).pow(2).sum()
        figures[f"layer_{layer}"] = {
            "variance_explained": round(float(1 - err / (y - y.mean(0)).pow(2).sum()), 4),
            "dead_features": int(((acts != 0).sum(0) == 0).sum()),
            "n_tokens": len(x),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    tc = Transcoders(
        name=f"{recipe.name}-transcoders", cross_layer=False, input_point="mlp_input",
        output_point="mlp_out", activation="topk", k=r.k, model_name=recipe.name, **weights,
    )  # fmt: skip
    target = directory / TRANSCODER_DIR
    if target.exists():
        shutil.rmtree(target)
    tc.save_circuit_tracer(target)
    return figures


def probe_tokens(
    recipe: Recipe, n_sequences: int
) -> tuple[Tensor, Tensor | None, list[str] | None]:
    """Fresh probe texts for labels (a seed training never uses): tokens, and on the casebook
    each token's role."""
    stream = Stream(recipe, EVAL_SEED + 7)
    if recipe.corpus == "casebook":
        return stream.roles(n_sequences)
    return stream.next(n_sequences)[0], None, None


def token_classes(recipe: Recipe) -> dict[str, tuple[str, ...]] | None:
    """The corpus's classes of words for labels (the casebook's; None for random words)."""
    if recipe.corpus != "casebook":
        return None
    from qk_lens.toy.casebook_corpus import WORD_CLASSES

    return WORD_CLASSES


def label_saes(model: Any, recipe: Recipe, n_sequences: int = 512) -> dict[str, LabelSet]:
    """Labels for every dictionary of an attached model, from held-out probe sequences."""
    from qk_lens.labels import label_dictionary

    tokens, roles, names = probe_tokens(recipe, n_sequences)
    classes = token_classes(recipe)
    return {
        d.hook_name: label_dictionary(
            model, d, tokens, roles=roles, role_names=names, token_classes=classes
        )
        for d in model.qk_dictionaries.values()
    }


def label_transcoders(
    model: HookedTransformer, tc: Any, recipe: Recipe, n_sequences: int = 512
) -> dict[int, LabelSet]:
    """Labels for every layer's transcoder features, from the same probe sequences."""
    from qk_lens.labels import label_features
    from qk_lens.toy.tokenizer import SPECIALS

    tokens, roles, names = probe_tokens(recipe, n_sequences)
    hooks = [f"blocks.{layer}.hook_resid_mid" for layer in range(tc.n_layers)]
    prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    token_names = [*SPECIALS, *recipe.words()]
    out = {}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
        xs = [model.blocks[i].ln2(cache[h]) for i, h in enumerate(hooks)]  # each MLP's input
    for layer, x in enumerate(xs):
        acts = tc.encode(layer, x.reshape(-1, model.cfg.d_model)).reshape(*tokens.shape, -1)
        acts[:, : tc.zero_positions] = 0  # inactive at BOS, as in the split
        out[layer] = label_features(
            acts.reshape(-1, acts.shape[-1]), tokens.reshape(-1), prev.reshape(-1),
            positions.reshape(-1), token_names,
            roles=None if roles is None else roles.reshape(-1), role_names=names,
            token_classes=token_classes(recipe),
        )  # fmt: skip
    return out


def _update_config(directory: Path, **entries: Any) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(entries)
    path.write_text(json.dumps(config, indent=2) + "\n")


STAGES = ("model", "saes", "transcoders", "labels")


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
        if recipe.corpus == "repeats":
            metrics = evaluate_model(model)
        else:
            metrics = evaluate_cases(model, recipe)
            metrics["check_margins"] = check_margins(model, recipe)
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
    if "transcoders" in stages and recipe.transcoder is not None:
        from qk_lens.toy import load_model

        model = load_model(out, dictionaries=False, bridge=False)
        figures = train_transcoders(model, recipe, out, steps=sae_steps)
        _update_config(out, transcoders=figures)
        yield {"transcoders": figures}
    if "labels" in stages:
        from qk_lens.toy import LABELS_FILE, load_model

        model = load_model(out, bridge=False)
        label_sets = label_saes(model, recipe, n_sequences=probe_sequences)
        summary = {}
        for hook, labels in label_sets.items():
            labels.save(out / "saes" / hook / LABELS_FILE)
            summary[hook] = labels.frame()["kind"].value_counts().to_dict()
        tc = model.qk_transcoders
        if tc is not None:
            for layer, labels in label_transcoders(model, tc, recipe, probe_sequences).items():
                labels.save(out / TRANSCODER_DIR / f"labels_{layer}.json")
                summary[f"transcoder layer {layer}"] = (
                    labels.frame()["kind"].value_counts().to_dict()
                )
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
