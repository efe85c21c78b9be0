"""End to end: the deployments of infra/prefect.yaml on a stack started the way docs/deploy.md says.

Each part is its own process, started with its own CLI, as an operator would on separate machines: SeaweedFS
(``weed``, through the session's ``s3_store`` fixture), ``prefect server start`` on a free loopback port with
its own PREFECT_HOME, ``prefect work-pool create`` + ``prefect deploy --all`` (from a folder that is not the
checkout: entrypoints are module paths of the installed package), ``dask scheduler`` and two ``dask worker``
processes (one advertising ``--resources GPU=1``), and ``prefect worker start --pool audiopipe`` in a scratch
folder, with no path variable, told about Dask and shard concurrency only by its ``AUDIOPIPE_*`` environment.
Only the worker and the Dask workers get the S3 keys.

Runs are created through Prefect's API with the parameters the deployments took from the environment at
deploy time: featurize-archive, retrain-on-new-labels (asr) asked for a GPU (it must land on the GPU worker
and fail loudly, as this machine has none), the same on CPU (the first model is promoted), then
nightly-transcribe with that champion. Results are read back from the store: one manifest row per recording.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from audiopipe.infra.store import free_port
from tests.support import TEST_KEY, TEST_SECRET

pytestmark = [pytest.mark.e2e, pytest.mark.s3, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = ROOT / "infra" / "prefect.yaml"
POOL = "audiopipe"
SERVER_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 420.0
SHARD_CONCURRENCY = "2"
FILES_PER_SHARD = "6"
BATCH, HOLDOUT = 12, 6  # speech utterances: training labels, held-out labels
TINY_ASR = {"epochs": 1, "batch_size": 8, "model_overrides": {"lstm_units": 16, "lstm_layers": 1, "conv_channels": 8}}
GPU_ERROR = "a GPU was required (--gpu) but TensorFlow sees none on this worker"


@dataclass
class Stack:
    tmp: Path
    bucket: str
    endpoint_url: str
    api_url: str = ""
    scheduler: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    def env(self, *, credentials: bool, **extra: str) -> dict[str, str]:
        """This venv first on PATH; the S3 keys only where asked; nothing that points at the checkout."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "AUDIOPIPE_", "DASK_")) and k not in ("PYTHONPATH",)}
        env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", AWS_ENDPOINT_URL=self.endpoint_url, COLUMNS="200")
        if credentials:
            env.update(AWS_ACCESS_KEY_ID=TEST_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET)
        else:
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
                env.pop(name, None)
        if self.api_url:
            env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.tmp / "prefect-client"))
        env.update(extra)
        return env

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def run(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None,
            timeout: float = 300) -> str:
        """A command that must succeed; its output (also kept under logs/)."""
        done = subprocess.run(cmd, env=env, cwd=cwd or self.tmp, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        output = done.stdout + done.stderr
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / f"{name}.log").write_text(output)
        assert done.returncode == 0, f"`{' '.join(cmd)}` exited {done.returncode}:\n{output[-4000:]}"
        return output

    def tail(self, name: str, num_lines: int = 60) -> str:
        path = self.logs / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return f"--- {name}.log\n" + "\n".join(lines[-num_lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{self.tail(name)}"

    def remember_descendants(self) -> None:
        for proc in self.procs.values():
            try:
                self.seen.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        """SIGTERM each started process group (worker first), then SIGKILL whatever is left of them."""
        self.remember_descendants()
        for name in ("prefect-worker", "prefect-server", "dask-worker-gpu", "dask-worker-cpu", "dask-scheduler"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        leftovers = [p for p in self.seen.values() if p.is_running()]
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def s3(self):
        import s3fs

        return s3fs.S3FileSystem(key=TEST_KEY, secret=TEST_SECRET, endpoint_url=self.endpoint_url,
                                 skip_instance_cache=True)

    @property
    def urls(self) -> dict[str, str]:
        """The deployment variables: everything under this test's bucket."""
        b = f"s3://{self.bucket}"
        return {"AUDIOPIPE_TIMEZONE": "UTC", "AUDIOPIPE_ARCHIVE_URL": f"{b}/archive",
                "AUDIOPIPE_FEATURES_URL": f"{b}/features", "AUDIOPIPE_RESULTS_URL": f"{b}/results",
                "AUDIOPIPE_ASR_MODEL": f"{b}/models:asr@champion",
                "AUDIOPIPE_CLASSIFY_MODEL": f"{b}/models:classify@champion",
                "AUDIOPIPE_SEPARATE_MODEL": f"{b}/models:separate@champion",
                "AUDIOPIPE_REGISTRY_URL": f"{b}/models",
                "AUDIOPIPE_ASR_LABELS_URL": f"{b}/labels/asr", "AUDIOPIPE_ASR_HOLDOUT_URL":
                    f"{b}/archive/holdout/labels/labels.parquet",
                "AUDIOPIPE_CLASSIFY_LABELS_URL": f"{b}/labels/classify",
                "AUDIOPIPE_CLASSIFY_HOLDOUT_URL": f"{b}/labels/classify-holdout.parquet"}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait(what: str, ready, stack: Stack, timeout_s: float, logs: tuple[str, ...]) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        stack.check_alive()
        assert time.monotonic() < deadline, f"{what} not ready in {timeout_s:.0f} s\n" + \
            "\n".join(stack.tail(n) for n in logs)
        time.sleep(1.0)


def _start_dask(stack: Stack) -> None:
    """A scheduler and two single-threaded workers, with Dask's own CLI; the second advertises a GPU."""
    port = free_port()
    stack.scheduler = f"tcp://127.0.0.1:{port}"
    stack.start("dask-scheduler", ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-dashboard"], stack.env(credentials=False), stack.tmp / "dask")
    one_thread = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, extra in (("cpu", []), ("gpu", ["--resources", "GPU=1"])):
        stack.start(f"dask-worker-{name}", ["dask", "worker", stack.scheduler, "--name", f"{name}-worker",
                                            "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
                                            "--memory-limit", "3GiB", "--no-dashboard", *extra],
                    stack.env(credentials=True, **one_thread), stack.tmp / "dask" / name)

    def two_workers() -> bool:
        from distributed import Client

        try:
            with Client(stack.scheduler, timeout="5s") as client:
                return len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        except (OSError, TimeoutError):
            return False

    _wait("the Dask cluster", two_workers, stack, 180, ("dask-scheduler", "dask-worker-cpu", "dask-worker-gpu"))


def _start_prefect(stack: Stack) -> None:
    """Server, pool, deployments and worker, each command as docs/deploy.md gives it."""
    port = free_port()
    server_env = stack.env(credentials=False, PREFECT_HOME=str(stack.tmp / "prefect-server"))
    stack.start("prefect-server", ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                server_env, stack.tmp / "server")
    stack.api_url = f"http://127.0.0.1:{port}/api"
    _wait("the Prefect server", lambda: _answers(f"{stack.api_url}/health"), stack, SERVER_TIMEOUT_S,
          ("prefect-server",))
    client_env = stack.env(credentials=False)
    stack.run("work-pool", ["prefect", "work-pool", "create", POOL, "--type", "process"], client_env)
    deploy_dir = stack.tmp / "deploy"  # anywhere: nothing in the file is relative to the checkout
    deploy_dir.mkdir()
    stack.run("deploy", ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)],
              stack.env(credentials=False, **stack.urls), cwd=deploy_dir, timeout=600)
    worker_env = stack.env(credentials=True, AUDIOPIPE_DASK_ADDRESS=stack.scheduler, AUDIOPIPE_WORKERS="1",
                           AUDIOPIPE_SHARD_CONCURRENCY=SHARD_CONCURRENCY, AUDIOPIPE_FILES_PER_SHARD=FILES_PER_SHARD,
                           AUDIOPIPE_WORK_DIR=str(stack.tmp / "worker-scratch"), PREFECT_WORKER_QUERY_SECONDS="2")
    stack.start("prefect-worker", ["prefect", "worker", "start", "--pool", POOL], worker_env, stack.tmp / "worker")

    def online() -> bool:
        from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

        with stack.client() as client:
            return bool(client.read_workers_for_work_pool(
                POOL, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))))

    _wait("the Prefect worker", online, stack, 180, ("prefect-worker",))


