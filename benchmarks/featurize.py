"""Featurize benchmark: the in-process floor vs the real flow, rerun cost and peak memory, in one run.

Run ``make bench`` (or ``.venv/bin/python benchmarks/featurize.py --minutes 40``) on a quiet machine.
On one synthetic corpus (mixed lengths; 16/8/22.05 kHz WAV, 44.1 kHz stereo FLAC, 48 kHz OGG; one
long file) it measures:

(a) floor: one process, plain loop: soundfile -> mono -> soxr HQ -> ``tasks.features.log_mel`` per
    30 s segment, nothing written (default BLAS threads, best pass); beside it, passes with 1 BLAS thread and
    in a subprocess with the environment a Dask nanny gives its workers;
(b) ``featurize`` (Prefect flow + Dask LocalCluster, file:// in and out) with 1 and with 2 workers,
    each into a fresh output: wall time, start-up and steady throughput (audio / processing time);
(c) a no-change rerun of (b, 2 workers) into the same output: it must skip every file;
(d) peak RSS of ``featurize`` on one long 16 kHz WAV (2 h by default) with 2 workers, run in a
    subprocess whose process tree (driver, Dask workers, Prefect's API server) is sampled every 0.2 s.

Everything is written under ``benchmarks/.data/`` (git-ignored): the corpora (kept and reused), the
outputs (deleted unless ``--keep``) and ``featurize-results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil

from common import start_prefect  # noqa: E402 - benchmarks/common.py, beside this script
from audiopipe.infra.settings import apply_prefect_defaults

if TYPE_CHECKING:
    from audiopipe.tasks.features import FeatureConfig

DATA = Path(__file__).resolve().parent / ".data"
RESULTS = DATA / "featurize-results.json"
BLOCK_FRAMES = 65_536  # write in blocks: one long write segfaults libvorbis (MEASURED.md)
LONG_SHARE = 0.25  # of the corpus' audio in one long 16 kHz WAV
RSS_INTERVAL_S = 0.2
MB = 1_000_000
TARGETS = {"b1_per_core_vs_floor": 0.8, "b2_vs_b1": 1.7, "rerun_vs_b2_wall": 0.05, "peak_rss_mb": 500.0}
AUDIO_TOLERANCE = 0.01  # the flow's audio seconds vs the corpus' planned seconds


@dataclass(frozen=True)
class Fmt:
    """One corpus format and its share of the audio outside the long file."""

    rate: int
    channels: int
    container: str
    subtype: str
    ext: str
    share: float


# FLAC + OGG are ~22% of all audio, as in the corpus of MEASURED.md.
FORMATS = {
    "wav16k": Fmt(16_000, 1, "WAV", "PCM_16", ".wav", 0.46),
    "wav8k": Fmt(8_000, 1, "WAV", "PCM_16", ".wav", 0.10),
    "wav22k": Fmt(22_050, 1, "WAV", "PCM_16", ".wav", 0.15),
    "flac44k-stereo": Fmt(44_100, 2, "FLAC", "PCM_16", ".flac", 0.16),
    "ogg48k": Fmt(48_000, 1, "OGG", "VORBIS", ".ogg", 0.13),
}


# ---- corpus -----------------------------------------------------------------------------------------

def plan_corpus(minutes: float, seed: int = 0) -> list[tuple[str, str, float]]:
    """``(relative path, format name, seconds)``: one long file, then 5 s .. 10 min files in format shares.

    Lengths are drawn first; formats are then dealt longest file first to the format furthest below its
    share, so the shares hold even for a short corpus.
    """
    rng = np.random.default_rng(seed)
    total = minutes * 60.0
    long_s = round(LONG_SHARE * total, 2)
    rest = left = total - long_s
    lengths: list[float] = []
    while left > 0.5:
        lo, hi = (180.0, 600.0) if len(lengths) % 10 == 9 else (5.0, 180.0)
        seconds = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        lengths.append(round(left if left - seconds < 5.0 else seconds, 2))
        left -= lengths[-1]
    assigned, names = dict.fromkeys(FORMATS, 0.0), {}
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        names[i] = max(FORMATS, key=lambda k: FORMATS[k].share * rest - assigned[k])
        assigned[names[i]] += lengths[i]
    plan = [("long/long_16k.wav", "wav16k", long_s)]
    plan += [(f"{names[i]}/{i:03d}_{s:.0f}s{FORMATS[names[i]].ext}", names[i], s) for i, s in enumerate(lengths)]
    return plan


def speech_clip(index: int, rate: int) -> np.ndarray | None:
    """An espeak-ng sentence at ``rate`` for every third file, or None (other files, or no espeak-ng)."""
    if index % 3 or shutil.which("espeak-ng") is None:
        return None
    import soxr

    from audiopipe.tasks.synth import SENTENCES, speak

    voices = ("en-us+f3", "en+m3", "en-gb+f2", "en-us+m7")
    x, sr = speak(SENTENCES[index % len(SENTENCES)], voice=voices[index % len(voices)])
    return soxr.resample(x, sr, rate).astype(np.float32) if sr != rate else x


def write_audio(path: Path, fmt: Fmt, seconds: float, seed: int, speech: np.ndarray | None = None) -> None:
    """Tones + noise (+ tiled speech) written block by block, so memory stays at one block."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    rng, total = np.random.default_rng(seed), int(round(seconds * fmt.rate))
    base = 180.0 + 40.0 * rng.integers(0, 8, size=fmt.channels)
    with sf.SoundFile(path, "w", samplerate=fmt.rate, channels=fmt.channels, format=fmt.container,
                      subtype=fmt.subtype) as snd:
        for start in range(0, total, BLOCK_FRAMES):
            n = min(BLOCK_FRAMES, total - start)
            idx = np.arange(start, start + n)
            step = 1.0 + 0.5 * ((start // BLOCK_FRAMES) % 4)  # pitch changes every block (~1.4-8 s)
            block = 0.2 * np.sin(2 * np.pi * np.outer(idx / fmt.rate, base * step))
            block += 0.03 * rng.standard_normal((n, fmt.channels))
            if speech is not None:
                block += 0.5 * speech[idx % speech.size, None]
            snd.write(block.astype(np.float32))


def ensure_corpus(minutes: float) -> tuple[Path, list[dict]]:
    """The corpus for ``minutes`` under ``.data/corpus-<minutes>/``, generated once and reused while the plan holds."""
    root = DATA / f"corpus-{minutes:g}"
    index, plan = root / "corpus.json", plan_corpus(minutes)
    if index.exists():
        files = json.loads(index.read_text())["files"]
        if [(f["path"], f["seconds"]) for f in files] == [(rel, seconds) for rel, _, seconds in plan]:
            return root, files
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    files = []
    for i, (rel, name, seconds) in enumerate(plan):
        fmt = FORMATS[name]
        write_audio(root / rel, fmt, seconds, seed=i, speech=speech_clip(i, fmt.rate))
        files.append({"path": rel, "format": name, "seconds": seconds, "bytes": (root / rel).stat().st_size})
    index.write_text(json.dumps({"minutes": minutes, "files": files}, indent=1))
    print(f"corpus: wrote {len(files)} files ({minutes:g} min of audio) to {root} "
          f"in {time.perf_counter() - started:.0f} s")
    return root, files


def ensure_long_wav(hours: float) -> Path:
    """A ``hours``-long 16 kHz mono 16-bit WAV of tones + noise under ``.data/rss-<hours>h/input/``."""
    path = DATA / f"rss-{hours:g}h" / "input" / "long_16k.wav"
    expected = 44 + 2 * int(round(hours * 3600 * 16_000))
    if not path.exists() or path.stat().st_size != expected:
        write_audio(path, FORMATS["wav16k"], hours * 3600, seed=12345)
    return path


def corpus_summary(files: list[dict]) -> dict:
    """Audio seconds, file count and per-format share of a corpus."""
    total = sum(f["seconds"] for f in files)
    shares: dict[str, float] = {}
    for f in files:
        shares[f["format"]] = shares.get(f["format"], 0.0) + f["seconds"] / total
    return {"files": len(files), "audio_s": round(total, 2), "bytes": sum(f["bytes"] for f in files),
            "longest_s": max(f["seconds"] for f in files), "shortest_s": min(f["seconds"] for f in files),
            "format_share": {k: round(v, 3) for k, v in sorted(shares.items())}}


# ---- (a) the floor ----------------------------------------------------------------------------------

def warm_floor(paths: list[Path], cfg: FeatureConfig) -> None:
    """First-call costs (imports, soxr set-up per rate) off the clock, as the flow's ``warm_up`` does."""
    import soundfile as sf
    import soxr

    from audiopipe.tasks.features import log_mel

    for rate in {sf.info(str(p)).samplerate for p in paths}:
        x = np.zeros(rate, np.float32)
        log_mel(soxr.resample(x, rate, cfg.sample_rate, quality="HQ") if rate != cfg.sample_rate else x, cfg=cfg)


def floor_pass(paths: list[Path], label: str, blas_threads: int | None = None) -> dict:
    """One process, no output: decode -> mono -> soxr HQ -> log-mel, per segment as the flow cuts them."""
    import soundfile as sf
    import soxr
    from threadpoolctl import threadpool_limits

    from audiopipe.tasks.features import FeatureConfig, log_mel

    cfg = FeatureConfig()
    warm_floor(paths, cfg)
    audio_s, started, cpu = 0.0, time.perf_counter(), time.process_time()
    with threadpool_limits(blas_threads):
        for path in paths:
            with sf.SoundFile(path) as snd:
                rate, step = snd.samplerate, round(cfg.segment_seconds * snd.samplerate)
                for block in snd.blocks(blocksize=step, dtype="float32", always_2d=True):
                    mono = block[:, 0] if block.shape[1] == 1 else 0.5 * (block[:, 0] + block[:, 1])
                    if rate != cfg.sample_rate:
                        mono = soxr.resample(mono, rate, cfg.sample_rate, quality="HQ")
                    log_mel(mono, cfg=cfg)
                    audio_s += block.shape[0] / rate
    wall = time.perf_counter() - started
    return {"audio_s": audio_s, "wall_s": wall, "cpu_s": time.process_time() - cpu,
            "x_realtime": audio_s / wall, "blas_threads": blas_threads or "default", "label": label}


def floor_in_worker_env(corpus: Path) -> dict:
    """(a) again in a subprocess with the environment a Dask nanny gives its worker (thread pins, malloc).

    glibc reads ``MALLOC_*`` only at process start, hence the subprocess. With the same code and files, the
    gap between this and (a) is what the worker environment costs, not Prefect or Dask.
    """
    import dask
    import distributed  # noqa: F401 - registers distributed's config defaults

    worker_env = {k: str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--floor-child", str(corpus)],
                          env={**os.environ, **worker_env}, capture_output=True, text=True, check=True)
    malloc = " ".join(f"{k}={v}" for k, v in worker_env.items() if not k.endswith("_NUM_THREADS"))
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "env": worker_env,
            "label": f"Dask worker env (BLAS threads pinned, {malloc or 'default malloc'})"}


def floor_child(corpus: Path) -> None:
    """Body of ``--floor-child``: the best of two floor passes, as JSON on stdout."""
    files = json.loads((corpus / "corpus.json").read_text())["files"]
    paths = [corpus / f["path"] for f in files]
    passes = [floor_pass(paths, "worker environment") for _ in range(2)]
    print(json.dumps(max(passes, key=lambda p: p["x_realtime"])))


# ---- (b, c) the flow in this process ----------------------------------------------------------------

def run_featurize(in_dir: Path, out_dir: Path, workers: int, work_dir: Path) -> dict:
    """``featurize`` on local directories; the summary plus ``outer_wall_s`` (timed around the call)."""
    from audiopipe.flows.extract_features import featurize
    from audiopipe.infra.settings import RunSettings
    from audiopipe.tasks.features import FeatureConfig

    settings = RunSettings(workers=workers, work_dir=work_dir)
    started = time.perf_counter()
    summary = featurize(f"file://{in_dir.resolve()}", f"file://{out_dir.resolve()}",
                        feature_config=FeatureConfig(), settings=settings)
    summary["outer_wall_s"] = time.perf_counter() - started
    summary["audio_s"] = summary["audio_hours"] * 3600
    summary["steady_x_realtime"] = summary["audio_s"] / summary["processing_s"] if summary["processing_s"] else 0.0
    summary["in_worker_x_realtime"] = summary["audio_s"] / summary["busy_s"] if summary["busy_s"] else 0.0
    summary["settings"] = settings.model_dump(mode="json")
    return summary


def flow_runs(corpus: Path, files: list[dict], audio_s: float, problems: list[str]) -> dict:
    """(b) 1 and 2 workers into fresh outputs, then (c) the no-change rerun of the 2-worker output."""
    out = {"prefect_start_s": start_prefect()}
    for workers in (1, 2):
        target = DATA / f"out-w{workers}"
        shutil.rmtree(target, ignore_errors=True)
        run = run_featurize(corpus, target, workers, DATA / "work")
        out[f"b{workers}"] = run
        if run["files_ok"] != len(files) or run["files_rejected"]:
            problems.append(f"b{workers}: {run['files_ok']} ok, {run['files_rejected']} rejected "
                            f"of {len(files)} files")
        if abs(run["audio_s"] - audio_s) > AUDIO_TOLERANCE * audio_s:
            problems.append(f"b{workers}: featurized {run['audio_s']:.1f} s of audio, the corpus has {audio_s:.1f} s")
    rerun = run_featurize(corpus, DATA / "out-w2", 2, DATA / "work")
    out["c"] = rerun
    if rerun["files_skipped"] != rerun["files_listed"] or rerun["files_ok"]:
        problems.append(f"c: the rerun processed files: {rerun['files_skipped']} of {rerun['files_listed']} "
                        f"skipped, {rerun['files_ok']} processed")
    return out


# ---- (d) peak RSS of a subprocess tree --------------------------------------------------------------

def process_role(proc: psutil.Process, root_pid: int) -> str:
    """What a process in the featurize tree is, from its command line."""
    if proc.pid == root_pid:
        return "driver (flow, scheduler, nannies)"
    cmd = " ".join(proc.cmdline())
    if "resource_tracker" in cmd or "forkserver" in cmd:
        return "multiprocessing helper"
    if "spawn_main" in cmd:
        return "dask worker"
    if "uvicorn" in cmd or "prefect" in cmd:
        return "prefect api server"
    return f"other ({proc.name()})"


def sample_tree(root: psutil.Process, roles: dict[int, str]) -> list[tuple[str, int]]:
    """``(role, rss bytes)`` of ``root`` and all its descendants, skipping ones that just exited."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    sample = []
    for proc in procs:
        try:
            role = roles.get(proc.pid) or roles.setdefault(proc.pid, process_role(proc, root.pid))
            sample.append((role, proc.memory_info().rss))
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return sample


def watch_rss(child: subprocess.Popen) -> dict:
    """Sample the child's process tree every ``RSS_INTERVAL_S`` until it exits; peaks in MB."""
    root, roles = psutil.Process(child.pid), {}
    peak_single, peak_sum, by_role, at_peak_sum, samples = 0, 0, {}, {}, 0
    while child.poll() is None:
        sample = sample_tree(root, roles)
        samples += 1
        for role, rss in sample:
            by_role[role] = max(by_role.get(role, 0), rss)
        total = sum(rss for _, rss in sample)
        peak_single = max([peak_single, *(rss for _, rss in sample)])
        if total > peak_sum:
            peak_sum, at_peak_sum = total, {}
            for role, rss in sample:
                at_peak_sum[role] = at_peak_sum.get(role, 0) + rss
        time.sleep(RSS_INTERVAL_S)
    largest = max(by_role, key=by_role.get) if by_role else "none"
    return {"peak_single_mb": peak_single / MB, "peak_single_role": largest, "peak_sum_mb": peak_sum / MB,
            "peak_by_role_mb": {k: v / MB for k, v in by_role.items()},
            "sum_at_peak_by_role_mb": {k: v / MB for k, v in at_peak_sum.items()}, "samples": samples}


def measure_rss(hours: float, problems: list[str]) -> dict:
    """(d) ``featurize`` with 2 workers on one ``hours``-long WAV in a subprocess, its tree sampled."""
    wav = ensure_long_wav(hours)
    run_dir = wav.parent.parent
    shutil.rmtree(run_dir / "out", ignore_errors=True)
    shutil.rmtree(run_dir / "work", ignore_errors=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    log_path = run_dir / "child.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--rss-child", str(run_dir)],
                                 stdout=log, stderr=subprocess.STDOUT)
        peaks = watch_rss(child)
    peaks.update(hours=hours, file_bytes=wav.stat().st_size, child_wall_s=time.perf_counter() - started,
                 exit_code=child.returncode, log=str(log_path))
    if child.returncode != 0 or not (run_dir / "summary.json").exists():
        problems.append(f"d: the featurize subprocess failed (exit {child.returncode}); see {log_path}")
        return peaks
    summary = json.loads((run_dir / "summary.json").read_text())
    peaks["summary"] = summary
    if summary["files_ok"] != 1:
        problems.append(f"d: the long file was not featurized ({summary['files_ok']} ok)")
    return peaks


