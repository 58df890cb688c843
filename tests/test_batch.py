"""``qk-lens run CONFIG``: configs checked before work, parts whole or absent, resume after
SIGKILL without loss or duplicates, the same rows from every executor, dead workers retried."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import yaml

from qk_lens.batch import ConfigError, load_config, parse_config, plan, read_table, run

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (ROOT / "configs" / "prompts" / "toy_repeats.txt").read_text().splitlines()[:6]
KEY = ["prompt", "layer", "head", "q_pos", "k_pos", "rank"]
HAVE_SAE_LENS_HERE = importlib.util.find_spec("sae_lens") is not None


def write_config(folder: Path, **changes) -> Path:
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = {
        "name": "t",
        "model": {"name": "attn2-ln"},
        "prompts": {"file": "prompts.txt"},
        "compute": {"table": {"layers": [1], "top_k": 4, "min_prob": 0.1}},
        "output": {"dir": "out", "chunk_size": 2},
        "executor": {"kind": "local", "workers": 0, "threads_per_worker": 1},
    }
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        d = cfg
        for p in path:
            d = d.setdefault(p, {})
        if value is None and last in d:
            del d[last]
        else:
            d[last] = value
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    """The rows computed directly, prompt by prompt, with the model's own method."""
    from qk_lens import toy

    model = toy.load("attn2-ln")
    frames = []
    for i, p in enumerate(PROMPTS):
        df = model.qk_attribution_table(p, 1, top_k=4, min_prob=0.1)
        df.insert(0, "prompt", i)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    for c in ("q_kind", "q_label", "k_kind", "k_label"):
        out[c] = out[c].astype(str)
    return out


def same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    got = got.sort_values(KEY, kind="stable").reset_index(drop=True)
    want = want.sort_values(KEY, kind="stable").reset_index(drop=True)
    assert len(got) == len(want) and not got.duplicated(KEY).any()
    # float32 numbers computed in other batches (a resumed run) agree to float32 rounding of
    # sums whose terms reach ~20 (a score near 0 can differ by 5e-7); keys, labels and counts
    # are exact
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"compute__table__colour": "red"}, r"compute\.table\.colour: unknown key"),
        ({"model": None}, r"model: missing"),
        ({"compute__table__top_k": 0}, r"compute\.table\.top_k: .*greater than 0"),
        ({"compute__table__min_prob": "high"}, r"compute\.table\.min_prob"),
        ({"executor__kind": "slurm"}, r"executor\.kind: .*'local' or 'ray'"),
        ({"prompts__file": "missing.txt"}, r"prompts\.file: .*missing\.txt does not exist"),
        ({"prompts__dataset": "x"}, r"prompts: .*exactly one of file"),
        ({"compute__table__layers": [True]}, r"compute\.table\.layers"),
        ({"compute__table__top_k": "3"}, r"compute\.table\.top_k: .*integer"),
        ({"compute__table__heads": []}, r"compute\.table\.heads: .*at least 1"),
    ],
)
def test_a_bad_config_is_one_clear_error(tmp_path, changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, **changes))


def test_model_dependent_checks_run_before_any_work(tmp_path) -> None:
    cfg = load_config(write_config(tmp_path, compute__table__layers=[1, 5]))
    with pytest.raises(ConfigError, match=r"layers\[1\]: layer 5 is out of range: .*2 layers"):
        run(cfg, progress=False)
    assert not (tmp_path / "out").exists()
    cfg = load_config(write_config(tmp_path, compute__table__heads=[7]))
    with pytest.raises(ConfigError, match=r"heads\[0\]: head 7 is out of range"):
        run(cfg, progress=False)


def test_unreadable_prompts_and_bad_yaml(tmp_path) -> None:
    path = write_config(tmp_path)
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot be read as UTF-8"):
        load_config(path)
    path.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["a list"])


def test_example_configs_are_valid() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


