"""Bulk inference (``transcribe``) failing mid-run, with real parts: SeaweedFS, Dask worker processes, Prefect's
harness, a registered Keras model. A worker killed mid-run, a recording that kills its worker every time,
the S3 server restarted, and the CLI process SIGKILLed and run again: each ends with exactly one manifest
row per recording and one set of transcript rows per ok recording; the secret key is never written.

The failures are injected through Dask worker plugins (``os._exit`` when an item starts, or when a worker
opens the poison recording) or real signals; everything after them (nanny restart, allowed-failures,
KilledWorker, the one-at-a-time retry of suspects, shard retries, reconcile) is the real machinery. The work
itself is ~20 ms per item, so ``SlowItems`` stretches each item to keep failures in the middle of the run.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import dask
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from audiopipe.flows.infer import model_spec, run_inference
from audiopipe.infra.runners import WORKER_ENVIRON
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, merged_storage_spec, open_fs
from audiopipe.tasks.discover import list_audio_sources
from audiopipe.tasks.infer_layout import ResultLayout, relative_source
from audiopipe.tasks.infer_run import plan_items
from audiopipe.tasks.shards import plan_shards, read_manifest
from tests.flows.infer_support import register_asr, voiced, write_wav
from tests.support import TEST_KEY, TEST_SECRET, cli_env

pytestmark = [pytest.mark.slow, pytest.mark.s3]

PLUGINS = ("ir-slow", "ir-kill-once", "ir-poison")


class SlowItems(WorkerPlugin):
    """Stretch each inference item so a failure lands while others are still pending."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and str(key).startswith("transcribe-"):
            time.sleep(self.delay_s)


class KillOnce(WorkerPlugin):
    """Once ``armed`` exists, kill the worker that starts the next ``transcribe-`` item; once in the cluster.

    ``fired`` is created exclusively (and holds the item's key), so the restarted worker, which gets the
    plugin again, does not kill itself a second time.
    """

    def __init__(self, armed: str, fired: str) -> None:
        self.armed, self.fired = armed, fired

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing" or not str(key).startswith("transcribe-") or not os.path.exists(self.armed):
            return
        try:
            fd = os.open(self.fired, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(key).encode())
        os.close(fd)
        os._exit(17)


class PoisonRecording(WorkerPlugin):
    """Kill the worker process whenever it opens one recording: a file that crashes its decoder.

    No real audio file reliably crashes libsndfile, so the crash is injected where the worker opens the
    recording for decoding (``tasks.infer.open_source``), inside the running item. Crashing on the item's
    key instead (when it starts executing) can hit a just-restarted worker before its nanny saw it come up,
    and the nanny then never restarts it: the cluster loses a worker, which a real poison file (opened after
    the model has loaded) does not cause.
    """

    def __init__(self, url: str) -> None:
        self.path = url.split("://", 1)[1]

    def setup(self, worker) -> None:
        import audiopipe.tasks.infer as infer

        original = self.original = infer.open_source

        def open_source(fs, path, size, **kwargs):
            if path == self.path:
                os._exit(17)
            return original(fs, path, size, **kwargs)

        infer.open_source = open_source

    def teardown(self, worker) -> None:
        import audiopipe.tasks.infer as infer

        infer.open_source = self.original


def _cluster(local_directory: str) -> LocalCluster:
    """Two worker processes configured as ``infra.runners`` configures them; workers killed here restart."""
    config = {"distributed.scheduler.allowed-failures": 2, "distributed.nanny.pre-spawn-environ": WORKER_ENVIRON}
    with dask.config.set(config):
        return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB",
                            local_directory=local_directory, dashboard_address="127.0.0.1:0")


@pytest.fixture(scope="module")
def infer_cluster(tmp_path_factory, s3_store):
    cluster = _cluster(str(tmp_path_factory.mktemp("dask-infer")))
    yield cluster
    cluster.close()


@pytest.fixture()
def poison_cluster(tmp_path_factory, s3_store):
    """A cluster of its own for the poison test: a worker that crashes again within milliseconds of its
    restart can leave the nanny never restarting it, and that must not starve the tests after it."""
    cluster = _cluster(str(tmp_path_factory.mktemp("dask-poison")))
    yield cluster
    cluster.close()


@pytest.fixture()
def client(infer_cluster):
    with Client(infer_cluster.scheduler_address) as c:
        c.wait_for_workers(2, timeout=120)
        yield c
        registered = c.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
        for name in set(PLUGINS) & set(registered):
            c.unregister_worker_plugin(name)


