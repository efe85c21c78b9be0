"""The CLI's outcome: exit codes a scheduler can act on, errors as one paragraph, ``--json`` summaries.

Exit codes (README, "Exit codes"):

- 0: done.
- 1: the run finished, but some shards failed after their retries (``ShardsFailedError``). Nothing is lost:
  committed shards are kept and the same command finishes the rest.
- 2: a user error (``AudiopipeError``): a bad argument or config file, a missing bucket or input, refused
  credentials, a model that does not fit the command. Rerunning the same command cannot help.
- 75 (``EX_TEMPFAIL``): a transient outage: the store (or the Dask scheduler) could not be reached after
  the retries (``TransientStorageError``, or a connection error the code did not translate). Retry later.
- 70 (``EX_SOFTWARE``): an internal error, with its traceback on stderr; so 1 only ever means "rerun to finish".
- 130: interrupted (Ctrl-C), as the shell reports SIGINT.

With ``--json`` the command's summary is one JSON object on stdout (plus ``exit_code``, and ``error`` when
it failed); everything else (logs, progress, tables, warnings, output of worker processes started by the
run) goes to stderr, since file descriptor 1 points at stderr while the command runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from audiopipe.infra.errors import AudiopipeError, ShardsFailedError, TransientStorageError

EXIT_OK = 0
EXIT_FAILED_SHARDS = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL = 70
EXIT_TRANSIENT = 75
EXIT_INTERRUPTED = 130

JSON_HELP = "Print the summary as one JSON object on stdout (logs and progress go to stderr)."
stderr_console = Console(stderr=True)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for a command that raised ``exc`` (see the module docstring)."""
    from audiopipe.infra.storage import is_transient

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ShardsFailedError):
        return EXIT_FAILED_SHARDS
    if isinstance(exc, TransientStorageError):
        return EXIT_TRANSIENT
    if isinstance(exc, AudiopipeError):
        return EXIT_USER_ERROR
    seen = exc
    while seen is not None:  # a raw connection error, possibly wrapped by a library
        if is_transient(seen):
            return EXIT_TRANSIENT
        seen = seen.__cause__ or seen.__context__
    return EXIT_INTERNAL


def error_message(exc: BaseException) -> str:
    """What to tell the user: our own errors say what to fix; a raw outage says what happened and what to do."""
    if isinstance(exc, AudiopipeError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted: committed shards are kept; run the same command again to resume."
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    if exit_code_for(exc) == EXIT_TRANSIENT:
        return (f"the store or the Dask scheduler stopped answering ({text}). Committed shards are kept: run the "
                "same command again when it is back.")
    return f"internal error ({text}); the traceback is above. Please report it."


def show_error(message: str, code: int) -> None:
    """Print an error as one paragraph on stderr."""
    title = {EXIT_FAILED_SHARDS: "audiopipe: run incomplete", EXIT_TRANSIENT: "audiopipe: store unreachable",
             EXIT_INTERNAL: "audiopipe: internal error", EXIT_INTERRUPTED: "audiopipe: interrupted"
             }.get(code, "audiopipe: error")
    # Text: shown as written, never read as markup ("pip install 'audiopipe[train]'", s3://b/[x].wav)
    stderr_console.print(Panel(Text(message), title=title, border_style="red", expand=False))


@contextmanager
def stdout_kept_for_json(enabled: bool) -> Iterator[None]:
    """While the body runs, point file descriptor 1 at stderr, so nothing but the JSON lands on stdout.

    At the descriptor level, not ``sys.stdout``: Keras progress bars, prints in libraries and Dask worker
    processes started by the run (they inherit descriptor 1) would otherwise write there too.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Infinity as null and non-JSON objects as strings: strict JSON for any parser."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


class AudiopipeTyper(typer.Typer):
    """The root ``audiopipe`` app: an exception no command handled is a bug, so it exits 70 with its
    traceback, never 1 (which means "failed shards, rerun to finish")."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception:  # noqa: BLE001 - reported with its traceback, then the documented code
            traceback.print_exc(file=sys.stderr)
            show_error("internal error; the traceback is above. Please report it.", EXIT_INTERNAL)
            sys.exit(EXIT_INTERNAL)


def run_command(body: Callable[[], dict], show: Callable[[dict], None], *, as_json: bool) -> None:
    """Run a command's ``body``, show its summary (``show``: tables on stdout, or JSON) and exit with its code.

    A run whose shards partly failed still shows its summary (the error carries it), then exits 1.
    """
    result: dict | None = None
    failure: BaseException | None = None
    with stdout_kept_for_json(as_json):
        try:
            result = body()
        except (typer.Exit, SystemExit):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure gets its exit code
            failure = exc
            if exit_code_for(exc) == EXIT_INTERNAL:
                traceback.print_exc(file=sys.stderr)
            else:
                result = exc.summary if isinstance(exc, ShardsFailedError) else None
        code = exit_code_for(failure) if failure is not None else EXIT_OK
        if result and not as_json:
            show(result)  # the summary of a partly failed run too: what was done
        if failure is not None:
            show_error(error_message(failure), code)
    if as_json:
        payload = {**(result or {}), "exit_code": code}
        if failure is not None:
            payload["error"] = error_message(failure)
        sys.stdout.write(json.dumps(json_safe(payload)) + "\n")
        sys.stdout.flush()
    if code:
        raise typer.Exit(code)
