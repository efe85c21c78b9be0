"""Infra: ``audiopipe serve``, the scheduled pipeline on one machine, started in order, stopped in reverse.

In: S3 credentials (passed in; the CLI reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) and the
deployment variables of ``infra/prefect.yaml`` from the environment (defaults in ``DEPLOY_DEFAULTS``).
Out: running processes (SeaweedFS S3, a Prefect server with its UI and scheduler, the ``audiopipe``
process work pool holding every deployment of ``infra/prefect.yaml``, one Prefect worker), with the
Prefect home and one log file per process under ``<work_dir>/serve/``.

Each child gets only the environment it needs: the server and ``prefect deploy`` never see the S3 keys,
so they cannot end up in Prefect's database or logs; the worker, whose flow runs read the store, does.
Children run in their own sessions, so a Ctrl-C in the terminal reaches only the parent, which then
stops them one at a time: the worker and its flow runs, the server, the store (SIGTERM, then SIGKILL
past a grace period). Flow runs are in sessions of their own too (Prefect starts them so), which is
why stopping a process also stops the descendants it leaves behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from audiopipe.infra.deploy_check import refuse_credentials_in_deployments
from audiopipe.infra.errors import AudiopipeError, ConfigError
from audiopipe.infra.store import SeaweedStore, free_port

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_ROOT / "infra" / "prefect.yaml"
WORK_POOL = "audiopipe"

# Values `prefect deploy` substitutes for `{{ $NAME }}` in infra/prefect.yaml when the environment has none.
DEPLOY_DEFAULTS: dict[str, str] = {
    "AUDIOPIPE_TIMEZONE": "UTC",
    "AUDIOPIPE_ARCHIVE_URL": "s3://archive/audio",
    "AUDIOPIPE_FEATURES_URL": "s3://features/archive",
    "AUDIOPIPE_RESULTS_URL": "s3://results/nightly",
    "AUDIOPIPE_ASR_MODEL": "s3://models:asr@champion",
    "AUDIOPIPE_CLASSIFY_MODEL": "s3://models:classify@champion",
    "AUDIOPIPE_SEPARATE_MODEL": "s3://models:separate@champion",
    "AUDIOPIPE_REGISTRY_URL": "s3://models",
    "AUDIOPIPE_ASR_LABELS_URL": "s3://labels/asr/incoming",
    "AUDIOPIPE_ASR_HOLDOUT_URL": "s3://labels/asr/holdout.parquet",
    "AUDIOPIPE_CLASSIFY_LABELS_URL": "s3://labels/classify/incoming",
    "AUDIOPIPE_CLASSIFY_HOLDOUT_URL": "s3://labels/classify/holdout.parquet",
}
# Never handed to the server or to `prefect deploy`; the worker gets the keys passed to LocalServe only.
_WITHHELD = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PREFECT_API_KEY")
# A user's own Prefect database settings must not redirect this server's.
_WITHHELD_PREFIXES = ("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")

SERVER_START_TIMEOUT_S = 240.0  # a fresh home runs the SQLite migrations first: ~20-60 s on 2 busy cores
WORKER_START_TIMEOUT_S = 120.0
DEPLOY_TIMEOUT_S = 600.0
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class DeploymentEntry:
    """One deployment of the prefect file: its name and ``package.module.flow`` entrypoint (a module path)."""

    name: str
    entrypoint: str

    @property
    def module(self) -> str:
        return self.entrypoint.rsplit(".", 1)[0]

    def importable(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False


def read_deployments(prefect_file: Path) -> list[DeploymentEntry]:
    """The deployments declared in a prefect.yaml, in file order.

    Raises:
        ConfigError: when the file is missing, not YAML, or a deployment lacks a name or entrypoint.
    """
    try:
        data = yaml.safe_load(prefect_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {prefect_file}: {exc}") from exc
    entries = []
    for i, item in enumerate(data.get("deployments") or []):
        if not item.get("name") or not item.get("entrypoint"):
            raise ConfigError(f"deployment #{i} of {prefect_file} needs a name and an entrypoint.")
        entries.append(DeploymentEntry(item["name"], item["entrypoint"]))
    return entries


@dataclass
class _Child:
    """A started process with the file its output goes to."""

    name: str
    proc: subprocess.Popen
    log_path: Path


class LocalServe:
    """Store, Prefect server, work pool and deployments, worker: ``start()`` them, ``stop()`` them.

    Usable as a context manager; ``stop()`` is idempotent and also cleans up after a partial start.

    Args:
        work_dir: Scratch root; the store's data goes to ``<work_dir>/store`` (the folder ``audiopipe
            store up`` uses, so a store it started is reused and left running) and the rest to
            ``<work_dir>/serve``.
        access_key: S3 access key the store accepts and the worker uses.
        secret_key: Its secret.
        s3_port: S3 port on 127.0.0.1.
        api_port: Prefect server port on 127.0.0.1; a free one when None.
        project_root: Folder ``prefect deploy`` runs in (flows are imported from the installed package).
        prefect_file: Deployment file (default ``<project_root>/infra/prefect.yaml``).
        env: Base environment of every child (default ``os.environ``).
    """

    def __init__(self, work_dir: Path, *, access_key: str, secret_key: str, s3_port: int = 8333,
                 api_port: int | None = None, project_root: Path = PROJECT_ROOT,
                 prefect_file: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.serve_dir = self.work_dir / "serve"
        self.project_root = Path(project_root).resolve()
        self.prefect_file = Path(prefect_file or self.project_root / "infra" / "prefect.yaml").resolve()
        self.api_port = api_port or free_port()
        self.store = SeaweedStore(self.work_dir / "store", s3_port)
        self.owns_store = False
        self.deployed: list[str] = []
        self.skipped: dict[str, str] = {}
        self._keys = (access_key, secret_key)
        self._base_env = dict(os.environ if env is None else env)
        self._server: _Child | None = None
        self._worker: _Child | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def endpoint_url(self) -> str:
        return self.store.endpoint_url

    @property
    def prefect_home(self) -> Path:
        return self.serve_dir / "prefect"

    @property
    def logs_dir(self) -> Path:
        return self.serve_dir / "logs"

    def start(self, *, worker: bool = True, report: Callable[[str], None] = log.info) -> LocalServe:
        """Start every part in order; on any failure (or Ctrl-C) stop what was started and re-raise."""
        try:
            report("starting SeaweedFS")
            self.start_store()
            if not self.owns_store:
                report(f"using the SeaweedFS already running from {self.store.root} ({self.endpoint_url})")
            report(f"starting the Prefect server on {self.ui_url} (a fresh database takes a minute)")
            self.start_server()
            report(f"creating work pool {WORK_POOL!r} and deploying {self.prefect_file.name}")
            self.ensure_work_pool()
            self.crash_unfinished_runs("found unfinished when `audiopipe serve` started: the stack that ran it "
                                       "had been stopped or killed")
            self.deploy()
            if worker:
                report(f"starting a worker for pool {WORK_POOL!r}")
                self.start_worker()
        except BaseException:
            self.stop(report)
            raise
        return self

    def start_store(self) -> None:
        """Start SeaweedFS, or reuse the one already serving ``<work_dir>/store`` (then leave it running)."""
        if self.store.running_pid() is not None:
            state = json.loads(self.store.state_file.read_text())
            self.store = SeaweedStore(self.store.root, int(state["s3_port"]))
            return
        self.store.up(access_key=self._keys[0], secret_key=self._keys[1])
        self.owns_store = True

    def start_server(self) -> None:
        """``prefect server start`` on 127.0.0.1 with its own home; returns once ``/api/health`` answers."""
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(self.api_port)]
        self._server = self._spawn("server", cmd, self._env(credentials=False))
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _answers(f"{self.api_url}/health"):
            self._check(self._server)
            if time.monotonic() > deadline:
                raise AudiopipeError(f"the Prefect server did not answer on {self.api_url}/health within "
                                     f"{SERVER_START_TIMEOUT_S:.0f} s; see {self._server.log_path}.")
            time.sleep(0.5)

    def ensure_work_pool(self) -> None:
        """Create the ``audiopipe`` process work pool unless it exists (kept across restarts)."""
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectNotFound
        from prefect.workers.process import ProcessWorker

        with self.client() as client:
            try:
                client.read_work_pool(WORK_POOL)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=WORK_POOL, type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template()))

    def deploy(self) -> list[str]:
        """``prefect deploy`` each deployment of the prefect file whose flow module is installed; returns names.

        A deployment whose flow module is not installed (yet) is skipped (named in ``skipped``); any
        other deploy failure raises, with the end of ``deploy.log``.
        """
        refuse_credentials_in_deployments(self.prefect_file)  # before anything reaches the server
        entries = read_deployments(self.prefect_file)
        ready = [e for e in entries if e.importable()]
        self.skipped = {e.name: f"module {e.module} not installed" for e in entries if e not in ready}
        if not ready:
            raise ConfigError(f"no deployment of {self.prefect_file} has its flow module installed.")
        cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(self.prefect_file)]
        cmd += ["--all"] if len(ready) == len(entries) else [a for e in ready for a in ("--name", e.name)]
        log_path = self.logs_dir / "deploy.log"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as out:
                done = subprocess.run(cmd, cwd=self.project_root, env=self._env(credentials=False), stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      timeout=DEPLOY_TIMEOUT_S, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise AudiopipeError(f"`prefect deploy` took over {DEPLOY_TIMEOUT_S:.0f} s:\n{_tail(log_path)}") from exc
        if done.returncode != 0:
            raise ConfigError(f"`prefect deploy` of {self.prefect_file} failed (exit {done.returncode}):\n"
                              f"{_tail(log_path)}")
        self.deployed = [e.name for e in ready]
        return self.deployed

    def crash_unfinished_runs(self, reason: str) -> int:
        """Mark this pool's Pending/Running/Cancelling flow runs Crashed; returns how many.

        Call only when no worker of the pool runs (this server listens on 127.0.0.1 only, so its one
        worker is ours): such runs have no process left. Moving them to a final state frees their
        deployment's concurrency slot; left "Running", a run would hold the slot for good (the server
        keeps leases in memory) and CANCEL_NEW would cancel every later run of that deployment.
        """
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                    WorkPoolFilter, WorkPoolFilterName)
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed

        in_flight = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING])))
        with self.client() as client:
            runs = client.read_flow_runs(flow_run_filter=in_flight,
                                         work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[WORK_POOL])))
            for run in runs:
                client.set_flow_run_state(run.id, Crashed(message=f"{reason}. Run it again: the flow resumes "
                                                                  "where it stopped."), force=True)
        return len(runs)

    def start_worker(self) -> None:
        """``prefect worker start`` on the pool; returns once the server lists it online."""
        if self._worker and self._worker.proc.poll() is None:
            return
        from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process"]
        self._worker = self._spawn("worker", cmd, self._env(credentials=True))
        online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while True:
            self._check(self._worker)
            with self.client() as client:
                if client.read_workers_for_work_pool(WORK_POOL, worker_filter=online):
                    return
            if time.monotonic() > deadline:
                raise AudiopipeError(f"the Prefect worker did not come online within "
                                     f"{WORKER_START_TIMEOUT_S:.0f} s; see {self._worker.log_path}.")
            time.sleep(1.0)

    def client(self):
        """A synchronous Prefect client for this server (a context manager)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def check(self) -> None:
        """Raise if the server or worker has exited since it started."""
        for child in (self._server, self._worker):
            if child:
                self._check(child)

    def stop_worker(self, report: Callable[[str], None] = log.info) -> None:
        """Stop the worker and its flow runs; mark the runs it cut short Crashed, which frees their slots."""
        if not self._worker:
            return
        report("stopping the worker and its flow runs")
        _stop(self._worker.proc, STOP_GRACE_S)
        self._worker = None
        if self._server and self._server.proc.poll() is None:
            crashed = self.crash_unfinished_runs("its worker was stopped (`audiopipe serve` shutting down)")
            if crashed:
                report(f"marked {crashed} unfinished flow run(s) Crashed")

    def stop(self, report: Callable[[str], None] = log.info) -> None:
        """Stop worker (and its flow runs), server, then the store if this object started it."""
        try:
            self.stop_worker(report)
        finally:
            if self._server:
                report("stopping the Prefect server")
                _stop(self._server.proc, STOP_GRACE_S)
                self._server = None
            if self.owns_store:
                report("stopping SeaweedFS")
                self.store.down()
                self.owns_store = False

    def __enter__(self) -> LocalServe:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _env(self, *, credentials: bool) -> dict[str, str]:
        env = {k: v for k, v in self._base_env.items()
               if k not in _WITHHELD and not k.startswith(_WITHHELD_PREFIXES)}
        for name, value in DEPLOY_DEFAULTS.items():
            env.setdefault(name, value)
        env.update(
            PREFECT_SERVER_ANALYTICS_ENABLED="false",  # telemetry fails offline and locks SQLite
            PREFECT_HOME=str(self.prefect_home),
            PREFECT_API_URL=self.api_url,
            PREFECT_UI_URL=self.ui_url,
            AWS_ENDPOINT_URL=self.endpoint_url,
            PYTHONUNBUFFERED="1",
            # Flow runs start in a temporary folder: their scratch (Dask spill, model cache) goes here instead.
            AUDIOPIPE_WORK_DIR=str(self.work_dir),
        )
        if credentials:
            env.update(AWS_ACCESS_KEY_ID=self._keys[0], AWS_SECRET_ACCESS_KEY=self._keys[1])
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> _Child:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd or self.serve_dir, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return _Child(name, proc, log_path)

    @staticmethod
    def _check(child: _Child) -> None:
        code = child.proc.poll()
        if code is not None:
            raise AudiopipeError(f"the Prefect {child.name} exited with code {code}:\n{_tail(child.log_path)}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, num_lines: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-num_lines:]) + f"\n(full log: {path})"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM ``proc``; past ``grace_s`` stop what it leaves behind (descendants), then SIGKILL it.

    Descendants are listed before the signal because once ``proc`` exits its orphans can no longer be
    found through it; Prefect workers wait for their flow runs on SIGTERM, so those are stopped here.
    """
    if proc.poll() is not None:
        return
    tree = {p.pid: p for p in _descendants(proc.pid)}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        tree.update({p.pid: p for p in _descendants(proc.pid)})
    leftovers = [p for p in tree.values() if p.is_running()]
    for p in leftovers:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: pgid == pid
        proc.wait()