# ------------------------------------------------------------------ results
def test_run_writes_what_the_table_gives(tmp_path, reference) -> None:
    cfg = load_config(write_config(tmp_path))
    result = run(cfg, progress=False)
    assert (result.n_parts, result.parts_computed, result.parts_adopted) == (3, 3, 0)
    got = read_table(tmp_path / "out")
    same_rows(got, reference)
    # the rows of each pair sum to its score (an identity of the table, kept by the writer)
    sums = got.groupby(["prompt", "head", "q_pos", "k_pos"]).agg(
        s=("term", "sum"), t=("score", "first")
    )
    assert ((sums.s - sums.t).abs() <= 1e-4 * sums.t.abs().clip(lower=1)).all()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_prompts"] == 6
    assert sum(p["table"] for p in manifest["parts"].values()) == len(got)
    assert manifest["versions"]["torch"] and manifest["model"]["n_layers"] == 2
    assert len(manifest["model"]["weights_sha256"]) == 64
    # a pyarrow dataset of the parts
    assert pads.dataset(tmp_path / "out" / "table").count_rows() == len(got)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "profile.parquet",
        "prompts.jsonl",
        "report.html",
        "table",
    ]
    # a second run adopts everything and computes nothing
    again = run(cfg, progress=False)
    assert (again.parts_adopted, again.parts_computed) == (3, 0)


def test_max_pairs_keeps_the_most_attended(tmp_path, reference) -> None:
    cfg = load_config(write_config(tmp_path, compute__table__max_pairs=5))
    run(cfg, progress=False)
    got = read_table(tmp_path / "out")
    pairs = got.drop_duplicates(["prompt", "head", "q_pos", "k_pos"])
    for i, per in pairs.groupby("prompt"):
        ref = reference[reference.prompt == i].drop_duplicates(["head", "q_pos", "k_pos"])
        assert len(per) == min(5, len(ref))
        assert per.prob.min() >= ref.prob.nlargest(min(5, len(ref))).min() - 1e-12


def test_a_changed_config_refuses_to_mix(tmp_path) -> None:
    run(load_config(write_config(tmp_path)), progress=False)
    changed = load_config(write_config(tmp_path, compute__table__top_k=3))
    with pytest.raises(ConfigError, match="different config.*--overwrite"):
        run(changed, progress=False)
    result = run(changed, progress=False, overwrite=True)
    assert result.parts_computed == 3
    assert (
        read_table(tmp_path / "out").groupby(["prompt", "head", "q_pos", "k_pos"]).size().max() <= 4
    )


def test_dry_run_plans_without_writing(tmp_path) -> None:
    p = plan(load_config(write_config(tmp_path)))
    assert (p.n_prompts, p.n_parts, p.parts_done, p.layers, p.heads) == (6, 3, 0, [1], 4)
    assert 0 < p.est_pairs <= p.pairs_bound and p.est_rows["table"] > 0 and p.est_bytes > 0
    assert not (tmp_path / "out").exists()
    assert "estimated rows" in p.summary()


# ------------------------------------------------------------------ crashes and executors
def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path, reference) -> None:
    cfg_path = write_config(tmp_path, output__chunk_size=1)
    cmd = [sys.executable, "-m", "qk_lens", "run", str(cfg_path), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    table = tmp_path / "out" / "table"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(table.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(table.glob("part-*.parquet")))
    assert 2 <= n_before < 6, f"the kill came too late to test resuming ({n_before} parts)"
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{n_before} already done" in out.stdout or f"{n_before + 1} already done" in out.stdout
    assert not list(table.glob(".*"))  # no temporary files left
    same_rows(read_table(tmp_path / "out"), reference)


def kill_one_worker_after_the_first_part(table: Path, marker: str, killed: list[int]) -> None:
    """SIGKILL one worker process (its command line contains ``marker``) once a part is done."""
    import psutil

    deadline = time.time() + 240
    while time.time() < deadline and not list(table.glob("part-*.parquet")):
        time.sleep(0.02)
    while time.time() < deadline and not killed:
        for child in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if marker in cmd and not killed:
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("kind", "marker"),
    [("local", "spawn_main"), ("ray", "ray::RayWorker")],
)
def test_executors_give_the_same_rows_and_survive_a_killed_worker(
    tmp_path, reference, kind, marker
) -> None:
    if kind == "ray":
        pytest.importorskip("ray")
    cfg = load_config(
        write_config(
            tmp_path, output__chunk_size=1, executor__kind=kind, executor__workers=2,
            executor__max_retries=3,
        )
    )  # fmt: skip
    killed: list[int] = []
    t = threading.Thread(
        target=kill_one_worker_after_the_first_part,
        args=(tmp_path / "out" / "table", marker, killed),
    )
    t.start()
    result = run(cfg, progress=False)
    t.join()
    assert killed, "no worker process was found to kill"
    assert result.parts_computed == 6 and result.retries >= 1
    same_rows(read_table(tmp_path / "out"), reference)


