"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this imports as ``common``)."""

from __future__ import annotations

import time


def start_prefect() -> float:
    """Run an empty flow once, so Prefect's ephemeral API start-up is timed apart from the runs."""
    from prefect import flow

    @flow(name="bench-warm-up")
    def warm_up() -> None:
        return None

    started = time.perf_counter()
    warm_up()
    return time.perf_counter() - started
