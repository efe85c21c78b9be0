"""A rich progress bar fed by ``tasks.progress`` events: files, audio hours and x real time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from audiopipe.tasks.progress import ProgressEvent, watching


@contextmanager
def progress_bar(console: Console, label: str = "featurize") -> Iterator[None]:
    """Show a bar for the block; the flow's planning event sets the total."""
    started = time.perf_counter()
    totals = {"audio_s": 0.0, "rejected": 0}
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                  transient=False) as bar:
        task_id = bar.add_task("files", total=None, detail="planning…")

        def on_event(event: ProgressEvent) -> None:
            if event.files_total is not None:
                bar.update(task_id, total=event.files_total, detail="")
                return
            totals["audio_s"] += event.audio_s
            totals["rejected"] += event.rejected
            elapsed = max(time.perf_counter() - started, 1e-6)
            detail = (f"{totals['audio_s'] / 3600:.2f} h audio · {totals['audio_s'] / elapsed:,.0f}× real time"
                      f" · {totals['rejected']} rejected")
            bar.update(task_id, advance=event.files, detail=detail)

        with watching(on_event):
            yield
