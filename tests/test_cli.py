"""`qk-lens demo`: the main job, its report, its exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser

from qk_lens import toy
from qk_lens.cli import EXIT_CONFIRMED, EXIT_ERROR, main


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