def rss_child(run_dir: Path) -> None:
    """Body of the ``--rss-child`` subprocess: featurize ``run_dir/input`` with 2 workers."""
    summary = run_featurize(run_dir / "input", run_dir / "out", 2, run_dir / "work")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


# ---- report -----------------------------------------------------------------------------------------

def machine_notes() -> dict:
    """Where the numbers come from: CPU, memory, load, library versions, BLAS."""
    import dask
    import distributed
    import librosa
    import prefect
    import pyarrow
    import soundfile
    import soxr
    from threadpoolctl import threadpool_info

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(), "numpy": np.__version__, "librosa": librosa.__version__,
        "dask": dask.__version__, "distributed": distributed.__version__, "prefect": prefect.__version__,
        "pyarrow": pyarrow.__version__, "soundfile": soundfile.__version__, "soxr": soxr.__version__,
        "blas": [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                 for i in threadpool_info()],
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def verdict(value: float, target: float, shown: str, higher_is_better: bool = True) -> str:
    """``met (>= 0.8)`` or ``MISSED (>= 0.8)``; ``shown`` is the target as the table shows it."""
    ok = value >= target if higher_is_better else value <= target
    return f"{'met' if ok else 'MISSED'} ({shown})"


def ratios(res: dict) -> dict:
    """The ratios the targets are about."""
    floor, out = res["floor"]["x_realtime"], {}
    if "b1" in res:
        b1, b2 = res["b1"]["steady_x_realtime"], res["b2"]["steady_x_realtime"]
        out.update(b1_per_core_vs_floor=b1 / floor, b2_per_core_vs_floor=b2 / 2 / floor, b2_vs_b1=b2 / b1,
                   rerun_vs_b2_wall=res["c"]["outer_wall_s"] / res["b2"]["outer_wall_s"])
    return out


