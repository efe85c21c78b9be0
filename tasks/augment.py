"""Stage 0 (labelled corpora): speaker, room and channel variety for synthesized speech.

In: float32 mono samples at 16 kHz (an utterance), a generator, and for babble a bank of other speech.
Out: the degraded samples, the names of the degradations applied in order, the SNR when noise or babble
was added, and every parameter drawn (recorded per utterance in the labels, so evaluation can report each
degradation on its own).

What each does, as mature ASR recipes (Kaldi, ESPnet, NeMo) make it, with its probability per utterance in
``AUGMENT_PROBABILITIES`` (documented in docs/corpora.md):
- ``speed``: 0.9 or 1.1 (Kaldi's speed perturbation: tempo and pitch together, by resampling);
- ``pitch``: -3..+3 semitones at the same tempo (sox ``pitch``, WSOLA);
- ``vtlp``: vocal-tract-length perturbation, spectrum warped by 0.88..1.12 below 4.8 kHz (Jaitly & Hinton);
- ``reverb``: a room impulse response from ``rir_bank`` (image-source rooms, RT60 0.15-0.9 s);
- ``babble``: 3-6 other talkers at 0-30 dB SNR; ``noise``: white, pink or brown noise at 0-30 dB SNR;
- ``telephone``: 300-3400 Hz band, 8 kHz, one codec (linear, mu-law, A-law or GSM 06.10 through sox),
  20 ms packets dropped at 1-5% in a third of calls;
- ``gain``: level change -25..+6 dB; ``clip``: hard clipping at 0.3-0.7 of the peak.
Every utterance then gets a noise floor 65-85 dB below full scale: digital silence (exact zeros) never
occurs in real recordings and made a second "silence" cluster in the log-mel statistics.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any

import numpy as np
import soxr
from scipy import signal

SAMPLE_RATE_HZ = 16_000
TELEPHONE_HZ = 8_000
AUGMENT_PROBABILITIES: dict[str, float] = {
    "speed": 0.5, "pitch": 0.25, "vtlp": 0.3, "reverb": 0.3, "babble": 0.15, "noise": 0.35,
    "telephone": 0.25, "gain": 0.4, "clip": 0.08,
}
CLEAN_FRACTION = 0.2  # utterances left as synthesized (noise floor only)
SNR_RANGE_DB = (0.0, 30.0)
CODECS = ("linear", "mulaw", "alaw", "gsm")
PACKET_S = 0.02
_SOX_CODEC = {"mulaw": ["-t", "ul"], "alaw": ["-t", "al"], "gsm": ["-t", "gsm"]}


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
    return (other * np.sqrt(p_ref / (p_other * 10.0 ** (snr_db / 10.0)))).astype(np.float32)


def colored_noise(num_samples: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS ``"white"``, ``"pink"`` (1/f) or ``"brown"`` (1/f^2) noise, ``num_samples`` long.

    Raises:
        ValueError: for another colour.
    """
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}.get(color)
    if exponent is None:
        raise ValueError(f"unknown noise colour {color!r}; use white, pink or brown")
    spectrum = np.fft.rfft(rng.standard_normal(max(num_samples, 2)))
    spectrum /= np.maximum(np.arange(spectrum.size), 1) ** exponent
    n = np.fft.irfft(spectrum, max(num_samples, 2))[:num_samples]
    return (n / max(np.sqrt(np.mean(n**2)), 1e-12)).astype(np.float32)


