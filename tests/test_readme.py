"""Every code block of the README (and docs/) runs as written and prints what the README shows.

Offline blocks run in this process, each in a fresh namespace and a scratch folder, on the
bundled models; online blocks run in a fresh process against the local fake hub; a ``$ qk-lens
...`` transcript is compared with what the command prints now. Conventions: ``tests/readme.py``.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme import (
    DOCUMENTS,
    ROOT,
    Block,
    blocks,
    command_blocks,
    mismatch,
    python_blocks,
    run_block,
)

HAVE_SAE_LENS = importlib.util.find_spec("sae_lens") is not None

PYTHON = python_blocks()
OFFLINE = [b for b in PYTHON if not b.online]
ONLINE = [b for b in PYTHON if b.online]
COMMANDS = command_blocks()


def needs(block: Block) -> str | None:
    """Why this block cannot run on this stack, or None."""
    if re.search(r"^\s*(from|import) sae_lens\b", block.text, re.M) and not HAVE_SAE_LENS:
        return "imports sae_lens (stack (a)); this is stack (b)"
    return None


def test_the_documents_have_the_examples() -> None:
    """The parser finds what is there (a test of the reader itself: nothing silently skipped)."""
    assert len(OFFLINE) >= 7 and len(ONLINE) >= 2
    assert any(b.command == "qk-lens demo" for b in COMMANDS)
    for b in PYTHON:
        compile(b.text, b.name, "exec")
    for doc in DOCUMENTS:
        found = blocks(doc)
        shown = {id(b.output) for b in found if b.output is not None}
        for b in found:
            # a text block is either a python block's output or a command's transcript: an
            # output block nobody checks is exactly what this test file exists to prevent
            if b.lang == "text":
                assert id(b) in shown or b.command is not None, f"{b.name}: unchecked output"


@pytest.mark.parametrize("block", OFFLINE, ids=lambda b: b.name)
def test_offline_block_runs_and_prints_what_is_shown(block: Block, tmp_path: Path) -> None:
    if reason := needs(block):
        pytest.skip(reason)
    assert block.output is not None, (
        f"{block.name}: an offline example shows what it prints in a ```text block under it"
    )
    printed = run_block(block, tmp_path)
    problem = mismatch(block.output.text, printed)
    assert problem is None, f"{block.name} (python -m tests.readme rewrites it): {problem}"


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.fake_hub import offline_env

    return offline_env(tmp_path_factory.mktemp("readme_hub"))


@pytest.mark.parametrize("block", ONLINE, ids=lambda b: b.name)
def test_online_block_runs_against_the_fake_hub(
    block: Block, hub_env: dict[str, str], tmp_path: Path
) -> None:
    if reason := needs(block):
        pytest.skip(reason)
    script = tmp_path / "block.py"
    script.write_text(block.text)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,  # not the repo: TransformerLens treats a ./gpt2 folder as a local model
        env=hub_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{block.name} failed offline:\n{proc.stdout}\n{proc.stderr}"
    if block.output is not None:
        assert mismatch(block.output.text, proc.stdout) is None


@pytest.mark.parametrize("block", COMMANDS, ids=lambda b: b.name)
def test_command_transcript_is_what_the_command_prints(block: Block, tmp_path: Path) -> None:
    argv = shlex.split(block.command or "")
    assert argv[0] == "qk-lens", f"{block.name}: only qk-lens transcripts are checked"
    if any(a.startswith("configs/") for a in argv):  # as from a clone's root
        shutil.copytree(ROOT / "configs", tmp_path / "configs")
    proc = subprocess.run(
        [sys.executable, "-m", "qk_lens", *argv[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"`{block.command}` failed:\n{proc.stdout}\n{proc.stderr}"
    shown = block.text.split("\n", 1)[1]
    printed = proc.stdout.replace(str(tmp_path.resolve()), "/path/to")
    problem = mismatch(shown, printed)
    assert problem is None, f"{block.name}: `{block.command}` prints otherwise: {problem}"


@pytest.mark.parametrize(
    ("printed", "ok"),
    [
        ("score 16.918 prob 0.992", True),
        ("score 16.919 prob 0.992", True),  # one unit in the last shown place
        ("score  16.918   prob 0.992", True),  # column widths
        ("score 16.921 prob 0.992", False),
        ("score nan prob 0.992", False),
        ("score 16.918 prob 0.992 extra", False),
        ("score 16.918 p 0.992", False),
        ("score 1.6918e1 prob 0.992", False),  # written differently
        ("score 16.9 prob 0.992", False),
        ("score 16.918 prob 0.9921", False),
    ],
)
def test_the_comparison_can_fail(printed: str, ok: bool) -> None:
    assert (mismatch("score 16.918 prob 0.992", printed) is None) is ok


def test_blocks_pair_outputs_only_when_adjacent(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```python\nprint(1)\n```\n\n```text\n1\n```\n"
        "```python\nprint(2)\n```\nsome words\n```text\n2\n```\n"
        "```text\n$ qk-lens demo\nhello\n```\n"
    )
    found = blocks(doc)
    assert [b.lang for b in found] == ["python", "text", "python", "text", "text"]
    assert found[0].output is found[1]
    assert found[2].output is None
    assert found[4].command == "qk-lens demo"


def test_integers_are_exact() -> None:
    assert mismatch("head L0H3 at 17", "head L0H3 at 17") is None
    assert mismatch("head L0H3 at 17", "head L0H2 at 17") is not None
    assert mismatch("head L0H3 at 17", "head L0H3 at 18") is not None
