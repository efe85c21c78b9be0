"""``audiopipe serve`` as an operator runs it: one real stack for the module, driven through Prefect's API.

The stack is the CLI in a subprocess (SeaweedFS, ``prefect server start``, the ``audiopipe`` work pool with
every deployment of infra/prefect.yaml, ``prefect worker start``). Runs are triggered the way a user or an
automation would: ``run_deployment`` and flow runs created through the API. The last test stops it with
SIGINT and checks that no process is left; the module fixture kills whatever is left even if a test failed.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from audiopipe.infra.serve import PREFECT_FILE, WORK_POOL, LocalServe
from audiopipe.infra.store import free_port
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.synth import tone
from tests.support import TEST_KEY, TEST_SECRET, cli_env

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(900)]
DEPLOYMENT = "extract-features/featurize-archive"
READY_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 300.0
NUM_FILES = 3


@dataclass
class Served:
    proc: subprocess.Popen
    output: Path
    work_dir: Path
    env: dict[str, str]
    api_url: str
    endpoint_url: str
    seen: dict[int, psutil.Process]  # every descendant observed, for the final cleanup

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def s3(self):
        import s3fs

        return s3fs.S3FileSystem(key=TEST_KEY, secret=TEST_SECRET, endpoint_url=self.endpoint_url,
                                 skip_instance_cache=True)

    def remember_descendants(self) -> list[psutil.Process]:
        found = _descendants(self.proc.pid)
        self.seen.update({p.pid: p for p in found})
        return found

    def log_tail(self, name: str, num_lines: int = 40) -> str:
        path = self.work_dir / "serve" / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:]) if path.exists() else ""


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_all(served: Served) -> None:
    """SIGINT the CLI (its own clean stop); SIGKILL anything that outlives it."""
    served.remember_descendants()
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGINT)
        try:
            served.proc.wait(90)
        except subprocess.TimeoutExpired:
            served.remember_descendants()
            os.killpg(served.proc.pid, signal.SIGKILL)
            served.proc.wait()
    leftovers = [p for p in served.seen.values() if p.is_running()]
    for p in leftovers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    env = cli_env(tmp, AWS_ACCESS_KEY_ID=TEST_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET,
                  PREFECT_WORKER_QUERY_SECONDS="2", AUDIOPIPE_WORKERS="1", AUDIOPIPE_TIMEZONE="Europe/Berlin")
    for name in ("PREFECT_API_URL", "AWS_ENDPOINT_URL"):  # serve sets its own
        env.pop(name, None)
    output = tmp / "serve.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "audiopipe.flows.cli", "serve", "--s3-port", str(free_port()),
                                 "--api-port", str(free_port())], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    stack = Served(proc, output, tmp / "work", env, "", "", {})
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "export AWS_ENDPOINT_URL=" not in stack.text():
            stack.remember_descendants()
            assert proc.poll() is None, f"audiopipe serve exited with {proc.returncode}:\n{stack.text()}"
            assert time.monotonic() < deadline, f"audiopipe serve not ready in {READY_TIMEOUT_S} s:\n{stack.text()}"
            time.sleep(0.5)
        stack.api_url = re.search(r"export PREFECT_API_URL=(\S+)", stack.text()).group(1)
        stack.endpoint_url = re.search(r"export AWS_ENDPOINT_URL=(\S+)", stack.text()).group(1)
        stack.remember_descendants()
        yield stack
    finally:
        _kill_all(stack)


@pytest.fixture(scope="module")
def archive(served, tmp_path_factory) -> str:
    """A few seconds of audio (three tones) in a fresh bucket of the served store; returns its URL."""
    local = tmp_path_factory.mktemp("archive")
    for i in range(NUM_FILES):
        sf.write(local / f"tone{i}.wav", tone(300 + 100 * i, 1.5, 16_000), 16_000)
    bucket = f"serve-{secrets.token_hex(3)}"
    fs = served.s3()
    fs.mkdir(bucket)
    fs.put(str(local) + "/", f"{bucket}/archive/", recursive=True)
    return f"s3://{bucket}/archive"


def wait_final(served: Served, run_ids: list, timeout_s: float = RUN_TIMEOUT_S) -> list:
    """The flow runs once all are in a final state; fails with the worker's log otherwise."""
    deadline = time.monotonic() + timeout_s
    with served.client() as client:
        while True:
            runs = [client.read_flow_run(run_id) for run_id in run_ids]
            if all(r.state and r.state.is_final() for r in runs):
                return runs
            served.remember_descendants()
            if time.monotonic() > deadline:
                states = [(r.name, r.state and r.state.name) for r in runs]
                pytest.fail(f"runs not final after {timeout_s} s: {states}\n{served.log_tail('worker')}")
            time.sleep(1.0)


