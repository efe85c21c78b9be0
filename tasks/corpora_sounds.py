"""Stage 0 (labelled corpora): synthetic sound classes and speech/background mixtures.

In: a clip duration, a random generator and, for the ``speech`` class, an utterance made by
``corpora_voices``. Out: float32 mono samples at 16 kHz. ``SOUND_CLASSES`` maps each class name to its
generator; every generator draws all its parameters (pitch, rate, colour, level) from the generator it is
given, so a class is a family of sounds, not one sound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import signal

from audiopipe.tasks import synth
from audiopipe.tasks.augment import scale_to_snr
from audiopipe.tasks.corpora_voices import SAMPLE_RATE_HZ

SR = SAMPLE_RATE_HZ
SoundFn = Callable[[float, np.random.Generator], tuple[np.ndarray, dict[str, Any]]]


def _n(duration_s: float) -> int:
    return int(round(duration_s * SR))


def _normalise(x: np.ndarray, peak: float) -> np.ndarray:
    top = float(np.max(np.abs(x))) if x.size else 0.0
    return (x * (peak / top) if top > 0 else x).astype(np.float32)


def _bandpass(x: np.ndarray, lo_hz: float, hi_hz: float, order: int = 2) -> np.ndarray:
    sos = signal.butter(order, (lo_hz, hi_hz), btype="bandpass", fs=SR, output="sos")
    return signal.sosfilt(sos, x)


def _note(freq_hz: float, duration_s: float, brightness: float) -> np.ndarray:
    """One note with harmonics (amplitudes ``brightness**k``) and an attack/decay envelope."""
    t = np.arange(_n(duration_s)) / SR
    harmonics = [k for k in range(1, 6) if k * freq_hz < SR / 2]
    wave = sum(brightness ** (k - 1) * np.sin(2 * np.pi * k * freq_hz * t) for k in harmonics)
    env = np.minimum(1.0, t / 0.01) * np.exp(-t * 3.0 / max(duration_s, 1e-3))
    return (wave * env).astype(np.float32)


def music_clip(duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A melody on a random pentatonic scale at 70-170 bpm over a sustained triad (half the time)."""
    root = 110.0 * 2 ** (int(rng.integers(0, 24)) / 12)
    steps = (0, 2, 4, 7, 9) if rng.random() < 0.5 else (0, 3, 5, 7, 10)
    bpm, brightness = float(rng.uniform(70, 170)), float(rng.uniform(0.2, 0.7))
    x, pos = np.zeros(_n(duration_s), np.float32), 0
    while pos < x.size:
        beats = float(rng.choice([0.5, 1.0, 1.0, 2.0]))
        semis = steps[int(rng.integers(0, 5))] + 12 * int(rng.integers(1, 3))
        note = _note(root * 2 ** (semis / 12), beats * 60.0 / bpm, brightness)[: x.size - pos]
        x[pos : pos + note.size] += note
        pos += note.size
    if rng.random() < 0.5:
        chord = (0, 4, 7) if steps[1] == 2 else (0, 3, 7)
        x += 0.3 * sum(synth.tone(root * 2 ** (s / 12), duration_s, SR, amplitude=1.0)[: x.size] for s in chord) / 3
    return x, {"root_hz": round(root, 2), "bpm": round(bpm, 1), "scale": "major" if steps[1] == 2 else "minor"}


