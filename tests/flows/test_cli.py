"""The ``audiopipe`` CLI as a user runs it: real subprocesses, a real SeaweedFS, Prefect's harness API.

User errors must print one paragraph saying what to fix and show no traceback; the exit code tells a
scheduler what happened (0 done, 1 failed shards: rerun to finish, 2 a user error, 75 the store unreachable);
``--json`` prints the summary as exactly one JSON object on stdout. The S3 secret must never appear in any
output, report, output object or the Prefect database (its -wal and -shm files included).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.synth import tone
from tests.flows.test_secrets import db_texts
from tests.support import TEST_KEY, TEST_SECRET, cli_env

pytestmark = [pytest.mark.slow]
CLI = [sys.executable, "-m", "audiopipe.flows.cli"]


def run_cli(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout)


def run_json(args: list[str], env: dict, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Run with ``--json``: the whole of stdout must be one JSON object."""
    result = run_cli(args + ["--json"], env, timeout)
    try:
        payload = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"stdout is not one JSON object ({exc}):\n{result.stdout}\n{result.stderr}") from None
    assert isinstance(payload, dict) and payload["exit_code"] == result.returncode, result.stdout
    return result, payload


def small_corpus(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(root / f"t{i}.wav", tone(300 + 50 * i, 1.0, 16000), 16000)
    return root


def test_help_explains_every_option():
    out = run_cli(["featurize", "--help"], cli_env(Path("/tmp"))).stdout
    for option in ("--kind", "--sample-rate", "--n-fft", "--hop-length", "--n-mels", "--n-mfcc",
                   "--segment-seconds", "--files-per-shard", "--workers", "--dask-address",
                   "--storage-options", "--config", "--report"):
        assert option in out, option


@pytest.mark.s3
@pytest.mark.parametrize(
    ("case", "expect", "code"),
    [
        ("unreachable", "cannot reach the store", 75),  # a transient outage: retry later
        ("wrong-secret", "refused access", 2),
        ("missing-bucket", "does not exist", 2),
        ("empty-input", "no audio files", 2),
        ("unknown-kind", "unknown feature kind", 2),
        ("bad-json", "not valid JSON", 2),
        ("bad-config-key", "unknown keys", 2),
    ],
)
def test_user_errors_are_one_clear_paragraph(case, expect, code, tmp_path, s3_store, s3fs_client, bucket):
    s3fs_client.pipe(f"{bucket}/in/a.wav", (small_corpus(tmp_path / "c", 1) / "t0.wav").read_bytes())
    s3fs_client.pipe(f"{bucket}/empty/readme.txt", b"no audio here")
    env = cli_env(tmp_path)
    args = ["featurize", f"s3://{bucket}/in", f"s3://{bucket}/out"]
    if case == "unreachable":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
        args += ["--storage-options", json.dumps({"config_kwargs": {"retries": {"max_attempts": 1},
                                                                     "connect_timeout": 2}})]
    elif case == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "missing-bucket":
        args = ["featurize", "s3://no-such-bucket-audiopipe/in", f"s3://{bucket}/out"]
    elif case == "empty-input":
        args = ["featurize", f"s3://{bucket}/empty", f"s3://{bucket}/out"]
    elif case == "unknown-kind":
        args += ["--kind", "spectrogram"]
    elif case == "bad-json":
        args += ["--storage-options", "{endpoint_url: nope"]
    elif case == "bad-config-key":
        (tmp_path / "cfg.toml").write_text('kind = "mfcc"\nmel_bands = 40\n')
        args += ["--config", str(tmp_path / "cfg.toml")]
    result = run_cli(args, env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert expect in " ".join(output.split()), output
    assert "Traceback" not in output
    assert TEST_SECRET not in output


@pytest.mark.s3
def test_secret_never_appears_anywhere(tmp_path, s3_store, s3fs_client, bucket, prefect_api, prefect_db):
    s3fs_client.put(str(small_corpus(tmp_path / "c")) + "/", f"{bucket}/in/", recursive=True)
    env = cli_env(tmp_path, prefect_api)
    key = env.pop("AWS_ACCESS_KEY_ID")
    env.pop("AWS_SECRET_ACCESS_KEY")  # the secret arrives only through --storage-options
    options = json.dumps({"key": key, "secret": TEST_SECRET})
    report = tmp_path / "report"
    ok = run_cli(["featurize", f"s3://{bucket}/in", f"s3://{bucket}/out", "--storage-options", options,
                  "--report", str(report), "--workers", "1"], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    failed = run_cli(["featurize", f"s3://{bucket}/in", f"s3://{bucket}/out2", "--storage-options",
                      json.dumps({"key": key, "secret": TEST_SECRET, "endpoint_url": "http://127.0.0.1:9",
                                  "config_kwargs": {"retries": {"max_attempts": 1}}})], env, timeout=120)
    assert failed.returncode == 75  # the store is unreachable: a transient outage
    texts = [ok.stdout, ok.stderr, failed.stdout, failed.stderr]
    texts += [p.read_bytes().decode("latin-1") for p in report.rglob("*") if p.is_file()]
    texts += [blob.decode("latin-1") for blob in s3fs_client.cat(s3fs_client.find(f"{bucket}/out")).values()]
    texts += [p.read_bytes().decode("latin-1") for p in (tmp_path / "work").rglob("*") if p.is_file()]
    db = db_texts(prefect_db)  # the database and its -wal/-shm: recent writes sit in the WAL
    texts += list(db.values())
    assert (report / "index.html").exists() and any(report.glob("*.png"))
    assert len(texts) > 8 and any(name.endswith("-wal") for name in db), sorted(db)
    for text in texts:
        assert TEST_SECRET not in text


def test_config_file_and_duckdb_polars_read_back(tmp_path, prefect_api):
    import duckdb
    import polars as pl

    corpus = small_corpus(tmp_path / "in", 4)
    (tmp_path / "cfg.yaml").write_text("kind: mfcc\nn-mfcc: 13\nfiles_per_shard: 2\nworkers: 1\n")
    out = tmp_path / "out"
    result = run_cli(["featurize", str(corpus), str(out), "--config", str(tmp_path / "cfg.yaml"),
                      "--segment-seconds", "0.5"], cli_env(tmp_path, prefect_api))
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = FeatureConfig(kind="mfcc", n_mfcc=13, segment_seconds=0.5)
    parts = f"{out}/features/config={cfg.config_hash}/*.parquet"
    rows = duckdb.sql(f"SELECT source, count(*) AS n, min(len(features[1])) AS bins, sum(n_frames) AS frames, "
                      f"sum(len(features)) AS frames2 FROM read_parquet('{parts}') GROUP BY source "
                      "ORDER BY source").fetchall()
    assert len(rows) == 4
    for source, n, bins, frames, frames2 in rows:
        assert (n, bins, frames) == (2, 13, frames2)  # 1 s at 0.5 s segments; 13 MFCCs; n_frames agrees
    manifest = pl.read_parquet(f"{out}/manifest/config={cfg.config_hash}/*.parquet")
    assert manifest.height == 4 and set(manifest["status"]) == {"ok"}
    assert manifest["n_segments"].to_list() == [2, 2, 2, 2]


def test_ctrl_c_exits_even_when_unwinding_hangs():
    """The first Ctrl-C unwinds as usual; if that hangs (a thread waiting on a closed client), the run still
    ends within the grace period, with the shell's status for SIGINT (130)."""
    script = ("import threading, time\n"
              "from audiopipe.flows.cli import exit_promptly_on_interrupt\n"
              "exit_promptly_on_interrupt(grace_s=1.0)\n"
              "try:\n"  # 'ready' inside the try: the signal may land before print() returns
              "    print('ready', flush=True)\n"
              "    time.sleep(60)\n"
              "except KeyboardInterrupt:\n"
              "    print('unwinding', flush=True)\n"
              "    threading.Event().wait()  # an unwinding that never ends\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert time.monotonic() - started < 20
        assert proc.stdout.read().strip() == "unwinding"
        assert "exiting without waiting" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.s3
def test_json_summary_is_the_only_thing_on_stdout_for_every_bulk_command(tmp_path, dask_cluster, prefect_api):
    """featurize, transcribe, classify and separate with --json: stdout parses as one JSON object (the
    summary), while logs and progress still go to stderr."""
    from tests.flows.infer_support import register_asr, register_classifier, register_separator, voiced, write_wav

    corpus = tmp_path / "in"
    for i in range(3):
        write_wav(corpus / f"r{i}.wav", voiced(3.0, seed=i))
    env = cli_env(tmp_path, prefect_api)
    common = ["--dask-address", dask_cluster.scheduler_address]
    result, summary = run_json(["featurize", str(corpus), str(tmp_path / "feat"), *common], env)
    assert result.returncode == 0 and summary["files_ok"] == 3 and summary["shards_failed"] == 0
    assert "Finished in state Completed" in result.stderr  # Prefect's logs: on stderr, not in the JSON
    registry = str(tmp_path / "reg")
    models = {"transcribe": register_asr(registry), "classify": register_classifier(registry),
              "separate": register_separator(registry)}
    for command, model in models.items():
        result, summary = run_json([command, str(corpus), str(tmp_path / "out"), "--model", model, *common], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (summary["task"], summary["recordings_ok"], summary["shards_failed"]) == (command, 3, 0)
        assert summary["model"].endswith(model.rsplit(":", 1)[1]) and summary["rows_written"] > 0
        again, rerun = run_json([command, str(corpus), str(tmp_path / "out"), "--model", model, *common], env)
        assert (again.returncode, rerun["recordings_skipped"], rerun["shards_written"]) == (0, 3, 0)


@pytest.mark.parametrize("args, needle", [
    (["train", "classify", "--labels", "labels.parquet", "--registry", "reg"], "needs --features"),
    (["evaluate", "reg:classify@1", "--labels", "labels.parquet", "--beam-width", "-1"], "--beam-width"),
    (["retrain", "labels/", "--audio", "a/", "--features", "f/", "--model", "reg:classify",
      "--holdout", "h.parquet", "--train-params", "{nope"], "not valid JSON"),
    (["transcribe", "in/", "out/", "--model", "reg:asr@1", "--storage-options", "[1]"], "storage"),
], ids=["train", "evaluate", "retrain", "transcribe"])
def test_json_errors_are_one_object_too(args, needle, tmp_path):
    """A failed command with --json still prints one JSON object: its exit code and the error; the panel
    goes to stderr."""
    result, payload = run_json(args, cli_env(tmp_path), timeout=120)
    assert result.returncode == 2 and needle in payload["error"], (payload, result.stderr)
    assert "audiopipe: error" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.s3
def test_failed_shards_exit_1_and_a_rerun_finishes(tmp_path, prefect_api, s3_store):
    """The input store stops after the first shard committed: the second shard fails after its retries,
    the run still finishes and reports (exit 1, the summary in the JSON), and once the store is back the
    same command finishes the rest (exit 0) with every file in the manifest exactly once."""
    import dask
    from distributed import Client, LocalCluster

    from audiopipe.infra.store import SeaweedStore, free_port
    from tests.flows.test_resilience import SlowItems, assert_exactly_once, make_corpus, wait_for

    store = SeaweedStore(tmp_path / "store", free_port())
    store.up(access_key=TEST_KEY, secret_key=TEST_SECRET)
    with dask.config.set({"distributed.scheduler.allowed-failures": 2}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="2GiB",
                               local_directory=str(tmp_path / "dask"), dashboard_address="127.0.0.1:0")
    try:
        import s3fs

        fs = s3fs.S3FileSystem(key=TEST_KEY, secret=TEST_SECRET, endpoint_url=store.endpoint_url,
                               skip_instance_cache=True)
        fs.mkdir("shards")
        make_corpus(tmp_path / "corpus", 4)
        fs.put(str(tmp_path / "corpus") + "/", "shards/in/", recursive=True)
        out, cfg = tmp_path / "out", FeatureConfig()
        options = json.dumps({"endpoint_url": store.endpoint_url,
                              "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}})
        cmd = CLI + ["featurize", "s3://shards/in", str(out), "--files-per-shard", "2", "--no-progress", "--json",
                     "--dask-address", cluster.scheduler_address, "--storage-options", options]
        env = cli_env(tmp_path, prefect_api, AUDIOPIPE_SHARD_CONCURRENCY="1")  # shard 2 starts after shard 1
        manifest_dir = out / "manifest" / f"config={cfg.config_hash}"
        with Client(cluster.scheduler_address) as client:
            client.register_plugin(SlowItems(2.0))  # shard 2's items start >= 2 s after shard 1 commits
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                wait_for(lambda: any(manifest_dir.glob("part-*.parquet")), 240, "first shard")
                store.down()
                stdout, stderr = proc.communicate(timeout=400)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 1, stdout + stderr[-3000:]
            payload = json.loads(stdout)
            assert payload["exit_code"] == 1 and "run the same command again" in payload["error"]
            assert (payload["shards_written"], payload["shards_failed"], payload["files_ok"]) == (1, 1, 2)
            assert "audiopipe: run incomplete" in stderr and "internal error" not in stderr  # (Prefect logs
            # each failed shard attempt with its traceback; the CLI itself reports one paragraph)
            store.up(access_key=TEST_KEY, secret_key=TEST_SECRET)
            rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
        again = json.loads(rerun.stdout)
        assert (again["files_skipped"], again["files_ok"], again["exit_code"]) == (2, 2, 0)
        manifest = assert_exactly_once(f"file://{out}", cfg, 4)
        assert all(r["status"] == "ok" for r in manifest)
    finally:
        cluster.close()
        store.down()


@pytest.mark.parametrize("raised, code", [("ZeroDivisionError()", 70), ("KeyboardInterrupt()", 130)],
                         ids=["bug", "ctrl-c"])
def test_a_bug_exits_70_and_an_interrupt_130_never_1(raised, code, tmp_path):
    """1 means "failed shards, rerun to finish"; a bug (traceback on stderr) and Ctrl-C must not look like it.
    The command's body is replaced by one that raises, in the real entry point (no Prefect needed)."""
    script = ("import audiopipe.flows.cli as cli\n"
              "def body(*args):\n"
              f"    raise {raised}\n"
              "cli._featurize = body\n"
              "cli.main()\n")
    result = subprocess.run([sys.executable, "-c", script, "featurize", "in", "out", "--json"],
                            env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert json.loads(result.stdout) == {"exit_code": code, "error": json.loads(result.stdout)["error"]}
    assert ("Traceback" in result.stderr) == (code == 70)
