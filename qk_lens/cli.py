"""The ``qk-lens`` command.

``qk-lens demo``: the induction story on a bundled tiny model (no download), printed and written
as a self-contained HTML report. Exit status: 0 confirmed, 1 ran but not confirmed, 2 something
needed is missing or the input is invalid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_CONFIRMED, EXIT_NOT_CONFIRMED, EXIT_ERROR = 0, 1, 2


def _demo(args: argparse.Namespace) -> int:
    from qk_lens import toy
    from qk_lens.demo import run_story

    try:
        model = toy.load(args.model)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"qk-lens demo: cannot load the model: {e}", file=sys.stderr)
        return EXIT_ERROR
    prompt = args.prompt
    if prompt is not None and not prompt.strip():
        print("qk-lens demo: --prompt is empty", file=sys.stderr)
        return EXIT_ERROR
    unknown = _unknown_words(model, prompt) if prompt is not None else []
    if unknown:
        vocab = " ".join(w for w in model.tokenizer.get_vocab() if not w.startswith("<"))
        print(
            f"qk-lens demo: --prompt has words outside the model's vocabulary: "
            f"{', '.join(unknown)}; use these words: {vocab}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        story = run_story(model, prompt=prompt, q_pos=args.q_pos, top_k=args.top_k)
    except (ValueError, TypeError) as e:
        print(f"qk-lens demo: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(story.summary())
    if args.out is not None:
        try:
            path = story.report().save(args.out)
        except OSError as e:
            print(f"qk-lens demo: cannot write the report to {args.out}: {e}", file=sys.stderr)
            return EXIT_ERROR
        print(f"\nreport: {path.resolve()}")
    return EXIT_CONFIRMED if story.confirmed else EXIT_NOT_CONFIRMED


def _unknown_words(model, prompt: str) -> list[str]:
    """Words the tokenizer maps to its unknown token (they would all look like one token)."""
    tok = model.tokenizer
    if tok is None or tok.unk_token_id is None:
        return []
    return [w for w in prompt.split() if tok.convert_tokens_to_ids(w) == tok.unk_token_id]


def build_parser() -> argparse.ArgumentParser:
    from qk_lens.toy import DEFAULT_MODEL, NAMES

    parser = argparse.ArgumentParser(
        prog="qk-lens", description="Explain why attention heads attend where they do."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="the induction story on a bundled tiny model (no download)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"bundled model ({', '.join(NAMES)}) or a directory written by "
        f"`python -m qk_lens.toy.train --out DIR` (default: {DEFAULT_MODEL})",
    )
    demo.add_argument(
        "--prompt",
        default=None,
        help="words of the model's vocabulary with a repeat, e.g. 'fox owl cat jay fox owl cat' "
        "(default: a random repeated segment)",
    )
    demo.add_argument(
        "--q-pos",
        type=int,
        default=None,
        help="query position (a repeated token; default: the last repeated token)",
    )
    demo.add_argument("--top-k", type=int, default=8, help="interactions to show (default 8)")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("qk_lens_demo.html"),
        help="where the HTML report goes (default: ./qk_lens_demo.html)",
    )
    demo.add_argument("--no-report", dest="out", action="store_const", const=None)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        print("qk-lens demo: --top-k must be >= 1", file=sys.stderr)
        return EXIT_ERROR
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