def _synth(stack: Stack, where: str, n: int, seed: int) -> None:
    stack.run(f"synth-{where}", ["audiopipe", "synth", "speech", f"s3://{stack.bucket}/archive/{where}", "--n", str(n),
                                 "--seed", str(seed), "--dask-address", stack.scheduler],
              stack.env(credentials=True, AUDIOPIPE_WORK_DIR=str(stack.tmp / "cli")), timeout=300)


@pytest.fixture(scope="module")
def stack(s3_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    stack = Stack(tmp, f"e2e-{os.getpid()}", s3_store.endpoint_url)
    try:
        stack.s3().mkdir(stack.bucket)
        _start_dask(stack)
        _synth(stack, "batch1", BATCH, 1)  # labelled speech: training labels...
        _synth(stack, "holdout", HOLDOUT, 99)  # ...and a disjoint held-out table, all in the archive
        fs = stack.s3()  # the new labels "land" where the retrain deployment looks
        fs.copy(f"{stack.bucket}/archive/batch1/labels/labels.parquet", f"{stack.bucket}/labels/asr/batch1.parquet")
        _start_prefect(stack)
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(tmp / "worker-scratch", ignore_errors=True)


def _run(stack: Stack, deployment: str, **parameters) -> object:
    """Create a run of ``deployment`` through the API with these parameter overrides; wait for a final state."""
    with stack.client() as client:
        dep = client.read_deployment_by_name(deployment)
        run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not ((state := client.read_flow_run(run.id).state) and state.is_final()):
            stack.remember_descendants()
            stack.check_alive()
            assert time.monotonic() < deadline, f"{deployment}: {state}\n{stack.tail('prefect-worker')}"
            time.sleep(2.0)
        return client.read_flow_run(run.id)


def _flow_log(stack: Stack, run) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with stack.client() as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return "\n".join(entry.message for entry in logs)


def _task_runs(stack: Stack, run, name: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with stack.client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))


