"""`qk-lens demo`: the main job, its report, its exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from qk_lens import toy
from qk_lens.cli import EXIT_CONFIRMED, EXIT_ERROR, EXIT_NOT_CONFIRMED, main


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.external = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.external.append((tag, name, value))


def test_demo_confirms_and_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    assert main(["demo", "--out", str(out)]) == EXIT_CONFIRMED
    text = capsys.readouterr().out
    assert "Confirmed" in text and "current token = " in text and "previous token = " in text
    html = out.read_text()
    refs = _Refs()
    refs.feed(html)
    assert refs.external == []
    assert "<script src" not in html and "@import" not in html and "url(" not in html
    assert "Induction head" in html and "previous token = " in html
    assert "Head atlas" in html and "induction" in html


def test_demo_options(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--model",
            "attn2-rope",
            "--prompt",
            "owl cat jay fox elk hen owl cat jay fox elk hen",
            "--q-pos",
            "9",
            "--top-k",
            "3",
            "--no-report",
        ]
    )
    text = capsys.readouterr().out
    assert code == EXIT_CONFIRMED, text
    assert "query position 9 ('jay') -> key position 4 ('fox')" in text
    assert "report:" not in text


def test_casebook_demo_case(tmp_path, capsys):
    """`qk-lens demo --model casebook --case NAME` replays the case and writes its report."""
    out = tmp_path / "qk_lens_demo.html"
    code = main(["demo", "--model", "casebook", "--case", "antonyms", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    # 0 when every check passes, 1 when one fails (the shipped model: docs/casebook.md)
    assert code == (EXIT_CONFIRMED if "\nConfirmed" in text else EXIT_NOT_CONFIRMED), text
    assert "case: antonyms" in text and "held-out prompts flipped" in text and "[ok]" in text
    assert "edge across positions" in text and "qk_lens casebook: antonyms" in out.read_text()


def test_casebook_demo_bad_flags(capsys):
    assert main(["demo", "--model", "attn2-ln", "--case", "antonyms"]) == EXIT_ERROR
    assert "--case is for the casebook model" in capsys.readouterr().err
    assert main(["demo", "--model", "casebook", "--prompt", "the opposite of big is"]) == EXIT_ERROR
    assert "draws its own held-out prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--model", "casebook", "--case", "colour"])


def test_demo_missing_model_exits_nonzero(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nowhere")]) == EXIT_ERROR
    assert "nowhere" in capsys.readouterr().err
    broken = tmp_path / "attn2-ln"
    shutil.copytree(toy.model_dir("attn2-ln"), broken)
    (broken / "model.safetensors").unlink()
    assert main(["demo", "--model", str(broken)]) == EXIT_ERROR
    assert "model.safetensors is missing" in capsys.readouterr().err


def test_demo_prompt_without_repeat_exits_nonzero(capsys):
    assert main(["demo", "--prompt", "fox owl cat", "--no-report"]) == EXIT_ERROR
    assert "no repeated token" in capsys.readouterr().err


def test_demo_prompt_with_unknown_words_exits_nonzero(capsys):
    assert main(["demo", "--prompt", "fox hello owl fox hello owl", "--no-report"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "hello" in err and "fox" in err  # names the bad word and lists the vocabulary


def test_console_script_installed(tmp_path):
    """The `qk-lens` entry point resolves (the README's first command uses it)."""
    exe = shutil.which("qk-lens")
    cmd = [exe] if exe else [sys.executable, "-m", "qk_lens.cli"]
    res = subprocess.run([*cmd, "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--prompt" in res.stdout
    assert exe is not None, "qk-lens is not on PATH: is the package installed (pip install -e .)?"


def test_table_batch_run(tmp_path, capsys):
    import pandas as pd

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fox owl cat fox owl cat\n\neel jay hen eel jay hen\n")
    out = tmp_path / "t.csv"
    args = ["table", "--prompts", str(prompts), "--layer", "1", "--top-k", "4", "--quiet"]
    assert main([*args, "--min-prob", "0.2", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert sorted(df["prompt"].unique()) == [0, 1]  # the blank line is skipped
    assert (df["prob"] >= 0.2).all()
    # each pair's listed terms plus its remainder row sum to its score (an independent sum)
    sums = df.groupby(["prompt", "head", "q_pos", "k_pos"]).agg(
        t=("term", "sum"), s=("score", "first")
    )
    assert ((sums["t"] - sums["s"]).abs() <= 1e-4 * (1 + sums["s"].abs())).all()
    jl = tmp_path / "t.jsonl"
    assert main(["table", "--prompt", "fox owl fox owl", "--layer", "0", "--heads", "1", "--quiet",
                 "--out", str(jl)]) == 0  # fmt: skip
    assert set(pd.read_json(jl, lines=True)["head"]) == {1}


def test_table_bad_input(tmp_path, capsys):
    assert main(["table", "--prompts", str(tmp_path / "none.txt"), "--layer", "1"]) == EXIT_ERROR
    assert "none.txt" in capsys.readouterr().err
    assert main(["table", "--prompt", "fox", "--layer", "1", "--out", "x.xlsx"]) == EXIT_ERROR
    assert ".csv" in capsys.readouterr().err
    assert main(["table", "--prompt", "fox owl", "--layer", "5", "--quiet"]) == EXIT_ERROR
    assert "layer=5" in capsys.readouterr().err
    assert main(["table", "--prompt", "fox owl", "--layer", "1", "--heads", "0,x"]) == EXIT_ERROR
    assert "--heads" in capsys.readouterr().err
    code = main(["table", "--model", "gpt2", "--prompt", "hi", "--layer", "1", "--quiet"])
    assert code == EXIT_ERROR and "--sae-release" in capsys.readouterr().err