def assert_featurized(served: Served, out_url: str, cfg: FeatureConfig) -> None:
    """Every archive file is in the manifest as ok, and the feature parts hold rows for all of them."""
    fs = served.s3()
    root = out_url.removeprefix("s3://")
    manifest_parts = fs.glob(f"{root}/manifest/config={cfg.config_hash}/part-*.parquet")
    feature_parts = fs.glob(f"{root}/features/config={cfg.config_hash}/part-*.parquet")
    assert manifest_parts and feature_parts, fs.find(root)
    manifest = [row for p in manifest_parts for row in pq.read_table(io.BytesIO(fs.cat(p))).to_pylist()]
    assert sorted(r["source"].rsplit("/", 1)[-1] for r in manifest) == [f"tone{i}.wav" for i in range(NUM_FILES)]
    assert {r["status"] for r in manifest} == {"ok"}
    features = [pq.read_table(io.BytesIO(fs.cat(p))) for p in feature_parts]
    assert sum(t.num_rows for t in features) >= NUM_FILES


def test_serve_needs_credentials(tmp_path):
    env = cli_env(tmp_path)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "audiopipe.flows.cli", "serve"], env=env, capture_output=True,
                          text=True, timeout=120)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY first" in output, output
    assert "Traceback" not in output and not (tmp_path / "work" / "serve").exists()


def test_missed_runs_coalesce_into_one(served, archive):
    """Three nights missed (the pool was paused, as when no worker polls): one run, two cancelled."""
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.objects import StateType
    from prefect.states import Scheduled

    out_url = archive.replace("/archive", "/coalesced")
    now = datetime.now(timezone.utc)
    with served.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        client.update_work_pool(WORK_POOL, WorkPoolUpdate(is_paused=True))
        try:
            runs = [client.create_flow_run_from_deployment(
                deployment.id, parameters={"in_url": archive, "out_url": out_url, "settings": {"workers": 1}},
                state=Scheduled(scheduled_time=now - timedelta(days=days))) for days in (3, 2, 1)]
        finally:
            client.update_work_pool(WORK_POOL, WorkPoolUpdate(is_paused=False))
    finished = wait_final(served, [r.id for r in runs])
    types = sorted(r.state.type.value for r in finished)
    assert types == [StateType.CANCELLED.value] * 2 + [StateType.COMPLETED.value], (
        [(r.state.name, r.state.message) for r in finished], served.log_tail("worker"))
    for run in finished:
        if run.state.type == StateType.CANCELLED:
            assert "concurrency limit" in (run.state.message or "")
    assert_featurized(served, out_url, FeatureConfig())


