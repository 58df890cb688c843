"""Batch analyses from configs (``qk-lens run CONFIG``): checked configs, Parquet parts that are
whole or absent, resume after a crash, local worker processes or a Ray cluster."""

from qk_lens.batch.config import ConfigError, RunConfig, load_config, parse_config
from qk_lens.batch.executors import WorkerDied
from qk_lens.batch.profile import QKProfile, qk_profile
from qk_lens.batch.runner import Plan, RunResult, plan, prepare, run
from qk_lens.batch.store import read_table

__all__ = [
    "ConfigError",
    "Plan",
    "QKProfile",
    "RunConfig",
    "RunResult",
    "WorkerDied",
    "load_config",
    "parse_config",
    "plan",
    "prepare",
    "qk_profile",
    "read_table",
    "run",
]
