"""qk_lens.sae_files: SAELens's saved format read without SAELens.

On stack (a) every architecture is checked against SAELens itself (what it saves, qk_lens reads
to the bit, and the other way round; the folds move the same weights). On both stacks: a
pre-6.0 release from the (fake, offline) Hugging Face hub against a reference computed from the
raw file, QK attributions on a bridge with a dictionary given as a directory, and bad files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qk_lens
from qk_lens.sae_files import CFG_FILE, WEIGHTS_FILE, SavedSAE, load_sae, load_saved_sae
from tests.bridges import attached_bridge, make_bridge
from tests.saes import ARCHS, HAVE_SAE_LENS, NORMS, make_sae

needs_sae_lens = pytest.mark.skipif(not HAVE_SAE_LENS, reason="needs SAELens (TransformerLens 3)")


def _x(n: int = 7, d: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.5 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.4


@needs_sae_lens
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_reads_what_sae_lens_saves_to_the_bit(tmp_path, arch, norm, apply_b_dec):
    sae = make_sae(arch, "float64", norm, apply_b_dec, neuronpedia_id="tiny/1-res", seed=4)
    sae.save_model(tmp_path)
    mine = load_saved_sae(tmp_path)
    assert isinstance(mine, SavedSAE) and mine.cfg.architecture() == sae.cfg.architecture()
    assert mine.cfg.metadata.hook_name == sae.cfg.metadata.hook_name
    assert mine.cfg.metadata.neuronpedia_id == "tiny/1-res"
    x = _x()
    with torch.no_grad():
        want, got = sae.encode(x), mine.encode(x)
        assert torch.equal(got, want)
        assert torch.equal(mine.decode(got), sae.decode(want))
        assert torch.equal(mine(x), sae(x))
    assert (got != 0).any()


@needs_sae_lens
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sae_lens_reads_what_qk_lens_saves(tmp_path, arch):
    from sae_lens import SAE

    original = make_sae(arch, "float32", "layer_norm", seed=2)
    original.save_model(tmp_path / "a")
    mine = load_saved_sae(tmp_path / "a")
    mine.save_model(tmp_path / "b")
    back = SAE.load_from_disk(str(tmp_path / "b"))
    assert type(back) is type(original)
    assert back.cfg.to_dict() == original.cfg.to_dict()
    x = _x().float()
    with torch.no_grad():
        assert torch.equal(back.encode(x), original.encode(x))


@needs_sae_lens
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "matching_pursuit"])
def test_norm_scaling_fold_moves_what_sae_lens_moves(tmp_path, arch):
    sae = make_sae(arch, "float64", "expected_average_only_in", seed=5)
    sae.save_model(tmp_path)
    mine = load_saved_sae(tmp_path)
    sae.fold_activation_norm_scaling_factor(1.7)
    mine.fold_activation_norm_scaling_factor(1.7)
    _same_weights(mine, sae)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(mine.encode(x), sae.encode(x), rtol=1e-13, atol=1e-13)


@needs_sae_lens
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk_rescale"])
def test_whitening_fold_moves_what_sae_lens_moves(tmp_path, arch, apply_b_dec):
    sae = make_sae(arch, "float64", "covariance_whitening", apply_b_dec, seed=6)
    sae.save_model(tmp_path)
    mine = load_saved_sae(tmp_path)
    g = torch.Generator().manual_seed(3)
    m = torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(
        16, 16, generator=g, dtype=torch.float64
    )
    mean = torch.randn(16, generator=g, dtype=torch.float64)
    for s in (sae, mine):
        s.fold_activation_whitening(mean, m, torch.linalg.inv(m))
    _same_weights(mine, sae)
    assert mine.cfg.normalize_activations == sae.cfg.normalize_activations == "none"
    assert mine.cfg.rescale_acts_by_decoder_norm == getattr(
        sae.cfg, "rescale_acts_by_decoder_norm", False
    )


def _same_weights(mine, sae) -> None:
    for name, p in mine.named_parameters():
        # to rounding: SAELens's matching-pursuit fold multiplies W_dec by s then divides it,
        # and the whitening products round per machine (float64: a few units in the last
        # place, 7e-15 relative seen on one CPU)
        torch.testing.assert_close(p, getattr(sae, name).detach(), rtol=1e-13, atol=1e-16)
    assert mine.cfg.normalize_activations == sae.cfg.normalize_activations


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_and_dtype_override(tmp_path, arch):
    sae = make_sae(arch, "float64", "none", seed=7)
    sae.save_model(tmp_path)
    again = load_saved_sae(tmp_path, dtype="float32")
    assert again.W_dec.dtype == torch.float32 and again.cfg.dtype == "float32"
    torch.testing.assert_close(again.W_dec.double(), sae.W_dec.detach(), rtol=1e-7, atol=0)
    assert again.to(torch.float64).cfg.dtype == "float64"


def test_add_dictionary_takes_a_directory(tmp_path):
    model, tokens, layer = attached_bridge("LlamaForCausalLM")
    sae = model.qk_dictionaries[layer].sae
    sae.save_model(tmp_path)
    fresh = qk_lens.attach(make_bridge("LlamaForCausalLM"))
    d = fresh.add_dictionary(str(tmp_path))
    assert d.layer == layer
    want = model.qk_attribution(tokens, layer, 1, 9, 4)
    got = fresh.qk_attribution(tokens, layer, 1, 9, 4)
    torch.testing.assert_close(got.terms, want.terms, rtol=0, atol=1e-12)


def _write(tmp_path: Path, cfg: dict, weights: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / CFG_FILE).write_text(json.dumps(cfg))
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    return tmp_path


def _standard(d_in=4, d_sae=6) -> dict:
    return {
        "W_enc": torch.randn(d_in, d_sae),
        "b_enc": torch.randn(d_sae),
        "W_dec": torch.randn(d_sae, d_in),
        "b_dec": torch.randn(d_in),
    }


V6 = {"architecture": "standard", "d_in": 4, "d_sae": 6, "metadata": {"hook_name": "blocks.0.hook_resid_pre", "sae_lens_version": "6.54.12"}}  # fmt: skip


def test_pre_6_config_is_translated(tmp_path):
    w = {**_standard(), "scaling_factor": torch.ones(6)}
    old = {"d_in": 4, "d_sae": 6, "hook_point": "blocks.2.hook_resid_pre", "dtype": "torch.float32",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2},
           "normalize_activations": False, "neuronpedia_id": "m/2-res"}  # fmt: skip
    sae = load_saved_sae(_write(tmp_path, old, w))
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == 2
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    assert sae.cfg.metadata.neuronpedia_id == "m/2-res"
    assert sae.cfg.normalize_activations == "none" and sae.cfg.apply_b_dec_to_input
    x = torch.randn(3, 4)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    want = torch.zeros_like(pre)
    top = pre.topk(2, dim=-1)
    want.scatter_(-1, top.indices, top.values.relu())
    torch.testing.assert_close(sae.encode(x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"architecture": "batchtopk"}, r"'batchtopk'.*standard, gated, jumprelu, topk, abstopk"),
        ({"architecture": "transcoder"}, r"'transcoder' cannot be read"),
        ({"d_sae": 7}, r"W_enc has shape \(4, 6\).*d_sae=7"),
        ({"d_in": 0}, r"d_in must be a positive integer"),
        ({"normalize_activations": "zscore"}, r"normalize_activations='zscore'"),
        ({"reshape_activations": "hook_z"}, r"hook_z"),
        ({"dtype": "float8"}, r"dtype 'float8'"),
        ({"architecture": "topk"}, r"topk SAE needs an integer k"),
    ],
)
def test_bad_configs_are_refused(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        load_saved_sae(_write(tmp_path, {**V6, **change}, _standard()))


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cfg\.json is missing"):
        load_saved_sae(tmp_path)
    w = _standard()
    _write(tmp_path / "nan", V6, {**w, "b_enc": torch.full((6,), float("nan"))})
    with pytest.raises(ValueError, match="b_enc holds NaN"):
        load_saved_sae(tmp_path / "nan")
    _write(tmp_path / "extra", V6, {**w, "r_mag": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"unexpected \['r_mag'\]"):
        load_saved_sae(tmp_path / "extra")
    _write(tmp_path / "scale", V6, {**w, "scaling_factor": torch.full((6,), 2.0)})
    with pytest.raises(ValueError, match="scaling_factor that is not 1"):
        load_saved_sae(tmp_path / "scale")
    _write(tmp_path / "json", V6, w)
    (tmp_path / "json" / CFG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_saved_sae(tmp_path / "json")
    _write(tmp_path / "st", V6, w)
    (tmp_path / "st" / WEIGHTS_FILE).write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        load_saved_sae(tmp_path / "st")
    with pytest.raises(ValueError, match=r"hf://ORG/REPO/FOLDER"):
        load_saved_sae("hf://just-a-name")
    with pytest.raises(TypeError, match="directory path"):
        load_saved_sae(3)


def test_jumprelu_log_threshold_is_read(tmp_path):
    w = {**_standard(), "log_threshold": torch.randn(6)}
    sae = load_saved_sae(_write(tmp_path, {**V6, "architecture": "jumprelu"}, w))
    torch.testing.assert_close(sae.threshold, w["log_threshold"].exp())


# The online path, offline: boot_transformers("gpt2") and the gpt2-small-res-jb release's files
# (pre-6.0 format) from a fake hub cache, in a fresh process (the hub reads its cache location
# at import).
HUB_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformer_lens.model_bridge import TransformerBridge
import qk_lens
from qk_lens.arch import arch_of
from qk_lens.sae_files import load_saved_sae, load_sae

url = "hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.1.hook_resid_pre"
saved = load_saved_sae(url)
model = qk_lens.attach(TransformerBridge.boot_transformers("gpt2", dtype=torch.float64))
d = model.add_dictionary(url)
tokens = model.to_tokens("some text and more text")[0]
q = len(tokens) - 1
with torch.no_grad(), arch_of(model).exact_forward():
    _, cache = model.run_with_cache(tokens[None])
worst = 0.0
for a in model.qk_attribution(tokens, 1, 2, q):
    want = float(cache["blocks.1.attn.hook_attn_scores"][0, 2, q, a.k_pos])
    worst = max(worst, abs(float(a.terms.sum()) - want))
x = cache["blocks.1.hook_resid_pre"][0].float()
from huggingface_hub import hf_hub_download
raw = load_file(hf_hub_download("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.1.hook_resid_pre/sae_weights.safetensors"))
ref = torch.relu((x - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"])
out = {"class": type(d.sae).__name__, "worst": worst, "n_active": int((ref != 0).sum()),
       "encode_err": float((saved.encode(x) - ref).abs().max()),
       "hook": saved.cfg.metadata.hook_name, "arch": saved.cfg.architecture()}
try:
    from sae_lens import SAE
except ImportError:  # stack (b)
    SAE = None
if SAE is not None:
    lens = SAE.from_pretrained("gpt2-small-res-jb", "blocks.1.hook_resid_pre")
    out["vs_sae_lens"] = bool(torch.equal(lens.encode(x), saved.encode(x)))
print("QK_LENS_RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory) -> tuple[Path, dict]:
    from tests.fake_hub import offline_env

    root = tmp_path_factory.mktemp("hub")
    env = offline_env(root)
    return root, env


def test_release_from_the_hub_offline_on_a_bridge(hub_env):
    root, env = hub_env
    script = root / "user.py"
    script.write_text(HUB_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("QK_LENS_RESULT ")][-1]
    out = json.loads(line.removeprefix("QK_LENS_RESULT "))
    assert out["arch"] == "standard" and out["hook"] == "blocks.1.hook_resid_pre"
    assert out["class"] == ("StandardSAE" if HAVE_SAE_LENS else "SavedSAE")
    assert out["n_active"] > 0 and out["encode_err"] <= 1e-5
    assert out["worst"] <= 1e-9  # float64 bridge: terms sum to the bridge's own score
    if HAVE_SAE_LENS:
        assert out["vs_sae_lens"] is True


def test_cli_table_with_an_sae_from_the_hub(hub_env, tmp_path):
    root, env = hub_env
    out = tmp_path / "t.csv"
    args = ["--model", "gpt2", "--bridge", "--sae", "hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.1.hook_resid_pre",
            "--prompt", "some text", "--layer", "1", "--top-k", "4", "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "qk_lens", "table", *args], cwd=root, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd

    df = pd.read_csv(out)
    assert set(df["layer"]) == {1} and (df["q_kind"] == "feature").any()
    sums = df.groupby(["prompt", "head", "q_pos", "k_pos"]).agg(
        t=("term", "sum"), s=("score", "first")
    )
    assert ((sums["t"] - sums["s"]).abs() <= 1e-4 * sums["s"].abs().clip(lower=1)).all()


def test_load_sae_prefers_sae_lens_where_installed(tmp_path):
    make_sae("topk", "float32", seed=1).save_model(tmp_path)
    got = load_sae(tmp_path)
    assert type(got).__name__ == ("TopKSAE" if HAVE_SAE_LENS else "SavedSAE")
    assert isinstance(load_saved_sae(tmp_path), SavedSAE)
    assert load_file(str(tmp_path / WEIGHTS_FILE)).keys() >= {"W_enc", "W_dec", "b_enc", "b_dec"}


def test_resaving_a_pre_6_sae_keeps_its_metadata(tmp_path):
    old = {"d_in": 4, "d_sae": 6, "hook_point": "blocks.1.hook_resid_pre", "sae_lens_version": "3.5.0"}  # fmt: skip
    sae = load_saved_sae(_write(tmp_path / "old", old, _standard()))
    sae.save_model(tmp_path / "new")
    again = load_sae(tmp_path / "new")  # SAELens where installed: it must read 6.x metadata
    assert again.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    cfg = json.loads((tmp_path / "new" / CFG_FILE).read_text())
    assert cfg["metadata"]["sae_lens_version"].split(".")[0] == "6"


def test_fields_of_other_architectures_are_ignored_as_sae_lens_does(tmp_path):
    """A standard SAE whose config carries topk's rescale flag decodes as a standard SAE."""
    w = _standard()
    cfg = {**V6, "dtype": "float32", "rescale_acts_by_decoder_norm": True, "k": 3}
    sae = load_saved_sae(_write(tmp_path, cfg, w))
    assert not sae.cfg.rescale_acts_by_decoder_norm and sae.cfg.k is None
    acts = torch.rand(2, 6)
    torch.testing.assert_close(sae.decode(acts), acts @ w["W_dec"] + w["b_dec"], rtol=0, atol=1e-6)
    if HAVE_SAE_LENS:
        from sae_lens import SAE

        lens = SAE.load_from_disk(str(tmp_path))
        x = torch.randn(3, 4)
        torch.testing.assert_close(sae(x), lens(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"residual_threshold": None}, "residual_threshold must be a finite number"),
        ({"max_iterations": 0}, "max_iterations must be null or an integer >= 1"),
    ],
)
def test_matching_pursuit_settings_are_checked(tmp_path, change, match):
    w = {"W_dec": torch.randn(6, 4), "b_dec": torch.randn(4)}
    cfg = {**V6, "architecture": "matching_pursuit", **change}
    with pytest.raises(ValueError, match=match):
        load_saved_sae(_write(tmp_path, cfg, w))


def test_a_failed_save_leaves_no_config_behind(tmp_path, monkeypatch):
    import qk_lens.sae_files as files

    make_sae("standard", "float32", seed=1).save_model(tmp_path)
    other = make_sae("topk", "float32", seed=2, d_sae=12)
    if not isinstance(other, SavedSAE):  # stack (a): the same SAE through qk_lens's writer
        other.save_model(tmp_path / "x")
        other = load_saved_sae(tmp_path / "x")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        other.save_model(tmp_path)
    # the old weights may remain, but without a config nothing reads them as the new SAE
    with pytest.raises(FileNotFoundError, match=r"cfg\.json is missing"):
        load_saved_sae(tmp_path)