def noise_clip(duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """White, pink or brown noise."""
    color = str(rng.choice(["white", "pink", "brown"]))
    return synth.noise(duration_s, SR, color=color, rng=rng), {"color": color}


def alarm_clip(duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Either periodic beeps (600-2500 Hz, 0.05-0.4 s on, 0.05-0.3 s off) or a siren sweeping between two
    pitches at 0.3-3 Hz."""
    t = np.arange(_n(duration_s)) / SR
    if rng.random() < 0.5:
        f, on_s, off_s = float(rng.uniform(600, 2500)), float(rng.uniform(0.05, 0.4)), float(rng.uniform(0.05, 0.3))
        gate = (t % (on_s + off_s)) < on_s
        x = np.sin(2 * np.pi * f * t) * gate
        return x.astype(np.float32), {"style": "beeps", "freq_hz": round(f, 1), "on_s": round(on_s, 3),
                                      "off_s": round(off_s, 3)}
    lo, rate = float(rng.uniform(400, 900)), float(rng.uniform(0.3, 3.0))
    hi = lo * float(rng.uniform(1.3, 2.2))
    freq = lo + (hi - lo) * 0.5 * (1 - np.cos(2 * np.pi * rate * t))
    phase = 2 * np.pi * np.cumsum(freq) / SR
    x = np.sin(phase) + 0.3 * np.sin(2 * phase)
    return x.astype(np.float32), {"style": "siren", "lo_hz": round(lo, 1), "hi_hz": round(hi, 1),
                                  "rate_hz": round(rate, 2)}


def silence_clip(duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Near silence: white or pink noise peaking at -80..-60 dBFS."""
    level_db = float(rng.uniform(-80, -60))
    color = str(rng.choice(["white", "pink"]))
    return synth.noise(duration_s, SR, color=color, rng=rng, amplitude=10 ** (level_db / 20)), {
        "color": color, "peak_dbfs": round(level_db, 1)}


def rain_clip(duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Rain: a high-passed noise bed plus 50-400 droplets per second, each a 2-8 ms band-passed burst."""
    n, rate = _n(duration_s), float(rng.uniform(50, 400))
    bed = _bandpass(rng.standard_normal(n), 1500, 7000) * float(rng.uniform(0.05, 0.3))
    decay_ms, splash = float(rng.uniform(2, 8)), np.zeros(n)
    for _ in range(4):  # several droplet shapes, or one fixed burst spectrum shows as tonal lines
        drops = np.zeros(n)
        starts = rng.integers(0, max(1, n - 200), max(1, int(rate * duration_s / 4)))
        drops[starts] = rng.uniform(0.2, 1.0, starts.size)
        burst = rng.standard_normal(_n(0.03)) * np.exp(-np.arange(_n(0.03)) / (decay_ms * SR / 1000))
        splash += signal.fftconvolve(drops, burst)[:n]
    x = bed + _bandpass(splash, 800, 6000)
    return x.astype(np.float32), {"drops_per_s": round(rate, 1), "decay_ms": round(decay_ms, 2)}


def engine_clip(duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Engine hum: a 25-70 Hz fundamental with 1/k harmonics up to 1.2 kHz, amplitude-modulated at
    2-12 Hz (depth 0.2-0.6), over low-passed rumble."""
    t = np.arange(_n(duration_s)) / SR
    f0, am_hz, depth = float(rng.uniform(25, 70)), float(rng.uniform(2, 12)), float(rng.uniform(0.2, 0.6))
    drift = 1 + 0.03 * np.sin(2 * np.pi * float(rng.uniform(0.1, 0.5)) * t)
    phase = 2 * np.pi * np.cumsum(f0 * drift) / SR
    hum = sum(np.sin(k * phase + float(rng.uniform(0, 6.28))) / k for k in range(1, int(1200 / f0) + 1))
    rumble = signal.sosfilt(signal.butter(2, 300, fs=SR, output="sos"), rng.standard_normal(t.size))
    x = hum * (1 - depth + depth * np.sin(2 * np.pi * am_hz * t)) + 3.0 * rumble
    return x.astype(np.float32), {"f0_hz": round(f0, 1), "am_hz": round(am_hz, 2), "depth": round(depth, 2)}


def clapping_clip(duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Clapping by 1-6 people, each 2-7 claps per second with timing jitter; a clap is a 10-40 ms
    exponentially decaying noise burst band-passed around 1-2.5 kHz."""
    n, people = _n(duration_s), int(rng.integers(1, 7))
    x = np.zeros(n)
    for _ in range(people):
        rate = float(rng.uniform(2, 7))
        times = np.arange(float(rng.uniform(0, 1 / rate)), duration_s, 1 / rate)
        times = times + rng.normal(0, 0.1 / rate, times.size)
        centre, decay_s = float(rng.uniform(1000, 2500)), float(rng.uniform(0.01, 0.04))
        burst = rng.standard_normal(_n(4 * decay_s)) * np.exp(-np.arange(_n(4 * decay_s)) / (decay_s * SR))
        burst = _bandpass(burst, centre / 2, min(centre * 2, SR / 2 - 100))
        for start in (times[(times >= 0) & (times < duration_s)] * SR).astype(int):
            piece = burst[: n - start] * float(rng.uniform(0.5, 1.0))
            x[start : start + piece.size] += piece
    return x.astype(np.float32), {"people": people}


def fit_length(x: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` cut at a random offset, or zero-padded at a random offset, to exactly ``num_samples``."""
    if x.size >= num_samples:
        start = int(rng.integers(0, x.size - num_samples + 1))
        return x[start : start + num_samples]
    before = int(rng.integers(0, num_samples - x.size + 1))
    return np.pad(x, (before, num_samples - x.size - before))


def sound_clip(name: str, duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A clip of class ``name`` from ``SOUND_CLASSES`` (not ``speech``, which needs a synthesizer): float32
    of ``round(duration_s * 16000)`` samples, peak 0.1-0.9 (silence keeps its own tiny level).

    Raises:
        ValueError: for a name without a generator.
    """
    fn = SOUND_CLASSES.get(name)
    if fn is None:
        raise ValueError(f"no generator for sound class {name!r}; known: {sorted(SOUND_CLASSES)}")
    x, params = fn(duration_s, rng)
    x = fit_length(np.nan_to_num(x), _n(duration_s), rng)
    if name == "silence":
        return x.astype(np.float32), params
    peak = float(rng.uniform(0.1, 0.9))
    return _normalise(x, peak), params | {"peak": round(peak, 3)}


def mix_at_snr(speech: np.ndarray, background: np.ndarray, snr_db: float, *, peak: float = 0.9
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mix two equal-length signals so that speech is ``snr_db`` dB above the background.

    Both stems are scaled by one gain so the mixture peaks at ``peak``; the SNR and the identity
    ``mixture == speech_stem + background_stem`` are kept exactly (before quantisation to a file).

    Returns:
        ``(mixture, speech_stem, background_stem)``, float32, same length.

    Raises:
        ValueError: when the lengths differ or a signal is silent.
    """
    if speech.shape != background.shape:
        raise ValueError(f"stems differ in length: {speech.shape} vs {background.shape}")
    bg = scale_to_snr(speech, background, snr_db).astype(np.float64)
    sp = speech.astype(np.float64)
    gain = peak / max(float(np.max(np.abs(sp + bg))), 1e-12)
    sp, bg = (sp * gain).astype(np.float32), (bg * gain).astype(np.float32)
    return (sp + bg).astype(np.float32), sp, bg


# Explicit registry (no name-built dispatch); "speech" is produced by corpora.write_sounds with a voice.
SOUND_CLASSES: dict[str, SoundFn] = {
    "music": music_clip,
    "noise": noise_clip,
    "alarm": alarm_clip,
    "silence": silence_clip,
    "rain": rain_clip,
    "engine": engine_clip,
    "clapping": clapping_clip,
}
