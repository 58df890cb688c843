"""What a batch run computes, read from a YAML config and checked before any work.

A config names the model (and its dictionaries), the prompts, what to compute, where the output
goes and which executor runs it. Every key is checked: an unknown key, a missing one, a value of
the wrong type or out of range is one :class:`ConfigError` naming the key's path
(``compute.table.layers[1]``) and what would be valid. Checks that need the model (a layer out
of range) run in :func:`check_against_model`, still before any work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A config that cannot run: the message names the key and what would be valid."""


class Strict(BaseModel):
    # strict: YAML gives native types, so "3" for a count or `yes` for a layer is a mistake
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DictionarySpec(Strict):
    """One dictionary: a SAELens saved directory / ``hf://ORG/REPO/FOLDER``, or a SAELens
    release and id (stack (a))."""

    path: str | None = None
    release: str | None = None
    id: str | None = None

    def model_post_init(self, _: Any) -> None:
        if (self.path is None) == (self.release is None):
            raise ValueError("give either path (a directory or hf://...) or release with id")
        if (self.release is None) != (self.id is None):
            raise ValueError("release and id go together (a SAELens release and one of its ids)")


class TranscoderSpec(Strict):
    """Per-layer transcoders or a CLT in circuit-tracer's format: a directory or its
    ``config.yaml`` (relative to the config's folder). Features at the first ``zero_positions``
    positions count as inactive (circuit-tracer's BOS convention)."""

    path: str = Field(min_length=1)
    zero_positions: int = Field(default=1, ge=0)


class ModelSpec(Strict):
    """``name``: a bundled model (``attn2-ln``), a directory ``toy.load`` reads, or a
    TransformerLens / Hugging Face name (downloaded). ``transcoders``: the replacement of every
    MLP, for ``basis: transcoders``."""

    name: str = Field(min_length=1)
    bridge: bool = False
    dictionaries: list[DictionarySpec] = []
    transcoders: TranscoderSpec | None = None


class PromptsSpec(Strict):
    """Exactly one of ``file`` (text: one prompt per line; ``.jsonl``: one object per line,
    the prompt under ``field``), ``dataset`` (a ``datasets`` dataset: a hub name, online, or a
    local folder) or ``texts`` (the prompts themselves, for small runs)."""

    file: str | None = None
    texts: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    field: str = "text"
    limit: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=1)

    def model_post_init(self, _: Any) -> None:
        given = [k for k in ("file", "dataset", "texts") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of file (a .txt or .jsonl path), dataset or texts; got "
                + (", ".join(given) or "none")
            )


class TableSpec(Strict):
    """``qk_attribution_table`` per prompt: layers, heads (None: all), pairs with attention ≥
    ``min_prob`` (at most ``max_pairs`` per prompt and layer, the most attended), top-k terms."""

    layers: list[int] | Literal["all"] = Field(min_length=1)
    heads: list[int] | None = Field(default=None, min_length=1)
    top_k: int = Field(default=32, gt=0)
    min_prob: float = Field(default=0.05, ge=0.0, le=1.0)
    max_pairs: int | None = Field(default=None, gt=0)
    basis: Literal["dictionary", "upstream", "transcoders"] = "dictionary"
    # query positions per chunk of rows: bounds what a long prompt holds at once
    query_chunk: int = Field(default=256, gt=0)

    @field_validator("layers", "heads")
    @classmethod
    def _distinct(cls, v: Any) -> Any:
        if isinstance(v, list):
            if any(i < 0 for i in v):
                raise ValueError(f"indices are 0 or more, got {v}")
            if len(set(v)) != len(v):
                raise ValueError(f"indices repeat: {v}")
        return v