def test_prompts_from_jsonl_and_from_a_dataset(tmp_path, reference) -> None:
    rows = "".join(json.dumps({"id": i, "body": p}) + "\n" for i, p in enumerate(PROMPTS))
    (tmp_path / "p.jsonl").write_text(rows)
    cfg = load_config(write_config(tmp_path, prompts__file="p.jsonl", prompts__field="body"))
    run(cfg, progress=False)
    same_rows(read_table(tmp_path / "out"), reference)
    cfg = load_config(write_config(tmp_path, prompts__file="p.jsonl", prompts__field="text"))
    with pytest.raises(ConfigError, match=r"p\.jsonl:1 has no string under prompts\.field 'text'"):
        run(cfg, progress=False)

    pytest.importorskip("datasets")
    data = tmp_path / "data"  # a local dataset folder: what load_dataset reads offline
    data.mkdir()
    (data / "train.jsonl").write_text(rows)
    cfg = load_config(
        write_config(
            tmp_path, prompts__file=None, prompts__dataset=str(data), prompts__field="body",
            prompts__limit=4, output__dir="out_ds",
        )
    )  # fmt: skip
    run(cfg, progress=False)
    same_rows(read_table(tmp_path / "out_ds"), reference[reference.prompt < 4])


def test_the_qk_profile_counts_what_the_rows_hold(tmp_path, reference) -> None:
    from collections import defaultdict

    from qk_lens.batch import qk_profile

    cfg = load_config(write_config(tmp_path, executor__workers=0))
    run(cfg, progress=False)
    profile = qk_profile(tmp_path / "out", examples=2)
    # a slow reference written differently: one dict entry per interaction, row by row
    count: dict = defaultdict(int)
    total: dict = defaultdict(float)
    share: dict = defaultdict(float)
    prompts: dict = defaultdict(list)
    pairs: dict = defaultdict(set)
    for r in reference.itertuples():
        pairs[(r.layer, r.head)].add((r.prompt, r.q_pos, r.k_pos))
        if r.rank < 0:
            continue
        key = (r.layer, r.head, r.q_kind, r.q_feature, r.q_label, r.k_kind, r.k_feature, r.k_label)
        count[key] += 1
        total[key] += r.term
        share[key] += r.term / r.score
        if r.prompt not in prompts[key]:
            prompts[key].append(r.prompt)
    f = profile.frame
    assert len(f) == len(count) and profile.n_prompts == len(PROMPTS)
    for row in f.itertuples():
        key = (row.layer, row.head, row.q_kind, row.q_feature, row.q_label, row.k_kind,
               row.k_feature, row.k_label)  # fmt: skip
        assert row.count == count[key]
        assert row.n_prompts == len(prompts[key])
        assert list(row.examples) == prompts[key][:2]
        assert row.mean_term == pytest.approx(total[key] / count[key], rel=1e-12, abs=1e-12)
        assert row.mean_share == pytest.approx(share[key] / count[key], rel=1e-9, abs=1e-12)
        assert row.frac_pairs == pytest.approx(count[key] / len(pairs[(row.layer, row.head)]))
    # the run wrote it, and its report names every head with pairs
    saved = pd.read_parquet(tmp_path / "out" / "profile.parquet")
    assert len(saved) == len(f)
    html = (tmp_path / "out" / "report.html").read_text()
    for layer, head in pairs:
        assert f"L{layer}H{head} (" in html
    top = profile.head(1, 0, top_k=1, features_only=True)
    assert top.q_kind[0] == "feature" and top.k_kind[0] == "feature"
    with pytest.raises(ValueError, match="no interactions for L1H9"):
        profile.head(1, 9)
    by_total = profile.head(1, 0, top_k=3, by="total")
    totals = (by_total["count"] * by_total["mean_term"]).abs().tolist()
    everything = f[(f["layer"] == 1) & (f["head"] == 0)]
    assert totals == sorted(totals, reverse=True)
    assert totals[0] == pytest.approx((everything["count"] * everything["mean_term"]).abs().max())
    with pytest.raises(ValueError, match="by must be"):
        profile.head(1, 0, by="size")


