"""The layout's seams: the architecture adapter, the capture's logits, one forward per steering
call, the renderer registry, and the names kept for a release (module paths, keywords)."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import qk_lens
from qk_lens.arch import arch_of
from qk_lens.display import render
from tests.bridges import BRIDGE_CONFIGS, BRIDGE_NAMES
from tests.models import HOOKED, hooked_names, make_any, make_tokens, needs_hooked
from tests.saes import attached_with_sae

ARCH_NAMES = hooked_names()


def available(*names: str) -> list[str]:
    """The names this stack can build (HookedTransformer variants only on stack (a))."""
    return [n for n in names if n in BRIDGE_CONFIGS or HOOKED]


torch.set_num_threads(1)


# --------------------------------------------------------------------------- the adapter
def test_unknown_model_class_names_the_supported_ones():
    with pytest.raises(TypeError, match=r"no architecture adapter for Linear.*TransformerBridge"):
        arch_of(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", available("llama", "LlamaForCausalLM"))
def test_layer_description_built_once_and_rebuilt_after_an_edit(name):
    model = make_any(name)
    arch = arch_of(model)
    assert arch_of(model) is arch  # one per model
    first = arch.layer(1)
    assert arch.layer(1) is first  # one per layer, reused
    before = first.W_Q.clone()
    with torch.no_grad():  # in place: the version counter moves
        if name == "llama":
            model.blocks[1].attn.W_Q[0, 0, 0] += 1.0
        else:  # the Hugging Face weight the bridge wraps: q_proj.weight[out, in]
            q_proj = model.blocks[1].attn.original_component.q_proj
            getattr(q_proj, "original_component", q_proj).weight[0, 0] += 1.0
    second = arch.layer(1)
    assert second is not first
    changed = (second.W_Q - before).abs() > 0.5
    assert changed.sum() == 1 and float((second.W_Q - before)[changed]) == pytest.approx(1.0)


@needs_hooked  # bridges: tests/test_bridge.py::test_capture_logits_are_the_bridge_logits
@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "gemma2_2b_shape", "attn_only"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_capture_logits_are_the_forward_logits(name, dtype):
    """The capture keeps the unembedding's input; its logits are the forward's, bit for bit
    (Gemma-2's output softcap included)."""
    model = qk_lens.attach(make_any(name, dtype))
    tokens = make_tokens(model, 12)
    want = model(tokens, return_type="logits")[0]
    got = model.qk_capture(tokens[0]).logits()
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", available("gemma3", "Gemma3ForCausalLM"))
def test_steering_runs_one_forward_after_the_capture(name):
    """The clean side comes from the capture: steer_qk and steer_resid run one forward each."""
    model, tokens, layer = attached_with_sae(name)
    a = model.qk_attribution(tokens, layer, 1, 9, 9)  # captures the prompt
    f = int(a.key_parts[a.key_parts.kind == "feature"].feature.iloc[0])
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda t, hook: calls.append(t.shape[0]))]):
        model.steer_qk(tokens, layer, 1, "key", {f: 0.0}, positions=[9]).check()
        assert calls == [1]
        model.steer_resid(tokens, layer, [f], positions=[9]).check()
        assert calls == [1, 2]  # one batched forward: frozen-norm and live rows


def test_renderer_registry_names_a_missing_renderer():
    with pytest.raises(RuntimeError, match="no renderer 'nope'"):
        render("nope")


# --------------------------------------------------------------------------- old names
@pytest.mark.parametrize(
    "old, new",
    [
        ("qk_lens.contrast", "qk_lens.attribution.contrast"),
        ("qk_lens.loadings", "qk_lens.graph.loadings"),
        ("qk_lens.export", "qk_lens.graph.export"),
        ("qk_lens.patterns", "qk_lens.atlas.probes"),
        ("qk_lens.topk_terms", "qk_lens.attribution.topk"),
        ("qk_lens.table", "qk_lens.attribution.table"),
        ("qk_lens.attention", "qk_lens.arch.qk"),
    ],
)
def test_moved_modules_import_with_a_deprecation_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("name", available("gpt2", "GPT2LMHeadModel"))
def test_renamed_keywords_warn_and_agree(name):
    model, tokens, layer = attached_with_sae(name)
    a = model.qk_attribution(tokens, layer, 0, 9, 4)
    with pytest.warns(DeprecationWarning, match=r"top\(k=\.\.\.\) is deprecated; use top_k="):
        old = a.top(k=3)
    assert old.equals(a.top(top_k=3)) and len(old) == 3
    with pytest.raises(TypeError, match="got both k= and top_k="):
        a.top(k=3, top_k=3)
    with pytest.warns(DeprecationWarning, match="to_frame"):
        assert a.to_frame().equals(a.frame())
    row = model.qk_attribution(tokens, layer, 0, 9)
    with pytest.warns(DeprecationWarning, match="top="):
        old = row.inhibitors(top=2)
    assert old.equals(row.inhibitors(top_k=2))
    f = int(a.key_parts[a.key_parts.kind == "feature"].feature.iloc[0])
    with pytest.warns(DeprecationWarning, match="readout="):
        r = model.steer_qk(tokens, layer, 0, "key", {f: 0.0}, positions=[4], readout=9)
    assert r.readout_pos == [9]
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        a.top(top_k=0)