def add_noise(x: np.ndarray, *, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus coloured noise (``"white"``, ``"pink"``, ``"brown"``) at ``snr_db`` dB below it."""
    return (x + scale_to_snr(x, colored_noise(x.size, color, rng), snr_db)).astype(np.float32)


def add_babble(x: np.ndarray, bank: tuple[np.ndarray, ...], *, talkers: int, snr_db: float,
               rng: np.random.Generator) -> np.ndarray:
    """``x`` plus ``talkers`` other utterances from ``bank`` (looped, random offsets) at ``snr_db`` dB.

    Raises:
        ValueError: when the bank is empty.
    """
    if not bank:
        raise ValueError("babble needs a non-empty bank of speech")
    babble = np.zeros(x.size, np.float32)
    for k in rng.choice(len(bank), size=talkers, replace=talkers > len(bank)):
        talker = np.tile(bank[k], x.size // bank[k].size + 2)
        start = int(rng.integers(bank[k].size))
        babble += talker[start:start + x.size] / max(np.sqrt(power(bank[k])), 1e-9)
    return (x + scale_to_snr(x, babble, snr_db)).astype(np.float32)


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Kaldi-style speed perturbation: ``factor`` times faster and higher (resampled, played at 16 kHz)."""
    return soxr.resample(x, SAMPLE_RATE_HZ * factor, SAMPLE_RATE_HZ).astype(np.float32)


def _sox(x: np.ndarray, sr: int, effects: list[str]) -> np.ndarray:
    """``x`` (float32 at ``sr``) through sox ``effects``, raw float32 in and out through pipes."""
    if shutil.which("sox") is None:
        raise RuntimeError("sox not found on PATH; install the Debian package 'sox' (see scripts/bootstrap.sh)")
    raw = ["-t", "f32", "-r", str(sr), "-c", "1"]
    proc = subprocess.run(["sox", "-q", "-V1", *raw, "-", *raw, "-", *effects], input=x.astype(np.float32).tobytes(),
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sox {' '.join(effects)} failed: {proc.stderr.decode(errors='replace')[:300]}")
    return np.frombuffer(proc.stdout, np.float32).copy()


def pitch_shift(x: np.ndarray, semitones: float) -> np.ndarray:
    """``x`` shifted by ``semitones`` at the same tempo (sox ``pitch``), same length."""
    y = _sox(x, SAMPLE_RATE_HZ, ["pitch", f"{100 * semitones:.0f}"])
    return np.pad(y, (0, max(0, x.size - y.size)))[: x.size]


def vtlp(x: np.ndarray, alpha: float, *, boundary_hz: float = 4800.0) -> np.ndarray:
    """Vocal-tract-length perturbation: frequency ``f`` moves to ``alpha * f`` below ``boundary_hz`` and
    linearly to Nyquist above it (Jaitly & Hinton 2013), on the STFT: magnitudes are read from the source
    frequency, and the phase advances at the warped instantaneous frequency (a phase vocoder; keeping the
    old phase would pull the energy back to where it was), same length."""
    nperseg, hop = 512, 128
    nyquist = SAMPLE_RATE_HZ / 2
    _, _, spec = signal.stft(x, SAMPLE_RATE_HZ, nperseg=nperseg, noverlap=nperseg - hop)
    freqs = np.linspace(0.0, nyquist, spec.shape[0])
    knee = boundary_hz * min(alpha, 1.0) / alpha
    warped = np.where(freqs <= knee, freqs * alpha,
                      nyquist - (nyquist - knee * alpha) * (nyquist - freqs) / (nyquist - knee))
    source = np.interp(freqs, warped, freqs)  # the output bin at frequency g reads the input at warp^-1(g)
    src_bin = np.clip(np.rint(source / freqs[1]).astype(int), 0, freqs.size - 1)
    mags = np.stack([np.interp(source, freqs, col) for col in np.abs(spec).T], axis=1)
    expected = 2 * np.pi * np.arange(freqs.size) * hop / nperseg  # phase advance per hop of each bin centre
    phase = np.angle(spec)
    deviation = np.diff(phase, axis=1, prepend=phase[:, :1]) - expected[:, None]
    advance = expected[:, None] + (deviation + np.pi) % (2 * np.pi) - np.pi  # true advance per hop
    ratio = np.divide(freqs, source, out=np.ones_like(freqs), where=source > 0)
    new_phase = phase[src_bin, :1] + np.cumsum(advance[src_bin] * ratio[:, None], axis=1)
    _, y = signal.istft(mags * np.exp(1j * new_phase), SAMPLE_RATE_HZ, nperseg=nperseg, noverlap=nperseg - hop)
    return np.pad(y, (0, max(0, x.size - y.size)))[: x.size].astype(np.float32)


@functools.lru_cache(maxsize=2)
def rir_bank(seed: int = 0, count: int = 24) -> tuple[np.ndarray, ...]:
    """``count`` room impulse responses at 16 kHz, fixed by ``seed``: shoebox rooms 3x3x2.4-10x8x4 m with
    RT60 0.15-0.9 s, by pyroomacoustics' image-source method (with random jitter, so no flutter) when it
    is installed (the ``train`` extra), else exponentially decaying noise with a direct path."""
    rng = np.random.default_rng([seed, 0xA1])
    out = []
    for _ in range(count):
        dims, rt60 = rng.uniform((3.0, 3.0, 2.4), (10.0, 8.0, 4.0)), float(rng.uniform(0.15, 0.9))
        try:
            import pyroomacoustics as pra
        except ImportError:
            t = np.arange(int(rt60 * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
            tail = rng.standard_normal(t.size) * np.exp(-6.9078 * t / rt60) * 0.3  # ln(1000): -60 dB at rt60
            out.append(np.concatenate([[1.0], tail]).astype(np.float32))
            continue
        absorption, max_order = pra.inverse_sabine(rt60, dims)
        room = pra.ShoeBox(dims, fs=SAMPLE_RATE_HZ, materials=pra.Material(absorption),
                           max_order=min(max_order, 17), use_rand_ism=True, max_rand_disp=0.05)
        room.add_source(rng.uniform(0.5, dims - 0.5))
        room.add_microphone(rng.uniform(0.5, dims - 0.5))
        room.compute_rir()
        ir = np.asarray(room.rir[0][0], np.float64)
        out.append((ir / np.max(np.abs(ir))).astype(np.float32))
    return tuple(out)


def reverb(x: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """``x`` convolved with the impulse response ``ir``, cut to ``x``'s length, same RMS as ``x``."""
    y = signal.fftconvolve(x, ir)[: x.size]
    return (y * np.sqrt(power(x) / max(power(y), 1e-20))).astype(np.float32)


def telephone(x: np.ndarray, *, codec: str = "linear", drop_rate: float = 0.0,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """The telephone chain: 300-3400 Hz band-pass, 8 kHz, ``codec`` (``CODECS``: mu-law, A-law and GSM
    06.10 encoded and decoded by sox), ``drop_rate`` of the 20 ms packets zeroed, back to 16 kHz.

    Raises:
        ValueError: for an unknown codec, or a drop rate without ``rng``.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    sos = signal.butter(4, (300.0, 3400.0), btype="bandpass", fs=SAMPLE_RATE_HZ, output="sos")
    narrow = soxr.resample(signal.sosfilt(sos, x).astype(np.float32), SAMPLE_RATE_HZ, TELEPHONE_HZ)
    if codec != "linear":
        peak = max(float(np.max(np.abs(narrow))), 1e-9)
        scale = 0.7 / peak if peak > 0.7 else 1.0  # the codecs saturate at full scale
        encoded = _sox_encode(narrow * scale, _SOX_CODEC[codec])
        narrow = encoded[: narrow.size] / scale
    if drop_rate > 0:
        if rng is None:
            raise ValueError("dropping packets needs rng")
        packet = int(PACKET_S * TELEPHONE_HZ)
        lost = rng.random(narrow.size // packet + 1) < drop_rate
        narrow = narrow * np.repeat(~lost, packet)[: narrow.size]
    y = soxr.resample(narrow.astype(np.float32), TELEPHONE_HZ, SAMPLE_RATE_HZ)
    return np.pad(y, (0, max(0, x.size - y.size)))[: x.size].astype(np.float32)


def _sox_encode(x: np.ndarray, fmt: list[str]) -> np.ndarray:
    """8 kHz ``x`` encoded to ``fmt`` by one sox and decoded back by another (the codec's real loss)."""
    raw = ["-t", "f32", "-r", str(TELEPHONE_HZ), "-c", "1"]
    enc = subprocess.run(["sox", "-q", "-V1", *raw, "-", *fmt, "-r", str(TELEPHONE_HZ), "-c", "1", "-"],
                         input=x.astype(np.float32).tobytes(), capture_output=True)
    dec = subprocess.run(["sox", "-q", "-V1", *fmt, "-r", str(TELEPHONE_HZ), "-c", "1", "-", *raw, "-"],
                         input=enc.stdout, capture_output=True)
    if enc.returncode or dec.returncode:
        raise RuntimeError(f"sox {fmt[-1]} round trip failed: {(enc.stderr + dec.stderr).decode(errors='replace')[:300]}")
    y = np.frombuffer(dec.stdout, np.float32)
    return np.pad(y, (0, max(0, x.size - y.size)))


def noise_floor(x: np.ndarray, *, level_db: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus white noise at ``level_db`` dB below full scale (RMS), so no sample run is digital zero."""
    return (x + rng.standard_normal(x.size).astype(np.float32) * np.float32(10 ** (level_db / 20))).astype(np.float32)


def _draw(name: str, rng: np.random.Generator) -> bool:
    return bool(rng.random() < AUGMENT_PROBABILITIES[name])


def plan_augment(rng: np.random.Generator, *, babble: bool = True, clean_fraction: float = CLEAN_FRACTION
                 ) -> tuple[list[str], dict[str, Any]]:
    """Which degradations an utterance gets and their parameters, drawn before any signal is touched, so
    they never depend on the audio (Piper's length varies between runs; the plan must not).

    Returns:
        ``(applied, params)``: names in the order they will be applied, and their parameters plus
        ``floor_db`` and ``signal_seed`` (the seed of the signal-level noise).
    """
    applied: list[str] = []
    params: dict[str, Any] = {}
    if rng.random() >= clean_fraction:
        if _draw("speed", rng):
            params["speed"], applied = float(rng.choice((0.9, 1.1))), applied + ["speed"]
        if _draw("pitch", rng):
            params["pitch_semitones"] = round(float(rng.choice((-1, 1)) * rng.uniform(1.0, 3.0)), 2)
            applied.append("pitch")
        if _draw("vtlp", rng):
            params["vtlp_alpha"], applied = round(float(rng.uniform(0.88, 1.12)), 3), applied + ["vtlp"]
        if _draw("reverb", rng):
            params["rir"], applied = int(rng.integers(len(rir_bank()))), applied + ["reverb"]
        if babble and _draw("babble", rng):
            params["snr_db"], params["talkers"] = round(float(rng.uniform(*SNR_RANGE_DB)), 2), int(rng.integers(3, 7))
            applied.append("babble")
        elif _draw("noise", rng):
            params["snr_db"] = round(float(rng.uniform(*SNR_RANGE_DB)), 2)
            params["noise"], applied = str(rng.choice(["white", "pink", "brown"])), applied + ["noise"]
        if _draw("telephone", rng):
            params["codec"] = str(rng.choice(CODECS))
            params["drop_rate"] = round(float(rng.uniform(0.01, 0.05)), 3) if rng.random() < 1 / 3 else 0.0
            applied.append("telephone")
        if _draw("gain", rng):
            params["gain_db"], applied = round(float(rng.uniform(-25.0, 6.0)), 2), applied + ["gain"]
        if _draw("clip", rng):
            params["clip_fraction"], applied = round(float(rng.uniform(0.3, 0.7)), 3), applied + ["clip"]
    params["floor_db"] = round(float(rng.uniform(-85.0, -65.0)), 1)
    params["signal_seed"] = int(rng.integers(2**31))
    return applied, params


def apply_augment(x: np.ndarray, applied: list[str], params: dict[str, Any], *,
                  babble: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """``x`` through the degradations of ``plan_augment`` in order, peak-limited to 0.95 before the level
    changes, then the noise floor; float32 within [-1, 1]."""
    rng = np.random.default_rng(params["signal_seed"])
    y = x
    for name in applied:
        if name == "speed":
            y = speed(y, params["speed"])
        elif name == "pitch":
            y = pitch_shift(y, params["pitch_semitones"])
        elif name == "vtlp":
            y = vtlp(y, params["vtlp_alpha"])
        elif name == "reverb":
            y = reverb(y, rir_bank()[params["rir"]])
        elif name == "babble":
            y = add_babble(y, babble, talkers=params["talkers"], snr_db=params["snr_db"], rng=rng)
        elif name == "noise":
            y = add_noise(y, snr_db=params["snr_db"], color=params["noise"], rng=rng)
        elif name == "telephone":
            y = telephone(y, codec=params["codec"], drop_rate=params["drop_rate"], rng=rng)
        elif name == "gain":
            peak = float(np.max(np.abs(y))) if y.size else 0.0
            y = np.clip(y * (0.95 / peak if peak > 0.95 else 1.0) * 10 ** (params["gain_db"] / 20), -1.0, 1.0)
        elif name == "clip":
            level = params["clip_fraction"] * float(np.max(np.abs(y)))
            y = np.clip(y, -level, level)
        else:
            raise ValueError(f"unknown degradation {name!r}; known: {', '.join(AUGMENT_PROBABILITIES)}")
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    y = y * (0.95 / peak) if peak > 0.95 else y
    return np.clip(noise_floor(np.asarray(y, np.float32), level_db=params["floor_db"], rng=rng), -1.0, 1.0)


def augment_speech(x: np.ndarray, *, rng: np.random.Generator, babble: tuple[np.ndarray, ...] = (),
                   clean_fraction: float = CLEAN_FRACTION) -> tuple[np.ndarray, list[str], float | None, dict[str, Any]]:
    """Degrade an utterance: speaker (speed, pitch, vtlp), room (reverb), environment (babble or noise),
    channel (telephone), level (gain, clip), each with its ``AUGMENT_PROBABILITIES``, in that order;
    ``clean_fraction`` of utterances get none of them. Every utterance gets a noise floor.

    Args:
        x: float32 mono at 16 kHz.
        rng: The only source of randomness (``plan_augment`` draws from it, the signal noise from a seed it draws).
        babble: Speech to make babble from (``babble`` is never chosen when empty).

    Returns:
        ``(samples, applied, snr_db, params)``: float32 within [-1, 1], the names applied in order, the SNR in
        dB of babble or noise (None without), and every parameter drawn.
    """
    applied, params = plan_augment(rng, babble=bool(babble), clean_fraction=clean_fraction)
    return apply_augment(x, applied, params, babble=babble), applied, params.get("snr_db"), params


def degradation_groups(applied: list[str] | tuple[str, ...] | None, params: dict[str, Any] | None,
                       snr_db: float | None) -> list[str]:
    """The evaluation groups of an utterance by what was done to it (a row is in several): ``clean`` when
    nothing was, else each degradation's name, ``telephone:<codec>``, and the SNR band of babble or noise
    (``snr 0-10 dB``, ``snr 10-20 dB``, ``snr 20-30 dB``)."""
    applied, params = list(applied or []), params or {}
    if not applied:
        return ["clean"]
    out = list(applied)
    if "telephone" in applied and params.get("codec"):
        out.append(f"telephone:{params['codec']}")
    if snr_db is not None:
        low = min(20, int(snr_db // 10) * 10)
        out.append(f"snr {low}-{low + 10} dB")
    return out