def flow_rows(res: dict, r: dict) -> list[tuple[str, str, str, str]]:
    """Table rows of (b) and (c)."""
    rows = [("Prefect API start (once per process)", f"{res['prefect_start_s']:.1f} s", "", "")]
    for w in (1, 2):
        b = res[f"b{w}"]
        rows += [
            (f"(b{w}) featurize, {w} worker{'s' if w > 1 else ''}: wall", f"{b['outer_wall_s']:.1f} s", "", ""),
            (f"(b{w})   start-up", f"{b['startup_s']:.1f} s", "", ""),
            (f"(b{w})   steady x real time", f"{b['steady_x_realtime']:,.0f}",
             f"{r[f'b{w}_per_core_vs_floor']:.2f} of (a) per core",
             verdict(r["b1_per_core_vs_floor"], TARGETS["b1_per_core_vs_floor"], ">= 0.8") if w == 1 else ""),
            (f"(b{w})   in-worker x real time / orchestration share",
             f"{b['in_worker_x_realtime']:,.0f} / {1 - b['busy_s'] / (b['workers'] * b['processing_s']):.0%}",
             "", ""),
        ]
    rows.append(("(b2)/(b1) steady throughput", "", f"{r['b2_vs_b1']:.2f}x",
                 verdict(r["b2_vs_b1"], TARGETS["b2_vs_b1"], ">= 1.7x")))
    c = res["c"]
    rows.append(("(c) no-change rerun of (b2): wall", f"{c['outer_wall_s']:.2f} s",
                 f"{r['rerun_vs_b2_wall']:.1%} of (b2)",
                 verdict(r["rerun_vs_b2_wall"], TARGETS["rerun_vs_b2_wall"], "<= 5%", higher_is_better=False)))
    rows.append(("(c)   of it inside the flow function", f"{c['wall_s']:.2f} s", "", ""))
    return rows


