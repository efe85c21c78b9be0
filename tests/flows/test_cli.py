"""The ``audiopipe`` CLI as a user runs it: real subprocesses, a real SeaweedFS, Prefect's harness API.

User errors must print one paragraph saying what to fix, exit non-zero and show no traceback; the S3
secret must never appear in any output, report, output object or the Prefect database.
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
from tests.support import TEST_SECRET, cli_env

pytestmark = [pytest.mark.slow]
CLI = [sys.executable, "-m", "audiopipe.flows.cli"]


def run_cli(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout)


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
    ("case", "expect"),
    [
        ("unreachable", "cannot reach the store"),
        ("wrong-secret", "refused access"),
        ("missing-bucket", "does not exist"),
        ("empty-input", "no audio files"),
        ("unknown-kind", "unknown feature kind"),
        ("bad-json", "not valid JSON"),
        ("bad-config-key", "unknown keys"),
    ],
)
def test_user_errors_are_one_clear_paragraph(case, expect, tmp_path, s3_store, s3fs_client, bucket):
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
    assert result.returncode == 2, output
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
    assert failed.returncode == 2
    texts = [ok.stdout, ok.stderr, failed.stdout, failed.stderr]
    texts += [p.read_bytes().decode("latin-1") for p in report.rglob("*") if p.is_file()]
    texts += [blob.decode("latin-1") for blob in s3fs_client.cat(s3fs_client.find(f"{bucket}/out")).values()]
    texts += [p.read_bytes().decode("latin-1") for p in (tmp_path / "work").rglob("*") if p.is_file()]
    texts.append(prefect_db.read_bytes().decode("latin-1"))
    assert (report / "index.html").exists() and any(report.glob("*.png"))
    assert len(texts) > 8
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
