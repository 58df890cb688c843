"""The bundled toy models: the induction mechanism is recovered from the weights, files are checked."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from sae_lens import SAE

from qk_lens import toy
from qk_lens.demo import choose_pair, parse_token_label, run_story
from qk_lens.patterns import pattern_scores, strongest
from qk_lens.toy.data import RepeatSpec, repeated_batch
from qk_lens.toy.tokenizer import SPECIALS, WORDS

WORD_IDS = torch.arange(len(SPECIALS), len(SPECIALS) + len(WORDS))


@pytest.fixture(scope="module", params=toy.NAMES)
def model(request):
    return toy.load(request.param)


@pytest.fixture(scope="module")
def heads(model):
    scores = pattern_scores(model, n=32, seed=99)
    il, ih, _ = strongest(scores, "induction", range(1, model.cfg.n_layers))
    pl, ph, _ = strongest(scores, "previous_token", range(0, il))
    return (pl, ph), (il, ih)


def _random_repeated_prompt(gen: torch.Generator) -> tuple[list[int], int]:
    """BOS, random prefix, a segment of distinct words, random gap, the segment again."""
    length = int(torch.randint(4, 15, (1,), generator=gen))
    prefix = int(torch.randint(0, 6, (1,), generator=gen))
    gap = int(torch.randint(0, 5, (1,), generator=gen))
    perm = WORD_IDS[torch.randperm(len(WORD_IDS), generator=gen)]
    seg, others = perm[:length], perm[length:]
    # filler from the other words, so each repeated token has one earlier occurrence
    filler = others[torch.randint(0, len(others), (prefix + gap,), generator=gen)]
    tokens = [0, *filler[:prefix].tolist(), *seg.tolist(), *filler[prefix:].tolist(), *seg.tolist()]
    return tokens, length


def test_mechanism_recovered_on_50_prompts(model, heads):
    """At the strongest induction head the top interaction is current token = A x previous token = A."""
    _, (il, ih) = heads
    gen = torch.Generator().manual_seed(2024)
    hits, misses = 0, []
    for _ in range(50):
        tokens, length = _random_repeated_prompt(gen)
        q = int(torch.randint(len(tokens) - length, len(tokens), (1,), generator=gen))  # 2nd copy
        q, k = choose_pair(tokens, q_pos=q)
        attr = model.qk_attribution(torch.tensor(tokens), il, ih, q, k)
        attr.check()
        top = attr.top(1).iloc[0]
        a = model.tokenizer.convert_ids_to_tokens(tokens[q])
        ok = parse_token_label(top["q_label"]) == ("current token", a) and parse_token_label(
            top["k_label"]
        ) == ("previous token", a)
        hits += ok
        if not ok:
            misses.append((a, top["q_label"], top["k_label"]))
    assert hits >= 45, f"{hits}/50 prompts show the mechanism; misses: {misses[:5]}"


@pytest.mark.parametrize(
    "spec, max_share",
    [
        (RepeatSpec(), 0.15),  # the training distribution, unseen sequences
        (RepeatSpec(prefix=(0, 10), segment=(4, 18), gap=(0, 10)), 0.2),  # wider offsets
    ],
    ids=["held-out", "wider-offsets"],
)
def test_held_out_behaviour(model, heads, spec, max_share):
    """Induction attention and loss on repeated vs fresh tokens, on sequences it never saw."""
    _, (il, ih) = heads
    gen = torch.Generator().manual_seed(777)
    batch = repeated_batch(256, WORD_IDS, 0, gen, spec)
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens)
    logp = F.log_softmax(logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, batch.tokens[:, 1:, None])[..., 0]
    rep = batch.repeated[:, 1:]
    pattern = cache["pattern", il][:, ih]
    b, q = (batch.induction_target >= 0).nonzero(as_tuple=True)
    attn = pattern[b, q, batch.induction_target[b, q]]
    assert attn.mean() > 0.5, f"induction head attends {attn.mean():.2f} to the target"
    # fresh tokens are uniformly random: the best possible loss is log(#words); repeated tokens
    # are predictable by induction
    log_v = math.log(len(WORDS))
    assert abs(nll[~rep].mean() - log_v) < 0.3, f"fresh {nll[~rep].mean():.3f} vs {log_v:.3f}"
    assert nll[rep].mean() < max_share * log_v, f"loss on repeated tokens {nll[rep].mean():.3f}"


def test_demo_story_confirmed(model, heads):
    story = run_story(model)
    assert story.confirmed, story.summary()
    assert (story.previous_token_head, story.induction_head) == heads
    assert story.attribution.tolerance >= abs(
        story.attribution.terms.sum().item() - story.attribution.model_raw_score
    )
    html = story.report().to_html()
    assert "Confirmed" in html and "http://" not in html and "https://" not in html


def test_labels_and_saes_ship(model):
    info = model.toy
    for layer in range(model.cfg.n_layers):
        hook = f"blocks.{layer}.hook_resid_pre"
        sae = SAE.load_from_disk(str(info.directory / "saes" / hook))
        assert sae.cfg.metadata.hook_name == hook
        d = model.qk_dictionaries[layer]
        assert torch.equal(d.sae.W_dec, sae.W_dec)
        labels = info.label_sets[layer]
        assert len(labels) == sae.cfg.d_sae
        assert all(d.label(i) == labels[i].label for i in range(sae.cfg.d_sae))
    kinds = info.label_sets[model.cfg.n_layers - 1].frame()["kind"].value_counts()
    assert kinds.get("current token", 0) >= 10 and kinds.get("previous token", 0) >= 10, kinds


def test_tokenizer_round_trip(model):
    prompt = "fox owl fox"
    assert model.to_str_tokens(prompt) == ["<bos>", "fox", "owl", "fox"]
    toks = model.to_tokens(prompt)
    assert toks.shape == (1, 4) and toks[0, 1] == toks[0, 3]
    assert model.to_str_tokens("fox unicorn")[-1] == "<unk>"


# --------------------------------------------------------------------------- files
@pytest.fixture()
def copied(tmp_path):
    dst = tmp_path / "attn2-ln"
    shutil.copytree(toy.model_dir("attn2-ln"), dst)
    return dst


def test_corrupt_weight_file(copied):
    data = (copied / "model.safetensors").read_bytes()
    (copied / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="model.safetensors.*corrupt"):
        toy.load(copied)


def test_missing_weight_file(copied):
    (copied / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        toy.load(copied)


def test_mismatched_weights(copied):
    from safetensors.torch import load_file, save_file

    state = load_file(str(copied / "model.safetensors"))
    state["embed.W_E"] = state["embed.W_E"][:, :10].contiguous()
    save_file(state, str(copied / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match"):
        toy.load(copied)


def test_corrupt_config_and_missing_sae(copied):
    shutil.rmtree(copied / "saes" / "blocks.1.hook_resid_pre")
    with pytest.raises(FileNotFoundError, match="blocks.1.hook_resid_pre"):
        toy.load(copied)
    assert toy.load(copied, dictionaries=False).qk_dictionaries == {}
    (copied / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        toy.load(copied)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="attn2-ln"):
        toy.load("gpt5")


# --------------------------------------------------------------------------- training scripts
def test_training_script_runs_a_few_steps(tmp_path):
    from qk_lens.toy.train import main

    assert (
        main(
            [
                "--model",
                "attn2-rope",
                "--steps",
                "3",
                "--sae-steps",
                "3",
                "--probe-sequences",
                "8",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    model = toy.load(tmp_path / "attn2-rope")
    assert sorted(model.qk_dictionaries) == [0, 1]
    assert model.toy.config["training"]["steps"] == 3
    attr = model.qk_attribution("fox owl fox owl", 1, 0, 3, 2)
    attr.check()


def test_training_is_reproducible():
    """Fixed seeds: the same recipe gives the same weights (init, data order, updates)."""
    from qk_lens.toy.recipes import RECIPES
    from qk_lens.toy.train import train_model

    a, losses_a = train_model(RECIPES["attn2-ln"], steps=3, progress=False)
    b, losses_b = train_model(RECIPES["attn2-ln"], steps=3, progress=False)
    assert losses_a == losses_b
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