def result_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """(measurement, result, ratio, target) for everything measured."""
    r, fl = ratios(res), res["floor"]
    rows = [("(a) floor: one process, no output (best pass)", f"{fl['x_realtime']:,.0f} x real time",
             f"{fl['cpu_s'] / fl['wall_s']:.2f} cores busy", "")]
    rows += [(f"(a)   pass: {p['label']}", f"{p['x_realtime']:,.0f} x real time",
              f"{p['x_realtime'] / fl['x_realtime']:.2f} of (a)", "") for p in fl["passes"]]
    if "b1" in res:
        rows += flow_rows(res, r)
    if "d" in res and "peak_single_mb" in res["d"]:
        d = res["d"]
        rows += [(f"(d) peak RSS, one {d['hours']:g} h WAV, 2 workers: largest process",
                  f"{d['peak_single_mb']:,.0f} MB", d["peak_single_role"],
                  verdict(d["peak_single_mb"], TARGETS["peak_rss_mb"], "< 500 MB", higher_is_better=False)),
                 ("(d)   sum over the process tree", f"{d['peak_sum_mb']:,.0f} MB",
                  ", ".join(f"{k.split(' (')[0]} {v:,.0f}" for k, v in sorted(d["sum_at_peak_by_role_mb"].items())),
                  "")]
    return rows


