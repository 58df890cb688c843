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
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qk_lens.batch.config import ConfigError, RunConfig
from qk_lens.files import atomic_path, write_text

FORMAT = "qk_lens.run/1"
PART_GLOB = "part-*.parquet"


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

    def __init__(self, root: Path, cfg: RunConfig, n_prompts: int, model_info: dict[str, Any]):
        self.root = Path(root)
        self.cfg = cfg
        self.hash = cfg.result_hash()
        self.table_dir = self.root / "table"
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
    def open(self, overwrite: bool = False) -> dict[int, int]:
        """Create or resume the folder; the parts already done, {index: rows}."""
        self.table_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.table_dir.glob(".*.tmp"):
            tmp.unlink()  # a temporary part of a killed run: never renamed, so never counted
        old_hash = None
        if self.manifest_path.is_file():
            old_hash = json.loads(self.manifest_path.read_text()).get("config_hash")
        foreign = old_hash is not None and old_hash != self.hash
        done: dict[int, int] = {}
        for path in sorted(self.table_dir.glob(PART_GLOB)):
            meta = read_part_meta(path)
            if meta.get("config_hash") != self.hash:
                foreign = True
                continue
            done[int(meta["part"])] = int(meta["rows"])
        if foreign:
            if not overwrite:
                raise ConfigError(
                    f"{self.root} holds parts of a different config (hash {old_hash or 'other'}; "
                    f"this config's is {self.hash}): they would mix. Rerun with --overwrite to "
                    "discard them, or give another --out"
                )
            shutil.rmtree(self.table_dir)
            self.table_dir.mkdir(parents=True)
            done = {}
        self.manifest["parts"] = {part_name(i): {"rows": r} for i, r in sorted(done.items())}
        self._save_manifest()
        return done

    # ---------------------------------------------------------------- recording
    def record_part(self, index: int, rows: int) -> None:
        """Note a part its worker wrote (:func:`write_part`) in the manifest."""
        self.manifest["parts"][part_name(index)] = {"rows": rows}
        self._save_manifest()

    def finish(self, n_parts: int) -> None:
        self.manifest["complete"] = len(self.manifest["parts"]) == n_parts
        self._save_manifest()

    def _save_manifest(self) -> None:
        self.manifest["parts"] = dict(sorted(self.manifest["parts"].items()))
        write_text(self.manifest_path, json.dumps(self.manifest, indent=1) + "\n")


def write_part(
    table_dir: Path, config_hash: str, index: int, first: int, n_prompts: int,
    tables: Iterable[pa.Table], schema: pa.Schema,
) -> int:  # fmt: skip
    """Stream ``tables`` into part ``index`` under a temporary name, then rename it into place:
    the part is whole or absent. Returns its row count."""
    meta = {
        "config_hash": config_hash,
        "part": index,
        "first_prompt": first,
        "n_prompts": n_prompts,
    }
    path = Path(table_dir) / part_name(index)
    rows = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in tables:
                writer.write_table(table)
                rows += table.num_rows
            writer.add_key_value_metadata({"qk_lens": json.dumps({**meta, "rows": rows})})
    return rows


def read_part_meta(path: Path) -> dict[str, Any]:
    """The qk_lens metadata of a part file ({} if it has none or cannot be read)."""
    try:
        raw = pq.read_metadata(path).metadata or {}
        return json.loads(raw.get(b"qk_lens", b"{}"))
    except (OSError, ValueError, pa.ArrowInvalid):
        return {}


def read_table(root: str | Path) -> Any:
    """The whole table of a run folder as one DataFrame, parts in order."""
    import pandas as pd

    parts = sorted((Path(root) / "table").glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"{root} has no parts (table/{PART_GLOB})")
    return pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
