"""The bundled toy models: the induction mechanism is recovered from the weights, files are checked."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from qk_lens import toy
from qk_lens.atlas.probes import pattern_scores, strongest
from qk_lens.demo import choose_pair, parse_token_label, run_story
from qk_lens.sae_files import load_saved_sae
from qk_lens.toy.data import RepeatSpec, repeated_batch
from qk_lens.toy.tokenizer import SPECIALS, WORDS

WORD_IDS = torch.arange(len(SPECIALS), len(SPECIALS) + len(WORDS))


# Each bundled model as a HookedTransformer (TransformerLens 3 with SAELens) and as a
# TransformerBridge (both stacks).
HOOKED = toy.hooked_transformer_available()
KINDS = ["hooked", "bridge"] if HOOKED else ["bridge"]
needs_hooked = pytest.mark.skipif(not HOOKED, reason="needs HookedTransformer and SAELens")


@pytest.fixture(
    scope="module", params=[(n, k) for n in toy.INDUCTION_NAMES for k in KINDS], ids="-".join
)
def model(request):
    name, kind = request.param
    return toy.load(name, bridge=kind == "bridge")


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
    "spec",
    [RepeatSpec(), RepeatSpec(prefix=(0, 10), segment=(4, 18), gap=(0, 10))],
    ids=["held-out", "wider-offsets"],  # unseen sequences; offsets wider than in training
)
def test_held_out_behaviour(model, heads, spec):
    """Induction attention and loss on repeated vs fresh tokens, on sequences it never saw."""
    _, (il, ih) = heads
    gen = torch.Generator().manual_seed(777)
    batch = repeated_batch(256, WORD_IDS, 0, gen, spec)
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens)
    logp = F.log_softmax(logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, batch.tokens[:, 1:, None])[..., 0]
    rep = batch.repeated[:, 1:]
    fresh = batch.scored[:, 1:] & ~rep  # new words, and the first word of the copy
    pattern = cache["pattern", il][:, ih]
    b, q = (batch.induction_target >= 0).nonzero(as_tuple=True)
    attn = pattern[b, q, batch.induction_target[b, q]]
    assert attn.mean() > 0.9, f"induction head attends {attn.mean():.2f} to the target"
    # a new word is one of the words not seen yet, at random: nothing predicts it, so its loss
    # stays near log(#words); a repeated token is predictable by induction
    log_v = math.log(len(WORDS))
    assert abs(nll[fresh].mean() - log_v) < 0.3, f"fresh {nll[fresh].mean():.3f} vs {log_v:.3f}"
    assert nll[rep].mean() < 0.1, f"loss on repeated tokens {nll[rep].mean():.3f} nats"


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
        sae = load_saved_sae(info.directory / "saes" / hook)
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
@needs_hooked
def test_training_script_runs_a_few_steps(tmp_path):
    from qk_lens.cli import main

    assert (
        main(
            [
                "train",
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


@needs_hooked
def test_unknown_training_stage(tmp_path, capsys):
    from qk_lens.cli import main
    from qk_lens.toy.recipes import RECIPES
    from qk_lens.toy.train import build

    with pytest.raises(ValueError, match=r"unknown stages \['sae'\]; choose from model, saes"):
        next(build(RECIPES["attn2-ln"], tmp_path, ["sae"]))
    assert main(["train", "--stages", "model,sae", "--out", str(tmp_path)]) == 2
    assert "unknown stages ['sae']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was trained or written


@needs_hooked
def test_training_script_all_models_side_by_side(tmp_path):
    """`--model all` trains every bundled model, each in its own process."""
    from qk_lens.cli import main

    args = ["--steps", "2", "--sae-steps", "2", "--probe-sequences", "4", "--out", str(tmp_path)]
    assert main(["train", "--model", "all", *args]) == 0
    for name in toy.NAMES:
        model = toy.load(tmp_path / name)
        assert model.toy.config["training"]["steps"] == 2
        assert sorted(model.qk_dictionaries) == list(range(model.cfg.n_layers))
        assert (model.qk_transcoders is not None) == (name == "casebook")


@needs_hooked
@pytest.mark.parametrize("name", toy.NAMES)
def test_training_forward_is_the_model_forward(name):
    """The fused forward used for training computes exactly what HookedTransformer does."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from qk_lens.toy.recipes import RECIPES
    from qk_lens.toy.train import training_logits

    cfg = HookedTransformerConfig(**RECIPES[name].hooked_config(), dtype=torch.float64)
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random init leaves biases at 0 and norm weights at 1
        for pname, p in model.named_parameters():
            if pname.split(".")[-1] in ("b_Q", "b_K", "b_V", "b_O", "b_U", "w", "b", "b_in",
                                        "b_out"):  # fmt: skip
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = repeated_batch(6, WORD_IDS, 0, g, RepeatSpec())
    with torch.no_grad():
        ours = training_logits(model, batch.tokens)
        theirs = model(batch.tokens)
    assert (ours - theirs).abs().max() < 1e-10
    # with gradients on several threads the embedding is a one-hot product (a fixed summation
    # order): the same logits, and the same gradients as autograd through the model's forward
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours = training_logits(model, batch.tokens)
        ours.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        theirs = model(batch.tokens)
        theirs.square().mean().backward()
    finally:
        torch.set_num_threads(threads)
    assert (ours - theirs).abs().max() < 1e-10
    for n, p in model.named_parameters():
        assert (grads[n] - p.grad).abs().max() < 1e-10, n