def test_every_public_class_and_function_imports_from_the_top():
    for name in qk_lens.__all__:
        assert getattr(qk_lens, name) is not None


@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_architecture_flags_known_for_every_bridge(name):
    """What the bridge adapter says matches the Hugging Face config the bridge was built from."""
    model = make_any(name)
    hf = model.original_model.config
    la = arch_of(model).layer(0)
    assert (la.rotary is not None) == (name != "GPT2LMHeadModel")
    assert (la.qk_norm is not None) == (name in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"))
    assert (la.softcap is not None) == bool(getattr(hf, "attn_logit_softcapping", None))
    assert la.n_kv == (getattr(hf, "num_key_value_heads", None) or model.cfg.n_heads)
    assert (la.attn_out is not None) == name.startswith("Gemma")
    assert la.mlp_mode is not None


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_architecture_flags_known_for_every_variant(name):
    """Every test variant gets a description: what its adapter says matches its config."""
    model = make_any(name)
    arch = arch_of(model)
    cfg = model.cfg
    la = arch.layer(0)
    assert (la.rotary is not None) == (cfg.positional_embedding_type == "rotary")
    assert (la.qk_norm is not None) == bool(cfg.use_qk_norm)
    assert (la.softcap is not None) == (cfg.attn_scores_soft_cap > 0)
    assert la.n_kv == (cfg.n_key_value_heads or cfg.n_heads)
    assert (la.attn_out is not None) == bool(cfg.use_normalization_before_and_after)
    assert (la.mlp_mode is None) == bool(cfg.attn_only)


def test_module_entry_points():
    out = subprocess.run(
        [sys.executable, "-m", "qk_lens", "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "demo" in out.stdout and "train" in out.stdout
    with warnings.catch_warnings():
        out = subprocess.run(
            [sys.executable, "-W", "always::DeprecationWarning", "-m", "qk_lens.toy.train", "-h"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    if HOOKED:
        assert out.returncode == 0 and "--model" in out.stdout
        assert "deprecated; use `qk-lens train`" in out.stderr
    else:  # stack (b): training needs HookedTransformer and SAELens
        assert out.returncode != 0 and "TransformerLens 3.x with SAELens" in out.stderr


# --------------------------------------------------------------------------- the rules of the layout
PACKAGE = Path(qk_lens.__file__).parent
ARCH_FLAGS = (
    "normalization_type", "use_normalization_before_and_after", "use_qk_norm",
    "original_architecture", "n_key_value_heads", "attn_scores_soft_cap",
    "positional_embedding_type", "rotary_dim", "rotary_adjacent_pairs", "parallel_attn_mlp",
    "attn_only", "output_logits_soft_cap", "ungroup_grouped_query_attention", "attention_dir",
    "window_size", "clip_qkv", "use_logn_attn", "num_experts", "use_split_qkv_input",
)  # fmt: skip


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), path.read_text()


def test_architecture_flags_are_read_only_in_arch():
    import re

    pattern = re.compile(r"cfg\.(" + "|".join(ARCH_FLAGS) + r")\b")
    offenders = [
        f"{name}:{i + 1}: {line.strip()}"
        for name, text in _sources()
        if not name.startswith("qk_lens/arch/")
        for i, line in enumerate(text.splitlines())
        if pattern.search(line) and not line.strip().startswith(("#", "``", "*"))
    ]
    assert not offenders, offenders


def test_no_private_name_is_imported_from_another_module():
    import ast

    offenders = []
    for name, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qk_lens"):
                offenders += [f"{name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_code_cites_only_documents_inside_the_project():
    for name, text in _sources():
        assert "DESIGN.md" not in text and "shared/" not in text, name
