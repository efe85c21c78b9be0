"""Bulk-inference benchmark (issue 5, "Speed"): a plain per-file loop vs ``audiopipe transcribe``, in one run.

Run ``make bench-inference`` (``.venv/bin/python benchmarks/inference.py [--minutes 90] [--keep]``, about
4 minutes on 2 idle cores) on a quiet machine.
On one synthetic corpus (16 kHz mono WAV: many 3-15 s espeak-ng speech snippets, like phone-call clips,
plus a few long recordings) with one ASR model (``build_ctc_asr(CtcAsrConfig(n_mels=80))``: conv2d front
end, subsample 4, 3 x BiLSTM(192); untrained weights, the same compute as trained ones) registered in a
local registry, it measures:

(m) float32 matmul FLOP/s (2048 x 2048): numpy with 1 BLAS thread and with all threads, and TensorFlow
    with its default threads, in this process; TensorFlow and numpy with 1 thread again in (p)'s process;
(a) the plain loop, in this process: per file soundfile read -> ``compute_features`` (the model card's
    ``FeatureConfig``) -> ``model.predict`` on that file alone (batch of 1) -> greedy CTC decode, nothing
    written; default TensorFlow threads. Beside it, (a') the same loop calling a compiled ``tf.function``
    of the model instead of ``model.predict`` (what ``predict`` itself costs per call);
(g) ``run_inference("transcribe", ..., beam_width=1)`` (greedy decoding) with ``RunSettings(workers=2)``
    (Prefect flow + Dask LocalCluster, file:// in and out) into a fresh output: wall time, start-up, steady
    throughput (audio / processing time) and the flow's worker-second timings (decode, features, model,
    ctc, write);
(b) the same with the default decoder, the nightly job's: CTC prefix beam search (width 8) with the
    character LM registered with the model (fitted on the corpus's sentences, weight 0.3, bonus 1.5), into
    another fresh output; (g) and (b) run twice each, alternating, and the faster run of each counts; (b)'s
    steady throughput against (g)'s is the beam column. The untrained model's
    outputs are nearly flat, the beam search's worst case: no frame is blank-dominated, and every frame
    offers the top-8 characters;
(c) the same command again: it must write nothing (the output tree is compared file by file);
(p) in a subprocess with a Dask worker's environment, pinned to one CPU (what each of two workers gets on
    two cores): ``warm_model`` (start-up), then the first-call costs it leaves to the first item (first
    ``compute_features``, first predict = tracing the ``tf.function``);
    ``tasks.infer.infer_item`` on two shards' worth (128) of snippets grouped as ``plan_items`` groups them
    plus one chunk of a long recording: as the flow runs it; with ``window_s`` 16 (every snippet one
    window); with that, batch 32 and larger items cut from size-sorted shards (a what-if: the grouping
    is the benchmark's own); and under cProfile; each with its batches' sizes and padding. Then the
    compiled model alone at batch sizes 1..32 with its conv front end timed apart, and matmul FLOP/s
    with 1 thread.

Every phase records the CPU seconds of this process, of its children by role (Dask workers, Prefect's API
server) and of all other processes meanwhile, and the load average: the machine is shared.

LSTM FLOPs: per output frame, per direction, per layer ``2 * 4 * units * (input_dim + units)`` (the four
gates' input and recurrent matmuls; one multiply-add = 2 FLOPs; activations, bias and the cell update
not counted), summed over 3 layers and 2 directions. Frames are the model's output frames (input frames
/ 4) of every window the model actually heard: for the flow, each 10 s window core plus its 1 s of context
on either side; padding to the batch's longest window is not counted. Achieved FLOP/s per worker = the
flow's LSTM FLOPs / its ``model_s`` worker-seconds; ``model_s`` also holds the conv front end and dense
layer (their share of the model's FLOPs is printed) and the batch padding copy.

Everything is written under ``benchmarks/.data/`` (git-ignored): the corpus (kept and reused), the
registry and outputs (deleted unless ``--keep``), and ``inference-results.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from common import start_prefect  # noqa: E402 - benchmarks/common.py, beside this script
from audiopipe.infra.settings import apply_prefect_defaults  # noqa: E402

DATA = Path(__file__).resolve().parent / ".data"
RESULTS = DATA / "inference-results.json"
RATE = 16_000
SHORT_S = (3.0, 15.0)  # phone-call snippets
LONG_SHARE, LONG_PARTS = 0.25, (1.0, 1.5, 2.0)  # a quarter of the audio in three long recordings
MODEL_NAME = "asr-bench"
TARGETS = {"b_vs_a": 2.5, "lstm_vs_matmul_1t": 0.40, "rerun_vs_b_wall": 0.05, "b_vs_g": 0.5}
AUDIO_TOLERANCE = 0.01
PROPOSED_GROUP_BYTES = 16 * 1024 * 1024  # (p)'s what-if: snippets per Dask item (the flow: 4 MiB / 32 files)
VOICES = ("en-us+f3", "en+m3", "en-gb+f2", "en-us+m7")


# ---- corpus -----------------------------------------------------------------------------------------

def plan_corpus(minutes: float, seed: int = 0) -> list[tuple[str, float]]:
    """``(relative path, seconds)``: three long recordings (a quarter of the audio), then 3-15 s snippets."""
    rng = np.random.default_rng(seed)
    total = minutes * 60.0
    long_total = LONG_SHARE * total
    plan = [(f"long/long_{i}.wav", round(long_total * p / sum(LONG_PARTS), 2)) for i, p in enumerate(LONG_PARTS)]
    left = total - long_total
    while left >= SHORT_S[0]:
        seconds = round(float(rng.uniform(*SHORT_S)), 2)
        seconds = round(left, 2) if left - seconds < SHORT_S[0] else seconds
        plan.append((f"short/{len(plan):05d}_{seconds:.0f}s.wav", seconds))
        left -= seconds
    return plan


def speech_pool() -> list[np.ndarray]:
    """espeak-ng sentences at 16 kHz (20 sentences x 4 voices), or speech-like bursts without espeak-ng."""
    import soxr

    if shutil.which("espeak-ng") is None:
        return [voiced_bursts(float(s), np.random.default_rng(s)) for s in range(3, 7) for _ in range(10)]
    from audiopipe.tasks.synth import SENTENCES, speak

    pool = []
    for i, sentence in enumerate(SENTENCES):
        for voice in VOICES:
            x, sr = speak(sentence, voice=voice, speed_wpm=150 + 10 * (i % 4))
            pool.append(soxr.resample(x, sr, RATE).astype(np.float32))
    return pool


def voiced_bursts(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Harmonic bursts and pauses (as ``tests/flows/infer_support.voiced``), when espeak-ng is missing."""
    t = np.arange(int(seconds * RATE)) / RATE
    out, start = np.zeros_like(t), 0.0
    while start < seconds:
        length, f0 = rng.uniform(0.2, 1.2), rng.uniform(90, 250)
        on = (t >= start) & (t < start + length)
        out[on] = 0.3 * np.sin(2 * np.pi * f0 * t[on]) + 0.1 * np.sin(2 * np.pi * 3 * f0 * t[on])
        start += length + rng.uniform(0.05, 0.8)
    return out.astype(np.float32)