def polling_fs(endpoint_url: str):
    """An S3 client for polling a run's output: no listings cache (a cached listing hides later writes)."""
    import s3fs

    return s3fs.S3FileSystem(key=TEST_KEY, secret=TEST_SECRET, endpoint_url=endpoint_url, skip_instance_cache=True,
                             use_listings_cache=False)


def upload_corpus(s3, tmp_path: Path, prefix: str, n: int, seconds: float) -> list[str]:
    """``n`` speech-like recordings under ``s3://<prefix>/``; returns their URLs."""
    for i in range(n):
        write_wav(tmp_path / "corpus" / f"rec_{i:03d}.wav", voiced(seconds, seed=i))
    s3.put(str(tmp_path / "corpus") + "/", f"{prefix}/", recursive=True)
    return [f"s3://{prefix}/rec_{i:03d}.wav" for i in range(n)]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def committed_parts(s3, out: str) -> int:
    """Manifest parts of the asr@1 partition under ``out`` (bucket/prefix); polled while a run goes on."""
    found = s3.find(f"{out}/transcribe/model=asr/version=1/manifest")
    return sum(p.endswith(".parquet") for p in found)


def assert_exactly_once(out_url: str, in_url: str, storage: StorageSpec, sources: list[str]) -> list[dict]:
    """One manifest row per source; each ok source's transcript rows once, in the part its row names;
    its .jsonl/.srt/.vtt/.txt side files beside them; no data part without a manifest part."""
    fs, root = open_fs(out_url, storage)
    layout = ResultLayout(root, "transcribe", "asr", 1)
    manifest = read_manifest(fs, layout).to_pylist()
    assert Counter(r["source"] for r in manifest) == Counter(sources)

    def shard_ids(table: str) -> set[str]:
        names = [p.rsplit("/", 1)[1] for p in fs.find(f"{layout.base}/{table}")]
        return {n[len("part-"):-len(".parquet")] for n in names if n.startswith("part-") and n.endswith(".parquet")}

    data_ids = shard_ids("transcripts")
    assert data_ids <= shard_ids("manifest"), "orphan transcripts parts (no manifest part)"
    rows = []
    for shard in data_ids:
        part = layout.relative(layout.part("transcripts", shard))
        table = pq.read_table(io.BytesIO(fs.cat_file(layout.part("transcripts", shard))), columns=["source", "segment"])
        rows += [(r["source"], r["segment"], part) for r in table.to_pylist()]
    keys = Counter((source, segment) for source, segment, _ in rows)
    assert not [k for k, n in keys.items() if n > 1], "transcript rows doubled"
    per_source = Counter(source for source, _, _ in rows)
    for r in manifest:
        assert per_source.get(r["source"], 0) == r["n_segments"], r["source"]
        if r["status"] != "ok":
            continue
        assert {part for source, _, part in rows if source == r["source"]} <= {r["shard"]}
        rel = relative_source(in_url, r["source"])
        jsonl = fs.cat_file(layout.side_file("files", rel, ".jsonl")).decode().splitlines()
        assert len(jsonl) == r["n_segments"] and all(json.loads(x)["source"] == r["source"] for x in jsonl)
        assert fs.cat_file(layout.side_file("files", rel, ".srt")).decode().count(" --> ") == r["n_segments"]
        assert fs.cat_file(layout.side_file("files", rel, ".vtt")).decode().count(" --> ") == r["n_segments"]
        assert len(fs.cat_file(layout.side_file("files", rel, ".txt")).decode().splitlines()) == r["n_segments"]
    assert sum(per_source.values()) > 0, "the model emits text, so the counts mean something"
    return manifest