class GraphSpec(Strict):
    """``attribution_graph`` + ``head_loadings`` per prompt (residual dictionaries at every
    layer 1..n−1): nodes, edges and each edge's residual / MLP / per-head split."""

    targets: list[str | int] | None = None  # None: the top predictions, as circuit-tracer picks
    target_pos: int = -1
    max_n_logits: int = Field(default=10, gt=0)
    desired_logit_prob: float = Field(default=0.95, gt=0.0, le=1.0)
    readout: Literal["encoder", "decoder"] = "encoder"
    node_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    edge_threshold: float = Field(default=0.98, gt=0.0, le=1.0)
    max_feature_nodes: int | None = Field(default=None, ge=0)
    through_mlp: bool = True
    min_abs_loading: float = Field(default=0.0, ge=0.0)


class SteeringSpec(Strict):
    """``steer_qk_sweep`` of one feature inside one head, per prompt where the feature is
    active (prompts where it is not get no rows): score, attention and predictions per scale."""

    layer: int = Field(ge=0)
    head: int = Field(ge=0)
    feature: int = Field(ge=0)
    side: Literal["key", "query"] = "key"
    scales: list[float] = Field(min_length=1)


class ComputeSpec(Strict):
    table: TableSpec | None = None
    graphs: GraphSpec | None = None
    steering: list[SteeringSpec] = []

    def model_post_init(self, _: Any) -> None:
        if self.table is None and self.graphs is None and not self.steering:
            raise ValueError("nothing to compute: give table, graphs and/or steering")

    def datasets(self) -> list[str]:
        """The output datasets (a folder of parts each) this computes."""
        out = ["table"] if self.table is not None else []
        out += ["graph_nodes", "graph_edges", "head_loadings"] if self.graphs is not None else []
        return out + (["steering"] if self.steering else [])


class OutputSpec(Strict):
    dir: str = Field(min_length=1)
    chunk_size: int = Field(default=16, gt=0)  # prompts per part


class ExecutorSpec(Strict):
    kind: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=0)  # local: 0 runs in this process
    address: str | None = None  # ray: an existing cluster; None starts an embedded one
    threads_per_worker: int | None = Field(default=None, gt=0)
    max_retries: int = Field(default=2, ge=0)


class RunConfig(Strict):
    name: str = Field(min_length=1)
    model: ModelSpec
    prompts: PromptsSpec
    compute: ComputeSpec
    output: OutputSpec
    executor: ExecutorSpec = ExecutorSpec()
    # where relative paths in the config are read from (the config file's folder)
    base_dir: str = "."

    def path(self, p: str) -> Path:
        """A path of the config, relative ones read from the config file's folder."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.base_dir) / q

    def result_hash(self, prompts: list[str], fingerprint: str) -> str:
        """Hash of everything that decides the rows — the model spec and ``fingerprint`` (its
        weights and dictionaries), the prompts themselves, the compute settings, which prompts
        form a part — and not where they go, who computes them or how much memory a chunk
        takes: parts of runs with different hashes never mix."""
        what = self.model_dump(include={"model", "compute"})
        if what["compute"]["table"] is not None:
            del what["compute"]["table"]["query_chunk"]  # rows do not depend on it
        what["max_tokens"] = self.prompts.max_tokens
        what["prompts"] = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
        what["weights"] = fingerprint
        what["chunk_size"] = self.output.chunk_size
        blob = json.dumps(what, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "literal") or str(part).startswith(("list[", "str")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_config(data: Any, source: str = "config", base_dir: str | Path = ".") -> RunConfig:
    """A :class:`RunConfig` from parsed YAML/JSON, or one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of keys at the top, got {type(data).__name__}"
        )
    if "base_dir" in data:
        raise ConfigError(f"{source}: base_dir is set from the config file's location, not in it")
    try:
        return RunConfig(**data, base_dir=str(base_dir))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = _where(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "missing (required)"
            problems.append(f"  {key}: {msg}")
        raise ConfigError(
            f"{source}: {len(problems)} problem(s):\n" + "\n".join(problems)
        ) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and check a YAML (or JSON) config file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    cfg = parse_config(data, str(path), path.resolve().parent)
    check_files(cfg, str(path))
    return cfg


def check_files(cfg: RunConfig, source: str) -> None:
    """The prompts file is there and readable."""
    if cfg.prompts.file is None:
        return
    f = cfg.path(cfg.prompts.file)
    if not f.is_file():
        raise ConfigError(f"{source}: prompts.file: {f} does not exist")
    try:
        with f.open(encoding="utf-8") as fh:
            fh.read(1)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{source}: prompts.file: {f} cannot be read as UTF-8 text: {e}"
        ) from None


