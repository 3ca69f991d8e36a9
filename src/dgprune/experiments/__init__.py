"""Configs, the stages of a run, the demo grid and result records."""

from dgprune.experiments.config import RunConfig, build_config, dump_config
from dgprune.experiments.demo import run_demo
from dgprune.experiments.pipeline import make_context, resolve_device, run_pretrain, run_prune
from dgprune.experiments.records import ResultRecord, read_records, write_records

__all__ = [
    "ResultRecord",
    "RunConfig",
    "build_config",
    "dump_config",
    "make_context",
    "read_records",
    "resolve_device",
    "run_demo",
    "run_pretrain",
    "run_prune",
    "write_records",
]
