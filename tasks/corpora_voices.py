"""Stage 0 (labelled corpora): the speech synthesizers' voices, speaking, and speech augmentation.

In: text over ``corpora_text.VOCAB``; the ``espeak-ng`` and ``flite`` executables (Debian packages).
Out: float32 mono samples at ``SAMPLE_RATE_HZ`` plus the parameters used, and augmented copies (additive
noise at an SNR, telephone band, reverb, 8-bit mu-law).

A voice is named ``"<engine>:<name>"``: ``"espeak-ng:en-us+f3"`` (accent + variant) or ``"flite:slt"``.
``HELD_OUT_VOICES`` are spoken only in the test split: two espeak-ng variants that no training voice uses
with any accent, and one flite voice, so evaluation hears timbres the model never heard.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
from scipy import signal

from audiopipe.tasks import synth

SAMPLE_RATE_HZ = 16_000
ESPEAK, FLITE = "espeak-ng", "flite"
HELD_OUT_VOICES: tuple[str, ...] = ("espeak-ng:en-us+f4", "espeak-ng:en-gb-scotland+m3", "flite:rms")
# Variants whose output is hard to transcribe even for a person (whispers, distortion, "fast_test").
EXCLUDED_ESPEAK_VARIANTS = frozenset({"Demonic", "fast", "whisper", "whisperf"})
EXCLUDED_FLITE_VOICES = frozenset({"awb_time"})  # a limited-domain voice that can only say the time
FLITE_F0_HZ = {"slt": (150.0, 220.0)}  # mean pitch range per flite voice; the others are male
MALE_F0_HZ = (85.0, 135.0)


def _held_out_variants() -> frozenset[str]:
    return frozenset(v.split("+", 1)[1] for v in HELD_OUT_VOICES if v.startswith(ESPEAK + ":") and "+" in v)


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{cmd[0]} executable not found on PATH; install the Debian package {cmd[0]!r} "
                           "(see scripts/bootstrap.sh)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed for {what}: {proc.stderr.strip()[:300]}")
    return proc


@functools.lru_cache(maxsize=1)
def espeak_variants() -> tuple[str, ...]:
    """espeak-ng voice variants (file names usable after ``+``), sorted, less ``EXCLUDED_ESPEAK_VARIANTS``."""
    out = _run([ESPEAK, "--voices=variant"], "--voices=variant").stdout.splitlines()[1:]
    names = {line.split()[4][3:] for line in out if len(line.split()) == 5 and line.split()[4].startswith("!v/")}
    return tuple(sorted(names - EXCLUDED_ESPEAK_VARIANTS))


@functools.lru_cache(maxsize=1)
def flite_voices() -> tuple[str, ...]:
    """flite's built-in voices (``flite -lv``), sorted, less ``EXCLUDED_FLITE_VOICES``."""
    listing = _run([FLITE, "-lv"], "-lv").stdout.split(":", 1)[-1].split()
    return tuple(sorted(set(listing) - EXCLUDED_FLITE_VOICES))


@functools.lru_cache(maxsize=1)
def all_voices() -> tuple[str, ...]:
    """Every voice, ``"<engine>:<name>"``: each English espeak-ng accent alone and with each variant
    (held-out variants only in ``HELD_OUT_VOICES``), then each flite voice."""
    held = _held_out_variants()
    accents = synth.espeak_voices()
    accents = [a for a in accents if "+" not in a]  # synth adds a few variants; combined below instead
    voices = [f"{ESPEAK}:{a}" for a in accents]
    voices += [f"{ESPEAK}:{a}+{v}" for a in accents for v in espeak_variants() if v not in held]
    voices += [f"{FLITE}:{v}" for v in flite_voices()]
    return tuple(sorted(set(voices) | set(HELD_OUT_VOICES)))