def print_report(res: dict) -> None:
    """The rich table, then a markdown block for docs/benchmarks.md."""
    from rich.console import Console
    from rich.table import Table

    m, c = res["machine"], res["corpus"]
    title = (f"featurize benchmark: {c['files']} files, {c['audio_s'] / 60:.1f} min of audio | "
             f"{m['cpu_model']}, {m['usable_cpus']} CPUs, {m['ram_gib']} GiB")
    table = Table(title=title)
    for name in ("measurement", "result", "ratio", "target"):
        table.add_column(name)
    rows = result_rows(res)
    for row in rows:
        table.add_row(*row)
    console = Console(width=max(Console().width, 160))  # rows stay one line each in logs and pipes
    console.print(table)
    lines = [f"Corpus: {c['files']} files, {c['audio_s'] / 60:.1f} min of audio "
             f"({', '.join(f'{k} {v:.0%}' for k, v in c['format_share'].items())}). "
             f"Machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, {m['ram_gib']} GiB; "
             f"Python {m['python']}, numpy {m['numpy']}, librosa {m['librosa']}, dask {m['dask']}, "
             f"prefect {m['prefect']}; {m['date']}.", "",
             "| measurement | result | ratio | target |", "|---|---:|---:|---|"]
    lines += [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in rows]
    console.print("\nmarkdown for docs/benchmarks.md:\n", style="bold")
    print("\n".join(lines))


