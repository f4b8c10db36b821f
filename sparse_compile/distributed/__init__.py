"""Distributed training with sparse attention.

DDP and FSDP2 need nothing from this package: a model compiled with ``backend="sparse"`` is
wrapped as any other. Context parallelism (the sequence split over the ranks of a group) needs
the attention to see the keys of other ranks; here only the keys the pattern keeps travel:

* ``context_parallel(model, mesh, pattern=...)``: a model that takes the whole batch on every
  rank, runs each rank's part of the sequence and returns the global loss (``context.py``);
* ``sharded_attention``: the attention of one rank's shard (``sharded.py``);
* ``Sharding``: contiguous or load-balanced (zigzag) splits (``sharding.py``);
* ``exchange_plan`` / ``communication_report``: which keys travel and how many bytes
  (``plan.py``, ``report.py``).
"""

from sparse_compile.distributed.context import ContextParallelModel, context_parallel
from sparse_compile.distributed.plan import ExchangePlan, UnsupportedPatternError, exchange_plan
from sparse_compile.distributed.report import CommunicationReport, communication_report
from sparse_compile.distributed.sharded import register_group, sharded_attention
from sparse_compile.distributed.sharding import Sharding, ShardingError

__all__ = [
    "CommunicationReport", "ContextParallelModel", "ExchangePlan", "communication_report",
    "context_parallel", "Sharding", "ShardingError", "UnsupportedPatternError", "exchange_plan",
    "register_group", "sharded_attention",
]
