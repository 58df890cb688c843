"""Who computes the parts: this process, worker processes here, or a Ray cluster.

Every executor takes the parts still to do and yields ``(part, rows)`` as each part's file is
in place. A worker streams its part into a temporary file and renames it when whole, so a
worker that dies mid-part leaves no part behind (the caller records finished parts in the
manifest). Workers load the model once. A part whose worker died is handed to a fresh worker,
up to ``max_retries`` times. The output folder must be one every worker can write: this
machine's disk for ``local``, a shared file system for a Ray cluster of several machines.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from qk_lens.batch.config import RunConfig
from qk_lens.batch.inputs import load_model
from qk_lens.batch.store import write_part
from qk_lens.batch.work import SCHEMAS, Part, part_tables


class WorkerDied(RuntimeError):
    """A part's worker died more often than ``executor.max_retries`` allows."""


# ------------------------------------------------------------------- a worker's model
_WORKER: dict[str, Any] = {}


def init_worker(cfg_json: str, root: str, config_hash: str, threads: int | None) -> None:
    """Load the model once per worker process."""
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = RunConfig.model_validate_json(cfg_json)
    _WORKER.update(cfg=cfg, root=root, hash=config_hash)
    _WORKER["model"] = load_model(cfg.model, cfg.base_dir)


def compute_and_write(
    model: Any, cfg: RunConfig, root: str, config_hash: str, part: Part
) -> dict[str, int]:
    """Compute part ``part`` and write every dataset's file of it; rows per dataset."""
    schemas = {name: SCHEMAS[name] for name in cfg.compute.datasets()}
    tables = part_tables(model, cfg, part)
    return write_part(
        Path(root), config_hash, part.index, part.first, len(part.prompts), tables, schemas
    )


def run_part(part: Part) -> tuple[int, dict[str, int]]:
    w = _WORKER
    return part.index, compute_and_write(w["model"], w["cfg"], w["root"], w["hash"], part)


# ------------------------------------------------------------------- executors
def in_process(
    cfg: RunConfig, model: Any, parts: list[Part], root: str, config_hash: str
) -> Iterator[tuple[Part, dict[str, int]]]:
    """``workers: 0``: the caller's own model, one part after another."""
    for part in parts:
        yield part, compute_and_write(model, cfg, root, config_hash, part)


def local(
    cfg: RunConfig, parts: list[Part], root: str, config_hash: str,
    on_retry: Callable[[Part], None] = lambda p: None,
) -> Iterator[tuple[Part, dict[str, int]]]:  # fmt: skip
    """Worker processes on this machine (spawned: no state inherited from the caller)."""
    ex = cfg.executor
    attempts = dict.fromkeys((p.index for p in parts), 0)
    done: set[int] = set()
    todo = list(parts)
    ctx = multiprocessing.get_context("spawn")
    while todo:
        pool = ProcessPoolExecutor(
            max(1, min(ex.workers, len(todo))), mp_context=ctx, initializer=init_worker,
            initargs=(cfg.model_dump_json(), root, config_hash, ex.threads_per_worker),
        )  # fmt: skip
        futures = {pool.submit(run_part, p): p for p in todo}
        round_parts, todo = list(todo), []
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    _, rows = fut.result()
                    done.add(futures[fut].index)
                    yield futures[fut], rows
        except BrokenProcessPool:
            # A worker died (killed, out of memory) and the pool with it: which part it was
            # working on is unknown, so every unfinished part counts a try and goes to a new pool.
            todo = [p for p in round_parts if p.index not in done]
            for p in todo:
                on_retry(p)
                attempts[p.index] += 1
                if attempts[p.index] > ex.max_retries:
                    raise WorkerDied(
                        f"part {p.index} (prompts {p.first}..{p.first + len(p.prompts) - 1}): "
                        f"its worker died {attempts[p.index]} times (executor.max_retries = "
                        f"{ex.max_retries})"
                    ) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def ray_executor(
    cfg: RunConfig, parts: list[Part], root: str, config_hash: str,
    on_retry: Callable[[Part], None] = lambda p: None,
) -> Iterator[tuple[Part, dict[str, int]]]:  # fmt: skip
    """Ray actors, each holding the model: an embedded local cluster, or ``executor.address``."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "executor.kind: ray needs Ray: pip install 'qk_lens[ray]' (or pip install ray)"
        ) from None
    ex = cfg.executor
    started_here = not ray.is_initialized()
    if started_here:
        threads = ex.threads_per_worker or 1
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if ex.address is None:
            kwargs["num_cpus"] = max(1, ex.workers) * threads
        ray.init(address=ex.address, **kwargs)
    try:
        yield from _ray_loop(ray, cfg, parts, (root, config_hash), on_retry)
    finally:
        if started_here:
            ray.shutdown()


class RayWorker:
    """A Ray actor: the model, loaded once; computes parts."""

    def __init__(self, cfg_json: str, root: str, config_hash: str, threads: int | None):
        init_worker(cfg_json, root, config_hash, threads)

    def run(self, part: Part) -> tuple[int, dict[str, int]]:
        return run_part(part)


def _ray_loop(
    ray: Any, cfg: RunConfig, parts: list[Part], where: tuple[str, str],
    on_retry: Callable[[Part], None],
) -> Iterator[tuple[Part, dict[str, int]]]:  # fmt: skip
    ex = cfg.executor
    threads = ex.threads_per_worker or 1
    actor_cls = ray.remote(num_cpus=threads)(RayWorker)
    cfg_json = cfg.model_dump_json()
    n = max(1, min(ex.workers, len(parts)))
    actors = [actor_cls.remote(cfg_json, *where, ex.threads_per_worker) for _ in range(n)]
    todo = list(parts)
    attempts = {p.index: 0 for p in parts}
    running: dict[Any, tuple[Any, Part]] = {}  # ref -> (actor, part)
    idle = list(actors)
    while todo or running:
        while todo and idle:
            actor, part = idle.pop(), todo.pop(0)
            running[actor.run.remote(part)] = (actor, part)
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        actor, part = running.pop(ref)
        try:
            _, rows = ray.get(ref)
        except ray.exceptions.RayActorError:
            on_retry(part)
            attempts[part.index] += 1
            if attempts[part.index] > ex.max_retries:
                raise WorkerDied(
                    f"part {part.index}: its Ray worker died {attempts[part.index]} times "
                    f"(executor.max_retries = {ex.max_retries})"
                ) from None
            todo.insert(0, part)
            idle.append(actor_cls.remote(cfg_json, *where, ex.threads_per_worker))  # a fresh one
            continue
        idle.append(actor)
        yield part, rows
    for actor in idle:
        ray.kill(actor)