def test_featurize_archive_through_the_api(served, archive):
    """``run_deployment`` with JSON parameters (a feature_config dict) -> shards and manifest in S3."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg = {"kind": "mfcc", "n_mfcc": 13}
    out_url = archive.replace("/archive", "/features")
    with temporary_settings(updates={PREFECT_API_URL: served.api_url}):
        run = run_deployment(DEPLOYMENT, parameters={"in_url": archive, "out_url": out_url, "feature_config": cfg,
                                                     "settings": {"workers": 1, "files_per_shard": 2}},
                             timeout=RUN_TIMEOUT_S, poll_interval=1, as_subflow=False)
    assert run.state.is_completed(), (run.state, served.log_tail("worker"))
    assert_featurized(served, out_url, FeatureConfig.from_dict(cfg))


def test_redeploy_keeps_deployments_and_history(served):
    """Same names -> same ids; past runs stay (the scheduler's future runs may be replaced, as schedules are)."""
    with served.client() as client:
        before = {d.name: d.id for d in client.read_deployments()}
        runs_before = {r.id for r in client.read_flow_runs() if not r.state.is_scheduled()}
    port = lambda url: int(url.split(":")[2].split("/")[0])  # noqa: E731
    redeploy = LocalServe(served.work_dir, access_key=TEST_KEY, secret_key=TEST_SECRET,
                          s3_port=port(served.endpoint_url), api_port=port(served.api_url), env=served.env)
    assert set(redeploy.deploy()) == set(before)
    with served.client() as client:
        after = {d.name: d.id for d in client.read_deployments()}
        nightly = client.read_deployment_by_name("transcribe/nightly-transcribe")
        runs_after = {r.id for r in client.read_flow_runs()}
    assert after == before
    assert runs_before <= runs_after
    assert set(before) == {"featurize-archive", "nightly-transcribe", "retrain-on-new-labels", "nightly-classify",
                           "nightly-separate", "retrain-classify-on-new-labels"}
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"


def _texts_with_possible_secrets(served: Served) -> dict[str, str]:
    files = [PREFECT_FILE, *(p for p in (served.work_dir / "serve").rglob("*") if p.is_file())]
    texts = {str(p): p.read_bytes().decode("latin-1") for p in files}
    texts["audiopipe serve output"] = served.text()
    return texts


def test_secret_is_not_in_prefect_or_the_deployment_file(served):
    texts = _texts_with_possible_secrets(served)
    db = served.work_dir / "serve" / "prefect" / "prefect.db"
    assert str(db) in texts and "featurize-archive" in texts[str(db)]  # the real database was read
    assert any(name.endswith("worker.log") for name in texts)
    for name, text in texts.items():
        assert TEST_SECRET not in text, name


def test_nightly_transcribe_through_the_api(served, archive):
    """Trigger ``transcribe/nightly-transcribe`` through the API: transcripts land in SeaweedFS, once each."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from audiopipe.infra.storage import StorageSpec
    from tests.flows.infer_support import register_asr

    bucket = archive.removeprefix("s3://").split("/", 1)[0]
    storage = StorageSpec({"endpoint_url": served.endpoint_url, "key": TEST_KEY, "secret": TEST_SECRET})
    model = register_asr(f"s3://{bucket}/models", storage)  # a real Keras model, untrained: text is noise
    out_url = f"s3://{bucket}/transcripts"
    with temporary_settings(updates={PREFECT_API_URL: served.api_url}):
        run = run_deployment("transcribe/nightly-transcribe", timeout=RUN_TIMEOUT_S, poll_interval=1,
                             as_subflow=False, parameters={"in_url": archive, "out_url": out_url, "model": model,
                                                           "settings": {"workers": 1}})
    assert run.state.is_completed(), (run.state, served.log_tail("worker"))
    fs = served.s3()
    base = f"{bucket}/transcripts/transcribe/model=asr/version=1"
    manifest = [row for p in fs.glob(f"{base}/manifest/part-*.parquet")
                for row in pq.read_table(io.BytesIO(fs.cat(p))).to_pylist()]
    assert sorted(r["source"].rsplit("/", 1)[-1] for r in manifest) == [f"tone{i}.wav" for i in range(NUM_FILES)]
    assert {r["status"] for r in manifest} == {"ok"}
    for i in range(NUM_FILES):  # every recording has its subtitle and JSON-lines files
        assert fs.exists(f"{base}/files/tone{i}.wav.srt") and fs.exists(f"{base}/files/tone{i}.wav.jsonl")


def test_ctrl_c_stops_everything_in_reverse_order(served, archive):
    """SIGINT with a flow run in flight: every process ends, the run is Crashed, its slot is free."""
    from prefect.client.schemas.objects import StateType

    with served.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "in_url": archive, "out_url": archive.replace("/archive", "/interrupted"), "settings": {"workers": 1}})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (state := client.read_flow_run(run.id).state).type != StateType.RUNNING:
            assert not state.is_final() and time.monotonic() < deadline, (state, served.log_tail("worker"))
            time.sleep(0.2)
    children = served.remember_descendants()
    commands = [" ".join(p.cmdline()) for p in children]
    for part in ("weed", "server start", "worker start", "prefect.engine"):
        assert any(part in c for c in commands), (part, commands)
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(120) == 0, served.text()
    _, alive = psutil.wait_procs(list(served.seen.values()), timeout=5)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    text = served.text()
    # "marked N": an hourly/nightly scheduled run may be in flight too if the test spans its start time
    steps = [text.index(f"serve: {step}") for step in ("stopping the worker", "marked ",
                                                        "stopping the Prefect server", "stopping SeaweedFS",
                                                        "stopped.")]
    assert steps == sorted(steps), text
    with sqlite3.connect(served.work_dir / "serve" / "prefect" / "prefect.db") as db:
        [state_type] = db.execute("SELECT state_type FROM flow_run WHERE id = ?", (str(run.id),)).fetchone()
        [slots] = db.execute("SELECT active_slots FROM concurrency_limit_v2 WHERE name = ?",
                             (f"deployment:{deployment.id}",)).fetchone()
    assert (state_type, slots) == ("CRASHED", 0)  # else CANCEL_NEW would cancel every later run
    for name, text in _texts_with_possible_secrets(served).items():  # the database after its last write
        assert TEST_SECRET not in text, name
