"""Decode speed of the PyAV formats against FLAC of the same audio, and memory while streaming a long M4A.

    .venv/bin/python benchmarks/decode_formats.py --speed-minutes 5 --memory-minutes 20 --work /tmp/decbench

Speed: the same tones-plus-noise signal (44.1 kHz stereo; 48 kHz for WebM/Opus) as FLAC (libsndfile) and as M4A/AAC, WebM/Opus and
WMA (PyAV), each read through ``audio_io`` exactly as featurize reads it: probe, then 30 s segments mixed
down and resampled to 16 kHz (features are left out: they cost the same for every format). Memory: a
20-minute 16 kHz M4A streamed through the range reader (``open_source(stream=True)``) in a fresh process;
its peak RSS growth and tracemalloc peak are printed beside the size of the whole decoded signal.
Encoded files are cached in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import soundfile as sf

from audiopipe.tasks.audio_encode import write_encoded
from audiopipe.tasks.audio_io import iter_segments, open_source, probe

SEGMENT_S, TARGET_RATE = 30.0, 16000


def _blocks(sr: int, minutes: float, channels: int):
    """Tones plus noise, one minute per block (never the whole signal in memory)."""
    rng = np.random.default_rng(0)
    for k in range(int(minutes)):
        t = np.arange(60 * sr) / sr
        cols = [0.25 * np.sin(2 * np.pi * (220.0 + 40 * k + 110 * c) * t) + 0.05 * rng.standard_normal(t.size)
                for c in range(channels)]
        yield np.stack(cols, axis=1).astype(np.float32)


def _write(path: Path, fmt: str, sr: int, minutes: float, channels: int) -> Path:
    if path.exists():
        return path
    tmp = path.with_suffix(".part")
    if fmt == "flac":
        with sf.SoundFile(tmp, "w", samplerate=sr, channels=channels, format="FLAC", subtype="PCM_16") as f:
            for block in _blocks(sr, minutes, channels):
                f.write(block)
    else:
        with open(tmp, "wb") as fh:
            write_encoded(fh, _blocks(sr, minutes, channels), sr, fmt, bit_rate=128_000)
    tmp.rename(path)
    return path


def _read_all(path: Path) -> tuple[float, float]:
    """Seconds to probe and decode the file into 16 kHz mono segments; audio seconds read."""
    fs = fsspec.filesystem("file")
    started = time.perf_counter()
    handle = open_source(fs, str(path), path.stat().st_size, stream=True)
    snd, info = probe(handle, path.stat().st_size)
    audio_s = sum(d for _, _, d, _ in iter_segments(handle, snd, info, segment_seconds=SEGMENT_S,
                                                    target_rate=TARGET_RATE))
    snd.close()
    handle.close()
    return time.perf_counter() - started, audio_s


def speed(work: Path, minutes: float) -> dict:
    rates = {"flac": 44100, "m4a": 44100, "webm": 48000, "wma": 44100}  # Opus encodes at 48 kHz, not 44.1
    files = {fmt: _write(work / f"speed_{minutes:g}min.{fmt}", fmt, sr, minutes, 2) for fmt, sr in rates.items()}
    rows = {}
    for fmt, path in files.items():
        seconds, audio_s = min(_read_all(path) for _ in range(2))  # best of two: this machine is shared
        rows[fmt] = {"seconds": round(seconds, 2), "x_real_time": round(audio_s / seconds),
                     "mb": round(path.stat().st_size / 1e6, 1)}
    for fmt in rows:
        rows[fmt]["vs_flac"] = round(rows[fmt]["seconds"] / rows["flac"]["seconds"], 2)
    return rows


def memory(path: Path) -> dict:
    """Run in a fresh process: peak RSS growth and tracemalloc peak while streaming ``path``."""
    fs = fsspec.filesystem("file")
    handle = open_source(fs, str(path), path.stat().st_size, stream=True)
    snd, info = probe(handle, path.stat().st_size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    segments = sum(1 for _ in iter_segments(handle, snd, info, segment_seconds=SEGMENT_S, target_rate=TARGET_RATE))
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    snd.close()
    handle.close()
    return {"file_mb": round(path.stat().st_size / 1e6, 1), "duration_s": round(info.duration_s, 1),
            "segments": segments, "whole_decode_mb": round(info.frames * info.channels * 4 / 1e6, 1),
            "tracemalloc_peak_mb": round(traced_peak / 1e6, 1),
            "peak_rss_growth_mb": round((rss_after - rss_before) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-minutes", type=float, default=5.0)
    parser.add_argument("--memory-minutes", type=float, default=20.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/audiopipe-decode-bench"))
    parser.add_argument("--memory-of", type=Path, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory(args.memory_of)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    long_m4a = _write(args.work / f"memory_{args.memory_minutes:g}min.m4a", "m4a", 16000, args.memory_minutes, 1)
    child = subprocess.run([sys.executable, __file__, "--memory-of", str(long_m4a)], check=True,
                           capture_output=True, text=True)
    result = {"speed": speed(args.work, args.speed_minutes), "memory": json.loads(child.stdout.splitlines()[-1])}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
