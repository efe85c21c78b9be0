"""Flows/CLI: ``audiopipe serve`` — the scheduled pipeline on this machine until Ctrl-C.

Thin: check the credentials, start ``infra.serve.LocalServe`` (SeaweedFS, a Prefect server with its UI,
the ``audiopipe`` work pool with every deployment of ``infra/prefect.yaml``, a worker), print where
everything is, then wait. SIGINT (Ctrl-C) or SIGTERM stops the worker, the server and the store, in that
order. Runbook: ``docs/operations.md``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from audiopipe.infra.errors import AudiopipeError
from audiopipe.infra.settings import RunSettings, apply_prefect_defaults

if TYPE_CHECKING:
    from audiopipe.infra.serve import LocalServe

out = Console(soft_wrap=True)
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a user error as one paragraph and exit (the same panel as ``flows/cli.py``)."""
    err.print(Panel(Text(message), title="audiopipe: error", border_style="red", expand=False))
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``audiopipe`` command line."""
    app.command("serve")(serve)


def serve(
    s3_port: Annotated[int, typer.Option(help="S3 port of the SeaweedFS store on 127.0.0.1.")] = 8333,
    api_port: Annotated[int, typer.Option(help="Prefect server (API and UI) port on 127.0.0.1; 0 picks a free one.")] = 0,
    work_dir: Annotated[Path | None, typer.Option(help="Scratch folder: store data in WORK_DIR/store, Prefect home and logs in WORK_DIR/serve. (default: $AUDIOPIPE_WORK_DIR or .audiopipe)")] = None,
) -> None:
    """Run store, Prefect server, work pool, deployments (infra/prefect.yaml) and a worker until Ctrl-C.

    Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the store accepts only those, the
    worker uses them); deployment URLs and the nightly timezone from the AUDIOPIPE_* variables listed in
    infra/prefect.yaml. Ctrl-C or SIGTERM stops the worker, the server and the store, in that order.
    """
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        fail("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY first: the store accepts only those credentials "
             "and the worker's flow runs use them (they are never written to Prefect).")
    root = (work_dir or RunSettings().work_dir).resolve()
    apply_prefect_defaults(root)  # this process only talks to the server; Prefect reads its env at import
    from audiopipe.infra.serve import LocalServe

    stack = LocalServe(root, access_key=key, secret_key=secret, s3_port=s3_port, api_port=api_port or None)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start(report=_report)
        _print_ready(stack)
        while True:
            time.sleep(1.0)
            stack.check()
    except KeyboardInterrupt:
        _report("interrupted")
    except AudiopipeError as exc:
        _stop_quietly(stack)
        fail(str(exc))
    finally:
        _stop_quietly(stack)
        signal.signal(signal.SIGTERM, previous)
    _report("stopped.")


def _report(step: str) -> None:
    err.print(f"{time.strftime('%H:%M:%S')} serve: {step}", markup=False, highlight=False)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_quietly(stack: LocalServe) -> None:
    """Stop everything (idempotent), ignoring further Ctrl-C/SIGTERM so no child is left half-stopped."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.stop(report=_report)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _print_ready(stack: LocalServe) -> None:
    lines = [
        f"Prefect UI   {stack.ui_url}",
        f"S3 store     {stack.endpoint_url}  (data in {stack.store.root}"
        + (", already running: left running on exit)" if not stack.owns_store else ")"),
        f"deployed     {', '.join(stack.deployed)}  (work pool 'audiopipe')",
    ]
    lines += [f"skipped      {name}: {why}" for name, why in stack.skipped.items()]
    lines.append(f"logs         {stack.logs_dir}")
    out.print(Panel("\n".join(lines), title="audiopipe serve: ready", expand=False))
    out.print("Use it from another shell (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY as in this one):")
    out.print(f"export PREFECT_API_URL={stack.api_url}", markup=False, highlight=False)
    out.print(f"export AWS_ENDPOINT_URL={stack.endpoint_url}", markup=False, highlight=False)
    out.print("prefect deployment run extract-features/featurize-archive "
              "--param in_url=s3://BUCKET/audio --param out_url=s3://BUCKET/features", markup=False, highlight=False)
    out.print("Ctrl-C stops the worker, the server and the store.")