def test_killed_worker_loses_and_doubles_nothing(tmp_path, client, infer_cluster, s3_store, s3fs_client, bucket,
                                                 prefect_api):
    sources = upload_corpus(s3fs_client, tmp_path, f"{bucket}/in", 16, 4.0)
    model = register_asr(f"s3://{bucket}/models")
    armed, fired = tmp_path / "armed", tmp_path / "fired"
    client.register_plugin(SlowItems(0.4), name="ir-slow")
    client.register_plugin(KillOnce(str(armed), str(fired)), name="ir-kill-once")
    pids = set(client.run(os.getpid).values())
    probe = polling_fs(s3_store.endpoint_url)
    at_arming: list[int] = []

    def arm_after_first_commit() -> None:
        wait_for(lambda: committed_parts(probe, f"{bucket}/out") > 0, 120, "first shard")
        armed.touch()
        at_arming.append(committed_parts(probe, f"{bucket}/out"))

    killer = threading.Thread(target=arm_after_first_commit)
    killer.start()
    try:
        summary = run_inference("transcribe", f"s3://{bucket}/in", f"s3://{bucket}/out", model,
                                settings=RunSettings(dask_address=infer_cluster.scheduler_address,
                                                     files_per_shard=2, work_dir=tmp_path / "work"))
    finally:
        killer.join()
    assert fired.exists(), "no worker was killed"
    assert at_arming and at_arming[0] < 8, "the worker must die while shards are still pending"
    client.wait_for_workers(2, timeout=120)
    assert len(pids - set(client.run(os.getpid).values())) == 1  # exactly one worker died (and restarted)
    assert (summary["recordings_ok"], summary["recordings_rejected"]) == (16, 0)  # no bystander rejected
    manifest = assert_exactly_once(f"s3://{bucket}/out", f"s3://{bucket}/in", merged_storage_spec(), sources)
    assert [(r["source"], r["reason"]) for r in manifest if r["status"] != "ok"] == []


def test_poison_recording_is_quarantined_not_fatal(tmp_path, poison_cluster, s3fs_client, bucket, prefect_api):
    with Client(poison_cluster.scheduler_address) as client:
        client.wait_for_workers(2, timeout=120)
        _poison_run(tmp_path, client, poison_cluster, s3fs_client, bucket)


def _poison_run(tmp_path, client, infer_cluster, s3fs_client, bucket) -> None:
    sources = upload_corpus(s3fs_client, tmp_path, f"{bucket}/in", 6, 2.0)
    model = register_asr(f"s3://{bucket}/models")
    storage = merged_storage_spec()
    spec = model_spec("transcribe", model, storage, in_url=f"s3://{bucket}/in", work_dir=tmp_path / "work")
    listed = list_audio_sources(f"s3://{bucket}/in", storage)
    poison = listed[1]
    shard = next(s for s in plan_shards(listed, 3) if poison in s.files)
    items = plan_items(client, shard.files, spec, storage, {})  # small files only: nothing is probed
    assert [len(item.sources) for item in items] == [3], "the poison must share its item with bystanders"
    client.register_plugin(PoisonRecording(poison.url), name="ir-poison")
    summary = run_inference("transcribe", f"s3://{bucket}/in", f"s3://{bucket}/out", model,
                            settings=RunSettings(dask_address=infer_cluster.scheduler_address, files_per_shard=3,
                                                 work_dir=tmp_path / "work"))
    manifest = {r["source"]: r for r in assert_exactly_once(f"s3://{bucket}/out", f"s3://{bucket}/in", storage,
                                                             sources)}
    assert manifest[poison.url]["status"] == "rejected"
    assert manifest[poison.url]["reason"].startswith("worker crash")
    assert all(r["status"] == "ok" for url, r in manifest.items() if url != poison.url)
    assert summary["recordings_ok"] == 5 and summary["rejected_by_reason"] == {"worker crash": 1}


