"""Stage 0 (test/demo fixtures): synthesize audio corpora to a local directory.

In: a seed and a few counts (``CorpusSpec``); the ``espeak-ng`` binary for speech.
Out: audio files of many formats, sample rates and channel layouts, plus deliberately
bad files, written under a local directory, and a manifest
``{relative_posix_path: expectation}`` where the expectation is ``"ok"`` (must decode),
``"rejected"`` (ingest must refuse it) or ``"ignored"`` (not audio, must be skipped).

Everything except espeak-ng output is a deterministic function of the seed.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

ESPEAK_SR = 22050
BLOCK_FRAMES = 65_536  # libvorbis crashes on very long single writes; always write in blocks
OK, REJECTED, IGNORED = "ok", "rejected", "ignored"

SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Please send the quarterly report to the finance team by Friday.",
    "Turn left at the second traffic light, then continue for two miles.",
    "The weather tomorrow will be cloudy with a chance of light rain.",
    "Seven hundred and forty two passengers boarded the ship at dawn.",
    "Can you hear me clearly, or should I speak a little louder?",
    "Warning: the north exit is closed for maintenance until noon.",
    "She sells sea shells by the sea shore every summer morning.",
    "Our flight to Lisbon was delayed by nearly three hours.",
    "Remember to water the tomato plants before you leave.",
    "The museum opens at nine and closes at half past five.",
    "A gentle breeze drifted through the open kitchen window.",
    "Error code forty seven: the disk is almost full.",
    "Thank you for calling, your call is important to us.",
    "He counted the coins twice and still came up one short.",
    "The orchestra tuned their instruments before the concert began.",
    "Mix two cups of flour with one teaspoon of baking soda.",
    "Is this the train that stops at Central Station?",
    "The children built a sandcastle with a moat and a bridge.",
    "Data pipelines should fail loudly and recover gracefully.",
)

_VOICE_VARIANTS: tuple[str, ...] = ("en-us+f3", "en+m3", "en-gb+f2", "en-us+m7")


@dataclass(frozen=True)
class CorpusSpec:
    """What ``write_demo_corpus`` produces.

    Attributes:
        n_speech: Number of espeak-ng utterances.
        n_tones: Number of tone files (beeps, chords, sweeps).
        n_noise: Number of noise files (colors cycle white/pink/brown).
        include_bad: Whether to add the deliberately broken files under ``bad/``.
        seed: Seed for every random choice and signal.
    """

    n_speech: int = 6
    n_tones: int = 3
    n_noise: int = 3
    include_bad: bool = True
    seed: int = 0


def _rng(seed: int, key: str) -> np.random.Generator:
    """Independent generator per (seed, item) so adding items never shifts others."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def _require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng executable not found on PATH; install the 'espeak-ng' package "
            "(e.g. `apt-get install espeak-ng`) to synthesize speech"
        )
    return exe


def espeak_voices() -> list[str]:
    """List English espeak-ng voices usable without MBROLA, plus a few variants.

    Returns:
        Voice names accepted by ``espeak-ng -v`` (e.g. ``"en-gb"``, ``"en-us+f3"``),
        at least four, in a stable order.
    """
    exe = _require_espeak()
    out = subprocess.run([exe, "--voices=en"], capture_output=True, text=True, check=True)
    voices: list[str] = []
    for line in out.stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 5 or cols[4].startswith("mb/") or cols[1] == "variant":
            continue  # MBROLA voices need extra packages; variants are not languages
        if cols[1] not in voices:
            voices.append(cols[1])
    voices.extend(v for v in _VOICE_VARIANTS if v not in voices)
    return voices


