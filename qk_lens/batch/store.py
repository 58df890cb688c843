"""A run's output folder: Parquet parts that are whole or absent, and a manifest.

::

    DIR/manifest.json            config and its hash, versions, per-part row counts
    DIR/table/part-00000.parquet one part per chunk of prompts (pyarrow dataset: read DIR/table)

Each part is written under a temporary name and renamed into place, and carries the config
hash, its index and its prompt range in its own Parquet metadata. So after a crash (even
SIGKILL between the rename and the manifest update) the folder says exactly which parts are
done: a rerun adopts every whole part of the same config, redoes the rest, and never mixes in
parts of a different config unless told to discard them.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qk_lens.batch.config import ConfigError, RunConfig
from qk_lens.files import atomic_path, write_text

FORMAT = "qk_lens.run/1"
PART_GLOB = "part-*.parquet"
# every dataset a run can write, one folder each
DATASETS = ("table", "graph_nodes", "graph_edges", "head_loadings", "steering")
# files a complete run derives from its parts
DERIVED = ("profile.parquet", "report.html")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("qk_lens", "torch", "transformer-lens", "sae-lens", "transformers", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class RunStore:
    """The output folder of one config (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        cfg: RunConfig,
        config_hash: str,
        n_prompts: int,
        model_info: dict[str, Any],
    ):
        self.root = Path(root)
        self.cfg = cfg
        self.hash = config_hash
        self.datasets = cfg.compute.datasets()
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "name": cfg.name,
            "config_hash": self.hash,
            "config": cfg.model_dump(exclude={"base_dir"}),
            "versions": versions(),
            "model": model_info,
            "n_prompts": n_prompts,
            "chunk_size": cfg.output.chunk_size,
            "parts": {},
            "complete": False,
        }

    # ---------------------------------------------------------------- opening, resuming
    def open(self, overwrite: bool = False) -> dict[int, dict[str, int]]:
        """Create or resume the folder; the parts already done, {index: {dataset: rows}}."""
        old_hash = None
        if self.manifest_path.is_file():
            old_hash = json.loads(self.manifest_path.read_text()).get("config_hash")
        foreign = old_hash is not None and old_hash != self.hash
        found: dict[int, dict[str, int]] = {}
        for name in DATASETS:
            folder = self.root / name
            if not folder.is_dir():
                continue
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink()  # a temporary file of a killed run: never renamed, never counted
            for path in sorted(folder.glob(PART_GLOB)):
                meta = read_part_meta(path)
                if not meta:
                    path.unlink()  # unreadable (e.g. cut short by a power loss): not done
                    continue
                if meta.get("config_hash") != self.hash or name not in self.datasets:
                    foreign = True
                    continue
                found.setdefault(int(meta["part"]), {})[name] = int(meta["rows"])
        if foreign:
            if not overwrite:
                raise ConfigError(
                    f"{self.root} holds parts of a different config (hash {old_hash or 'other'}; "
                    f"this config's is {self.hash}): they would mix. Rerun with --overwrite to "
                    "discard them, or give another --out"
                )
            for name in DATASETS:
                shutil.rmtree(self.root / name, ignore_errors=True)
            found = {}
        for derived in DERIVED:  # rebuilt when the run completes; stale until then
            (self.root / derived).unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        # done: every dataset's file of the part is there (a part killed between two renames
        # is redone whole)
        done = {i: rows for i, rows in found.items() if set(rows) == set(self.datasets)}
        self.manifest["parts"] = {part_name(i): rows for i, rows in sorted(done.items())}
        self._save_manifest()
        return done

    # ---------------------------------------------------------------- recording
    def record_part(self, index: int, rows: dict[str, int]) -> None:
        """Note a part its worker wrote (:func:`write_part`) in the manifest."""
        self.manifest["parts"][part_name(index)] = rows
        self._save_manifest()

    def write_prompts(self, prompts: list[str], source_rows: list[int]) -> None:
        """DIR/prompts.jsonl: each prompt with its index (the rows' ``prompt``) and its row in
        the source (blank source rows are skipped, so the two can differ)."""
        lines = (
            json.dumps({"prompt": i, "source_row": r, "text": t})
            for i, (t, r) in enumerate(zip(prompts, source_rows, strict=True))
        )
        write_text(self.root / "prompts.jsonl", "\n".join(lines) + "\n")

    def finish(self, n_parts: int) -> None:
        self.manifest["complete"] = len(self.manifest["parts"]) == n_parts
        self._save_manifest()

    def _save_manifest(self) -> None:
        self.manifest["parts"] = dict(sorted(self.manifest["parts"].items()))
        write_text(self.manifest_path, json.dumps(self.manifest, indent=1) + "\n")


def write_part(
    root: Path, config_hash: str, index: int, first: int, n_prompts: int,
    tables: Iterable[tuple[str, pa.Table]], schemas: dict[str, pa.Schema],
) -> dict[str, int]:  # fmt: skip
    """Stream ``(dataset, rows)`` into part ``index`` of each dataset (``root/DATASET/``) under
    temporary names; after the last row each file is closed and renamed into place in turn.
    Each file is whole or absent, and a part counts as done only when all its datasets' files
    are there. Returns the rows written per dataset."""
    meta = {
        "config_hash": config_hash,
        "part": index,
        "first_prompt": first,
        "n_prompts": n_prompts,
    }
    rows = dict.fromkeys(schemas, 0)
    with ExitStack() as stack:
        writers = {}
        for name, schema in schemas.items():
            (Path(root) / name).mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(atomic_path(Path(root) / name / part_name(index)))
            writers[name] = stack.enter_context(pq.ParquetWriter(tmp, schema))
        for name, table in tables:
            writers[name].write_table(table)
            rows[name] += table.num_rows
        for name, writer in writers.items():
            writer.add_key_value_metadata({"qk_lens": json.dumps({**meta, "rows": rows[name]})})
    return rows


def read_part_meta(path: Path) -> dict[str, Any]:
    """The qk_lens metadata of a part file ({} if it has none or cannot be read)."""
    try:
        raw = pq.read_metadata(path).metadata or {}
        return json.loads(raw.get(b"qk_lens", b"{}"))
    except (OSError, ValueError, pa.ArrowInvalid):
        return {}


def read_table(root: str | Path, dataset: str = "table") -> Any:
    """One dataset of a run folder (``table``, ``graph_nodes``, ``graph_edges``,
    ``head_loadings``, ``steering``) as one DataFrame, parts in order."""
    import pandas as pd

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    parts = sorted((Path(root) / dataset).glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"{root} has no parts ({dataset}/{PART_GLOB})")
    return pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