def test_repeat_data_is_unambiguous():
    """Before the copy every word is new, so a word seen before always starts the copy."""
    spec = RepeatSpec(prefix=(0, 9), segment=(2, 20), gap=(0, 9))
    batch = repeated_batch(200, WORD_IDS, 0, torch.Generator().manual_seed(4), spec)
    for b in range(200):
        toks, start, off = batch.tokens[b], int(batch.repeat_start[b]), int(batch.offset[b])
        assert toks[0] == 0 and len(set(toks[1:start].tolist())) == start - 1
        end = int(batch.scored[b].nonzero().max()) + 1  # scored through the end of the copy
        assert torch.equal(toks[start:end], toks[start - off : end - off])
        q = torch.arange(start, end - 1)
        assert torch.equal(toks[batch.induction_target[b, q]], toks[q + 1])
        assert not batch.scored[b, end:].any() and batch.repeated[b, start + 1 : end].all()
    with pytest.raises(ValueError, match="need up to 40 words, but only 38 exist"):
        repeated_batch(2, WORD_IDS, 0, torch.Generator(), RepeatSpec(segment=(4, 27)))
    with pytest.raises(ValueError, match="segment=.*at least 2 tokens"):
        RepeatSpec(segment=(1, 5))


@needs_hooked
@pytest.mark.parametrize("name", ["attn2-ln", "casebook"])
def test_training_is_reproducible(name):
    """Fixed seeds: the same recipe gives the same weights (init, data order, updates)."""
    from qk_lens.toy.recipes import RECIPES
    from qk_lens.toy.train import train_model

    a, losses_a = train_model(RECIPES[name], steps=3, progress=False)
    b, losses_b = train_model(RECIPES[name], steps=3, progress=False)
    assert losses_a == losses_b
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