def test_store_restart_mid_run_completes(tmp_path, client, infer_cluster, prefect_api):
    from audiopipe.infra.store import SeaweedStore, free_port

    store = SeaweedStore(tmp_path / "store", free_port())
    store.up(access_key=TEST_KEY, secret_key=TEST_SECRET)
    try:
        fs = polling_fs(store.endpoint_url)
        fs.mkdir("restart")
        sources = upload_corpus(fs, tmp_path, "restart/in", 16, 4.0)
        options = {"endpoint_url": store.endpoint_url}
        model = register_asr("s3://restart/models", StorageSpec(options))
        restarted: list[tuple[int, datetime, datetime]] = []

        def restart_after_first_commit() -> None:
            probe = polling_fs(store.endpoint_url)
            wait_for(lambda: committed_parts(probe, "restart/out") > 0, 120, "first shard")
            committed = committed_parts(probe, "restart/out")
            down_at = datetime.now(timezone.utc)
            store.down()
            time.sleep(2)
            store.up(access_key=TEST_KEY, secret_key=TEST_SECRET)
            restarted.append((committed, down_at, datetime.now(timezone.utc)))

        client.register_plugin(SlowItems(0.4), name="ir-slow")
        thread = threading.Thread(target=restart_after_first_commit)
        thread.start()
        try:
            summary = run_inference("transcribe", "s3://restart/in", "s3://restart/out", model,
                                    storage_options=options,
                                    settings=RunSettings(dask_address=infer_cluster.scheduler_address,
                                                         files_per_shard=2, work_dir=tmp_path / "work"))
        finally:
            thread.join()
        assert restarted and restarted[0][0] < 8, "the store must restart while shards are still pending"
        assert (summary["recordings_ok"], summary["shards_failed"]) == (16, 0)
        manifest = assert_exactly_once("s3://restart/out", "s3://restart/in", StorageSpec(options), sources)
        assert [(r["source"], r["reason"]) for r in manifest if r["status"] != "ok"] == []
        # in flight: this run committed shards both before the store went down and after it came back
        _, down_at, up_at = restarted[0]
        committed = [r["processed_at"] for r in manifest]
        assert any(t < down_at for t in committed) and any(t > up_at for t in committed), (down_at, up_at)
    finally:
        store.down()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_killed_cli_resumes_exactly_once_and_never_writes_the_secret(tmp_path, client, infer_cluster, s3_store,
                                                                      s3fs_client, bucket, prefect_api, prefect_db,
                                                                      sig):
    sources = upload_corpus(s3fs_client, tmp_path, f"{bucket}/in", 16, 4.0)
    model = register_asr(f"s3://{bucket}/models")
    client.register_plugin(SlowItems(0.4), name="ir-slow")
    cmd = [sys.executable, "-m", "audiopipe.flows.cli", "transcribe", f"s3://{bucket}/in", f"s3://{bucket}/out",
           "--model", model, "--files-per-shard", "2", "--dask-address", infer_cluster.scheduler_address,
           "--no-progress"]
    env = cli_env(tmp_path, prefect_api)
    assert env["AWS_SECRET_ACCESS_KEY"] == TEST_SECRET and env["AWS_ENDPOINT_URL"]  # the keys come from here only
    probe = polling_fs(s3_store.endpoint_url)
    killed_log = tmp_path / "killed.log"
    with open(killed_log, "wb") as log:  # a file, not a pipe: a full pipe would stall the CLI
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: committed_parts(probe, f"{bucket}/out") > 0, 180, "first shard")
        os.killpg(proc.pid, sig)
        committed_at_kill = committed_parts(probe, f"{bucket}/out")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert committed_at_kill < 8, "the run must be killed before it finished"
    assert proc.returncode != 0
    # A kill rarely lands in the milliseconds between a shard's transcripts part and its manifest part, so
    # one committed shard is put back in that state: its data part an orphan, its recordings pending.
    manifest_dir = f"{bucket}/out/transcribe/model=asr/version=1/manifest"
    uncommitted = sorted(p for p in probe.find(manifest_dir) if p.endswith(".parquet"))[0]
    assert probe.exists(uncommitted.replace("/manifest/", "/transcripts/"))
    probe.rm_file(uncommitted)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    skipped = re.search(r"skipped \(already answered by this model version\)\W+(\d+)", rerun.stdout)
    assert skipped and int(skipped[1]) >= 2 * (committed_at_kill - 1), rerun.stdout  # committed work is kept
    manifest = assert_exactly_once(f"s3://{bucket}/out", f"s3://{bucket}/in", merged_storage_spec(), sources)
    assert [(r["source"], r["reason"]) for r in manifest if r["status"] != "ok"] == []
    # the secret reached the CLI through its environment; it must not be written anywhere
    texts = {"killed run output": killed_log.read_bytes().decode("latin-1"),
             "rerun stdout": rerun.stdout, "rerun stderr": rerun.stderr}
    outputs = probe.find(f"{bucket}/out")
    texts.update({p: blob.decode("latin-1") for p, blob in probe.cat(outputs).items()})
    work = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
    texts.update({str(p): p.read_bytes().decode("latin-1") for p in work})
    db_files = sorted(prefect_db.parent.glob(prefect_db.name + "*"))  # the database and its -wal/-shm
    texts.update({str(p): p.read_bytes().decode("latin-1") for p in db_files})
    assert len(outputs) > 2 * len(sources) and work and prefect_db in db_files
    assert [name for name, text in texts.items() if TEST_SECRET in text] == []