def training_voices(engine: str) -> tuple[str, ...]:
    """Voices of ``engine`` allowed in the train and val splits (everything but ``HELD_OUT_VOICES``)."""
    return tuple(v for v in all_voices() if v.startswith(engine + ":") and v not in HELD_OUT_VOICES)


def _flite(text: str, voice: str, *, stretch: float, f0_hz: float) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory(prefix="audiopipe-flite-") as tmp:
        wav = Path(tmp) / "out.wav"
        _run([FLITE, "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}",
              "--setf", f"int_f0_target_mean={f0_hz:.1f}", "-t", text, "-o", str(wav)], f"voice {voice!r}")
        data, sr = sf.read(wav, dtype="float32", always_2d=True)
    if data.size == 0:
        raise RuntimeError(f"flite produced no audio for voice {voice!r}")
    return data.mean(axis=1), int(sr)


def speak_voice(text: str, voice: str, *, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Say ``text`` with ``voice`` at a random rate and pitch, resampled to ``SAMPLE_RATE_HZ``.

    espeak-ng speaks at 130-200 words per minute and pitch 30-70 (its 0-99 scale); flite at a duration
    stretch of 0.8-1.25 and a mean pitch drawn per voice (``FLITE_F0_HZ``).

    Args:
        text: Transcript over ``VOCAB``.
        voice: ``"espeak-ng:<accent>[+<variant>]"`` or ``"flite:<name>"``.
        rng: The only source of randomness.

    Returns:
        ``(samples, params)``: float32 mono at 16 kHz peaking at 0.9, and the engine parameters used.

    Raises:
        ValueError: for an unknown engine. RuntimeError: when the synthesizer is missing or fails.
    """
    engine, name = voice.split(":", 1)
    if engine == ESPEAK:
        params = {"speed_wpm": int(rng.integers(130, 201)), "pitch": int(rng.integers(30, 71))}
        x, sr = synth.speak(text, voice=name, speed_wpm=params["speed_wpm"], pitch=params["pitch"])
    elif engine == FLITE:
        lo, hi = FLITE_F0_HZ.get(name, MALE_F0_HZ)
        params = {"stretch": round(float(rng.uniform(0.8, 1.25)), 3), "f0_hz": round(float(rng.uniform(lo, hi)), 1)}
        x, sr = _flite(text, name, stretch=params["stretch"], f0_hz=params["f0_hz"])
    else:
        raise ValueError(f"unknown speech engine {engine!r} in voice {voice!r}; use {ESPEAK} or {FLITE}")
    y = soxr.resample(x, sr, SAMPLE_RATE_HZ) if sr != SAMPLE_RATE_HZ else x
    peak = float(np.max(np.abs(y))) or 1.0
    return (0.9 * y / peak).astype(np.float32), params


def power(x: np.ndarray) -> float:
    """Mean square of ``x`` (linear power, full scale sine = 0.5)."""
    return float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0


def scale_to_snr(reference: np.ndarray, other: np.ndarray, snr_db: float) -> np.ndarray:
    """``other`` scaled so that ``10*log10(power(reference) / power(result)) == snr_db`` (dB).

    Raises:
        ValueError: when either signal is silent, so no SNR is defined.
    """
    p_ref, p_other = power(reference), power(other)
    if p_ref <= 0 or p_other <= 0:
        raise ValueError("cannot set an SNR against a silent signal")
    gain = np.sqrt(p_ref / (p_other * 10.0 ** (snr_db / 10.0)))
    return (other * gain).astype(np.float32)


def add_noise(x: np.ndarray, *, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus coloured noise (``"white"``, ``"pink"``, ``"brown"``) at ``snr_db`` dB below it."""
    n = synth.noise(x.size / SAMPLE_RATE_HZ, SAMPLE_RATE_HZ, color=color, rng=rng)[: x.size]
    n = np.pad(n, (0, x.size - n.size))
    return (x + scale_to_snr(x, n, snr_db)).astype(np.float32)


def telephone(x: np.ndarray) -> np.ndarray:
    """Telephone channel: band-pass 300-3400 Hz (4th-order Butterworth), down to 8 kHz and back to 16 kHz."""
    sos = signal.butter(4, (300.0, 3400.0), btype="bandpass", fs=SAMPLE_RATE_HZ, output="sos")
    narrow = soxr.resample(signal.sosfilt(sos, x).astype(np.float32), SAMPLE_RATE_HZ, 8000)
    y = soxr.resample(narrow, 8000, SAMPLE_RATE_HZ)
    return np.pad(y, (0, max(0, x.size - y.size)))[: x.size].astype(np.float32)


def reverb(x: np.ndarray, *, rt60_s: float, wet: float, rng: np.random.Generator) -> np.ndarray:
    """Room reverb: convolution with a synthetic impulse response (direct path plus exponentially decaying
    noise reaching -60 dB after ``rt60_s`` seconds), ``wet`` of the tail's energy mixed in; same length
    and RMS as ``x``."""
    t = np.arange(int(rt60_s * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    tail = rng.standard_normal(t.size) * np.exp(-6.9078 * t / rt60_s)  # ln(1000): -60 dB at rt60
    tail *= np.sqrt(wet / max(np.sum(tail**2), 1e-12))
    ir = np.concatenate([[1.0], tail])
    y = signal.fftconvolve(x, ir)[: x.size]
    return (y * np.sqrt(power(x) / max(power(y), 1e-20))).astype(np.float32)


def mulaw(x: np.ndarray, *, bits: int = 8) -> np.ndarray:
    """Codec-like distortion: mu-law companding (mu = 2**bits - 1), quantised to ``bits`` bits, expanded."""
    mu = float(2**bits - 1)
    compressed = np.sign(x) * np.log1p(mu * np.minimum(np.abs(x), 1.0)) / np.log1p(mu)
    quantised = np.round((compressed + 1.0) / 2.0 * mu) / mu * 2.0 - 1.0
    return (np.sign(quantised) * np.expm1(np.abs(quantised) * np.log1p(mu)) / mu).astype(np.float32)


def augment_speech(x: np.ndarray, *, rng: np.random.Generator, clean_fraction: float = 0.3
                   ) -> tuple[np.ndarray, list[str], float | None, dict[str, Any]]:
    """Randomly degrade an utterance: reverb (p=0.35), telephone (p=0.25), mu-law (p=0.15), then noise
    at 5-30 dB SNR (p=0.6), in that order; ``clean_fraction`` of utterances are left as they are.

    Returns:
        ``(samples, applied, snr_db, params)``: float32 peaking at most 0.95, the names applied in order
        (subset of reverb/telephone/mulaw/noise), the SNR in dB when noise was added, and their parameters.
    """
    applied: list[str] = []
    params: dict[str, Any] = {}
    snr_db: float | None = None
    if rng.random() < clean_fraction:
        return x, applied, snr_db, params
    y = x
    if rng.random() < 0.35:
        params |= {"rt60_s": round(float(rng.uniform(0.15, 0.7)), 3), "wet": round(float(rng.uniform(0.2, 0.8)), 3)}
        y, applied = reverb(y, rt60_s=params["rt60_s"], wet=params["wet"], rng=rng), applied + ["reverb"]
    if rng.random() < 0.25:
        y, applied = telephone(y), applied + ["telephone"]
    if rng.random() < 0.15:
        y, applied = mulaw(y), applied + ["mulaw"]
    if rng.random() < 0.6:
        snr_db, params["noise"] = round(float(rng.uniform(5.0, 30.0)), 2), str(rng.choice(["white", "pink", "brown"]))
        y, applied = add_noise(y, snr_db=snr_db, color=params["noise"], rng=rng), applied + ["noise"]
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    return (y * (0.95 / peak) if peak > 0.95 else y).astype(np.float32), applied, snr_db, params