def recording(seconds: float, pool: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Sentences from ``pool`` with 0.1-0.8 s pauses, room noise at about -45 dBFS, cut to ``seconds``."""
    want, parts, have = int(round(seconds * RATE)), [], 0
    while have < want:
        clip = pool[int(rng.integers(len(pool)))] * float(rng.uniform(0.5, 1.0))
        gap = np.zeros(int(rng.uniform(0.1, 0.8) * RATE), np.float32)
        parts += [gap, clip]
        have += gap.size + clip.size
    x = np.concatenate(parts)[:want]
    return (x + 0.005 * rng.standard_normal(want)).astype(np.float32)


def ensure_corpus(minutes: float) -> tuple[Path, list[dict]]:
    """The corpus for ``minutes`` under ``.data/inference-corpus-<minutes>/``, generated once and reused."""
    import soundfile as sf

    root = DATA / f"inference-corpus-{minutes:g}"
    index, plan = root / "corpus.json", plan_corpus(minutes)
    if index.exists():
        files = json.loads(index.read_text())["files"]
        if [(f["path"], f["seconds"]) for f in files] == plan and all((root / f["path"]).exists() for f in files):
            return root, files
    shutil.rmtree(root, ignore_errors=True)
    started, pool, files = time.perf_counter(), speech_pool(), []
    for i, (rel, seconds) in enumerate(plan):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, recording(seconds, pool, np.random.default_rng(i)), RATE, subtype="PCM_16")
        files.append({"path": rel, "seconds": seconds, "bytes": (root / rel).stat().st_size})
    index.write_text(json.dumps({"minutes": minutes, "files": files}, indent=1))
    print(f"corpus: wrote {len(files)} files ({minutes:g} min of audio) to {root} "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return root, files


# ---- the model and its FLOPs ------------------------------------------------------------------------

def register_model(corpus: Path, files: list[dict], registry: Path) -> tuple[str, dict]:
    """Build the ASR model, set feature statistics from 20 corpus files, register it as family ``asr``."""
    import keras
    import soundfile as sf

    from audiopipe.models.asr_ctc import DEFAULT_VOCAB, CtcAsrConfig, build_ctc_asr
    from audiopipe.models.layers import set_feature_stats
    from audiopipe.models.registry import Registry, TrainingData
    from audiopipe.tasks.features import FeatureConfig, compute_features

    keras.utils.set_random_seed(0)
    cfg, feature_cfg = CtcAsrConfig(n_mels=80), FeatureConfig()
    model = build_ctc_asr(cfg)
    frames = np.concatenate([compute_features(sf.read(corpus / f["path"], dtype="float32")[0], cfg=feature_cfg)
                             for f in files[len(LONG_PARTS):len(LONG_PARTS) + 20]])
    set_feature_stats(model, frames.mean(axis=0), np.maximum(frames.std(axis=0), 1e-3))
    shutil.rmtree(registry, ignore_errors=True)
    # the character LM and decoder setting training ships with a model (tasks/train_lm.py), fitted on the
    # corpus's sentences at training's order; weight and bonus are its no-validation defaults
    from audiopipe.models.ctc_decode import CharNgramLM
    from audiopipe.models.text_norm import normalize_text
    from audiopipe.tasks.synth import SENTENCES
    from audiopipe.tasks.train_lm import BEAM_WIDTH, DEFAULT_SETTING, LM_FILE, LM_ORDER

    lm = CharNgramLM.fit([normalize_text(t) for t in SENTENCES], order=LM_ORDER)
    ref = Registry(str(registry)).register(
        MODEL_NAME, model, family="asr", metrics={"cer": 1.0}, feature_config=feature_cfg.to_dict(),
        training_data=TrainingData.of(["benchmarks/inference.py: untrained"]), vocabulary=tuple(DEFAULT_VOCAB),
        params={"model_config": cfg.to_dict()}, files={LM_FILE: lm.to_bytes()},
        extra={"decoder": {"beam_width": BEAM_WIDTH, "lm_file": LM_FILE, "lm_weight": DEFAULT_SETTING[0],
                           "insertion_bonus": DEFAULT_SETTING[1]}})
    return f"{registry}:{ref.name}@{ref.version}", cfg.to_dict()


def flops_per_output_frame(cfg: dict) -> dict:
    """FLOPs (multiply-add = 2) of the conv front end, the BiLSTMs and the classifier per output frame."""
    blocks = int(math.log2(cfg["subsample"])) if cfg["frontend"] == "conv2d" else 0
    bins, in_ch, conv = cfg["n_mels"], 1, 0.0
    for b in range(blocks):
        bins = -(-bins // 2)
        positions = cfg["subsample"] // 2 ** (b + 1) * bins * cfg["conv_channels"]
        conv += 2 * positions * 9 * in_ch  # 3x3 kernels
        in_ch = cfg["conv_channels"]
    dim = bins * cfg["conv_channels"] if blocks else cfg["n_mels"] * cfg["subsample"]
    lstm, units = 0.0, cfg["lstm_units"]
    for _ in range(cfg["lstm_layers"]):
        lstm += 2 * (2 * 4 * units * (dim + units))  # 2 directions x (4 gates x (input + recurrent) matmuls)
        dim = 2 * units
    dense = 2 * dim * (len(cfg["vocab"]) + 1)
    return {"conv": conv, "lstm": lstm, "dense": dense, "total": conv + lstm + dense}


def out_frames(num_samples: int, subsample: int = 4, hop: int = 160) -> int:
    """Model output frames for ``num_samples`` of 16 kHz audio (librosa ``center=True`` frames / subsample)."""
    return -(-(1 + num_samples // hop) // subsample)


def flow_window_frames(num_samples: int, window_s: float = 10.0, context_s: float = 1.0) -> int:
    """Output frames of every window the flow runs for one recording (core plus context, as ``iter_windows``)."""
    step, ctx = int(round(window_s * RATE)), int(round(context_s * RATE))
    total = 0
    for k in range(max(1, -(-num_samples // step))):
        core = min(step, num_samples - k * step)
        head = ctx if k else 0
        tail = min(ctx, num_samples - (k + 1) * step) if (k + 1) * step < num_samples else 0
        total += out_frames(core + head + tail)
    return total


# ---- (m) matmul FLOP/s ------------------------------------------------------------------------------

def best_seconds(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_flops(n: int = 2048, *, numpy_threads: int | None, tf: bool) -> float:
    """Best-of-5 float32 ``n x n`` matmul FLOP/s: numpy with ``numpy_threads`` (None: all), or TensorFlow."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    if tf:
        import tensorflow as tf_

        x = tf_.constant(a)
        return 2 * n**3 / best_seconds(lambda: tf_.linalg.matmul(x, x).numpy())
    from threadpoolctl import threadpool_limits

    with threadpool_limits(numpy_threads):
        return 2 * n**3 / best_seconds(lambda: a @ a)


# ---- CPU use: this process, its children by role, and every other process (a shared machine) --------

def process_role(proc: psutil.Process) -> str:
    """What a child of this process is, from its command line."""
    cmd = " ".join(proc.cmdline())
    if "resource_tracker" in cmd or "forkserver" in cmd:
        return "helper"
    if "spawn_main" in cmd:
        return "dask workers"
    if "uvicorn" in cmd or "prefect" in cmd:
        return "prefect server"
    return "other children"


class CpuMeter:
    """Wall time; CPU seconds of this process, of its children by role (sampled every 0.25 s) and of all
    other processes meanwhile (system busy time minus ours), plus the load average at both ends."""

    INTERVAL_S = 0.25

    def __enter__(self) -> CpuMeter:
        self.load_start, self.base, self.last, self.roles = os.getloadavg(), {}, {}, {}
        self._sample()
        self.base = dict(self.last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.wall0, self.busy0, self.self0 = time.perf_counter(), self._busy(), self._self()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.wall0
        self._stop.set()
        self._thread.join()
        self._sample()
        self.by_role = {"driver": self._self() - self.self0}
        for pid, cpu in self.last.items():
            role = self.roles[pid]
            self.by_role[role] = self.by_role.get(role, 0.0) + cpu - self.base.get(pid, 0.0)
        self.own_cpu_s = sum(self.by_role.values())
        self.other_cpu_s = max(0.0, self._busy() - self.busy0 - self.own_cpu_s)
        self.load_end = os.getloadavg()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        for child in psutil.Process().children(recursive=True):
            try:
                if child.pid not in self.roles:
                    self.roles[child.pid] = process_role(child)
                times = child.cpu_times()
            except psutil.Error:
                continue
            self.last[child.pid] = times.user + times.system

    @staticmethod
    def _self() -> float:
        times = psutil.Process().cpu_times()
        return times.user + times.system

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def to_dict(self) -> dict:
        return {"wall_s": self.wall_s, "own_cpu_s": self.own_cpu_s, "other_cpu_s": self.other_cpu_s,
                "own_cores": self.own_cpu_s / self.wall_s, "other_cores": self.other_cpu_s / self.wall_s,
                "cpu_s_by_role": self.by_role, "load_start": self.load_start, "load_end": self.load_end}


# ---- (a) the plain loop -----------------------------------------------------------------------------

def plain_loop(paths: list[Path], call, label: str, card) -> dict:
    """Per file: read -> features -> ``call(features[None], lengths)`` -> greedy decode; seconds per step."""
    import soundfile as sf

    from audiopipe.models.asr_ctc import greedy_decode
    from audiopipe.models.layers import output_lengths
    from audiopipe.tasks.features import FeatureConfig, compute_features

    cfg, vocab = FeatureConfig.from_dict(card.feature_config), "".join(card.vocabulary)
    subsample = int(card.params["model_config"]["subsample"])
    for frames in (301, 1001, 1501):  # tracing off the clock (predict retraces to a shape-generic graph)
        call(np.zeros((1, frames, cfg.n_mels), np.float32), np.array([frames], np.int32))
    steps = dict.fromkeys(("decode_s", "features_s", "model_s", "ctc_s"), 0.0)
    audio_s, frames_out = 0.0, 0
    with CpuMeter() as meter:
        for path in paths:
            t0 = time.perf_counter()
            samples, rate = sf.read(path, dtype="float32")
            t1 = time.perf_counter()
            if rate != cfg.sample_rate or samples.ndim != 1:
                raise ValueError(f"{path}: expected mono {cfg.sample_rate} Hz audio")
            feats = compute_features(samples, cfg=cfg)
            t2 = time.perf_counter()
            logits = call(feats[None], np.array([feats.shape[0]], np.int32))
            t3 = time.perf_counter()
            valid = output_lengths(np.array([feats.shape[0]]), subsample)
            greedy_decode(logits, valid, vocab=vocab)
            t4 = time.perf_counter()
            for key, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                steps[key] += seconds
            audio_s += samples.size / rate
            frames_out += int(valid[0])
    return {"label": label, "audio_s": audio_s, "x_realtime": audio_s / meter.wall_s, "output_frames": frames_out,
            "timings": steps, "cpu": meter.to_dict()}


def plain_loops(paths: list[Path], model_ref: str, work_dir: Path) -> tuple[dict, dict]:
    """(a) with ``model.predict`` and (a') with a compiled ``tf.function``, the model loaded from the registry."""
    import tensorflow as tf

    from audiopipe.models.registry import open_model_ref

    registry, ref = open_model_ref(model_ref)
    model, card = registry.load(ref, work_dir / "plain-models")

    def predict(x, lengths):
        return model.predict({"features": x, "lengths": lengths}, verbose=0)

    bins = int(model.input["features"].shape[-1])
    signature = [tf.TensorSpec((None, None, bins), tf.float32), tf.TensorSpec((None,), tf.int32)]
    compiled = tf.function(lambda x, lengths: model({"features": x, "lengths": lengths}, training=False),
                           input_signature=signature)
    a = plain_loop(paths, predict, "model.predict, batch 1", card)
    a_fn = plain_loop(paths, lambda x, n: compiled(x, n).numpy(), "compiled tf.function, batch 1", card)
    return a, a_fn


# ---- (b, c) the flow in this process ----------------------------------------------------------------

def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def run_transcribe(corpus: Path, out: Path, model_ref: str, work_dir: Path, **decoder) -> dict:
    """``run_inference("transcribe", ...)`` with 2 workers; the summary plus ``outer_wall_s`` and CPU use."""
    from audiopipe.flows.infer import run_inference
    from audiopipe.infra.settings import RunSettings

    settings = RunSettings(workers=2, work_dir=work_dir)
    with CpuMeter() as meter:
        summary = run_inference("transcribe", f"file://{corpus.resolve()}", f"file://{out.resolve()}", model_ref,
                                settings=settings, **decoder)
    summary.update(outer_wall_s=meter.wall_s, cpu=meter.to_dict(), settings=settings.model_dump(mode="json"))
    summary["audio_s"] = summary["audio_hours"] * 3600
    summary["steady_x_realtime"] = summary["audio_s"] / summary["processing_s"] if summary["processing_s"] else 0.0
    return summary


def flow_runs(corpus: Path, files: list[dict], model_ref: str, audio_s: float, problems: list[str]) -> dict:
    """(g) greedy (``--beam-width 1``) and (b) the default decoder (beam search with the model's LM), each
    twice, alternating, into fresh outputs (the faster of each pair is kept: other processes on a shared
    machine slow one run or the other); then (c) (b)'s command again, which must write nothing."""
    out, work = DATA / "inference-out", DATA / "inference-work"
    res = {"prefect_start_s": start_prefect()}
    runs: dict[str, list[dict]] = {"g": [], "b": []}
    for attempt in range(2):
        for key, decoder in (("g", {"beam_width": 1}), ("b", {})):
            target = out if key == "b" else DATA / "inference-out-greedy"
            shutil.rmtree(target, ignore_errors=True)
            runs[key].append(run_transcribe(corpus, target, model_ref, work, **decoder))
    res["g"] = max(runs["g"], key=lambda r: r["steady_x_realtime"])
    res["b"] = b = runs["b"][-1]  # its output is what (c) reruns over; rows show this run
    b["steady_x_realtime_runs"] = [r["steady_x_realtime"] for r in runs["b"]]
    res["g"]["steady_x_realtime_runs"] = [r["steady_x_realtime"] for r in runs["g"]]

    if b["recordings_ok"] != len(files) or b["recordings_rejected"]:
        problems.append(f"b: {b['recordings_ok']} ok, {b['recordings_rejected']} rejected of {len(files)} files")
    if abs(b["audio_s"] - audio_s) > AUDIO_TOLERANCE * audio_s:
        problems.append(f"b: transcribed {b['audio_s']:.1f} s of audio, the corpus has {audio_s:.1f} s")
    before = tree_state(out)
    res["c"] = c = run_transcribe(corpus, out, model_ref, work)
    after = tree_state(out)
    changed = sorted(set(before.items()) ^ set(after.items()))
    c["files_changed"] = len({path for path, _ in changed})
    if c["recordings_ok"] or c["recordings_skipped"] != c["recordings_listed"] or changed:
        problems.append(f"c: the rerun processed {c['recordings_ok']} recordings and changed "
                        f"{c['files_changed']} output files")
    return res


# ---- (p) one worker's view, in a subprocess with the worker environment on one CPU ------------------

def profile_in_worker_env(corpus: Path, model_ref: str) -> dict:
    """Run ``--profile-child`` with the environment a Dask nanny gives its workers; its JSON result."""
    from audiopipe.infra.runners import WORKER_ENVIRON

    env = {**os.environ, **{k: str(v) for k, v in WORKER_ENVIRON.items()}}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--profile-child", str(corpus),
                           "--model", model_ref], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"profile child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_items(corpus: Path, *, group_bytes: int, group_files: int, shards_by_size: bool = False) -> list:
    """Two shards' worth (2 x 64) of snippets grouped as ``plan_items`` groups them, plus one long-file chunk.

    ``plan_shards`` cuts shards in path order; ``shards_by_size`` cuts them from the size-sorted list
    instead, so each shard (and each item) holds recordings of similar length.
    """
    from audiopipe.tasks.extract import SourceFile
    from audiopipe.tasks.infer import InferItem
    from audiopipe.tasks.infer_run import CHUNK_WINDOWS

    files = json.loads((corpus / "corpus.json").read_text())["files"]
    shorts = [SourceFile("file://" + str(corpus / f["path"]), f["bytes"]) for f in files[len(LONG_PARTS):]][:128]
    if shards_by_size:
        shorts.sort(key=lambda f: f.size)
    items = []
    for shard in (shorts[:64], shorts[64:]):
        group: list = []
        for f in sorted(shard, key=lambda f: f.size):
            group.append(f)
            if sum(g.size for g in group) >= group_bytes or len(group) >= group_files:
                items.append(InferItem(tuple(group)))
                group = []
        if group:
            items.append(InferItem(tuple(group)))
    long_file = SourceFile("file://" + str(corpus / files[0]["path"]), files[0]["bytes"])
    return items + [InferItem((long_file,), 0, CHUNK_WINDOWS)]


def item_pass(items: list, spec, storage, calls: list, per_frame: dict, label: str, profiler=None) -> dict:
    """``infer_item`` over ``items`` (as a worker runs them); its timings, model batches and LSTM FLOP/s."""
    from audiopipe.tasks.infer import infer_item

    calls.clear()
    with CpuMeter() as meter:
        if profiler:
            profiler.enable()
        outputs = [o for item in items for o in infer_item(item, spec, storage)]
        if profiler:
            profiler.disable()
    timings: dict[str, float] = {}
    for o in outputs:
        for k, v in o.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    audio, valid = sum(o.audio_s for o in outputs), sum(v for _, _, v in calls)
    return {"label": label, "audio_s": audio, "x_realtime": audio / meter.wall_s, "timings": timings,
            "cpu": meter.to_dict(), "calls": len(calls), "mean_batch": sum(b for b, _, _ in calls) / len(calls),
            "padded_over_valid": sum(b * t for b, t, _ in calls) / valid,
            "lstm_flops": valid / 4 * per_frame["lstm"] / timings["model_s"]}


def batch_sweep(loaded, per_frame: dict) -> list[dict]:
    """The compiled model alone at batch sizes 1..32 on 12 s windows (and 3 s), front end timed apart."""
    import keras

    model = loaded.model
    frontend = keras.Model(model.inputs, model.get_layer("frontend_flatten").output)
    rows = []
    for batch, frames in ((1, 1201), (4, 1201), (16, 1201), (32, 1201), (16, 301)):
        x = np.random.default_rng(batch).standard_normal((batch, frames, 80)).astype(np.float32)
        n = np.full(batch, frames, np.int32)
        total = best_seconds(lambda: loaded.predict(x, n).numpy(), reps=3)
        front = best_seconds(lambda: frontend.predict_on_batch({"features": x, "lengths": n}), reps=3)
        lstm = batch * out_frames((frames - 1) * 160) * per_frame["lstm"]
        rows.append({"batch": batch, "frames": frames, "seconds": total, "frontend_s": front,
                     "x_realtime": batch * frames / 100 / total, "lstm_flops": lstm / total,
                     "lstm_flops_without_frontend": lstm / max(total - front, 1e-9)})
    return rows


def profile_child(corpus: Path, model_ref: str) -> None:
    """Body of ``--profile-child``: one worker's view of ``infer_item`` on one CPU; JSON on stdout's last line.

    Pinned to one CPU because that is what a worker gets when two share two cores; alone and unpinned,
    TensorFlow's inter-op pool (2 threads) runs the two LSTM directions side by side on ~1.5 cores.
    """
    import dataclasses

    from audiopipe.flows.infer import model_spec
    from audiopipe.infra.storage import StorageSpec
    from audiopipe.tasks.features import compute_features
    from audiopipe.tasks.infer import loaded_model, warm_model
    from audiopipe.tasks.infer_run import GROUP_BYTES, GROUP_FILES

    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    storage, per_frame = StorageSpec(), flops_per_output_frame(loaded_model_config(model_ref))
    spec = model_spec("transcribe", model_ref, storage, in_url=f"file://{corpus}", work_dir=DATA / "inference-work")
    res: dict = {"cpu": cpu, "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}}
    t0 = time.perf_counter()
    warm_model(spec, storage)  # what each worker runs at start-up (client.run)
    t1 = time.perf_counter()
    compute_features(np.zeros(RATE, np.float32), cfg=spec.features)
    t2 = time.perf_counter()
    loaded = loaded_model(spec, storage)
    predict = loaded.predict
    predict(np.zeros((1, 1001, 80), np.float32), np.array([1001], np.int32))
    res.update(warm_model_s=t1 - t0, first_features_s=t2 - t1, first_predict_s=time.perf_counter() - t2)
    calls: list[tuple[int, int, int]] = []

    def counting(x, lengths):
        calls.append((int(x.shape[0]), int(x.shape[1]), int(np.asarray(lengths).sum())))
        return predict(x, lengths)

    loaded.predict = counting
    profiler = cProfile.Profile()
    items = child_items(corpus, group_bytes=GROUP_BYTES, group_files=GROUP_FILES)
    proposed = child_items(corpus, group_bytes=PROPOSED_GROUP_BYTES, group_files=64, shards_by_size=True)
    whole = dataclasses.replace(spec, window_s=SHORT_S[1] + 1.0)
    res["passes"] = [item_pass(items, spec, storage, calls, per_frame, "warm-up"),
                     item_pass(items, spec, storage, calls, per_frame, "as the flow runs it (window 10 s, batch 16)"),
                     item_pass(items, whole, storage, calls, per_frame, f"window_s {whole.window_s:g}"),
                     item_pass(proposed, dataclasses.replace(whole, batch_size=32), storage, calls, per_frame,
                               f"window_s {whole.window_s:g}, batch 32, 16 MiB items, shards by size"),
                     item_pass(items, spec, storage, calls, per_frame, "as the flow runs it, under cProfile",
                               profiler)][1:]
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    res["profile_tottime"] = out.getvalue()[-5000:]
    loaded.predict = predict
    res["sweep"] = batch_sweep(loaded, per_frame)
    res["matmul_tf_1t"] = matmul_flops(numpy_threads=None, tf=True)
    res["matmul_numpy_1t"] = matmul_flops(numpy_threads=1, tf=False)
    print(json.dumps(res, default=str))


def loaded_model_config(model_ref: str) -> dict:
    """The ``CtcAsrConfig`` fields recorded on the model's card."""
    from audiopipe.models.registry import open_model_ref

    registry, ref = open_model_ref(model_ref)
    return dict(registry.get_card(ref).params["model_config"])


# ---- report -----------------------------------------------------------------------------------------

def machine_notes() -> dict:
    """Where the numbers come from: CPU, cores, memory, load, library versions, BLAS."""
    import dask
    import keras
    import prefect
    import tensorflow as tf
    from threadpoolctl import threadpool_info

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_model": model,
        "avx512": "avx512f" in flags, "amx": any(f.startswith("amx") for f in flags),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(), "numpy": np.__version__, "tensorflow": tf.__version__,
        "keras": keras.__version__, "dask": dask.__version__, "prefect": prefect.__version__,
        "blas": [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                 for i in threadpool_info()],
    }


def verdict(value: float, target: float, shown: str, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return f"{'met' if ok else 'MISSED'} ({shown})"


def derived(res: dict) -> dict:
    """FLOPs, FLOP/s and the ratios the targets are about."""
    per_frame, files = res["flops_per_output_frame"], res["corpus"]["files_list"]
    flow_frames = sum(flow_window_frames(int(round(f["seconds"] * RATE))) for f in files)
    a, b, p = res["a"], res["b"], res["p"]
    one_thread = max(p["matmul_tf_1t"], p["matmul_numpy_1t"])
    out = {"flow_output_frames": flow_frames, "flow_extra_context": flow_frames / a["output_frames"] - 1,
           "lstm_share": per_frame["lstm"] / per_frame["total"], "matmul_1t_reference": one_thread,
           "a_lstm_flops": a["output_frames"] * per_frame["lstm"] / a["timings"]["model_s"],
           "a_fn_lstm_flops": a["output_frames"] * per_frame["lstm"] / res["a_fn"]["timings"]["model_s"]}
    if "b" in res and b["timings"].get("model_s"):
        out["b_lstm_flops_per_worker"] = flow_frames * per_frame["lstm"] / b["timings"]["model_s"]
        out["b_lstm_vs_matmul_1t"] = out["b_lstm_flops_per_worker"] / one_thread
        out["b_vs_a"] = b["steady_x_realtime"] / a["x_realtime"]
        out["b_wall_vs_a"] = (b["audio_s"] / b["outer_wall_s"]) / a["x_realtime"]
        out["rerun_vs_b_wall"] = res["c"]["outer_wall_s"] / b["outer_wall_s"]
        out["b_untimed_worker_s"] = b["workers"] * b["processing_s"] - sum(b["timings"].values())
        out["b_vs_g"] = max(b.get("steady_x_realtime_runs", [b["steady_x_realtime"]])) / max(
            res["g"].get("steady_x_realtime_runs", [res["g"]["steady_x_realtime"]]))
        out["g_untimed_worker_s"] = res["g"]["workers"] * res["g"]["processing_s"] - sum(res["g"]["timings"].values())
    return out


def split(timings: dict, total: float) -> str:
    return ", ".join(f"{k.removesuffix('_s')} {v:.1f} s ({v / total:.0%})" for k, v in timings.items())


def cpu_note(cpu: dict) -> str:
    roles = ", ".join(f"{k} {v:.0f}" for k, v in cpu["cpu_s_by_role"].items() if v >= 0.5)
    return f"CPU-s: {roles}, other processes {cpu['other_cpu_s']:.0f}; load {cpu['load_start'][0]:.1f}"


def plain_rows(res: dict) -> list[tuple[str, str, str, str]]:
    m, a, d, g = res["matmul"], res["a"], res["derived"], 1e9
    rows = [("(m) float32 matmul 2048^2, numpy 1 thread / all threads",
             f"{m['numpy_1t'] / g:,.0f} / {m['numpy_all'] / g:,.0f} GFLOP/s",
             f"{m['numpy_all'] / m['numpy_1t']:.2f}x", ""),
            ("(m)   TensorFlow default threads / 1 thread (in (p), 1 CPU)",
             f"{m['tf_all'] / g:,.0f} / {res['p']['matmul_tf_1t'] / g:,.0f} GFLOP/s", "", "")]
    for key, run in (("a", a), ("a'", res["a_fn"])):
        rows += [(f"({key}) plain loop, {run['label']}", f"{run['x_realtime']:,.0f} x real time",
                  f"{run['cpu']['own_cores']:.2f} cores busy" + ("" if key == "a" else
                                                                f"; {run['x_realtime'] / a['x_realtime']:.2f}x (a)"),
                  cpu_note(run["cpu"])),
                 (f"({key})   where the time goes", split(run["timings"], run["cpu"]["wall_s"]), "", "")]
    rows.append(("(a)   LSTM FLOP/s in model.predict / in the tf.function (a')",
                 f"{d['a_lstm_flops'] / g:,.1f} / {d['a_fn_lstm_flops'] / g:,.1f} GFLOP/s",
                 f"{d['a_fn_lstm_flops'] / m['tf_all']:.0%} of TF all-threads matmul", ""))
    return rows


def flow_rows(res: dict) -> list[tuple[str, str, str, str]]:
    d, b, c, g, gr = res["derived"], res["b"], res["c"], 1e9, res["g"]
    return [
        ("Prefect API start (once per process)", f"{res['prefect_start_s']:.1f} s", "", ""),
        ("(g) transcribe --beam-width 1 (greedy), 2 workers: wall / start-up / processing",
         f"{gr['outer_wall_s']:.1f} / {gr['startup_s']:.1f} / {gr['processing_s']:.1f} s", "", cpu_note(gr["cpu"])),
        ("(g)   steady x real time (audio / processing)", f"{gr['steady_x_realtime']:,.0f}", "", ""),
        ("(g)   worker-seconds", split({**gr["timings"], "untimed_s": d["g_untimed_worker_s"]},
                                      gr["workers"] * gr["processing_s"]),
         f"of {gr['workers']} x {gr['processing_s']:.1f} s", ""),
        ("(b) transcribe (default: beam 8 + char LM), 2 workers: wall / start-up / processing",
         f"{b['outer_wall_s']:.1f} / {b['startup_s']:.1f} / {b['processing_s']:.1f} s", "", cpu_note(b["cpu"])),
        ("(b)   steady x real time (audio / processing)", f"{b['steady_x_realtime']:,.0f}", f"{d['b_vs_a']:.2f}x (a)",
         verdict(d["b_vs_a"], TARGETS["b_vs_a"], ">= 2.5x")),
        ("(b)   steady throughput, beam + LM vs greedy (g), faster of two runs each",
         f"{max(b['steady_x_realtime_runs']):,.0f} vs {max(gr['steady_x_realtime_runs']):,.0f} (runs: "
         f"{' / '.join(f'{x:,.0f}' for x in b['steady_x_realtime_runs'])} vs "
         f"{' / '.join(f'{x:,.0f}' for x in gr['steady_x_realtime_runs'])})", f"{d['b_vs_g']:.2f}x (g)",
         verdict(d["b_vs_g"], TARGETS["b_vs_g"], ">= 0.5x")),
        ("(b)   end-to-end x real time (audio / wall, start-up included)", f"{b['audio_s'] / b['outer_wall_s']:,.0f}",
         f"{d['b_wall_vs_a']:.2f}x (a)", ""),
        ("(b)   worker-seconds", split({**b["timings"], "untimed_s": d["b_untimed_worker_s"]},
                                      b["workers"] * b["processing_s"]),
         f"of {b['workers']} x {b['processing_s']:.1f} s", ""),
        ("(b)   LSTM FLOP/s per worker (LSTM FLOPs / model_s)", f"{d['b_lstm_flops_per_worker'] / g:,.1f} GFLOP/s",
         f"{d['b_lstm_vs_matmul_1t']:.0%} of 1-thread matmul",
         verdict(d["b_lstm_vs_matmul_1t"], TARGETS["lstm_vs_matmul_1t"], ">= 40%")),
        ("(b)   LSTM share of model FLOPs; frames heard vs (a)", f"{d['lstm_share']:.1%}",
         f"+{d['flow_extra_context']:.1%} (window context)", ""),
        ("(c) no-change rerun: wall / inside the flow", f"{c['outer_wall_s']:.2f} / {c['wall_s']:.2f} s",
         f"{d['rerun_vs_b_wall']:.1%} of (b)",
         verdict(d["rerun_vs_b_wall"], TARGETS["rerun_vs_b_wall"], "<= 5%", higher_is_better=False)),
        ("(c)   recordings processed / output files changed", f"{c['recordings_ok']} / {c['files_changed']}", "",
         "must be 0 / 0"),
    ]


def worker_rows(res: dict) -> list[tuple[str, str, str, str]]:
    p, ref, g = res["p"], res["derived"]["matmul_1t_reference"], 1e9
    rows = [("(p) one worker on 1 CPU: warm_model, then first compute_features / first predict",
             f"{p['warm_model_s']:.1f}, then {p['first_features_s']:.2f} / {p['first_predict_s']:.2f} s", "",
             "what warm_model leaves to the first item")]
    for run in p["passes"]:
        rows += [(f"(p)   infer_item, {run['label']}", f"{run['x_realtime']:,.0f} x real time",
                  f"LSTM {run['lstm_flops'] / g:,.0f} GFLOP/s ({run['lstm_flops'] / ref:.0%})",
                  f"batch {run['mean_batch']:.1f}, padded/valid {run['padded_over_valid']:.2f}"),
                 ("(p)     where the time goes", split(run["timings"], run["cpu"]["wall_s"]), "", "")]
    for s in p["sweep"]:
        rows.append((f"(p) model alone, batch {s['batch']} x {s['frames']} frames",
                     f"{s['x_realtime']:,.0f} x real time",
                     f"LSTM {s['lstm_flops'] / g:,.0f} GFLOP/s ({s['lstm_flops'] / ref:.0%})",
                     f"front end {s['frontend_s'] / s['seconds']:.0%} of the call"))
    return rows


def result_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """(measurement, result, ratio, target / note) for everything measured."""
    return plain_rows(res) + (flow_rows(res) if "b_vs_a" in res["derived"] else []) + worker_rows(res)


def print_report(res: dict) -> None:
    """The rich table, then a markdown block for docs/benchmarks.md."""
    from rich.console import Console
    from rich.table import Table

    mach, c = res["machine"], res["corpus"]
    title = (f"inference benchmark: {c['files']} files, {c['audio_s'] / 60:.1f} min of audio | "
             f"{mach['cpu_model']}, {mach['usable_cpus']} CPUs | load {mach['load_avg_at_start'][0]:.2f} "
             f"-> {mach['load_avg_at_end'][0]:.2f}")
    table = Table(title=title)
    for name in ("measurement", "result", "ratio", "target / note"):
        table.add_column(name)
    rows = result_rows(res)
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 180)).print(table)
    print("\nmarkdown for docs/benchmarks.md:\n")
    print(f"Corpus: {c['files']} files, {c['audio_s'] / 60:.1f} min of 16 kHz mono WAV ({c['short_files']} of "
          f"3-15 s, {c['long_files']} of {c['long_min_s'] / 60:.1f}-{c['long_max_s'] / 60:.1f} min). Machine: "
          f"{mach['cpu_model']}, {mach['usable_cpus']} CPUs, load average {mach['load_avg_at_start']} at start, "
          f"{mach['load_avg_at_end']} at end; {mach['date']}.\n")
    print("| measurement | result | ratio | target / note |\n|---|---:|---:|---|")
    print("\n".join(f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in rows))
    print("\ncProfile of (p), by own time:\n" + res["p"]["profile_tottime"])


