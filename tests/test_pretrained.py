"""The documented from_pretrained workflow, run offline against a local Hugging Face cache.

``tests/fake_hub.py`` writes a hub cache holding a tiny random ``gpt2`` and a small SAE under the
``gpt2-small-res-jb`` release's repo. The user code then runs unchanged in a subprocess with
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at that cache: huggingface_hub reads those
variables when it is imported, so they have to be in place before the interpreter starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_hub import D_SAE, N_EMBD, N_HEAD, N_LAYER, SAE_ID, offline_env

USER_SCRIPT = r"""
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(2)

# ---- the documented user code, verbatim ----
import qk_lens
from sae_lens import SAE
model = qk_lens.HookedQKTransformer.from_pretrained("gpt2")
sae = SAE.from_pretrained("gpt2-small-res-jb", "blocks.1.hook_resid_pre")
model.add_dictionary(sae)
attr = model.qk_attribution("some text", layer=1, head=0, q_pos=-1, k_pos=0)
attr.check()
# ---- end of user code ----

out = {}
assert isinstance(model, qk_lens.HookedQKTransformer), type(model)
assert model.cfg.dtype == torch.float32, model.cfg.dtype
out["model"] = {
    "d_model": model.cfg.d_model,
    "n_layers": model.cfg.n_layers,
    "n_heads": model.cfg.n_heads,
    "d_vocab": model.cfg.d_vocab,
    "model_name": model.cfg.model_name,
}
assert isinstance(sae, SAE), f"SAE.from_pretrained returned {type(sae)}"
out["sae"] = {
    "class": type(sae).__name__,
    "hook_name": sae.cfg.metadata.hook_name,
    "d_in": sae.cfg.d_in,
    "d_sae": sae.cfg.d_sae,
    "normalize_activations": sae.cfg.normalize_activations,
    "b_dec_nonzero": bool(sae.b_dec.abs().sum() > 0),
    "b_enc_nonzero": bool(sae.b_enc.abs().sum() > 0),
    "dictionary_layers": sorted(model.qk_dictionaries),
}
assert model.qk_dictionaries[1].sae is sae

# Independent check: the score TransformerLens's own forward pass puts in hook_attn_scores.
tokens = model.to_tokens("some text")
n_tok = tokens.shape[1]
with torch.no_grad():
    _, cache = model.run_with_cache(
        tokens, names_filter=["blocks.1.attn.hook_attn_scores", "blocks.1.hook_resid_pre"]
    )
hook_score = float(cache["blocks.1.attn.hook_attn_scores"][0, 0, n_tok - 1, 0])
terms_sum = float(attr.terms.sum())
assert (attr.q_pos, attr.k_pos) == (n_tok - 1, 0), (attr.q_pos, attr.k_pos)
assert abs(terms_sum - hook_score) <= 1e-4 * max(1.0, abs(hook_score)), (terms_sum, hook_score)

# The feature rows are the hub SAE's active features at the query position.
qp = attr.query_parts
feats = qp[qp["kind"] == "feature"]
with torch.no_grad():
    acts = sae.encode(cache["blocks.1.hook_resid_pre"][0, n_tok - 1])
active = torch.nonzero(acts > 0)[:, 0].tolist()
assert sorted(feats["feature"].tolist()) == sorted(active), (feats["feature"].tolist(), active)
by_id = dict(zip(feats["feature"].tolist(), feats["activation"].tolist(), strict=True))
assert all(abs(by_id[i] - float(acts[i])) <= 1e-5 * max(1.0, abs(float(acts[i]))) for i in active)
out["attr"] = {
    "n_tokens": n_tok,
    "terms_sum": terms_sum,
    "hook_score": hook_score,
    "check_error": attr.check(),
    "n_feature_rows": len(feats),
    "kinds": sorted(set(qp["kind"])),
}

# A locally saved copy of the SAE attaches too, and gives the same attribution.
local = Path(sys.argv[1])
sae.save_model(local)
sae_local = SAE.load_from_disk(local)
d_local = model.add_dictionary(sae_local)
assert d_local.layer == 1 and model.qk_dictionaries[1] is d_local and d_local.sae is sae_local
attr_local = model.qk_attribution("some text", layer=1, head=0, q_pos=-1, k_pos=0)
out["local"] = {
    "files": sorted(p.name for p in local.iterdir()),
    "hook_name": sae_local.cfg.metadata.hook_name,
    "check_error": attr_local.check(),
    "max_term_diff": float((attr_local.terms - attr.terms).abs().max()),
    "n_feature_rows": int((attr_local.query_parts["kind"] == "feature").sum()),
}