def check_against_model(
    cfg: RunConfig, n_layers: int, n_heads: int, dict_sizes: dict[int, int]
) -> None:
    """Layers, heads and features in range, and a dictionary wherever one is read
    (``dict_sizes``: the model's dictionaries, {layer: number of features})."""
    problems = []
    if cfg.compute.table is not None:
        problems += _table_problems(cfg.compute.table, n_layers, n_heads, list(dict_sizes))
        if cfg.compute.table.basis == "transcoders" and cfg.model.transcoders is None:
            problems.append(
                "  compute.table.basis: 'transcoders' needs model.transcoders (a circuit-tracer "
                "directory or config.yaml)"
            )
    if cfg.compute.graphs is not None:
        missing = [layer for layer in range(1, n_layers) if layer not in dict_sizes]
        if missing:
            problems.append(
                f"  compute.graphs: a graph needs a residual dictionary at every layer "
                f"1..{n_layers - 1}; layers {missing} have none"
            )
    for i, st in enumerate(cfg.compute.steering):
        where = f"  compute.steering[{i}]"
        if st.layer >= n_layers:
            problems.append(
                f"{where}.layer: layer {st.layer} is out of range: the model has {n_layers} "
                f"layers (0..{n_layers - 1})"
            )
        elif st.layer not in dict_sizes:
            problems.append(
                f"{where}.layer: layer {st.layer} has no dictionary (layers with one: "
                f"{sorted(dict_sizes) or 'none'})"
            )
        elif st.feature >= dict_sizes[st.layer]:
            problems.append(
                f"{where}.feature: feature {st.feature} is out of range: layer {st.layer}'s "
                f"dictionary has {dict_sizes[st.layer]} features"
            )
        if st.head >= n_heads:
            problems.append(
                f"{where}.head: head {st.head} is out of range: the model has {n_heads} heads "
                f"per layer (0..{n_heads - 1})"
            )
    if problems:
        raise ConfigError(f"{cfg.name}: {len(problems)} problem(s):\n" + "\n".join(problems))


def _table_problems(t: TableSpec, n_layers: int, n_heads: int, dict_layers: list[int]) -> list[str]:
    layers = list(range(n_layers)) if t.layers == "all" else t.layers
    problems = []
    for i, layer in enumerate(layers):
        if t.layers != "all" and not 0 <= layer < n_layers:
            problems.append(
                f"  compute.table.layers[{i}]: layer {layer} is out of range: the model has "
                f"{n_layers} layers (0..{n_layers - 1})"
            )
        elif t.basis == "dictionary" and layer not in dict_layers:
            problems.append(
                f"  compute.table.layers[{i}]: layer {layer} has no dictionary (layers with one: "
                f"{sorted(dict_layers) or 'none'}); add one under model.dictionaries or set "
                "compute.table.basis: upstream"
            )
    for i, h in enumerate(t.heads or []):
        if not 0 <= h < n_heads:
            problems.append(
                f"  compute.table.heads[{i}]: head {h} is out of range: the model has {n_heads} "
                f"heads per layer (0..{n_heads - 1})"
            )
    return problems


def table_layers(cfg: RunConfig, n_layers: int) -> list[int]:
    t = cfg.compute.table
    if t is None:
        return []
    return list(range(n_layers)) if t.layers == "all" else list(t.layers)