def test_graphs_and_head_loadings_per_prompt(tmp_path) -> None:
    """The graph datasets hold each prompt's graph and its loadings, equal to the methods'."""
    from qk_lens import toy

    cfg = load_config(
        write_config(
            tmp_path, compute={"graphs": {"max_n_logits": 2, "min_abs_loading": 0.0}},
            output__chunk_size=4,
        )
    )  # fmt: skip
    result = run(cfg, progress=False)
    assert result.n_parts == 2
    nodes = read_table(tmp_path / "out", "graph_nodes")
    edges = read_table(tmp_path / "out", "graph_edges")
    loads = read_table(tmp_path / "out", "head_loadings")
    model = toy.load("attn2-ln")
    for i in (0, 5):
        g = model.attribution_graph(PROMPTS[i], max_n_logits=2)
        hl = model.head_loadings(g)
        mine = edges[edges.prompt == i].drop(columns="prompt").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, g.edges.reset_index(drop=True), check_dtype=False)
        assert len(nodes[nodes.prompt == i]) == len(g.nodes)
        want = hl.frame()
        got = loads[loads.prompt == i].reset_index(drop=True)
        np.testing.assert_allclose(got.loading, want.loading, rtol=0, atol=0)
        # residual + mlp + Σ heads = the edge's weight, from the written rows alone
        per_edge = got.groupby("edge").loading.sum().to_numpy()
        np.testing.assert_allclose(per_edge, mine.weight.to_numpy(), rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "out" / "table").exists()


def test_steering_sweeps_per_prompt(tmp_path) -> None:
    """A sweep's rows equal steer_qk_sweep's; prompts where the feature is inactive get none."""
    from qk_lens import toy

    model = toy.load("attn2-ln")
    attr = model.qk_attribution(PROMPTS[0], 1, 0, q_pos=-1, k_pos=None)
    best = attr[int(attr.probs.argmax())].top(top_k=1)
    feature = int(best["k_feature"].iloc[0])
    spec = {"layer": 1, "head": 0, "feature": feature, "scales": [0.0, 2.0]}
    cfg = load_config(write_config(tmp_path, compute={"steering": [spec]}))
    run(cfg, progress=False)
    got = read_table(tmp_path / "out", "steering")
    active = set(got.prompt)
    assert 0 in active
    for i, prompt in enumerate(PROMPTS):
        if i not in active:
            with pytest.raises(ValueError, match="not active"):
                model.steer_qk_sweep(prompt, 1, 0, feature, scales=[0.0])
            continue
        sw = model.steer_qk_sweep(prompt, 1, 0, feature, scales=[0.0, 2.0])
        want = sw.frame()
        mine = got[got.prompt == i].reset_index(drop=True)
        np.testing.assert_allclose(mine.score_after, want["L1H0 score"], rtol=0, atol=0)
        np.testing.assert_allclose(mine.prob_after, want["L1H0 prob"], rtol=0, atol=0)
        assert list(mine.top_after) == list(want.top_after)
    cfg = load_config(write_config(tmp_path, compute={"steering": [{**spec, "feature": 10_000}]}))
    with pytest.raises(ConfigError, match=r"steering\[0\]\.feature: feature 10000 is out of range"):
        run(cfg, progress=False)


