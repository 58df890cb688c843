"""The ``qk-lens`` command.

``qk-lens demo``: the induction story on a bundled tiny model (no download), printed and written
as a self-contained HTML report; ``--model casebook --case NAME`` replays one of the paper's case
studies on the casebook model (``qk_lens.casebook``). Exit status: 0 confirmed, 1 ran but not
confirmed, 2 something needed is missing or the input is invalid.

``qk-lens table``: the batch run — ``qk_attribution_table`` of one layer for every prompt of a
file (or ``--prompt``), written as one CSV / JSON Lines / Parquet table with a ``prompt`` column.
Models: a bundled toy model or directory, or any TransformerLens name (downloaded) with SAELens
SAEs (``--sae-release`` and ``--sae-id``). Exit status 0, or 2 on missing pieces / bad input.

``qk-lens run CONFIG``: a batch analysis from a YAML config (``configs/``), written as a
Parquet dataset with a manifest, resumable after a crash, on local workers or a Ray cluster
(``qk_lens.batch``). Exit status 0, 1 if a worker kept dying, 2 on a bad config or input.

``qk-lens train`` (also ``python -m qk_lens train``): rebuild a bundled toy model, its SAEs
and labels from nothing (``qk_lens.toy.train.build``), printing one JSON summary per stage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

EXIT_CONFIRMED, EXIT_NOT_CONFIRMED, EXIT_ERROR = 0, 1, 2
_DEFAULT_OUT = Path("qk_lens_demo.html")  # the default object itself: an explicit --out differs


def _demo(args: argparse.Namespace) -> int:
    from qk_lens import toy
    from qk_lens.demo import run_story

    is_casebook = _is_casebook(args.model)
    if args.case is not None and not is_casebook:
        print(f"qk-lens demo: --case is for the casebook model (--model casebook), not "
              f"{args.model!r}", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    if is_casebook and (args.prompt is not None or args.q_pos is not None):
        print("qk-lens demo: the casebook demo draws its own held-out prompt; --prompt and "
              "--q-pos are for the induction demo on attn2-ln / attn2-rope", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    try:
        model = toy.load(args.model, bridge=args.bridge or None)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"qk-lens demo: cannot load the model: {e}", file=sys.stderr)
        return EXIT_ERROR
    if is_casebook:
        return _casebook_demo(model, args)
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
        import torch

        il, ih = story.induction_head
        explorer = model.qk_explorer(
            torch.tensor(story.prompt_tokens), il, top_k=args.top_k, min_prob=0.05,
            title=f"qk_lens demo: layer {il} of {story.model_name}",
        )  # fmt: skip
        out = Path(args.out)
        try:
            epath = explorer.save(out.with_name(f"{out.stem}_explorer{out.suffix or '.html'}"))
        except OSError as e:
            print(f"qk-lens demo: cannot write the explorer: {e}", file=sys.stderr)
            return EXIT_ERROR
        print(
            f"explorer: {epath.resolve()} (click L{il}H{ih}, then the cell at query "
            f"{story.q_pos}, key {story.k_pos})"
        )
    return EXIT_CONFIRMED if story.confirmed else EXIT_NOT_CONFIRMED


def _is_casebook(name: str) -> bool:
    from qk_lens import toy

    if name == "casebook":
        return True
    config = Path(name) / "config.json"
    if name in toy.NAMES or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("recipe", {}).get("corpus") == "casebook"
    except (OSError, ValueError, AttributeError):
        return False


def _casebook_demo(model, args: argparse.Namespace) -> int:
    from qk_lens.casebook import run_case

    case = args.case or "induction"
    try:
        study = run_case(model, case, progress=not args.quiet)
    except (ValueError, TypeError) as e:
        print(f"qk-lens demo: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(study.summary())
    if args.out is not None:
        out = Path(f"qk_lens_casebook_{case}.html") if args.out is _DEFAULT_OUT else Path(args.out)
        try:
            path = study.report().save(out)
        except OSError as e:
            print(f"qk-lens demo: cannot write the report to {out}: {e}", file=sys.stderr)
            return EXIT_ERROR
        print(f"\nreport: {path.resolve()}")
    return EXIT_CONFIRMED if study.confirmed else EXIT_NOT_CONFIRMED


def _load_for_table(args: argparse.Namespace):
    """The flags checked as flags, then the same loader as ``qk-lens run``'s configs."""
    from qk_lens import toy
    from qk_lens.batch.config import DictionarySpec, ModelSpec
    from qk_lens.batch.inputs import load_model

    is_toy = args.model in toy.NAMES or (Path(args.model) / "config.json").is_file()
    if is_toy and (args.sae_release or args.sae_id or args.sae):
        raise ValueError(
            "--sae-release/--sae-id/--sae are for pretrained models; toy models ship SAEs"
        )
    if bool(args.sae_release) != bool(args.sae_id):
        raise ValueError("--sae-release and --sae-id go together (a SAELens release and its ids)")
    if not is_toy and not (args.sae_release or args.sae) and args.basis == "dictionary":
        raise ValueError(
            f"{args.model!r} is not a bundled model: give its SAEs with --sae-release and --sae-id "
            "(e.g. --sae-release gpt2-small-res-jb --sae-id blocks.5.hook_resid_pre), or with "
            "--sae DIR or --sae hf://ORG/REPO/FOLDER (SAELens's saved format), or use "
            "--basis upstream"
        )
    if args.sae_release:
        try:
            import sae_lens  # noqa: F401
        except ImportError:
            raise ValueError(
                "--sae-release needs SAELens (with TransformerLens 3.x); beside TransformerLens "
                "4 give each SAE as --sae hf://ORG/REPO/FOLDER or a local directory"
            ) from None
    dictionaries = [DictionarySpec(release=args.sae_release, id=i) for i in args.sae_id or []]
    dictionaries += [DictionarySpec(path=p) for p in args.sae or []]
    return load_model(ModelSpec(name=args.model, bridge=args.bridge, dictionaries=dictionaries))


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        prompts = list(args.prompt)
    else:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        prompts = [line.rstrip("\n") for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError("no prompts: the file is empty (one prompt per line)")
    return prompts


def _parse_heads(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.lstrip("-").isdigit() for p in parts):
        raise ValueError(f"--heads must be comma-separated head indices like 0,3,5; got {text!r}")
    return [int(p) for p in parts]


TABLE_FORMATS = (".csv", ".jsonl", ".parquet")


def _table(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    out = Path(args.out)
    if out.suffix not in TABLE_FORMATS:
        print(
            f"qk-lens table: --out must end in one of {TABLE_FORMATS}, got {out.name!r}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        prompts = _read_prompts(args)
        model = _load_for_table(args)
        heads = None if args.heads is None else _parse_heads(args.heads)
        frames = []
        for i, prompt in enumerate(tqdm(prompts, desc="prompts", disable=args.quiet)):
            df = model.qk_attribution_table(
                prompt, args.layer, heads=heads, top_k=args.top_k, min_prob=args.min_prob,
                basis=args.basis,
            )  # fmt: skip
            df.insert(0, "prompt", i)
            frames.append(df)
            model.clear_qk_cache()  # one prompt at a time: keep memory flat over long files
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"qk-lens table: {e}", file=sys.stderr)
        return EXIT_ERROR
    table = pd.concat(frames, ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        table.to_csv(out, index=False)
    elif out.suffix == ".jsonl":
        table.to_json(out, orient="records", lines=True)
    else:
        table.to_parquet(out, index=False)
    n_pairs = table.groupby(["prompt", "head", "q_pos", "k_pos"]).ngroups
    print(f"{len(table)} rows ({n_pairs} (head, q, k) pairs over {len(prompts)} prompts) -> {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from qk_lens.batch import ConfigError, WorkerDied, load_config, plan, run

    try:
        cfg = load_config(args.config)
        if args.dry_run:
            print(plan(cfg, out=args.out).summary())
            return 0
        result = run(cfg, out=args.out, overwrite=args.overwrite, progress=not args.quiet)
    except (ConfigError, FileNotFoundError, ValueError, TypeError, ImportError) as e:
        print(f"qk-lens run: {e}", file=sys.stderr)
        return EXIT_ERROR
    except WorkerDied as e:
        print(f"qk-lens run: {e}; rerun the same command to resume", file=sys.stderr)
        return EXIT_NOT_CONFIRMED
    print(result.summary())
    return 0


def _unknown_words(model, prompt: str) -> list[str]:
    """Words the tokenizer maps to its unknown token (they would all look like one token)."""
    tok = model.tokenizer
    if tok is None or tok.unk_token_id is None:
        return []
    return [w for w in prompt.split() if tok.convert_tokens_to_ids(w) == tok.unk_token_id]


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from qk_lens.toy import hooked_transformer_available
    from qk_lens.toy.recipes import RECIPES

    if not hooked_transformer_available():
        print(
            "qk-lens train: training the toy models needs HookedTransformer and SAELens's trainer "
            "(TransformerLens 3.x with SAELens: pip install 'qk_lens[saelens]'); the models it "
            "trains then load as bridges on TransformerLens 4 too",
            file=sys.stderr,
        )
        return EXIT_ERROR
    from qk_lens.toy.train import MODELS_DIR, STAGES, build

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"qk-lens train: unknown stages {unknown}; choose from {', '.join(STAGES)}",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    if args.model == "all":  # every recipe in its own process, side by side
        rest = ["--stages", ",".join(stages), "--probe-sequences", str(args.probe_sequences)]
        for flag, value in (("--steps", args.steps), ("--sae-steps", args.sae_steps),
                            ("--out", args.out), ("--seed", args.seed),
                            ("--threads", args.threads)):  # fmt: skip
            if value is not None:
                rest += [flag, str(value)]
        procs = [
            subprocess.Popen([sys.executable, "-m", "qk_lens", "train", "--model", name, *rest])
            for name in sorted(RECIPES)
        ]
        return max(p.wait() for p in procs)
    recipe = RECIPES[args.model]
    if args.seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.seed)
    # the recipe's thread count by default (one for the small models, so `--model all` runs
    # them side by side, one per core): the results are bit-reproducible for a thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or recipe.threads)
    try:
        out = (args.out or MODELS_DIR) / recipe.name
        for summary in build(recipe, out, stages, args.steps, args.sae_steps, args.probe_sequences):
            print(json.dumps(summary), flush=True)
    finally:
        torch.set_num_threads(threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qk_lens.toy import DEFAULT_MODEL, NAMES
    from qk_lens.toy.casebook_corpus import CASES

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
        f"`qk-lens train --out DIR` (default: {DEFAULT_MODEL})",
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
        default=_DEFAULT_OUT,
        help="where the HTML report goes (default: ./qk_lens_demo.html; with the casebook "
        "./qk_lens_casebook_CASE.html)",
    )
    demo.add_argument("--no-report", dest="out", action="store_const", const=None)
    demo.add_argument(
        "--case",
        choices=CASES,
        default=None,
        help="with --model casebook: the case study to replay (default: induction)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--bridge", action="store_true", help="load the model as a "
                      "TransformerBridge (the default where HookedTransformer is unavailable)")  # fmt: skip
    demo.set_defaults(run=_demo)

    table = sub.add_parser(
        "table",
        help="batch run: top QK terms of one layer for every prompt, as one table",
        description="qk_attribution_table for each prompt; rows of a (prompt, head, q, k) pair "
        "sum exactly to its score (the remainder row carries the unlisted terms).",
    )
    table.add_argument("--model", default=DEFAULT_MODEL, help="bundled model, its directory, "
                       "or a TransformerLens model name (downloads)")  # fmt: skip
    table.add_argument("--bridge", action="store_true", help="load --model as a "
                       "TransformerBridge (the default where HookedTransformer is unavailable)")  # fmt: skip
    src = table.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt per line")
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    table.add_argument("--layer", type=int, required=True)
    table.add_argument("--heads", default=None, help="comma-separated heads (default: all)")
    table.add_argument("--top-k", type=int, default=32)
    table.add_argument("--min-prob", type=float, default=0.0)
    table.add_argument("--basis", choices=("dictionary", "upstream"), default="dictionary")
    table.add_argument("--sae-release", default=None, help="SAELens release (pretrained models)")
    table.add_argument("--sae-id", action="append", default=None, help="SAE id (repeatable)")
    table.add_argument("--sae", action="append", default=None, help="an SAE in SAELens's saved "
                       "format: a directory or hf://ORG/REPO/FOLDER (repeatable; no SAELens "
                       "needed)")  # fmt: skip
    table.add_argument("--out", default="qk_table.csv", help=f"output, one of {TABLE_FORMATS}")
    table.add_argument("--quiet", action="store_true", help="no progress bar")
    table.set_defaults(run=_table)

    run = sub.add_parser(
        "run",
        help="batch analysis from a config: Parquet parts, resumable, local workers or Ray",
        description="Run a config (configs/*.yaml): the table of every prompt, written as "
        "Parquet parts of a dataset with a manifest. Rerunning after a crash computes only "
        "the missing parts.",
    )
    run.add_argument("config", help="a YAML config (see configs/)")
    run.add_argument("--out", default=None, help="output folder (overrides output.dir)")
    run.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    run.add_argument("--overwrite", action="store_true",
                     help="discard parts of a different config in the output folder")  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(run=_run)

    from qk_lens.toy.recipes import RECIPES

    train = sub.add_parser(
        "train",
        help="rebuild a bundled toy model, its SAEs and labels from nothing",
        description="Train a bundled toy model and its dictionaries (fixed seeds, one thread "
        "each: bit-reproducible). Same as `python -m qk_lens train`.",
    )
    train.add_argument("--model", choices=[*sorted(RECIPES), "all"], default=DEFAULT_MODEL,
                       help="'all' trains every bundled model at once, one process (and core) "
                       "each")  # fmt: skip
    train.add_argument("--stages", default="model,saes,transcoders,labels",
                       help="comma-separated: model, saes, transcoders (models with MLPs), labels")  # fmt: skip
    train.add_argument("--steps", type=int, default=None, help="model training steps")
    train.add_argument("--sae-steps", type=int, default=None,
                       help="SAE (and transcoder) training steps")  # fmt: skip
    train.add_argument("--probe-sequences", type=int, default=512)
    train.add_argument("--out", type=Path, default=None, help="default: the package's models/")
    train.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    train.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the "
        "dictionaries (default: the recipe's; the model itself always trains on "
        "the recipe's count, which its weights depend on)",
    )
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        print(f"qk-lens {args.command}: --top-k must be >= 1", file=sys.stderr)
        return EXIT_ERROR
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
