"""Who computes the parts: this process, worker processes here, or a Ray cluster.

Every executor takes the parts still to do and yields ``(part, rows)`` as each part's file is
in place. A worker streams its part into a temporary file and renames it when whole, so a
worker that dies mid-part leaves no part behind (the caller records finished parts in the
manifest). Workers load the model once. A part whose worker died is handed to a fresh worker,
up to ``max_retries`` times. The output folder must be one every worker can write: this
machine's disk for ``local``, a shared file system for a Ray cluster of several machines.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections import deque
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


def worker_threads(cfg: RunConfig) -> int:
    """Torch threads per worker: as configured, else this machine's cores shared out."""
    ex = cfg.executor
    if ex.threads_per_worker is not None:
        return ex.threads_per_worker
    return max(1, (os.cpu_count() or 1) // max(1, ex.workers))


def charge(part: Part, attempts: dict[int, int], max_retries: int, what: str) -> None:
    attempts[part.index] += 1
    if attempts[part.index] > max_retries:
        last = part.first + len(part.prompts) - 1
        raise WorkerDied(
            f"part {part.index} (prompts {part.first}..{last}): its {what} died "
            f"{attempts[part.index]} times (executor.max_retries = {max_retries})"
        )


def local(
    cfg: RunConfig, parts: list[Part], root: str, config_hash: str,
    on_retry: Callable[[Part], None] = lambda p: None,
) -> Iterator[tuple[Part, dict[str, int]]]:  # fmt: skip
    """Worker processes on this machine (spawned: no state inherited from the caller).

    At most ``workers`` parts are in flight, so when a worker dies (and the pool with it) only
    the parts that were running are charged a try: which of them killed it is unknown."""
    ex = cfg.executor
    attempts = dict.fromkeys((p.index for p in parts), 0)
    todo = deque(parts)
    ctx = multiprocessing.get_context("spawn")
    n = max(1, min(ex.workers, len(todo)))
    args = (cfg.model_dump_json(), root, config_hash, worker_threads(cfg))
    while todo:
        pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker, initargs=args)
        running: dict[Any, Part] = {}
        lost: list[Part] = []
        broken = False
        try:
            # once the pool breaks, nothing new is submitted and what still runs is settled
            while running or (todo and not broken):
                while todo and not broken and len(running) < n:
                    part = todo.popleft()
                    try:
                        running[pool.submit(run_part, part)] = part
                    except BrokenProcessPool:  # broke before any running part reported it
                        todo.appendleft(part)  # never started: not charged
                        broken = True
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    part = running.pop(fut)
                    try:
                        _, rows = fut.result()
                    except BrokenProcessPool:
                        lost.append(part)
                        broken = True
                        continue
                    yield part, rows
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for part in reversed(lost):
            on_retry(part)
            charge(part, attempts, ex.max_retries, "worker")
            todo.appendleft(part)


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
    if not parts:
        return
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
    actors = [actor_cls.remote(cfg_json, *where, threads) for _ in range(n)]
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
            # an actor Ray calls unavailable may still hold its CPUs: end it for good
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            charge(part, attempts, ex.max_retries, "Ray worker")
            todo.insert(0, part)
            idle.append(actor_cls.remote(cfg_json, *where, threads))  # a fresh one
            continue
        idle.append(actor)
        yield part, rows
    for actor in idle:
        with contextlib.suppress(Exception):
            ray.kill(actor)
