"""Flows: run one Prefect task per shard with a bounded number of shards in flight.

In: a shard task (``extract-shard``, ``infer-shard``), the shard plans, how many may run at once and the
task's other arguments. Out: ``(plan, future)`` pairs in plan order, for the flow to collect.

The bound is decided inside the flow run, from the run's ``RunSettings`` and the cluster it connected to.
A flow's own ``task_runner`` is fixed when its module is imported, which for a deployed run is the worker's
``prefect.engine`` process: sized there, ``AUDIOPIPE_SHARD_CONCURRENCY`` and the cluster's size would never
reach it. So the shards go to a thread pool of their own, opened for the loop and closed after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from prefect import unmapped
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

P = TypeVar("P")


def shard_futures(shard_task: Any, plans: Sequence[P], in_flight: int,
                  **fixed: Any) -> Iterator[tuple[P, PrefectFuture]]:
    """Submit ``shard_task(plan=..., **fixed)`` for every plan, at most ``in_flight`` running at once.

    Call it in a flow run and consume it in a ``for`` loop: the pool stays open while the loop runs and is
    closed (unstarted shards cancelled) when the loop ends or raises.

    Args:
        shard_task: A Prefect task whose first parameter is ``plan``.
        plans: The shard plans, one task run each.
        in_flight: Maximum concurrent task runs (at least 1).
        **fixed: The task's other arguments, the same for every shard.

    Yields:
        ``(plan, future)`` in the order of ``plans``.
    """
    with ThreadPoolTaskRunner(max_workers=max(1, in_flight)) as pool:
        futures = pool.map(shard_task, {"plan": list(plans), **{k: unmapped(v) for k, v in fixed.items()}})
        yield from zip(plans, futures)
