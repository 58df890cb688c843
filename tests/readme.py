"""The README's (and docs/'s) code blocks, read, run and compared with the output shown.

Conventions the documents follow (``tests/test_readme.py`` enforces them):

* A fenced ```` ```python ```` block is an example a user copies as written. It runs on its own
  (a fresh namespace, in a scratch folder), so it must import what it uses.
* A block whose first line is a comment starting with ``# online`` downloads something. The
  tests run it in a fresh process against the local fake hub (``tests/fake_hub.py``), offline.
* A ```` ```text ```` block right after a python block (blank lines between, nothing else) is
  what that block prints. A ```` ```text ```` block whose first line is ``$ COMMAND`` is what
  that command prints.
* Printed numbers with a decimal point are compared to within one unit of the last digit shown
  (the machines that run the tests round float32 sums differently in the last place), written
  the same way (as many decimals, an exponent or not); integers exactly; everything else
  exactly, up to runs of spaces (a DataFrame's column widths follow its numbers).

``python -m tests.readme`` rewrites the output blocks of the offline examples with what they
print now; read the diff before committing it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(\S*)\s*$")
_NUMBER = re.compile(r"[-+−]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Block:
    """One fenced block: its language, where it sits, its text, and the output shown under it."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    output: Block | None = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def online(self) -> bool:
        first = self.text.lstrip().splitlines()[0] if self.text.strip() else ""
        return first.startswith("# online")

    @property
    def command(self) -> str | None:
        """For a text block that shows a command's output: the command after ``$ ``."""
        first = self.text.splitlines()[0] if self.text else ""
        return first[2:] if self.lang == "text" and first.startswith("$ ") else None


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, python blocks paired with their output block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    between: list[str] = []  # lines since the last block closed
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            between.append(lines[i])
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: a fenced block is never closed")
        block = Block(path, start + 1, m.group(1), "\n".join(body) + "\n")
        prev = found[-1] if found else None
        if (
            block.lang == "text"
            and block.command is None
            and prev is not None
            and prev.lang == "python"
            and not any(s.strip() for s in between)
        ):
            prev.output = block
        found.append(block)
        between = []
        i += 1
    return found


def python_blocks() -> list[Block]:
    return [b for doc in DOCUMENTS for b in blocks(doc) if b.lang == "python"]


def command_blocks() -> list[Block]:
    return [b for doc in DOCUMENTS for b in blocks(doc) if b.command is not None]


def run_block(block: Block, cwd: Path) -> str:
    """Run an offline block in this process, in ``cwd``, in a fresh namespace; what it printed."""
    out = io.StringIO()
    code = compile(block.text, block.name, "exec")
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            exec(code, {"__name__": "__main__"})  # noqa: S102 - the README's own code
    finally:
        os.chdir(old)
    return out.getvalue()


def _tokens(text: str) -> list[str | float]:
    """Text split into numbers (kept with their shown precision) and squeezed other text."""
    parts: list[str | float] = []
    pos = 0
    for m in _NUMBER.finditer(text):
        parts.append(re.sub(r"\s+", " ", text[pos : m.start()]))
        parts.append(m.group(0))
        pos = m.end()
    parts.append(re.sub(r"\s+", " ", text[pos:]).strip())
    return parts


def _shape(number: str) -> tuple[bool, int, bool]:
    """(has a decimal point, digits after it, has an exponent): how a number is written."""
    mantissa, e, _ = number.lower().partition("e")
    return "." in mantissa, len(mantissa.partition(".")[2]), bool(e)


# float32 results vary by a few units in their last place with the thread count and batch
# shapes: a number shown with more digits than that may differ by this much, relative
_FLOAT32 = 5e-7


def _last_place(shown: str) -> float:
    mantissa, _, exp = shown.lower().replace("−", "-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (-decimals + (int(exp) if exp else 0))


def mismatch(shown: str, printed: str) -> str | None:
    """None if ``printed`` is what ``shown`` says (numbers to ±1 in their last shown digit, or
    to float32's few units in the last place); else a description of the first difference."""
    a, b = _tokens(shown.strip()), _tokens(printed.strip())
    if len(a) != len(b):
        return f"shown:\n{shown}\nprinted:\n{printed}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if i % 2 == 0:
            if x.strip() != y.strip():
                return f"text differs: {x!r} vs {y!r}\nprinted:\n{printed}"
            continue
        fx, fy = float(x.replace("−", "-")), float(y.replace("−", "-"))
        if _shape(x) != _shape(y):  # 0.99 vs 0.9931, 17 vs 16.5: another format, not rounding
            return f"number written differently: shown {x}, printed {y}\nprinted:\n{printed}"
        if not _shape(x)[0] and not _shape(x)[2]:
            if fx != fy:  # integers (heads, positions, counts) are exact
                return f"integer differs: shown {x}, printed {y}\nprinted:\n{printed}"
        elif not abs(fx - fy) <= max(1.01 * _last_place(x), _FLOAT32 * abs(fx)):  # NaN fails
            return f"number differs: shown {x}, printed {y}\nprinted:\n{printed}"
    return None


def rewrite(path: Path, new_outputs: dict[int, str]) -> None:
    """Replace the output blocks opened at the given lines with new text."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for start in sorted(new_outputs, reverse=True):
        end = start  # 1-based opening line; find the closing fence
        while not lines[end].startswith("```"):
            end += 1
        lines[start:end] = new_outputs[start].rstrip("\n").splitlines()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    import tempfile

    for doc in DOCUMENTS:
        updates = {}
        for b in blocks(doc):
            if b.lang != "python" or b.online or b.output is None:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                printed = run_block(b, Path(tmp))
            if mismatch(b.output.text, printed) is not None:
                updates[b.output.line] = printed
                print(f"{b.name}: output block rewritten", file=sys.stderr)
        if updates:
            rewrite(doc, updates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