def test_resume_keys_on_what_decides_the_rows(tmp_path) -> None:
    """A memory setting (query_chunk) resumes; changed prompt text refuses; an unreadable part
    is redone; prompts.jsonl maps each prompt to its source row."""
    (tmp_path / "src").mkdir()
    path = write_config(tmp_path)
    text = (tmp_path / "prompts.txt").read_text()
    (tmp_path / "prompts.txt").write_text("\n" + text)  # a blank first line: rows shift by one
    first = run(load_config(path), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "prompts.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["source_row"]) for x in lines[:2]] == [(0, 1), (1, 2)]
    assert lines[0]["text"] == PROMPTS[0]
    again = run(load_config(write_config(tmp_path, compute__table__query_chunk=3)), progress=False)
    assert (again.parts_adopted, again.parts_computed) == (3, 0)
    (tmp_path / "prompts.txt").write_text("\n" + text)
    part = tmp_path / "out" / "table" / "part-00001.parquet"
    part.write_bytes(b"")  # a part cut short (power loss before the data reached the disk)
    redo = run(load_config(path), progress=False)
    assert (redo.parts_adopted, redo.parts_computed) == (2, 1) and redo.rows == first.rows
    (tmp_path / "prompts.txt").write_text(text.replace("rat", "cat", 1))
    with pytest.raises(ConfigError, match="different config"):
        run(load_config(path), progress=False)


def test_cli_reports_a_bad_config_with_exit_2(tmp_path, capsys) -> None:
    from qk_lens.cli import main

    path = write_config(tmp_path, compute__table__colour="red", executor__kind="slurm")
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "compute.table.colour: unknown key" in err and "executor.kind" in err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ray_on_an_existing_cluster(tmp_path, reference) -> None:
    """``executor.address``: a cluster started apart (``ray start --head``) does the parts, for
    ``qk-lens run`` in a fresh process (as a user connects to their cluster)."""
    pytest.importorskip("ray")
    import socket

    ray_bin = Path(sys.executable).parent / "ray"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [str(ray_bin), "start", "--head", "--num-cpus", "2", f"--port={port}",
             "--include-dashboard", "false", "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=180)
    try:
        # "auto": the cluster `ray start` left its address (and its auth token) for
        path = write_config(
            tmp_path, executor__kind="ray", executor__workers=2, executor__address="auto"
        )
        cmd = [sys.executable, "-m", "qk_lens", "run", str(path), "--quiet"]
        out = subprocess.run(
            cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "3 computed" in out.stdout
        same_rows(read_table(tmp_path / "out"), reference)
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=180)


# ------------------------------------------------------------------ transcoders
def test_transcoder_settings_are_checked_before_any_work(tmp_path) -> None:
    path = write_config(tmp_path, compute__table__basis="transcoders")
    with pytest.raises(ConfigError, match=r"compute\.table\.basis: 'transcoders' needs model"):
        plan(load_config(path))
    # the bundled models are attention-only: no MLP for a transcoder to replace
    import torch

    from tests.test_transcoders import random_transcoders

    random_transcoders(32, 2, torch.float32).save_circuit_tracer(tmp_path / "tc")
    path = write_config(tmp_path, model__transcoders={"path": "tc"})
    # stack (a): the HookedTransformer is attention-only; stack (b): its bridge rebuild has
    # d_model 64 (the set is 32 wide)
    with pytest.raises(ConfigError, match=r"model\.transcoders\.path: .*(attention-only|d_model)"):
        plan(load_config(path))
    path = write_config(tmp_path, model__transcoders={"path": "nowhere"})
    with pytest.raises(ConfigError, match=r"model\.transcoders\.path: .*nowhere"):
        plan(load_config(path))


_TRANSCODER_RUN = """
import sys
import pandas as pd
from qk_lens.batch import load_config, read_table
from qk_lens.batch.inputs import load_model
from qk_lens.cli import main

assert main(["run", "cfg.yaml", "--quiet"]) == 0
got = read_table("out")
cfg = load_config("cfg.yaml")
model = load_model(cfg.model, cfg.base_dir)
frames = []
for i, p in enumerate(cfg.prompts.texts):
    df = model.qk_attribution_table(p, 3, top_k=4, min_prob=0.05, basis="transcoders")
    df.insert(0, "prompt", i)
    frames.append(df)
want = pd.concat(frames, ignore_index=True)
key = ["prompt", "layer", "head", "q_pos", "k_pos", "rank"]
got = got.sort_values(key).reset_index(drop=True)
want = want.sort_values(key).reset_index(drop=True)
for c in ("q_kind", "q_label", "k_kind", "k_label"):
    want[c] = want[c].astype(str)
pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False, rtol=0, atol=0)
print("rows", len(got), "feature terms", int((got["q_kind"] == "feature").sum()))
"""


def test_a_run_with_transcoders_on_a_pretrained_model(tmp_path) -> None:
    """``model.transcoders`` on gpt2 (the tests' offline hub): the run's rows are the table
    the model gives with basis='transcoders'."""
    import torch

    from tests.fake_hub import N_EMBD, N_LAYER, offline_env
    from tests.test_transcoders import random_transcoders

    env = offline_env(tmp_path / "hub")
    tc = random_transcoders(N_EMBD, N_LAYER, torch.float32, "clt", d_tc=64)
    tc.save_circuit_tracer(tmp_path / "clt")
    cfg = {
        "name": "tc",
        "model": {"name": "gpt2", "transcoders": {"path": "clt"}},
        "prompts": {"texts": ["the cat sat on the mat . the cat", "a dog ran . a dog ran"]},
        "compute": {"table": {"layers": [3], "top_k": 4, "min_prob": 0.05, "basis": "transcoders"}},
        "output": {"dir": "out", "chunk_size": 1},
        "executor": {"kind": "local", "workers": 0, "threads_per_worker": 1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "check.py").write_text(_TRANSCODER_RUN)
    out = subprocess.run(
        [sys.executable, "check.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    import re

    m = re.search(r"rows (\d+) feature terms (\d+)", out.stdout)
    assert m, out.stdout[-2000:]
    rows, feats = int(m.group(1)), int(m.group(2))
    assert rows > 0 and feats > 0


_GPT2_RUN = """
import yaml
from qk_lens.batch import parse_config, read_table
from qk_lens.cli import main

raw = yaml.safe_load(open(CONFIG))
# the example as written, with inline prompts for the dataset (the offline hub has none)
raw["prompts"] = {"texts": ["When Mary and John went to the store, John gave a drink to",
                            "The cat sat on the mat. The cat sat on the"], "max_tokens": 128}
raw["output"]["dir"] = "out"
raw["executor"]["workers"] = 0
yaml.safe_dump(raw, open("cfg.yaml", "w"))
assert main(["run", "cfg.yaml", "--quiet"]) == 0
rows = read_table("out")
print("rows", len(rows), "layers", sorted(set(rows["layer"])))
"""


def test_the_gpt2_small_example_config_runs(tmp_path) -> None:
    """configs/gpt2-small-profile.yaml (online) on the tests' offline stand-in hub: its model,
    its release and id load and the table is written (the prompts replaced by two texts)."""
    from tests.fake_hub import offline_env

    if not HAVE_SAE_LENS_HERE:
        pytest.skip("the config names a SAELens release (stack (a))")
    env = offline_env(tmp_path / "hub")
    script = _GPT2_RUN.replace("CONFIG", repr(str(ROOT / "configs" / "gpt2-small-profile.yaml")))
    (tmp_path / "check.py").write_text(script)
    out = subprocess.run(
        [sys.executable, "check.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layers [5]" in out.stdout and "rows 0 " not in out.stdout