# ---- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--rss-child`` and ``--floor-child`` are the benchmark's own subprocesses)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=40.0, help="audio in the corpus (default 40)")
    parser.add_argument("--rss-hours", type=float, default=2.0, help="length of the (d) WAV (default 2.0)")
    parser.add_argument("--skip-rss", action="store_true", help="skip (d)")
    parser.add_argument("--skip-flow", action="store_true", help="skip (b) and (c): floor (and RSS) only")
    parser.add_argument("--keep", action="store_true", help="keep the feature outputs under benchmarks/.data")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor-child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Everything, in an order that keeps runs apart: (d) first, in its own process; then (a), (b), (c), (a)."""
    problems: list[str] = []
    given = {k: v for k, v in vars(args).items() if not k.endswith("_child")}
    res: dict = {"machine": machine_notes(), "args": given, "targets": TARGETS}
    corpus, files = ensure_corpus(args.minutes)
    res["corpus"] = {"path": str(corpus), **corpus_summary(files)}
    if not args.skip_rss:  # first: its Prefect API server must not share the SQLite file with ours
        res["d"] = measure_rss(args.rss_hours, problems)
    paths = [corpus / f["path"] for f in files]
    passes = [floor_pass(paths, "before the flows"), floor_pass(paths, "1 BLAS thread", blas_threads=1),
              floor_pass(paths, "before the flows")]
    passes.append(floor_in_worker_env(corpus))
    if not args.skip_flow:
        res.update(flow_runs(corpus, files, res["corpus"]["audio_s"], problems))
    passes.append(floor_pass(paths, "after the flows"))  # drift between the two passes shows machine noise
    best = max((p for p in passes if p["label"] in ("before the flows", "after the flows")),
               key=lambda p: p["x_realtime"])
    res["floor"] = {**best, "passes": passes}
    res["ratios"] = ratios(res)
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    res["problems"] = problems
    return res, problems


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one of its subprocesses); exit code 1 when a run did not do what it must."""
    args = parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    apply_prefect_defaults(DATA)  # before Prefect is imported: PREFECT_HOME under .data, telemetry off
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    if args.floor_child:
        floor_child(args.floor_child)
        return 0
    res, problems = run_benchmark(args)
    RESULTS.write_text(json.dumps(res, indent=1, default=str))
    print_report(res)
    print(f"\nresults: {RESULTS}")
    if not args.keep:
        for path in (DATA / "out-w1", DATA / "out-w2", DATA / "work", DATA / f"rss-{args.rss_hours:g}h" / "out",
                     DATA / f"rss-{args.rss_hours:g}h" / "work"):
            shutil.rmtree(path, ignore_errors=True)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
