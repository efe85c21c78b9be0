"""Progress events from shard tasks to whoever watches the run (the CLI's rich bar), in-process.

A shard task calls ``report(...)`` after each file; the CLI installs a sink with ``watching(...)``.
Without a sink, events are dropped: Prefect logs per shard remain the record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """One finished file (or a planning event when ``files_total`` is set)."""

    files: int = 0
    audio_s: float = 0.0
    rejected: int = 0
    files_total: int | None = None


_lock = threading.Lock()
_sinks: list[Callable[[ProgressEvent], None]] = []


def report(event: ProgressEvent) -> None:
    """Send ``event`` to every installed sink (thread-safe, cheap when none is installed)."""
    with _lock:
        sinks = list(_sinks)
    for sink in sinks:
        sink(event)


@contextmanager
def watching(sink: Callable[[ProgressEvent], None]) -> Iterator[None]:
    """Install ``sink`` for the duration of the block."""
    with _lock:
        _sinks.append(sink)
    try:
        yield
    finally:
        with _lock:
            _sinks.remove(sink)
