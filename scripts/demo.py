"""audiopipe end-to-end demo: synthetic audio -> local S3 -> features -> models -> nightly results -> retraining.

Run from anywhere with ``make demo`` or ``.venv/bin/python scripts/demo.py``; it needs no arguments,
no internet and no cloud account, and takes a few minutes on 2 cores. It:

1. synthesizes a small, varied corpus under ``demo-out/corpus`` (espeak-ng speech in several voices,
   tones, noise, a non-audio file and a few deliberately broken files);
2. starts a local SeaweedFS S3 server (data in ``demo-out/store``) and uploads the corpus to
   ``s3://audiopipe-demo/archive/``;
3. runs the real CLI, exactly as you would type it, twice: the second run is incremental and skips
   every file;
4. copies the output Parquet to ``demo-out/features-local/`` and queries it with DuckDB;
5. trains a small speech recogniser and, through the retraining flow, a sound classifier, into a registry
   in the store, and makes them champions;
6. "nightly": transcribes newly arrived recordings with the ASR champion (Parquet, .jsonl, .srt back in
   the store), then runs the same command again, which finds nothing new;
7. a second batch of labels lands: the retraining flow featurizes only the new audio, trains a challenger,
   scores champion and challenger on a fixed held-out set and promotes the challenger only if better;
   run again, it trains nothing.

Credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` are used when set; otherwise random ones are
made for this run only. They are passed through the environment and never printed. The S3 server is
always stopped at the end, on errors and on Ctrl-C too. Everything is written under ``demo-out/``
(``make clean`` removes it).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
OUT = Path("demo-out")  # relative to REPO, so the printed commands are the ones to type there
CORPUS, STORE, LOCAL, REPORT = OUT / "corpus", OUT / "store", OUT / "features-local", OUT / "report"
BUCKET = "audiopipe-demo"
IN_URL, OUT_URL = f"s3://{BUCKET}/archive", f"s3://{BUCKET}/features"

console = Console(highlight=False)


def heading(text: str) -> None:
    """A step heading: a rule with the title on the left."""
    console.rule(f"[bold cyan]{text}", align="left")


def synthesize_corpus() -> None:
    """Step 1: write the demo corpus and show what it holds."""
    from audiopipe.tasks.synth import CorpusSpec, write_demo_corpus

    heading("1/7 synthesize corpus")
    started = time.perf_counter()
    manifest = write_demo_corpus(CORPUS, CorpusSpec(n_speech=12, n_tones=6, n_noise=6, include_bad=True))
    counts: dict[str, int] = {}
    for expectation in manifest.values():
        counts[expectation] = counts.get(expectation, 0) + 1
    folders = sorted({rel.split("/", 1)[0] for rel in manifest if "/" in rel})
    console.print(f"{len(manifest)} files in {CORPUS}/ ({time.perf_counter() - started:.1f} s): "
                  + ", ".join(f"{n} expected {k}" for k, n in sorted(counts.items())))
    console.print(f"folders: {', '.join(folders)}; plus notes.txt (not audio)")


def demo_credentials() -> None:
    """Use the caller's AWS keys if both are set, else random ones for this run (never printed)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        console.print("credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from your environment")
    else:
        os.environ["AWS_ACCESS_KEY_ID"] = "demo" + secrets.token_hex(8)
        os.environ["AWS_SECRET_ACCESS_KEY"] = secrets.token_hex(24)
        console.print("credentials: random AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY made for this demo")
    os.environ.pop("AWS_SESSION_TOKEN", None)  # the local store knows only the key pair


