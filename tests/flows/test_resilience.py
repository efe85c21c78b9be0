"""Failures mid-run, with real processes: a killed Dask worker, a poison file that kills its worker every
time, the S3 server restarted, and the whole run killed (SIGKILL) or interrupted (Ctrl-C) and run again.
Each ends with exactly one manifest row per input and one set of feature rows per ok input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import dask
import pytest
import soundfile as sf
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from audiopipe.flows.extract_features import featurize
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, open_fs
from audiopipe.tasks.discover import list_audio_sources
from audiopipe.tasks.execute import PROBE_MIN_BYTES, item_key
from audiopipe.tasks.extract import WorkItem
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.shards import OutputLayout, read_manifest
from audiopipe.tasks.synth import noise, tone
from tests.support import TEST_KEY, TEST_SECRET, cli_env

pytestmark = [pytest.mark.slow]


class SlowItems(WorkerPlugin):
    """Stretch each featurize task so a failure can be injected mid-run (the work itself is ~5 ms)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and str(key).startswith("featurize-"):
            time.sleep(self.delay_s)


class PoisonKey(WorkerPlugin):
    """Kill the worker process whenever it starts one task: a file that crashes its decoder.

    No real audio file reliably segfaults libsndfile, so the crash is injected; everything after it
    (nanny restart, Dask's allowed-failures, KilledWorker, quarantine) is the real machinery.
    """

    def __init__(self, key_prefix: str) -> None:
        self.key = key_prefix

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and str(key).startswith(self.key):
            os._exit(17)


def make_corpus(root: Path, n: int) -> None:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        y = tone(200 + 37 * i, 1.5, 16000) + noise(1.5, 16000, rng=rng)
        sf.write(root / f"clip_{i:03d}.wav", y, 16000)


def assert_exactly_once(out_url: str, cfg: FeatureConfig, n_inputs: int) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    fs, root = open_fs(out_url, StorageSpec())
    layout = OutputLayout(root, cfg.config_hash)
    manifest = read_manifest(fs, layout).to_pylist()
    assert Counter(r["source"] for r in manifest).most_common(1)[0][1] == 1
    assert len(manifest) == n_inputs
    parts = [p for p in fs.find(layout.features_dir) if p.endswith(".parquet")]
    committed = {layout.features_part(r["shard"].rsplit("part-", 1)[1][:-8]) for r in manifest if r["shard"]}
    assert {p if p.startswith("/") or "://" in out_url else p for p in parts} == committed  # no orphans
    rows = [r for p in parts
            for r in pq.read_table(io.BytesIO(fs.cat_file(p)), columns=["source", "segment"]).to_pylist()]
    keys = Counter((r["source"], r["segment"]) for r in rows)
    assert max(keys.values()) == 1
    per_source = Counter(r["source"] for r in rows)
    for r in manifest:
        assert per_source.get(r["source"], 0) == r["n_segments"]
    return manifest


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def featurize_poisoned(tmp_path: Path, cluster, key_prefix: str, n_inputs: int, *,
                       files_per_shard: int) -> tuple[dict[str, dict], dict]:
    """Featurize ``tmp_path/in`` on ``cluster`` while tasks whose key starts with ``key_prefix`` kill their
    worker; returns the manifest by source (checked exactly-once for ``n_inputs``) and the run summary."""
    cfg, out = FeatureConfig(), f"file://{tmp_path}/out"
    with Client(cluster.scheduler_address) as client:
        client.register_plugin(PoisonKey(key_prefix))
        summary = featurize(str(tmp_path / "in"), out, feature_config=cfg, settings=RunSettings(
            dask_address=cluster.scheduler_address, files_per_shard=files_per_shard, work_dir=tmp_path / "work"))
    return {r["source"]: r for r in assert_exactly_once(out, cfg, n_inputs)}, summary


@pytest.fixture()
def own_cluster(tmp_path, s3_store):
    with dask.config.set({"distributed.scheduler.allowed-failures": 2}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB",
                               local_directory=str(tmp_path / "dask"), dashboard_address="127.0.0.1:0")
    yield cluster
    cluster.close()


def test_killed_worker_loses_and_doubles_nothing(tmp_path, own_cluster, prefect_api):
    make_corpus(tmp_path / "in", 24)
    cfg, out = FeatureConfig(), f"file://{tmp_path}/out"
    with Client(own_cluster.scheduler_address) as client:
        client.register_plugin(SlowItems(0.15))
        pids = list(client.run(os.getpid).values())
        manifest_dir = tmp_path / "out" / "manifest" / f"config={cfg.config_hash}"

        def kill_when_first_shard_commits() -> None:
            wait_for(lambda: any(manifest_dir.glob("part-*.parquet")), 120, "first shard")
            os.kill(pids[0], signal.SIGKILL)
            killed.append(len(list(manifest_dir.glob("part-*.parquet"))))

        killed: list[int] = []
        killer = threading.Thread(target=kill_when_first_shard_commits)
        killer.start()
        summary = featurize(str(tmp_path / "in"), out, feature_config=cfg, settings=RunSettings(
            dask_address=own_cluster.scheduler_address, files_per_shard=3, work_dir=tmp_path / "work"))
        killer.join()
    assert killed and killed[0] < 8, "the worker must die while shards are still pending"
    assert summary["files_ok"] == 24 and summary["files_rejected"] == 0
    assert_exactly_once(out, cfg, 24)