# ---- the bridge way (TransformerLens's recommended model class), verbatim ----
from transformer_lens.model_bridge import TransformerBridge
bridge = qk_lens.attach(TransformerBridge.boot_transformers("gpt2"))
bridge.add_dictionary(SAE.from_pretrained("gpt2-small-res-jb", "blocks.1.hook_resid_pre"))
battr = bridge.qk_attribution("some text", layer=1, head=0, q_pos=-1, k_pos=0)
battr.check()
# ---- end of user code ----
with torch.no_grad():
    _, bcache = bridge.run_with_cache(bridge.to_tokens("some text"))
bridge_score = float(bcache["blocks.1.attn.hook_attn_scores"][0, 0, n_tok - 1, 0])
out["bridge"] = {
    "is_bridge": isinstance(bridge, TransformerBridge),
    "terms_sum": float(battr.terms.sum()),
    "bridge_score": bridge_score,
    "scale": battr.scale,
    "tl_terms_sum": terms_sum,
}
print("QK_LENS_RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(a working folder, an environment whose hub cache is the fake one, offline)."""
    root = tmp_path_factory.mktemp("pretrained")
    env = offline_env(root)
    return root, env


@pytest.fixture(scope="module")
def user_run(hub: tuple[Path, dict]) -> dict:
    root, env = hub
    script = root / "user_code.py"
    script.write_text(USER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(root / "sae_saved_locally")],
        cwd=root,  # not the repo: TransformerLens treats a ./gpt2 folder as a local model
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"user code failed offline:\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("QK_LENS_RESULT ")]
    assert lines, f"no result printed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("QK_LENS_RESULT "))


def test_from_pretrained_gpt2_and_sae_offline(user_run: dict) -> None:
    m, sae, attr = user_run["model"], user_run["sae"], user_run["attr"]
    # The tiny cached model was loaded, not the real 768-wide GPT-2.
    assert m["d_model"] == N_EMBD
    assert (m["n_layers"], m["n_heads"]) == (N_LAYER, N_HEAD)
    assert m["model_name"] == "gpt2"

    assert sae["class"] == "StandardSAE"
    assert sae["hook_name"] == SAE_ID
    assert (sae["d_in"], sae["d_sae"]) == (N_EMBD, D_SAE)
    assert sae["normalize_activations"] == "none"
    assert sae["b_dec_nonzero"] and sae["b_enc_nonzero"]
    assert sae["dictionary_layers"] == [1]

    assert attr["check_error"] <= 1e-4
    assert attr["terms_sum"] == pytest.approx(attr["hook_score"], abs=1e-4)
    assert attr["n_feature_rows"] > 0
    assert "feature" in attr["kinds"] and "error" in attr["kinds"]


def test_locally_saved_sae_attaches(user_run: dict) -> None:
    local = user_run["local"]
    assert {"cfg.json", "sae_weights.safetensors"} <= set(local["files"])
    assert local["hook_name"] == SAE_ID
    assert local["check_error"] <= 1e-4
    assert local["max_term_diff"] <= 1e-6
    assert local["n_feature_rows"] == user_run["attr"]["n_feature_rows"] > 0


def test_bridge_boot_transformers_offline(user_run: dict) -> None:
    """``TransformerBridge.boot_transformers("gpt2")``, attached, explains the same scores."""
    b = user_run["bridge"]
    assert b["is_bridge"]
    assert abs(b["terms_sum"] - b["bridge_score"]) <= 1e-4 * b["scale"]
    # the same weights through HookedTransformer and through the bridge: the same score
    assert b["terms_sum"] == pytest.approx(b["tl_terms_sum"], abs=1e-4 * b["scale"])


def test_cli_table_on_a_bridge_offline(hub: tuple[Path, dict]) -> None:
    """``qk-lens table --model gpt2 --bridge``: the pretrained path through a bridge."""
    import pandas as pd

    root, env = hub
    out = root / "bridge_table.csv"
    args = ["--model", "gpt2", "--bridge", "--sae-release", "gpt2-small-res-jb"]
    args += ["--sae-id", SAE_ID, "--prompt", "some text", "--layer", "1", "--top-k", "4"]
    proc = subprocess.run(
        [sys.executable, "-m", "qk_lens", "table", *args, "--out", str(out), "--quiet"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    pairs = table.groupby(["head", "q_pos", "k_pos"])
    assert len(pairs) >= 4  # every head, every unmasked pair of the prompt
    sums, hooked = pairs["term"].sum(), pairs["model_score"].first()  # the bridge's own hook
    assert ((sums - hooked).abs() <= 1e-4 * hooked.abs().clip(lower=1.0)).all()
