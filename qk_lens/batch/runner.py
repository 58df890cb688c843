"""``qk-lens run CONFIG``: check the config, plan the parts, compute the missing ones, write them.

The driver loads the model (for the checks against it, the tokenizer and ``workers: 0``),
reads the prompts, opens the output folder (adopting the parts a killed run finished), and
hands the rest to the executor; it alone writes files, part by part, as they finish.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from qk_lens.batch import executors
from qk_lens.batch.config import RunConfig, check_against_model, table_layers
from qk_lens.batch.inputs import load_model, read_prompts
from qk_lens.batch.profile import qk_profile
from qk_lens.batch.store import RunStore, part_name, read_part_meta
from qk_lens.batch.work import Part, compute_part, prompt_tokens, split_parts


@dataclass
class Prepared:
    cfg: RunConfig
    out: Path
    model: Any
    prompts: list[str]
    source_rows: list[int]  # each prompt's row in its source (blank ones skipped)
    parts: list[Part]
    fingerprint: str  # SHA-256 of the weights and dictionaries
    hash: str  # cfg.result_hash of these prompts and weights


def prepare(cfg: RunConfig, out: str | Path | None = None) -> Prepared:
    """Load and check everything a run needs, before any work."""
    model = load_model(cfg.model, cfg.base_dir)
    n_heads = model.cfg.n_heads
    sizes = {layer: int(d.sae.W_dec.shape[0]) for layer, d in model.qk_dictionaries.items()}
    check_against_model(cfg, model.cfg.n_layers, n_heads, sizes)
    prompts, rows = read_prompts(cfg.prompts, cfg)
    root = (Path(out) if out is not None else cfg.path(cfg.output.dir)).resolve()
    parts = split_parts(prompts, cfg.output.chunk_size)
    fp = weights_fingerprint(model)
    return Prepared(cfg, root, model, prompts, rows, parts, fp, cfg.result_hash(prompts, fp))


def model_info(model: Any) -> dict[str, Any]:
    c = model.cfg
    return {
        "class": type(model).__name__,
        "name": getattr(c, "model_name", None),
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "d_model": c.d_model,
        "dtype": str(getattr(c, "dtype", "")),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
    }


def weights_fingerprint(model: Any) -> str:
    """SHA-256 of every parameter's and every dictionary's tensors (names and bytes): the
    version of the weights a run used."""
    h = hashlib.sha256()

    def add(name: str, t: Any) -> None:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    for name, p in sorted(model.named_parameters()):
        add(name, p)
    for layer, d in sorted(model.qk_dictionaries.items()):
        sae = d.sae
        if hasattr(sae, "state_dict"):
            tensors = sae.state_dict()
        else:  # an object with SAELens's interface only
            names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
            tensors = {
                n: getattr(sae, n) for n in names if isinstance(getattr(sae, n, None), torch.Tensor)
            }
        for name, t in sorted(tensors.items()):
            add(f"dictionary {layer}.{name}", t)
    tc = model.qk_transcoders
    if tc is not None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold"):
            for layer, t in enumerate(getattr(tc, name) or []):
                add(f"transcoder {layer}.{name}", t)
        h.update(f"{tc.activation} {tc.k} {tc.zero_positions} {tc.input_point}".encode())
    return h.hexdigest()


@dataclass
class RunResult:
    """What a run did: where, how many parts were there already, computed, rows, time."""

    out: Path
    n_prompts: int
    n_parts: int
    parts_adopted: int
    parts_computed: int
    rows: int
    seconds: float
    retries: int = 0  # parts handed to a fresh worker after theirs died

    def summary(self) -> str:
        retried = f" ({self.retries} redone after a worker died)" if self.retries else ""
        profile = (
            f"; per-head QK profile -> {self.out / 'profile.parquet'} and "
            f"{self.out / 'report.html'}"
            if (self.out / "profile.parquet").is_file()
            else ""
        )
        return (
            f"{self.n_prompts} prompts in {self.n_parts} parts: {self.parts_adopted} already "
            f"done, {self.parts_computed} computed in {self.seconds:.1f} s{retried}; "
            f"{self.rows} rows -> {self.out}{profile}"
        )


def run(
    cfg: RunConfig,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    prepared: Prepared | None = None,
) -> RunResult:
    """Compute every part of ``cfg`` not already in the output folder, and write it."""
    p = prepared or prepare(cfg, out)
    info = {**model_info(p.model), "weights_sha256": p.fingerprint}
    store = RunStore(p.out, cfg, p.hash, len(p.prompts), info)
    done = store.open(overwrite=overwrite)
    store.write_prompts(p.prompts, p.source_rows)
    todo = [part for part in p.parts if part.index not in done]
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(p.prompts), initial=sum(len(x.prompts) for x in p.parts if x.index in done),
        unit="prompt", desc=cfg.name, disable=not progress,
    )  # fmt: skip
    ex = cfg.executor
    retried: list[int] = []
    where = (str(store.root), store.hash)
    if ex.kind == "ray":
        stream = executors.ray_executor(cfg, todo, *where, lambda x: retried.append(x.index))
    elif ex.workers == 0:
        stream = executors.in_process(cfg, p.model, todo, *where)
    else:
        stream = executors.local(cfg, todo, *where, lambda x: retried.append(x.index))
    computed = 0
    with bar:
        for part, rows in stream:
            store.record_part(part.index, rows)
            computed += 1
            bar.update(len(part.prompts))
    store.finish(len(p.parts))
    rows = sum(sum(v.values()) for v in store.manifest["parts"].values())
    if store.manifest["complete"] and cfg.compute.table is not None:
        profile = qk_profile(p.out)
        profile.info = {"run": cfg.name, "model": cfg.model.name}
        profile.save(p.out / "profile.parquet")
        profile.report(f"QK profile: {cfg.name}").save(p.out / "report.html")
    seconds = time.perf_counter() - t0
    return RunResult(
        p.out, len(p.prompts), len(p.parts), len(done), computed, rows, seconds, len(retried)
    )


@dataclass
class Plan:
    """What a run would do (``--dry-run``): counts, and rows and bytes estimated from a sample."""

    out: Path
    n_prompts: int
    n_parts: int
    parts_done: int
    datasets: list[str]
    layers: list[int]
    heads: int
    tokens: int
    pairs_bound: int
    sample_prompts: int
    est_pairs: float
    est_rows: dict[str, float]
    est_bytes: float

    def summary(self) -> str:
        lines = [
            f"output: {self.out} ({self.parts_done} of {self.n_parts} parts already done)",
            f"prompts: {self.n_prompts} ({self.tokens} tokens), parts: {self.n_parts}",
        ]
        if "table" in self.datasets:
            lines += [
                f"layers: {self.layers}, heads per layer: {self.heads}",
                f"(head, q, k) pairs: at most {self.pairs_bound} (every unmasked pair); "
                f"estimated {self.est_pairs:,.0f} above the attention threshold",
            ]
        rows = ", ".join(f"{n} {r:,.0f}" for n, r in self.est_rows.items())
        lines.append(
            f"estimated rows: {rows}; estimated Parquet size: {self.est_bytes / 2**20:,.1f} MiB "
            f"(from the first {self.sample_prompts} prompt(s), computed now)"
        )
        return "\n".join(lines)


def plan(cfg: RunConfig, out: str | Path | None = None, sample: int = 2) -> Plan:
    """The plan of a run, with rows and bytes extrapolated from the first ``sample`` prompts:
    table pairs by the sample's share of unmasked pairs above the threshold, other datasets
    per prompt."""
    p = prepare(cfg, out)
    t = cfg.compute.table
    layers = table_layers(cfg, p.model.cfg.n_layers)
    heads = (len(t.heads) if t.heads is not None else p.model.cfg.n_heads) if t else 0
    lengths = [len(prompt_tokens(p.model, s, cfg.prompts.max_tokens)) for s in p.prompts]
    k = min(sample, len(p.prompts))
    tables = compute_part(p.model, cfg, Part(0, 0, tuple(p.prompts[:k])))

    def unmasked(ls: list[int]) -> int:
        return sum(n * (n + 1) // 2 for n in ls) * heads * len(layers)

    bound, est_pairs = unmasked(lengths), 0.0
    est_rows: dict[str, float] = {}
    est_bytes = 0.0
    for name, table in tables.items():
        buf = io.BytesIO()
        pq.write_table(table, buf)
        per_row = buf.tell() / max(table.num_rows, 1)
        if name == "table":
            keys = ["prompt", "layer", "head", "q_pos", "k_pos"]
            sample_pairs = len(table.select(keys).to_pandas().drop_duplicates())
            est_pairs = sample_pairs / max(unmasked(lengths[:k]), 1) * bound
            if t is not None and t.max_pairs is not None:
                bound = min(bound, len(p.prompts) * len(layers) * t.max_pairs)
                est_pairs = min(est_pairs, bound)
            est_rows[name] = est_pairs * table.num_rows / max(sample_pairs, 1)
        else:
            est_rows[name] = table.num_rows * len(p.prompts) / k
        est_bytes += est_rows[name] * per_row
    this = p.hash
    datasets = cfg.compute.datasets()
    parts_done = sum(
        1
        for part in p.parts
        if all(
            read_part_meta(p.out / n / part_name(part.index)).get("config_hash") == this
            for n in datasets
        )
    )
    return Plan(
        p.out, len(p.prompts), len(p.parts), parts_done, datasets, layers, heads, sum(lengths),
        bound, k, est_pairs, est_rows, est_bytes,
    )  # fmt: skip