# ---- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=90.0, help="audio in the corpus (default 90)")
    parser.add_argument("--keep", action="store_true", help="keep the registry and outputs under benchmarks/.data")
    parser.add_argument("--profile-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """(m), (a), (a'), then (b), (c) and (p): every side on the same files, one after another."""
    problems: list[str] = []
    res: dict = {"machine": machine_notes(), "args": {"minutes": args.minutes, "keep": args.keep},
                 "targets": TARGETS}
    corpus, files = ensure_corpus(args.minutes)
    shorts, longs = files[len(LONG_PARTS):], files[:len(LONG_PARTS)]
    res["corpus"] = {"path": str(corpus), "files": len(files), "audio_s": sum(f["seconds"] for f in files),
                     "short_files": len(shorts), "long_files": len(longs), "files_list": files,
                     "long_min_s": min(f["seconds"] for f in longs), "long_max_s": max(f["seconds"] for f in longs)}
    model_ref, model_cfg = register_model(corpus, files, DATA / "inference-registry")
    res["model_ref"], res["flops_per_output_frame"] = model_ref, flops_per_output_frame(model_cfg)
    res["matmul"] = {"numpy_1t": matmul_flops(numpy_threads=1, tf=False),
                     "numpy_all": matmul_flops(numpy_threads=None, tf=False),
                     "tf_all": matmul_flops(numpy_threads=None, tf=True)}
    print(f"[{datetime.now():%H:%M:%S}] (a) plain loops on {len(files)} files", flush=True)
    res["a"], res["a_fn"] = plain_loops([corpus / f["path"] for f in files], model_ref, DATA / "inference-work")
    print(f"[{datetime.now():%H:%M:%S}] (b, c) transcribe flow", flush=True)
    res.update(flow_runs(corpus, files, model_ref, res["corpus"]["audio_s"], problems))
    print(f"[{datetime.now():%H:%M:%S}] (p) worker-env profile", flush=True)
    res["p"] = profile_in_worker_env(corpus, model_ref)
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    res["derived"] = derived(res)
    res["problems"] = problems
    return res, problems


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or its profile subprocess); exit code 1 when a run did not do what it must."""
    args = parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    apply_prefect_defaults(DATA)  # before Prefect is imported: PREFECT_HOME under .data, telemetry off
    if args.profile_child:
        profile_child(args.profile_child, args.model)
        return 0
    res, problems = run_benchmark(args)
    RESULTS.write_text(json.dumps(res, indent=1, default=str))
    print_report(res)
    print(f"\nresults: {RESULTS}")
    if not args.keep:
        for path in ("inference-out", "inference-out-greedy", "inference-work", "inference-registry"):
            shutil.rmtree(DATA / path, ignore_errors=True)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