def speak(text: str, *, voice: str, speed_wpm: int = 160, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Synthesize ``text`` with espeak-ng.

    Args:
        text: English text to speak.
        voice: espeak-ng voice name (see ``espeak_voices``).
        speed_wpm: Speaking rate in words per minute.
        pitch: espeak-ng pitch, 0-99.

    Returns:
        ``(samples, sample_rate)``: float32 mono samples in [-1, 1] and the rate in Hz
        (22050 for espeak-ng).

    Raises:
        RuntimeError: If espeak-ng is missing, fails, or produces no audio.
    """
    exe = _require_espeak()
    with tempfile.TemporaryDirectory(prefix="audiopipe-speak-") as tmp:
        wav = Path(tmp) / "out.wav"
        cmd = [exe, "-v", voice, "-s", str(speed_wpm), "-p", str(pitch), "-w", str(wav), text]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wav.exists() or wav.stat().st_size <= 44:
            raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.strip()}")
        data, sr = sf.read(wav, dtype="float32", always_2d=True)
    mono = np.clip(data.mean(axis=1), -1.0, 1.0).astype(np.float32)
    if mono.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for voice {voice!r}")
    return mono, int(sr)


def _fade(x: np.ndarray, sr: int, fade_s: float = 0.005) -> np.ndarray:
    """Apply short linear fade in/out (``fade_s`` seconds) to avoid clicks."""
    n = min(int(sr * fade_s), x.shape[0] // 2)
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def tone(freq_hz: float, duration_s: float, sr: int, *, amplitude: float = 0.3) -> np.ndarray:
    """Sine tone.

    Args:
        freq_hz: Frequency in Hz.
        duration_s: Duration in seconds.
        sr: Sample rate in Hz.
        amplitude: Peak amplitude (linear, full scale = 1).

    Returns:
        float32 mono samples of length ``round(duration_s * sr)``, 5 ms fades at the ends.
    """
    t = np.arange(int(round(duration_s * sr)), dtype=np.float64) / sr
    return _fade((amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32), sr)


def noise(
    duration_s: float, sr: int, *, color: str = "white", rng: np.random.Generator, amplitude: float = 0.1
) -> np.ndarray:
    """Coloured noise.

    Args:
        duration_s: Duration in seconds.
        sr: Sample rate in Hz.
        color: ``"white"`` (flat), ``"pink"`` (-3 dB/octave) or ``"brown"`` (-6 dB/octave).
        rng: Random generator (the only source of randomness).
        amplitude: Peak amplitude (linear, full scale = 1).

    Returns:
        float32 mono samples of length ``round(duration_s * sr)``.

    Raises:
        ValueError: On an unknown color.
    """
    n = int(round(duration_s * sr))
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}.get(color)
    if exponent is None:
        raise ValueError(f"unknown noise color {color!r}; use white, pink or brown")
    x = rng.standard_normal(n)
    if exponent and n > 1:
        spec = np.fft.rfft(x)
        f = np.fft.rfftfreq(n, d=1.0 / sr)
        f[0] = f[1]  # avoid division by zero; DC removed below
        x = np.fft.irfft(spec / f**exponent, n=n)
        x -= x.mean()
    peak = float(np.max(np.abs(x))) if n else 0.0
    return (x * (amplitude / peak) if peak > 0 else x).astype(np.float32)


def _alarm(sr: int, duration_s: float = 2.0) -> np.ndarray:
    """Two-tone alarm: alternating 880/660 Hz beeps of 0.2 s with 0.05 s gaps."""
    beeps = [np.concatenate([tone(f, 0.2, sr, amplitude=0.4), np.zeros(int(0.05 * sr), np.float32)])
             for f in (880.0, 660.0)]
    cycle = np.concatenate(beeps)
    reps = int(np.ceil(duration_s * sr / cycle.size))
    return np.tile(cycle, reps)[: int(duration_s * sr)]


def _chord(freqs: tuple[float, ...], duration_s: float, sr: int) -> np.ndarray:
    """Sum of sines at ``freqs`` (Hz), peak about 0.5."""
    return sum(tone(f, duration_s, sr, amplitude=0.5 / len(freqs)) for f in freqs)


def _sweep(f0: float, f1: float, duration_s: float, sr: int) -> np.ndarray:
    """Linear chirp from ``f0`` to ``f1`` Hz."""
    t = np.arange(int(duration_s * sr)) / sr
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration_s))
    return _fade((0.3 * np.sin(phase)).astype(np.float32), sr)


def _ogg_crc(page: bytes) -> int:
    """Ogg page CRC-32 (polynomial 0x04C11DB7, MSB-first, no reflection, no final xor)."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        crc &= 0xFFFFFFFF
    return crc


def _pin_ogg_serial(path: Path, serial: int = 0x41504950) -> None:
    """Replace libsndfile's random Ogg stream serial with a constant so output is reproducible."""
    buf, pos = bytearray(path.read_bytes()), 0
    while buf[pos : pos + 4] == b"OggS":
        n_seg = buf[pos + 26]
        size = 27 + n_seg + sum(buf[pos + 27 : pos + 27 + n_seg])
        buf[pos + 14 : pos + 18] = serial.to_bytes(4, "little")
        buf[pos + 22 : pos + 26] = bytes(4)
        buf[pos + 22 : pos + 26] = _ogg_crc(bytes(buf[pos : pos + size])).to_bytes(4, "little")
        pos += size
    path.write_bytes(bytes(buf))


def _zero_peak_timestamp(path: Path) -> None:
    """Zero the wall-clock timestamp libsndfile puts in a float WAV's PEAK chunk."""
    buf, pos = bytearray(path.read_bytes()), 12
    while pos + 8 <= len(buf):
        cid, size = bytes(buf[pos : pos + 4]), int.from_bytes(buf[pos + 4 : pos + 8], "little")
        if cid == b"PEAK":
            buf[pos + 12 : pos + 16] = bytes(4)  # after version(4): timestamp(4)
            path.write_bytes(bytes(buf))
            return
        if cid == b"data":
            return
        pos += 8 + size + (size & 1)


def _write(path: Path, data: np.ndarray, sr: int, *, fmt: str = "WAV", subtype: str | None = None) -> None:
    """Write ``data`` (frames[, channels]) in ``BLOCK_FRAMES`` blocks via ``sf.SoundFile``.

    OGG serials and float-WAV PEAK timestamps are pinned so equal input gives equal bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data if data.ndim == 2 else data[:, None]
    with sf.SoundFile(path, "w", samplerate=sr, channels=data.shape[1], format=fmt, subtype=subtype) as f:
        for start in range(0, data.shape[0], BLOCK_FRAMES):
            f.write(data[start : start + BLOCK_FRAMES])
    if fmt == "OGG":
        _pin_ogg_serial(path)
    elif fmt == "WAV" and subtype in ("FLOAT", "DOUBLE"):
        _zero_peak_timestamp(path)


def _stereo(x: np.ndarray, sr: int) -> np.ndarray:
    """Make a genuinely two-channel signal: right channel delayed 3 ms and quieter."""
    d = int(0.003 * sr)
    right = np.concatenate([np.zeros(d, np.float32), x[: x.size - d]]) * 0.8
    return np.stack([x, right], axis=1).astype(np.float32)


# (relative-path suffix, sample rate Hz, channels, soundfile format, subtype)
_SPEECH_FORMATS: tuple[tuple[str, int, int, str, str | None], ...] = (
    (".wav", 16000, 1, "WAV", "PCM_16"),
    (".wav", 8000, 1, "WAV", "PCM_16"),
    (".flac", 44100, 2, "FLAC", "PCM_16"),
    (".ogg", 22050, 1, "OGG", "VORBIS"),
    (".mp3", 22050, 1, "MP3", "MPEG_LAYER_III"),
    (".wav", 22050, 1, "WAV", "PCM_16"),
)


def _write_speech(out_dir: Path, spec: CorpusSpec) -> dict[str, str]:
    """Write ``spec.n_speech`` utterances from different voices, cycling formats/rates."""
    rng = _rng(spec.seed, "speech")
    voices = espeak_voices()
    order = rng.permutation(len(voices))
    sentences = rng.permutation(len(SENTENCES))
    manifest: dict[str, str] = {}
    for i in range(spec.n_speech):
        voice = voices[order[i % len(voices)]]
        text = SENTENCES[sentences[i % len(SENTENCES)]]
        speed, pitch = int(rng.integers(150, 211)), int(rng.integers(30, 71))
        x, sr = speak(text, voice=voice, speed_wpm=speed, pitch=pitch)
        ext, out_sr, ch, fmt, subtype = _SPEECH_FORMATS[i % len(_SPEECH_FORMATS)]
        y = soxr.resample(x, sr, out_sr).astype(np.float32) if out_sr != sr else x
        y = np.clip(y, -0.99, 0.99)
        rel = f"speech/speech_{i:02d}_{voice.replace('+', '_')}_{out_sr // 1000}k{ext}"
        _write(out_dir / rel, _stereo(y, out_sr) if ch == 2 else y, out_sr, fmt=fmt, subtype=subtype)
        manifest[rel] = OK
    return manifest


def _write_tones(out_dir: Path, spec: CorpusSpec) -> dict[str, str]:
    """Write ``spec.n_tones`` tone files: alarm beeps (wav), chords (stereo flac), sweeps (ogg)."""
    manifest: dict[str, str] = {}
    chords = ((261.63, 329.63, 392.0), (220.0, 277.18, 329.63), (196.0, 246.94, 293.66, 349.23))
    for i in range(spec.n_tones):
        kind = ("alarm", "chord", "sweep")[i % 3]
        if kind == "alarm":
            rel, sr = f"tones/alarm_{i:02d}.wav", 16000
            _write(out_dir / rel, _alarm(sr, 1.5 + 0.5 * (i % 4)), sr, subtype="PCM_16")
        elif kind == "chord":
            rel, sr = f"tones/chord_{i:02d}.flac", 44100
            _write(out_dir / rel, _stereo(_chord(chords[i % 3], 2.0, sr), sr), sr, fmt="FLAC")
        else:
            rel, sr = f"tones/sweep_{i:02d}.ogg", 48000
            _write(out_dir / rel, _sweep(200.0, 4000.0, 2.0, sr), sr, fmt="OGG", subtype="VORBIS")
        manifest[rel] = OK
    return manifest


def _write_noise(out_dir: Path, spec: CorpusSpec) -> dict[str, str]:
    """Write ``spec.n_noise`` noise files cycling white/pink/brown at 16/22.05/8 kHz."""
    manifest: dict[str, str] = {}
    for i in range(spec.n_noise):
        color, sr, ext, fmt = (("white", 16000, ".wav", "WAV"), ("pink", 22050, ".flac", "FLAC"),
                               ("brown", 8000, ".wav", "WAV"))[i % 3]
        rel = f"noise/{color}_{i:02d}{ext}"
        x = noise(1.5, sr, color=color, rng=_rng(spec.seed, rel), amplitude=0.2)
        _write(out_dir / rel, x, sr, fmt=fmt, subtype="PCM_16")
        manifest[rel] = OK
    return manifest


def _write_misc(out_dir: Path, spec: CorpusSpec) -> dict[str, str]:
    """Write the unicode-named sub-folder file and the non-audio ``notes.txt``."""
    rel = "sous dossier/café été.wav"
    hum = noise(1.0, 16000, rng=_rng(spec.seed, rel), amplitude=0.02)
    x = _chord((329.63, 415.30, 493.88), 1.0, 16000) + hum
    _write(out_dir / rel, x.astype(np.float32), 16000, subtype="PCM_16")
    (out_dir / "notes.txt").write_text("Demo corpus from audiopipe.tasks.synth; not audio.\n", "utf-8")
    return {rel: OK, "notes.txt": IGNORED}


def _write_bad(out_dir: Path, seed: int) -> dict[str, str]:
    """Write files that decoding must reject: empty, fake, truncated, frameless, garbage."""
    bad = out_dir / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "empty.wav").write_bytes(b"")
    (bad / "not_audio.flac").write_text("This is plain text pretending to be FLAC.\n", "utf-8")
    full = bad / "truncated.wav"
    _write(full, tone(440.0, 1.0, 16000), 16000, subtype="PCM_16")
    raw = full.read_bytes()
    full.write_bytes(raw[: 44 + (len(raw) - 44) // 2 + 1])  # mid-data, odd byte count
    with sf.SoundFile(bad / "header_only.wav", "w", samplerate=16000, channels=1, subtype="PCM_16"):
        pass
    garbage = _rng(seed, "bad/corrupt.ogg").integers(0, 256, 4096, dtype=np.uint8)
    (bad / "corrupt.ogg").write_bytes(b"XXXX" + garbage.tobytes())
    names = ("empty.wav", "not_audio.flac", "truncated.wav", "header_only.wav", "corrupt.ogg")
    return {f"bad/{n}": REJECTED for n in names}


def write_demo_corpus(out_dir: Path, spec: CorpusSpec = CorpusSpec()) -> dict[str, str]:
    """Write a small, varied demo corpus.

    Args:
        out_dir: Local directory (created if missing).
        spec: Counts and seed.

    Returns:
        ``{relative_posix_path: expectation}`` with expectation ``"ok"``, ``"rejected"``
        or ``"ignored"``, for every file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _write_speech(out_dir, spec)
    manifest |= _write_tones(out_dir, spec)
    manifest |= _write_noise(out_dir, spec)
    manifest |= _write_misc(out_dir, spec)
    if spec.include_bad:
        manifest |= _write_bad(out_dir, spec.seed)
    logger.info("wrote demo corpus: %d files under %s", len(manifest), out_dir)
    return manifest


def _mix(sr: int, duration_s: float, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """Tone-plus-noise test signal, each channel a different pitch; shape (frames, channels)."""
    cols = [tone(220.0 * (1 + c * 0.5), duration_s, sr, amplitude=0.25) for c in range(channels)]
    x = np.stack(cols, axis=1) + 0.03 * rng.standard_normal((cols[0].size, channels))
    return x.astype(np.float32)


# (relative path, sample rate Hz, channels, format, subtype)
_MESSY_FORMATS: tuple[tuple[str, int, int, str, str], ...] = (
    ("formats/pcm24.wav", 48000, 1, "WAV", "PCM_24"),
    ("formats/float32.wav", 44100, 1, "WAV", "FLOAT"),
    ("formats/int32.wav", 32000, 1, "WAV", "PCM_32"),
    ("formats/mono_8k.wav", 8000, 1, "WAV", "PCM_16"),
    ("formats/stereo_44k.wav", 44100, 2, "WAV", "PCM_16"),
    ("formats/surround_48k_6ch.wav", 48000, 6, "WAV", "PCM_16"),
    ("formats/UPPER.WAV", 16000, 1, "WAV", "PCM_16"),
    ("formats/Mixed.Flac", 22050, 1, "FLAC", "PCM_16"),
    ("formats/tone.aiff", 22050, 1, "AIFF", "PCM_16"),
    ("formats/stereo_44k.mp3", 44100, 2, "MP3", "MPEG_LAYER_III"),
    ("nested/level1/level2/level3/deep.flac", 16000, 1, "FLAC", "PCM_16"),
    ("日本語/音声テスト.wav", 16000, 1, "WAV", "PCM_16"),
    ("accents/Ångström ñandú.flac", 22050, 2, "FLAC", "PCM_24"),
    ("names with spaces/my recording 01.wav", 16000, 1, "WAV", "PCM_16"),
)
# (relative path, sample rate Hz, channels, tasks.audio_encode format): formats libsndfile cannot read
# (Ogg Opus aside), decoded through PyAV
_MESSY_ENCODED: tuple[tuple[str, int, int, str], ...] = (
    ("formats/aac_44k_stereo.m4a", 44100, 2, "m4a"),
    ("formats/adts_22k.aac", 22050, 1, "aac"),
    ("formats/video_track.mp4", 48000, 2, "mp4"),
    ("formats/voice_48k.opus", 48000, 1, "opus"),
    ("formats/stream_48k.webm", 48000, 2, "webm"),
    ("formats/legacy_44k.wma", 44100, 2, "wma"),
)


def _write_long(path: Path, duration_s: float, seed: int, sr: int = 16000) -> None:
    """Write a long 16-bit mono wav of tones plus noise block by block (memory ~ one block)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng, total = _rng(seed, path.name), int(round(duration_s * sr))
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, format="WAV", subtype="PCM_16") as f:
        for start in range(0, total, BLOCK_FRAMES):
            t = np.arange(start, min(start + BLOCK_FRAMES, total)) / sr
            freq = 300.0 + 200.0 * ((start // BLOCK_FRAMES) % 5)  # pitch steps every ~4 s
            block = 0.25 * np.sin(2 * np.pi * freq * t) + 0.03 * rng.standard_normal(t.size)
            f.write(block.astype(np.float32))


def _write_encoded_formats(out_dir: Path, seed: int) -> dict[str, str]:
    """M4A, raw AAC, MP4, Opus, WebM and WMA files, and broken ones: cut in half, random bytes, 0 bytes."""
    from audiopipe.tasks.audio_encode import encode_audio

    manifest = {}
    for i, (rel, sr, ch, fmt) in enumerate(_MESSY_ENCODED):
        data = encode_audio(_mix(sr, 1.0 + (i % 3) * 0.5, _rng(seed, rel), ch), sr, fmt)
        (out_dir / rel).write_bytes(data)
        (out_dir / f"bad/truncated.{fmt}").write_bytes(data[: len(data) // 2])
        manifest |= {rel: OK, f"bad/truncated.{fmt}": REJECTED}
    (out_dir / "bad/random.m4a").write_bytes(_rng(seed, "bad/random.m4a").bytes(6000))
    (out_dir / "bad/empty.webm").write_bytes(b"")
    return manifest | {"bad/random.m4a": REJECTED, "bad/empty.webm": REJECTED}


def write_messy_archive(out_dir: Path, *, seed: int = 0, long_file_s: float = 600.0) -> dict[str, str]:
    """Write the demo corpus plus awkward formats, names and failure cases for tests.

    Args:
        out_dir: Local directory (created if missing).
        seed: Seed for all signals.
        long_file_s: Duration of ``long/long_16k.wav`` in seconds.

    Returns:
        ``{relative_posix_path: expectation}`` as in ``write_demo_corpus``.
    """
    out_dir = Path(out_dir)
    manifest = write_demo_corpus(out_dir, CorpusSpec(seed=seed))
    for i, (rel, sr, ch, fmt, subtype) in enumerate(_MESSY_FORMATS):
        x = _mix(sr, 0.5 + (i % 4) * 0.5, _rng(seed, rel), ch)
        _write(out_dir / rel, x, sr, fmt=fmt, subtype=subtype)
        manifest[rel] = OK
    _write(out_dir / "formats/silence.wav", np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    manifest["formats/silence.wav"] = OK
    nan = _mix(16000, 1.0, _rng(seed, "bad/nan.wav"))
    nan[4000:4100] = np.nan
    _write(out_dir / "bad/nan.wav", nan, 16000, subtype="FLOAT")
    mp3 = out_dir / "bad/truncated.mp3"
    _write(mp3, _mix(22050, 3.0, _rng(seed, "bad/truncated.mp3")), 22050, fmt="MP3", subtype="MPEG_LAYER_III")
    raw = mp3.read_bytes()
    mp3.write_bytes(raw[: len(raw) // 2])
    manifest |= {"bad/nan.wav": REJECTED, "bad/truncated.mp3": REJECTED}
    manifest |= _write_encoded_formats(out_dir, seed)
    _write_long(out_dir / "long/long_16k.wav", long_file_s, seed)
    manifest["long/long_16k.wav"] = OK
    logger.info("wrote messy archive: %d files under %s", len(manifest), out_dir)
    return manifest
