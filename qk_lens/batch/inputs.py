"""A run's inputs: the model (with its dictionaries) and the prompts, as its config names them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qk_lens.batch.config import ConfigError, ModelSpec, PromptsSpec, RunConfig


def load_model(spec: ModelSpec, base_dir: str | Path = ".") -> Any:
    """The attached model of ``spec``: a bundled model (its own SAEs), or a pretrained one with
    the dictionaries listed (downloads where the name is not on disk)."""
    import qk_lens
    from qk_lens import toy
    from qk_lens.sae_files import load_sae

    local = Path(base_dir) / spec.name
    if spec.name in toy.NAMES or (local / "config.json").is_file():
        if spec.dictionaries:
            raise ConfigError(
                "model.dictionaries: the bundled models ship their SAEs; leave the list out"
            )
        model = toy.load(spec.name if spec.name in toy.NAMES else local, bridge=spec.bridge or None)
        return _with_transcoders(model, spec, base_dir)
    if spec.bridge or not toy.hooked_transformer_available():
        from transformer_lens.model_bridge import TransformerBridge

        model = qk_lens.attach(TransformerBridge.boot_transformers(spec.name))
    else:
        model = qk_lens.HookedQKTransformer.from_pretrained(spec.name)
    device = str(model.cfg.device)
    for i, d in enumerate(spec.dictionaries):
        if d.release is not None:
            try:
                from sae_lens import SAE
            except ImportError:
                raise ConfigError(
                    f"model.dictionaries[{i}]: release needs SAELens (TransformerLens 3.x); "
                    "beside TransformerLens 4 give path: hf://ORG/REPO/FOLDER instead"
                ) from None
            sae = SAE.from_pretrained(d.release, d.id)
        else:
            p = d.path if d.path.startswith("hf://") else str(Path(base_dir) / d.path)
            sae = load_sae(p, device=device)
        model.add_dictionary(sae.to(device=device))
    return _with_transcoders(model, spec, base_dir)


def _with_transcoders(model: Any, spec: ModelSpec, base_dir: str | Path) -> Any:
    if spec.transcoders is not None:
        path = Path(base_dir) / spec.transcoders.path
        try:
            model.add_transcoders(path, zero_positions=spec.transcoders.zero_positions)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.transcoders.path: {e}") from None
    return model


def read_prompts(spec: PromptsSpec, cfg: RunConfig) -> tuple[list[str], list[int]]:
    """The prompts in order, and each one's row in its source (blank ones are skipped: a
    blank line of a text file, an empty string in JSON Lines or a dataset), at most ``limit``."""
    if spec.texts is not None:
        rows = list(enumerate(spec.texts))
    elif spec.file is not None:
        rows = _file_rows(cfg.path(spec.file), spec)
    else:
        rows = _dataset_rows(spec)
    for n, text in rows:
        if not isinstance(text, str):
            raise ConfigError(
                f"prompts: row {n} is a {type(text).__name__}, not text ({text!r:.60})"
            )
    kept = [(n, t) for n, t in rows if t.strip()]
    if spec.limit is not None:
        kept = kept[: spec.limit]
    if not kept:
        raise ConfigError("prompts: there are none (an empty source, or only blank prompts)")
    return [t for _, t in kept], [n for n, _ in kept]


def _file_rows(path: Path, spec: PromptsSpec) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise ConfigError(
            f"prompts.file: {path} is .json; give JSON Lines (.jsonl: one object per line, the "
            "prompt under prompts.field) or a text file (one prompt per line)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    if suffix != ".jsonl":
        return list(enumerate(lines))
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"prompts.file: {path}:{n + 1} is not JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(spec.field), str):
            raise ConfigError(
                f"prompts.file: {path}:{n + 1} has no string under prompts.field "
                f"{spec.field!r} (keys: {sorted(obj) if isinstance(obj, dict) else '-'})"
            )
        rows.append((n, obj[spec.field]))
    return rows


def _dataset_rows(spec: PromptsSpec) -> list[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "prompts.dataset needs the datasets package (pip install datasets)"
        ) from None
    ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split, streaming=True)
    rows = []
    kept = 0
    for n, row in enumerate(ds):
        if spec.field not in row:
            raise ConfigError(
                f"prompts.field: {spec.field!r} is not a column of {spec.dataset} "
                f"(columns: {sorted(row)})"
            )
        rows.append((n, row[spec.field]))
        kept += isinstance(row[spec.field], str) and bool(row[spec.field].strip())
        if spec.limit is not None and kept >= spec.limit:
            break  # streamed: read only as far as the limit needs
    return rows
