"""A tiny offline stand-in for the Hugging Face hub repos behind ``from_pretrained("gpt2")``.

``populate_fake_hub(cache_dir)`` writes a hub cache (the layout huggingface_hub reads with
``HF_HUB_OFFLINE=1``) holding, under the real ids that TransformerLens and SAELens resolve to:

* ``gpt2`` -- what ``transformer_lens.loading_from_pretrained.get_official_model_name("gpt2")``
  returns (TransformerLens 3.9 uses the legacy id, not ``openai-community/gpt2``): a random-init
  ``GPT2LMHeadModel`` with 6 layers, d_model 64 and 4 heads, saved with ``save_pretrained``
  (config.json, generation_config.json, model.safetensors) next to a byte-level BPE tokenizer
  trained here (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt) whose last id is
  ``<|endoftext|>``, as in GPT-2.
* ``jbloom/GPT2-Small-SAEs-Reformatted`` -- the repo of SAELens's ``gpt2-small-res-jb`` release,
  with ``blocks.L.hook_resid_pre/{cfg.json, sae_weights.safetensors, sparsity.safetensors}`` for
  L = 1 and 5 (the README's examples use layer 5) in
  the pre-6.0 format that release is stored in (``hook_point``, ``d_in``, ``d_sae``... with no
  ``sae_lens_version``), read by SAELens's default ``sae_lens`` loader: a ReLU SAE with d_in 64,
  d_sae 128 and nonzero ``b_enc`` / ``b_dec``.

* ``meta-llama/Llama-3.2-1B`` -- a random-init ``LlamaForCausalLM`` with 4 layers, d_model 64, 4
  heads (2 key/value heads) and d_mlp 128, with the same tokenizer;
* ``mntss/transcoder-Llama-3.2-1B`` -- circuit-tracer's per-layer transcoders for it, in that
  repo's format (``config.yaml`` naming ``mlp.hook_in`` → ``mlp.hook_out``, and
  ``layer_{i}.safetensors``): ReLU, 128 features per layer.

The hub cache layout is ``models--ORG--NAME/refs/main`` (a commit hash) and
``models--ORG--NAME/snapshots/<commit>/<path in repo>``; files are written straight into the
snapshot (the hub links them to ``blobs/``, but readers only follow the snapshot paths).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

GPT2_REPO = "gpt2"
SAE_RELEASE = "gpt2-small-res-jb"
SAE_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"
SAE_ID = "blocks.1.hook_resid_pre"
SAE_IDS = (SAE_ID, "blocks.5.hook_resid_pre")

N_LAYER, N_EMBD, N_HEAD, N_POSITIONS = 6, 64, 4, 128
LLAMA_REPO = "meta-llama/Llama-3.2-1B"
TRANSCODER_REPO = "mntss/transcoder-Llama-3.2-1B"
LLAMA_LAYERS, D_TRANSCODER = 4, 128
D_SAE = 128
EOS = "<|endoftext|>"

_CORPUS = [
    "some text",
    "The quick brown fox jumps over the lazy dog.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Attention heads attend to earlier tokens; sparse autoencoders explain the residual stream.",
    "Hello world! 0123456789",
]


def snapshot_dir(cache_dir: Path, repo_id: str) -> Path:
    """Create ``models--ORG--NAME`` with ``refs/main`` and return its (empty) snapshot folder."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"qk_lens fake hub: {repo_id}".encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _train_tokenizer():
    """A GPT-2-style byte-level BPE: 256 byte symbols + merges, then ``<|endoftext|>`` last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=319,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab[EOS] = len(vocab)
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=N_POSITIONS)
    return tok, vocab, merges


def _write_gpt2(cache_dir: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    snap = snapshot_dir(cache_dir, GPT2_REPO)
    tok, vocab, merges = _train_tokenizer()
    tok.save_pretrained(snap)
    # The real repo also ships the slow tokenizer's files.
    (snap / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (snap / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )

    eos_id = vocab[EOS]
    cfg = GPT2Config(
        vocab_size=len(vocab),
        n_positions=N_POSITIONS,
        n_ctx=N_POSITIONS,  # legacy key the real config.json carries; TransformerLens reads it
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        # Random layer norms and biases, so that folding them into the weights is exercised.
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(snap, safe_serialization=True)


def _write_sae(cache_dir: Path, sae_id: str) -> None:
    snap = snapshot_dir(cache_dir, SAE_REPO)
    folder = snap / sae_id  # pretrained_saes.yaml: path == id for this release
    layer = int(sae_id.split(".")[1])
    folder.mkdir(parents=True, exist_ok=True)
    # The keys of the release's (pre-SAELens-6) cfg.json; handle_pre_6_0_config renames
    # hook_point -> hook_name and fills in architecture="standard", activation_fn="relu".
    cfg = {
        "model_name": "gpt2-small",
        "hook_point": sae_id,
        "hook_point_layer": layer,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False,
        "context_size": N_POSITIONS,
        "use_cached_activations": False,
        "d_in": N_EMBD,
        "expansion_factor": D_SAE // N_EMBD,
        "d_sae": D_SAE,
        "b_dec_init_method": "geometric_median",
        "device": "cpu",
        "seed": 42,
        "dtype": "torch.float32",
        "l1_coefficient": 8e-05,
        "lr": 0.0004,
        "train_batch_size": 4096,
        "total_training_tokens": 300000000,
        "use_ghost_grads": False,
        "run_name": f"{D_SAE}-L1-8e-05-LR-0.0004-Tokens-3.000e+08",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(layer)
    w_dec = torch.randn(D_SAE, N_EMBD, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    weights = {
        "W_enc": (torch.randn(N_EMBD, D_SAE, generator=g) / N_EMBD**0.5).contiguous(),
        "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
        "W_dec": w_dec.contiguous(),
        "b_dec": 0.1 * torch.randn(N_EMBD, generator=g),
    }
    save_file(weights, str(folder / "sae_weights.safetensors"))
    save_file(
        {"sparsity": -2.0 - torch.rand(D_SAE, generator=g)},
        str(folder / "sparsity.safetensors"),
    )


def _write_llama(cache_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    snap = snapshot_dir(cache_dir, LLAMA_REPO)
    tok, vocab, _ = _train_tokenizer()
    tok.save_pretrained(snap)
    eos_id = vocab[EOS]
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=N_EMBD, intermediate_size=2 * N_EMBD,
        num_hidden_layers=LLAMA_LAYERS, num_attention_heads=N_HEAD, num_key_value_heads=2,
        max_position_embeddings=N_POSITIONS, bos_token_id=eos_id, eos_token_id=eos_id,
        tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(snap, safe_serialization=True)

    tc = snapshot_dir(cache_dir, TRANSCODER_REPO)
    (tc / "config.yaml").write_text(
        "model_kind: transcoder_set\n"
        f"model_name: {LLAMA_REPO}\n"
        "feature_input_hook: mlp.hook_in\n"
        "feature_output_hook: mlp.hook_out\n"
        f"scan: {TRANSCODER_REPO}\n"
    )
    g = torch.Generator().manual_seed(7)
    for layer in range(LLAMA_LAYERS):
        save_file(
            {
                "W_enc": (torch.randn(D_TRANSCODER, N_EMBD, generator=g) / N_EMBD**0.5),
                "W_dec": 0.1 * torch.randn(D_TRANSCODER, N_EMBD, generator=g),
                "b_enc": 0.1 * torch.randn(D_TRANSCODER, generator=g) - 0.3,
                "b_dec": 0.05 * torch.randn(N_EMBD, generator=g),
            },
            str(tc / f"layer_{layer}.safetensors"),
        )


def populate_fake_hub(cache_dir: Path) -> None:
    """Write the tiny ``gpt2`` and the ``gpt2-small-res-jb`` SAE into hub cache ``cache_dir``.

    Point ``HF_HUB_CACHE`` at ``cache_dir`` and set ``HF_HUB_OFFLINE=1`` before huggingface_hub is
    imported, and ``HookedTransformer.from_pretrained("gpt2")`` and
    ``SAE.from_pretrained("gpt2-small-res-jb", "blocks.1.hook_resid_pre")`` read these files.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_gpt2(cache_dir)
    _write_llama(cache_dir)
    for sae_id in SAE_IDS:
        _write_sae(cache_dir, sae_id)


def offline_env(root: Path) -> dict[str, str]:
    """A fake hub under ``root`` and the environment a fresh process reads it with, offline (the
    hub fixes its cache location at import, so the user code runs in a subprocess)."""
    import os

    hf_home = Path(root) / "hf_home"
    populate_fake_hub(hf_home / "hub")
    env = dict(os.environ)
    for legacy in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE"):
        env.pop(legacy, None)
    repo_root = str(Path(__file__).resolve().parent.parent)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")])),
    )
    return env