def _max_overlap(runs) -> int:
    """Most task runs running at one instant (the worker's AUDIOPIPE_SHARD_CONCURRENCY bounds it)."""
    assert runs and all(r.start_time and r.end_time for r in runs), runs
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _manifest(stack: Stack, prefix: str) -> list[dict]:
    fs = stack.s3()
    return [row for part in fs.glob(f"{prefix}/part-*.parquet")
            for row in pq.read_table(io.BytesIO(fs.cat(part))).to_pylist()]


def _archive(stack: Stack) -> list[str]:
    files = stack.s3().find(f"{stack.bucket}/archive")
    return sorted(f"s3://{f}" for f in files if f.endswith((".wav", ".flac", ".ogg", ".mp3")))


def _train_keys_by_worker(stack: Stack) -> dict[str, list[str]]:
    """Worker name -> the training tasks it was sent (the worker's own state machine log)."""
    from distributed import Client

    def sent(dask_worker) -> list[str]:
        return sorted({str(e[0]) for e in dask_worker.state.log
                       if len(e) > 1 and e[1] == "compute-task" and str(e[0]).startswith("train-")})

    with Client(stack.scheduler, timeout="10s") as client:
        names = {addr: w["name"] for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        return {names[addr]: keys for addr, keys in client.run(sent).items()}


def test_deployments_run_on_a_stack_started_as_documented(stack):
    urls = stack.urls
    with stack.client() as client:
        deployments = {d.name: d for d in client.read_deployments()}
    assert set(deployments) == {"featurize-archive", "nightly-transcribe", "retrain-on-new-labels", "nightly-classify",
                                "nightly-separate", "retrain-classify-on-new-labels"}
    assert {n for n, d in deployments.items() if d.paused} == {"nightly-classify", "nightly-separate"}
    assert all(d.pull_steps == [] for d in deployments.values())
    assert deployments["retrain-on-new-labels"].parameters["model"] == f"{urls['AUDIOPIPE_REGISTRY_URL']}:asr"
    archive = _archive(stack)
    assert len(archive) == BATCH + HOLDOUT, archive

    # featurize-archive with the parameters it took from the environment at deploy time
    run = _run(stack, "extract-features/featurize-archive")
    assert run.state.is_completed(), (run.state, _flow_log(stack, run), stack.tail("prefect-worker"))
    log = _flow_log(stack, run)
    # the worker's AUDIOPIPE_DASK_ADDRESS: the two CLI-started workers, not a local cluster of AUDIOPIPE_WORKERS=1
    assert "Dask ready with 2 workers" in log, log
    assert _max_overlap(_task_runs(stack, run, "extract-shard")) == int(SHARD_CONCURRENCY)
    features = urls["AUDIOPIPE_FEATURES_URL"].removeprefix("s3://")
    [config] = [p.rsplit("config=", 1)[1] for p in stack.s3().ls(f"{features}/manifest") if "config=" in p]
    shards = stack.s3().glob(f"{features}/manifest/config={config}/part-*.parquet")
    assert len(shards) == -(-len(archive) // int(FILES_PER_SHARD)), shards  # the worker's AUDIOPIPE_FILES_PER_SHARD

    # retrain (asr) asking for a GPU: the fit lands on the worker advertising GPU=1, which has none: loud failure
    gpu_run = _run(stack, "retrain-on-new-labels/retrain-on-new-labels",
                   train_params={**TINY_ASR, "require_gpu": True})
    gpu_log = _flow_log(stack, gpu_run)
    assert gpu_run.state.is_failed(), (gpu_run.state, gpu_log)
    assert GPU_ERROR in " ".join(f"{gpu_run.state.message} {gpu_log}".split()), (gpu_run.state.message, gpu_log)
    placed = _train_keys_by_worker(stack)
    assert placed["cpu-worker"] == [] and len(placed["gpu-worker"]) == 1, placed
    assert not stack.s3().exists(f"{urls['AUDIOPIPE_REGISTRY_URL'].removeprefix('s3://')}/asr/retrain/state.json")

    # the same on CPU: trains, scores on the held-out table, promotes the first model
    cpu_run = _run(stack, "retrain-on-new-labels/retrain-on-new-labels", train_params=TINY_ASR)
    assert cpu_run.state.is_completed(), (cpu_run.state, _flow_log(stack, cpu_run), stack.tail("prefect-worker"))
    from audiopipe.infra.storage import StorageSpec
    from audiopipe.models.registry import Registry

    registry = Registry(urls["AUDIOPIPE_REGISTRY_URL"], StorageSpec({"endpoint_url": stack.endpoint_url}))
    assert registry.aliases("asr").get("champion") == 1, (registry.aliases("asr"), _flow_log(stack, cpu_run))

    # every archive file featurized exactly once, although three runs wrote to the same output
    rows = _manifest(stack, f"{features}/manifest/config={config}")
    assert Counter(r["source"] for r in rows) == Counter(archive), sorted(r["source"] for r in rows)
    assert {r["status"] for r in rows} == {"ok"}

    # nightly-transcribe with the champion named by AUDIOPIPE_ASR_MODEL
    tx_run = _run(stack, "transcribe/nightly-transcribe")
    assert tx_run.state.is_completed(), (tx_run.state, _flow_log(stack, tx_run), stack.tail("prefect-worker"))
    base = f"{urls['AUDIOPIPE_RESULTS_URL'].removeprefix('s3://')}/transcribe/model=asr/version=1"
    rows = _manifest(stack, f"{base}/manifest")
    assert Counter(r["source"] for r in rows) == Counter(archive), sorted(r["source"] for r in rows)
    assert {r["status"] for r in rows} == {"ok"}
    outputs = stack.s3().find(f"{base}/files")
    assert sum(p.endswith(".srt") for p in outputs) == len(archive), json.dumps(outputs)[:2000]
    # a second night with nothing new writes nothing
    again = _run(stack, "transcribe/nightly-transcribe")
    assert again.state.is_completed(), (again.state, _flow_log(stack, again))
    assert Counter(r["source"] for r in _manifest(stack, f"{base}/manifest")) == Counter(archive)