@needs_hooked
@pytest.mark.parametrize("name", toy.NAMES)
def test_the_bridge_is_the_hooked_model(name):
    """arch/convert.py's GPT-2 / Llama rebuild computes what the HookedTransformer computes."""
    hooked = toy.load(name, bridge=False, dtype=torch.float64)
    bridge = toy.load(name, bridge=True, dtype=torch.float64)
    assert type(bridge).__name__ == "QKTransformerBridge"
    text = (
        "i called aunt sally . we had dinner with uncle bob . so i called aunt"
        if name == "casebook"
        else "eel lark mole boar eel lark mole boar"
    )
    toks = hooked.to_tokens(text)
    assert torch.equal(bridge.to_tokens(text), toks)
    assert (toks != hooked.tokenizer.unk_token_id).all()
    with torch.no_grad():
        _, ch = hooked.run_with_cache(toks)
        _, cb = bridge.run_with_cache(toks)
    # Rotary tables are float32 on both sides (TransformerLens's buffers, Hugging Face's
    # computation), computed differently: equal to float32's rounding, not float64's.
    tol = {"rtol": 0, "atol": 1e-9} if name != "attn2-rope" else {"rtol": 1e-6, "atol": 1e-6}
    for hook in (
        "blocks.1.hook_resid_pre",
        "blocks.1.attn.hook_attn_scores",
        "ln_final.hook_normalized",
    ):
        a, b = ch[hook], cb[hook]
        mask = torch.isfinite(a) & (a > -1e30)
        torch.testing.assert_close(b[mask], a[mask], **tol)
    h = hooked.qk_attribution(toks[0], 1, 0, 8, 4)
    b = bridge.qk_attribution(toks[0], 1, 0, 8, 4)
    cols = ["kind", "feature", "position"]
    for side in ("query_parts", "key_parts"):
        assert getattr(h, side)[cols].equals(getattr(b, side)[cols]), side
    torch.testing.assert_close(b.terms, h.terms, **tol)