def start_store(store) -> None:
    """Step 2a: start SeaweedFS and point AWS_ENDPOINT_URL at it."""
    heading("2/7 start a local S3 store and upload the corpus")
    demo_credentials()
    started = time.perf_counter()
    pid = store.up(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
    os.environ["AWS_ENDPOINT_URL"] = store.endpoint_url
    console.print(f"SeaweedFS S3 at {store.endpoint_url} (pid {pid}, data in {STORE}/) "
                  f"up in {time.perf_counter() - started:.1f} s")
    console.print(f"export AWS_ENDPOINT_URL={store.endpoint_url}")


def s3():
    """An s3fs filesystem on the demo store; keys and endpoint come from the environment."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)


def upload_corpus() -> None:
    """Step 2b: create the bucket and upload the corpus under archive/."""
    fs = s3()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    started = time.perf_counter()
    fs.put(f"{CORPUS}/", f"{BUCKET}/archive/", recursive=True)
    uploaded = fs.find(f"{BUCKET}/archive", detail=True)
    size = sum(info["size"] for info in uploaded.values())
    console.print(f"uploaded {len(uploaded)} objects ({size / 1e6:.1f} MB) to {IN_URL}/ "
                  f"in {time.perf_counter() - started:.1f} s")


def cli_command() -> list[str]:
    """The CLI as a command line: ``python -m audiopipe.flows.cli`` (the ``audiopipe`` script otherwise)."""
    probe = subprocess.run([sys.executable, "-m", "audiopipe.flows.cli", "--help"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "audiopipe.flows.cli"]
    return [str(Path(sys.executable).parent / "audiopipe")]


def shown(cmd: list[str]) -> str:
    """The command as the user would type it in the repository root (venv paths made relative)."""
    parts = [os.path.relpath(p) if p.startswith(sys.prefix) else p for p in cmd]
    return shlex.join(parts)


def run_featurize(cli: list[str], title: str) -> float:
    """Run ``featurize`` once in a subprocess, streaming its output; return its wall time in s."""
    cmd = [*cli, "featurize", IN_URL, OUT_URL, "--files-per-shard", "8", "--report", str(REPORT)]
    console.print(f"[bold]{title}[/bold]")
    console.print(f"$ {shown(cmd)}", style="green", soft_wrap=True)
    started = time.perf_counter()
    result = subprocess.run(cmd)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"featurize failed with exit code {result.returncode}; see its output above.")
    console.print(f"took {elapsed:.1f} s")
    return elapsed


def featurize_twice() -> None:
    """Step 3: a full run, then the same command again (incremental: everything is skipped)."""
    heading("3/7 featurize with the CLI (twice)")
    cli = cli_command()
    first = run_featurize(cli, "first run: every file is new")
    second = run_featurize(cli, "second run, same command: nothing new, so everything is skipped")
    console.print(f"first run {first:.1f} s, incremental rerun {second:.1f} s (it only listed the archive "
                  "and read the manifest: its time is Python and Prefect start-up)")
    console.print(f"HTML report with example spectrograms: {REPORT / 'index.html'}")


def download_output() -> list[str]:
    """Copy features/ and manifest/ from S3 to LOCAL; return the partition folders found."""
    shutil.rmtree(LOCAL, ignore_errors=True)
    LOCAL.mkdir(parents=True)
    s3().get(f"{BUCKET}/features/", f"{LOCAL}/", recursive=True)
    partitions = sorted(str(p.relative_to(LOCAL)) for p in LOCAL.glob("*/config=*") if p.is_dir())
    bad = [p for p in (LOCAL / "features", LOCAL / "manifest") if not any(p.glob("config=*"))]
    if bad or not all(re.fullmatch(r"(features|manifest)/config=[0-9a-f]+", p) for p in partitions):
        raise SystemExit(f"unexpected output layout under {LOCAL}: {partitions}")
    return partitions


def show_query(con, sql: str) -> None:
    """Print ``sql`` and its result as a table."""
    console.print(Syntax(sql, "sql", word_wrap=True, background_color="default"))
    cursor = con.execute(sql)
    table = Table(*(d[0] for d in cursor.description), header_style="bold")
    for row in cursor.fetchall():
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def query_output() -> None:
    """Step 4: DuckDB over local copies of the Parquet output (httpfs would need internet to install)."""
    import duckdb

    heading("4/7 query the output with DuckDB")
    partitions = download_output()
    console.print(f"copied {OUT_URL}/ to {LOCAL}/ (hive partitions: {', '.join(partitions)})")
    con = duckdb.connect()
    show_query(con, "SELECT status, coalesce(split_part(reason, ':', 1), '') AS why,\n"
                    "       count(*) AS files, round(sum(duration_s) / 60, 2) AS minutes\n"
                    f"FROM read_parquet('{LOCAL}/manifest/**/*.parquet',\n"
                    "                  hive_partitioning = false)\n"
                    "GROUP BY ALL ORDER BY ALL")
    show_query(con, f"SELECT replace(source, '{IN_URL}/', '') AS file, segment,\n"
                    "       n_frames, len(features) AS frames, len(features[1]) AS mels\n"
                    f"FROM read_parquet('{LOCAL}/features/**/*.parquet')\n"
                    "ORDER BY file, segment LIMIT 5")


REGISTRY = f"s3://{BUCKET}/registry"
SOUNDS, SOUND_LABELS = f"s3://{BUCKET}/sounds", f"s3://{BUCKET}/sound-labels"
CALLS, RESULTS = f"s3://{BUCKET}/calls", f"s3://{BUCKET}/results"
# Small on purpose: the demo shows the loop in minutes; benchmarks/quality.py trains for quality.
ASR_TRAINING = ["--epochs", "3", "--batch-size", "8"]


def run_cli(cli: list[str], args: list[str]) -> None:
    """Run one CLI command in a subprocess, showing it first; stop the demo if it fails."""
    cmd = [*cli, *args]
    console.print(f"$ {shown(cmd)}", style="green", soft_wrap=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"`{shown(cmd)}` failed; see its output above.")


def land_labels(batch: str) -> None:
    """New labels "land": copy a synthesized batch's labels table under the prefix retraining watches."""
    s3().copy(f"{BUCKET}/sounds/{batch}/labels/labels.parquet", f"{BUCKET}/sound-labels/{batch}.parquet")
    console.print(f"labels landed: {SOUND_LABELS}/{batch}.parquet")


def retrain_args() -> list[str]:
    return ["retrain", SOUND_LABELS, "--audio", SOUNDS, "--features", f"s3://{BUCKET}/sound-features",
            "--model", f"{REGISTRY}:classify", "--holdout", f"{SOUNDS}/holdout/labels/labels.parquet",
            "--family", "classify", "--epochs", "4"]


def train_models() -> None:
    """Step 5: labelled corpora -> features -> models trained on a Dask worker -> the registry, champions set."""
    heading("5/7 train small models, register them, pick champions")
    cli = cli_command()
    speech = f"s3://{BUCKET}/train-speech"
    run_cli(cli, ["synth", "speech", speech, "--n", "120"])
    run_cli(cli, ["featurize", f"{speech}/audio", f"{speech}/features", "--no-progress"])
    run_cli(cli, ["train", "asr", "--features", f"{speech}/features", "--labels", f"{speech}/labels/labels.parquet",
                  "--registry", REGISTRY, *ASR_TRAINING])
    run_cli(cli, ["models", "promote", f"{REGISTRY}:asr@1", "--reason", "first ASR model of the demo"])
    console.print("a sound classifier through the retraining flow: with no champion yet, its first model is "
                  "trained and promoted")
    run_cli(cli, ["synth", "sounds", f"{SOUNDS}/holdout", "--n", "60", "--seed", "99"])
    run_cli(cli, ["synth", "sounds", f"{SOUNDS}/batch1", "--n", "120", "--seed", "1"])
    land_labels("batch1")
    run_cli(cli, retrain_args())
    run_cli(cli, ["models", "list", REGISTRY])
    console.print("training reports (curves, confusion matrix, transcripts with errors marked): .audiopipe/reports/")


def nightly_transcribe() -> None:
    """Step 6: tonight's recordings arrive; transcribe what is new with the champion, then again (nothing new)."""
    heading("6/7 nightly transcription of new recordings")
    cli = cli_command()
    run_cli(cli, ["synth", "speech", CALLS, "--n", "12", "--seed", "7"])
    args = ["transcribe", f"{CALLS}/audio", RESULTS, "--model", f"{REGISTRY}:asr@champion", "--files-per-shard", "6"]
    run_cli(cli, args)
    fs = s3()
    base = f"{BUCKET}/results/transcribe/model=asr/version=1/files"
    srts = {p: fs.cat_file(p).decode() for p in sorted(fs.find(base)) if p.endswith(".srt")}
    console.print(f"{len(srts)} recordings, each with a .srt and a .jsonl under s3://{base}/")
    spoken = [(p, text) for p, text in srts.items() if text.strip()]
    if spoken:
        console.print(f"{spoken[0][0].rsplit('/', 1)[-1]} (a tiny model trained for 3 epochs: rough text; "
                      "benchmarks/quality.py trains for real):")
        console.print(spoken[0][1][:400])
    else:
        console.print("the demo's 3-epoch model emits no characters yet, so the files hold no cues; "
                      "benchmarks/quality.py trains a model that does")
    console.print("[bold]the same command the next night, with nothing new:[/bold]")
    run_cli(cli, args)


def retrain_on_new_labels() -> None:
    """Step 7: a second batch of labels lands; retrain, judge on the held-out set, promote or keep."""
    heading("7/7 new labels land: retrain, compare with the champion, promote or keep")
    cli = cli_command()
    run_cli(cli, ["synth", "sounds", f"{SOUNDS}/batch2", "--n", "120", "--seed", "2"])
    land_labels("batch2")
    run_cli(cli, retrain_args())
    console.print("[bold]again, with no new labels: nothing is trained[/bold]")
    run_cli(cli, retrain_args())
    run_cli(cli, ["models", "show", f"{REGISTRY}:classify@champion"])


def stop_store(store) -> None:
    """Stop the demo's S3 server if it is running (a no-op otherwise)."""
    if store.down():
        console.print(f"SeaweedFS stopped (data kept in {STORE}/).")


def fresh_start(store) -> None:
    """Stop a store left by an interrupted demo and clear its output, so the first run does everything."""
    store.down()
    for path in (CORPUS, STORE, LOCAL, REPORT):
        shutil.rmtree(path, ignore_errors=True)


def _terminate(signum, frame) -> None:  # SIGTERM -> the same clean-up as Ctrl-C
    raise KeyboardInterrupt


def main() -> int:
    """Run the seven steps; the S3 server is stopped whatever happens."""
    os.chdir(REPO)
    signal.signal(signal.SIGTERM, _terminate)
    from audiopipe.infra.errors import AudiopipeError
    from audiopipe.infra.store import SeaweedStore, free_port

    started, store = time.perf_counter(), SeaweedStore(STORE, free_port())
    try:
        fresh_start(store)
        synthesize_corpus()
        start_store(store)
        upload_corpus()
        featurize_twice()
        query_output()
        train_models()
        nightly_transcribe()
        retrain_on_new_labels()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    except AudiopipeError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    finally:
        stop_store(store)
    console.print(f"[bold green]demo finished in {time.perf_counter() - started:.0f} s[/bold green]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