def test_poison_file_is_quarantined_not_fatal(tmp_path, own_cluster, prefect_api):
    make_corpus(tmp_path / "in", 6)
    poison = list_audio_sources(str(tmp_path / "in"), StorageSpec())[2]
    manifest, summary = featurize_poisoned(tmp_path, own_cluster, item_key(WorkItem(poison)), 6, files_per_shard=3)
    assert manifest[poison.url]["status"] == "rejected"
    assert manifest[poison.url]["reason"].startswith("worker crash")
    assert summary["files_ok"] == 5 and summary["rejected_by_reason"] == {"worker crash": 1}


def test_file_whose_probe_crashes_its_worker_is_quarantined(tmp_path, own_cluster, prefect_api):
    """Files over PROBE_MIN_BYTES are probed on a worker before planning; a probe that kills its worker
    every time must reject that one file, not fail the shard it shares with healthy files."""
    import numpy as np

    make_corpus(tmp_path / "in", 3)
    big = tone(330, 150.0, 16000) + noise(150.0, 16000, rng=np.random.default_rng(1))  # 4.8 MB as 16-bit WAV
    sf.write(tmp_path / "in" / "long.wav", big, 16000, subtype="PCM_16")
    assert (tmp_path / "in" / "long.wav").stat().st_size > PROBE_MIN_BYTES
    long_file = next(f for f in list_audio_sources(str(tmp_path / "in"), StorageSpec()) if f.url.endswith("long.wav"))
    manifest, summary = featurize_poisoned(tmp_path, own_cluster, f"probe-{item_key(WorkItem(long_file))}", 4,
                                           files_per_shard=4)
    assert manifest[long_file.url]["status"] == "rejected"
    assert manifest[long_file.url]["reason"].startswith("worker crash: the worker process died every time it probed")
    assert summary["files_ok"] == 3 and summary["rejected_by_reason"] == {"worker crash": 1}

@pytest.mark.s3
def test_store_restart_mid_run_completes(tmp_path, own_cluster, prefect_api, s3_store):
    import s3fs

    from audiopipe.infra.store import SeaweedStore, free_port

    store = SeaweedStore(tmp_path / "store", free_port())
    store.up(access_key=TEST_KEY, secret_key=TEST_SECRET)
    try:
        fs = s3fs.S3FileSystem(key=TEST_KEY, secret=TEST_SECRET, endpoint_url=store.endpoint_url,
                               skip_instance_cache=True)
        fs.mkdir("restart")
        make_corpus(tmp_path / "in", 24)
        fs.put(str(tmp_path / "in") + "/", "restart/in/", recursive=True)
        cfg = FeatureConfig()

        def restart_after_first_commit() -> None:
            probe = s3fs.S3FileSystem(key=TEST_KEY, secret=TEST_SECRET, endpoint_url=store.endpoint_url,
                                      skip_instance_cache=True)
            wait_for(lambda: any(p.endswith(".parquet") for p in  # a manifest part, not a commit intent
                                 probe.find(f"restart/out/manifest/config={cfg.config_hash}")), 120, "commit")
            down_at = datetime.now(timezone.utc)
            store.down()
            time.sleep(2)
            store.up(access_key=TEST_KEY, secret_key=TEST_SECRET)
            restarted.append((down_at, datetime.now(timezone.utc)))

        restarted: list[tuple[datetime, datetime]] = []
        with Client(own_cluster.scheduler_address) as client:
            client.register_plugin(SlowItems(0.15))
            thread = threading.Thread(target=restart_after_first_commit)
            thread.start()
            try:
                summary = featurize("s3://restart/in", "s3://restart/out", feature_config=cfg,
                                    storage_options={"endpoint_url": store.endpoint_url},
                                    settings=RunSettings(dask_address=own_cluster.scheduler_address,
                                                         files_per_shard=3, work_dir=tmp_path / "work"))
            finally:
                thread.join()
        assert restarted
        assert summary["files_ok"] == 24
        spec = StorageSpec({"endpoint_url": store.endpoint_url})
        fs2, root = open_fs("s3://restart/out", spec)
        manifest = read_manifest(fs2, OutputLayout(root, cfg.config_hash)).to_pylist()
        assert len(manifest) == 24 and len({r["source"] for r in manifest}) == 24
        assert all(r["status"] == "ok" for r in manifest)
        # the restart happened while the run was in flight: shards committed before the store went down and
        # others after it came back, in the same run
        (down_at, up_at), = restarted
        committed = [r["processed_at"] for r in manifest]
        assert any(t < down_at for t in committed) and any(t > up_at for t in committed), (down_at, up_at)
    finally:
        store.down()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_killed_run_resumes_exactly_once(tmp_path, prefect_api, sig):
    make_corpus(tmp_path / "in", 40)
    out = tmp_path / "out"
    cfg = FeatureConfig()
    cmd = [sys.executable, "-m", "audiopipe.flows.cli", "featurize", str(tmp_path / "in"), str(out),
           "--files-per-shard", "2", "--workers", "1", "--no-progress"]
    env = cli_env(tmp_path, prefect_api)
    manifest_dir = out / "manifest" / f"config={cfg.config_hash}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: any(manifest_dir.glob("part-*.parquet")), 180, "first shard")
        os.killpg(proc.pid, sig)
        committed_at_kill = len(list(manifest_dir.glob("part-*.parquet")))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert committed_at_kill < 20, "the run must be killed before it finished"
    assert proc.returncode != 0
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_exactly_once(f"file://{out}", cfg, 40)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    third = featurize(str(tmp_path / "in"), str(out), feature_config=cfg,
                      settings=RunSettings(work_dir=tmp_path / "work"))
    assert (third["files_skipped"], third["shards_written"]) == (40, 0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # a no-change rerun writes nothing