@needs_hooked
@pytest.mark.parametrize("attn_only", [False, True])
def test_the_neox_rebuild_computes_the_hooked_model(attn_only):
    """LayerNorm + rotary (+ GELU MLPs) rebuilt as GPTNeoXForCausalLM: the same logits as the
    HookedTransformer, with every bias and norm weight randomized (zero biases would hide a
    misplaced one)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from qk_lens.arch.convert import hooked_to_hf

    cfg = dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=50, attn_only=attn_only,
        normalization_type="LN", positional_embedding_type="rotary", rotary_dim=8, seed=3,
        act_fn=None if attn_only else "gelu_new", **({} if attn_only else {"d_mlp": 24}),
    )  # fmt: skip
    hooked = HookedTransformer(HookedTransformerConfig(**cfg, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hooked.named_parameters():
            if name.split(".")[-1].startswith(("b", "w")):  # biases, norm weights
                p.copy_(
                    torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (name[-2:] == ".w")
                )
    state = {k: v for k, v in hooked.state_dict().items()}
    hf, hf_cfg, architecture = hooked_to_hf(cfg, state)
    assert architecture == "GPTNeoXForCausalLM"
    toks = torch.randint(0, 50, (2, 16), generator=g)
    with torch.no_grad():
        want = hooked(toks)
        got = hf(toks).logits
    # rotary tables: float32 on both sides, computed differently (as for Llama above)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()

    # the bridge over the rebuild: its own hooks' scores, and the same QK attribution terms
    from transformer_lens.model_bridge import sources

    import qk_lens
    from tests.saes import make_sae

    bridge = qk_lens.attach(sources.build_bridge_from_module(hf, architecture, hf_config=hf_cfg))
    qk_lens.attach(hooked)
    for model in (hooked, bridge):
        model.add_dictionary(make_sae("topk", d_in=32, d_sae=64, seed=3))
    with torch.no_grad():
        _, ch = hooked.run_with_cache(toks[:1])
        _, cb = bridge.run_with_cache(toks[:1])
    a, b = ch["blocks.1.attn.hook_attn_scores"], cb["blocks.1.attn.hook_attn_scores"]
    mask = torch.isfinite(a) & (a > -1e30)
    torch.testing.assert_close(b[mask], a[mask], rtol=1e-6, atol=1e-6)
    h = hooked.qk_attribution(toks[0], 1, 2, 9, 4)
    br = bridge.qk_attribution(toks[0], 1, 2, 9, 4)
    torch.testing.assert_close(br.terms, h.terms, rtol=1e-6, atol=1e-6)
    want_score = a[0, 2, 9, 4].item()
    assert abs(br.score - want_score) < 1e-6 and abs(h.score - want_score) < 1e-9


@pytest.mark.skipif(HOOKED, reason="TransformerLens 4 only")
def test_training_needs_stack_a(capsys):
    from qk_lens.cli import main

    assert main(["train", "--model", "attn2-ln", "--steps", "1"]) == 2
    assert "TransformerLens 3.x with SAELens" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"attn_scores_soft_cap": 1.0}, r"sets \['attn_scores_soft_cap'\]"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"attn_scale": 2.0}, "attn_scale=2.0"),
        ({"attn_only": False}, "act_fn=None"),
        ({"attn_only": False, "act_fn": "relu", "d_mlp": 64}, "act_fn='relu'"),
        ({"normalization_type": "LNPre"}, "normalization_type='LNPre'"),
        (
            {
                "normalization_type": "RMS",
                "positional_embedding_type": "rotary",
                "attn_only": False,
                "act_fn": "gelu_new",
                "d_mlp": 64,
            },
            "MLPs convert with LayerNorm",
        ),
    ],
)
def test_the_bridge_rebuild_refuses_what_it_does_not_carry_over(extra, match):
    import json

    from qk_lens.arch.convert import hooked_to_hf

    d = toy.model_dir("attn2-ln")
    cfg = json.loads((d / "config.json").read_text())["hooked_transformer_config"]
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        hooked_to_hf({**cfg, **extra}, state)
    extra_key = dict(state, **{"blocks.0.attn.W_extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.attn.W_extra'\]"):
        hooked_to_hf(cfg, extra_key)


@needs_hooked
def test_transcoder_training_writes_what_it_trained(tmp_path):
    """The casebook's transcoder stage on a small random model: circuit-tracer files that load
    back, whose features are the top-k pre-activations recomputed here by hand, whose figures
    are the held-out variance explained, and whose labels cover every feature."""
    import dataclasses

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from qk_lens.toy.recipes import RECIPES, TranscoderRecipe
    from qk_lens.toy.train import label_transcoders, train_transcoders, transcoder_batches
    from qk_lens.transcoders import load_transcoders

    recipe = dataclasses.replace(
        RECIPES["casebook"], n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=32,
        transcoder=TranscoderRecipe(d_transcoder=48, k=4, steps=5, batch_tokens=64),
    )  # fmt: skip
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**recipe.hooked_config()))
    figures = train_transcoders(model, recipe, tmp_path)
    tc = load_transcoders(tmp_path / "transcoders", model)
    assert (tc.activation, tc.k, tc.input_point, tc.output_point) == (
        "topk",
        4,
        "mlp_input",
        "mlp_out",
    )
    for layer in range(2):
        x, y = next(transcoder_batches(model, layer, 256, 99, recipe))
        pre = x @ tc.W_enc[layer] + tc.b_enc[layer]
        keep = pre >= pre.topk(4, dim=-1).values[:, -1:]
        acts = torch.where(keep, pre, 0.0)
        torch.testing.assert_close(tc.encode(layer, x), acts)
        assert torch.allclose(tc.W_dec[layer].norm(dim=-1), torch.ones(48), atol=1e-5)
        # the recorded figure is the variance explained on the held-out batches (seeded apart)
        from qk_lens.toy.train import EVAL_SEED

        held = transcoder_batches(model, layer, 64, EVAL_SEED + 50 + layer, recipe)
        xs, ys = zip(*(next(held) for _ in range(8)), strict=True)
        hx, hy = torch.cat(xs), torch.cat(ys)
        err = (tc.encode(layer, hx) @ tc.W_dec[layer] + tc.b_dec[layer] - hy).pow(2).sum()
        ve = 1 - err / (hy - hy.mean(0)).pow(2).sum()
        f = figures[f"layer_{layer}"]
        assert f["variance_explained"] == pytest.approx(float(ve), abs=1e-4)
        assert f["n_tokens"] == 8 * 64
    labels = label_transcoders(model, tc, recipe, n_sequences=8)
    assert sorted(labels) == [0, 1] and all(len(ls) == 48 for ls in labels.values())
