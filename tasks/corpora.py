"""Stage 0 (labelled corpora): write the ``audiopipe synth`` corpora and their LABELS_V1 table.

In: a kind (``speech``, ``sounds``, ``music``, ``mixtures``), a count and a seed; the speech synthesizers
(``corpora_voices``: espeak-ng, flite, festival, Piper), the text sources (``corpora_text``), music21's
bundled Bach chorales, fluidsynth.
Out: files under a LOCAL directory (``audio/<kind>/<split>/...``, ``midi/music/<split>/...``) and one
``LabelRow`` per file, whose ``source`` is the path relative to that directory; ``upload_corpus`` copies the
directory to the store and ``LabelRow.with_prefix`` turns the paths into the URLs the manifest uses.

Everything is a function of (kind, n, seed, installed package versions): item ``i`` draws from its own
generator, so adding items never changes earlier ones, and a range of speech items can be written on its
own (``write_speech(start=...)``: what each Dask worker of ``flows/synth.py`` does) - except Piper's
samples, see ``corpora_voices``. Splits: speech, sounds and mixtures cycle through
``SPLIT_CYCLE`` (80/10/10); a sentence's split is fixed by its hash (``corpora_text.sentence_split``), so
test sentences are never spoken in train or val; ``HELD_OUT_VOICES`` (and so the held-out engine) speak
only in test. Music splits by
work (BWV number), so the transpositions of one chorale stay in one split.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tempfile
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from fsspec.implementations.local import LocalFileSystem

from audiopipe.infra.errors import ConfigError, SchemaError
from audiopipe.infra.schemas import LABELS_KINDS, LABELS_MEDIA, LABELS_SPLITS, LABELS_V1, validate_table
from audiopipe.infra.storage import StorageSpec, describe_storage_error, join, open_fs, to_url, write_bytes_atomic
from audiopipe.tasks.corpora_music import (TRANSPOSE_SEMITONES, chorale_paths, load_chorale, melody_tokens,
                                           render_midi, save_midi, work_split)
from audiopipe.tasks.corpora_real import COARSE_LABELS, REAL_SLOTS, RealPool, real_clip
from audiopipe.tasks.corpora_sounds import SOUND_CLASSES, fit_length, mix_at_snr, sound_clip
from audiopipe.tasks.augment import augment_speech
from audiopipe.tasks.corpora_text import make_sentence
from audiopipe.tasks.corpora_voices import (ENGINE_WEIGHTS, HELD_OUT_VOICES, SAMPLE_RATE_HZ, babble_bank,
                                            speak_many, speak_voice, training_voices, voice_params)

logger = logging.getLogger(__name__)

SPLIT_CYCLE = ("test", "train", "train", "train", "train", "val", "train", "train", "train", "train")
SOUND_CLASS_NAMES: tuple[str, ...] = ("speech", *SOUND_CLASSES)
MIXTURE_BACKGROUNDS = ("music", "noise", "rain", "engine", "clapping")
LABELS_PATH = "labels/labels.parquet"


@dataclass(frozen=True)
class LabelRow:
    """One row of LABELS_V1 (see ``docs/data-contracts.md``); paths are relative until ``with_prefix``."""

    source: str
    kind: str
    split: str
    engine: str
    seed: int
    media: str = "audio"
    label: str | None = None
    text: str | None = None
    voice: str | None = None
    augment: tuple[str, ...] = ()
    snr_db: float | None = None
    duration_s: float | None = None
    sample_rate: int | None = None
    stems: tuple[tuple[str, str], ...] = ()
    midi: str | None = None
    note_pitches: tuple[int, ...] | None = None
    note_durations_ql: tuple[float, ...] | None = None
    params: str = "{}"

    def with_prefix(self, prefix: str) -> LabelRow:
        """A copy whose ``source``, ``midi`` and stem paths are ``prefix/<path>`` (``prefix`` a URL)."""
        base = prefix.rstrip("/") + "/"
        return replace(self, source=base + self.source, midi=base + self.midi if self.midi else None,
                       stems=tuple((name, base + path) for name, path in self.stems))

    def to_dict(self) -> dict[str, Any]:
        """The row as LABELS_V1 values (``stems`` as a JSON object string, null when there are none)."""
        row = asdict(self)
        row["augment"] = list(self.augment)
        row["stems"] = json.dumps(dict(self.stems), sort_keys=True) if self.stems else None
        return row


def item_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    """The generator of item ``index`` of corpus ``kind``: independent of every other item's."""
    return np.random.default_rng([seed, zlib.crc32(kind.encode("utf-8")), index])


def split_for(index: int) -> str:
    """The split of item ``index`` in the speech, sounds and mixtures corpora (``SPLIT_CYCLE``)."""
    return SPLIT_CYCLE[index % len(SPLIT_CYCLE)]


def choose_voice(split: str, index: int, rng: np.random.Generator) -> str:
    """The voice of item ``index``: every other test item takes the next held-out voice in turn, every
    other item a training voice of an engine drawn by ``ENGINE_WEIGHTS``."""
    turn = index // len(SPLIT_CYCLE)
    if split == "test" and turn % 2 == 0:
        return HELD_OUT_VOICES[(turn // 2) % len(HELD_OUT_VOICES)]
    engines = list(ENGINE_WEIGHTS)
    pool = training_voices(engines[int(rng.choice(len(engines), p=list(ENGINE_WEIGHTS.values())))])
    return pool[int(rng.integers(len(pool)))]


def _sentence(split: str, rng: np.random.Generator) -> str:
    return make_sentence(split, rng)[0]


def save_wav(out_dir: Path, rel: str, samples: np.ndarray) -> float:
    """Write float32 mono ``samples`` as 16-bit PCM WAV at 16 kHz to ``out_dir/rel``; returns seconds."""
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(samples, -1.0, 32767 / 32768), SAMPLE_RATE_HZ, subtype="PCM_16")
    return round(samples.size / SAMPLE_RATE_HZ, 6)


def write_speech(out_dir: Path, *, n: int, seed: int, start: int = 0, clean_fraction: float | None = None
                 ) -> list[LabelRow]:
    """Write utterances ``start .. n-1`` as ``audio/speech/<split>/speech-<i>.wav`` (16 kHz mono).

    Each utterance is a sentence of its split from a text source (``corpora_text.make_sentence``) said by a
    voice (``choose_voice``) at random engine parameters, then degraded (``augment.augment_speech``: speed,
    pitch, vtlp, reverb, babble or noise at 0-30 dB, telephone, gain, clip; a noise floor always). All
    utterances are planned first, then said (festival's in one process), then degraded in order.

    Returns:
        One row per file: ``text`` the transcript, ``voice``, ``engine``, ``augment`` (the degradations in
        the order applied), ``snr_db``, and in ``params`` the engine's and each degradation's parameters plus
        ``text_source`` and ``held_out`` (the voice is in ``HELD_OUT_VOICES``).
    """
    plans = []
    for i in range(start, n):
        rng, split = item_rng(seed, "speech", i), split_for(i)
        text, source = make_sentence(split, rng)
        voice = choose_voice(split, i, rng)
        plans.append((i, rng, split, text, source, voice, voice_params(voice, rng)))
    said = speak_many([(text, voice, params) for _, _, _, text, _, voice, params in plans])
    kwargs = {} if clean_fraction is None else {"clean_fraction": clean_fraction}
    rows = []
    for (i, rng, split, text, source, voice, params), x in zip(plans, said):
        y, applied, snr_db, aug = augment_speech(x, rng=rng, babble=babble_bank(), **kwargs)
        rel = f"audio/speech/{split}/speech-{i:06d}.wav"
        extra = {"text_source": source, "held_out": voice in HELD_OUT_VOICES}
        rows.append(LabelRow(source=rel, kind="speech", split=split, engine=voice.split(":")[0], seed=seed,
                             text=text, voice=voice, augment=tuple(applied), snr_db=snr_db,
                             duration_s=save_wav(out_dir, rel, y), sample_rate=SAMPLE_RATE_HZ,
                             params=json.dumps(params | aug | extra, sort_keys=True)))
    return rows


def write_sounds(out_dir: Path, *, n: int, seed: int, real: RealPool | None = None) -> list[LabelRow]:
    """Write ``n`` clips of 1-3 s, ``audio/sounds/<split>/<class>-<i>.wav``, classes in turn
    (``SOUND_CLASS_NAMES``: speech, music, noise, alarm, silence, rain, engine, clapping).

    With ``real`` (fetched Debian packages, ``corpora_real``) the cycle also holds ``REAL_SLOTS``: real music
    and real sound effects and environmental sounds, cut from the tracks of the item's split (held-out
    packages only in test), ``engine`` ``debian:<package>``, and the labels are the four classes of
    ``COARSE_LABELS`` (speech, music, sound, silence; the fine class in ``params["class"]``).

    Returns:
        One row per file, ``label`` the class; speech clips also carry ``voice`` (their text is cut, so
        ``text`` is null and the sentence is in ``params``).
    """
    slots = SOUND_CLASS_NAMES + (REAL_SLOTS if real is not None else ())
    rows = []
    for i in range(n):
        name, rng = slots[i % len(slots)], item_rng(seed, "sounds", i)
        split = split_for(i // len(slots))  # every class gets the same split proportions
        duration_s = round(float(rng.uniform(1.0, 3.0)), 2)
        voice, engine, stem = None, "numpy", name
        if name.startswith("real-"):
            name = name.removeprefix("real-")
            x, params = real_clip(real, name, split, duration_s, rng)
            engine, stem = f"debian:{params['package']}", f"{name}-real"
        elif name == "speech":
            voice = choose_voice(split, i // len(slots), rng)
            sentence, engine = _sentence(split, rng), voice.split(":")[0]
            x, params = speak_voice(sentence, voice, rng=rng)
            peak = float(rng.uniform(0.1, 0.9))
            x = fit_length(x, int(round(duration_s * SAMPLE_RATE_HZ)), rng) * peak / 0.9
            params |= {"sentence": sentence, "peak": round(peak, 3)}
        else:
            x, params = sound_clip(name, duration_s, rng)
        label = COARSE_LABELS[name] if real is not None else name
        params |= {"class": name} if label != name else {}
        rel = f"audio/sounds/{split}/{stem}-{i:06d}.wav"
        rows.append(LabelRow(source=rel, kind="sounds", split=split, engine=engine, seed=seed, label=label,
                             voice=voice, duration_s=save_wav(out_dir, rel, x), sample_rate=SAMPLE_RATE_HZ,
                             params=json.dumps(params, sort_keys=True)))
    return rows


def write_mixtures(out_dir: Path, *, n: int, seed: int, snr_db: tuple[float, float] = (-5.0, 10.0)
                   ) -> list[LabelRow]:
    """Write ``n`` speech + background mixtures at a uniform SNR in ``snr_db`` (dB), with clean stems.

    Files: ``audio/mixtures/<split>/mix-<i>.wav`` and, same length, ``mix-<i>.speech.wav`` and
    ``mix-<i>.background.wav``, with ``mixture == speech + background`` up to 16-bit rounding. The speech is
    an unaugmented utterance padded with 0.1-0.5 s of silence each side; the background cycles through
    ``MIXTURE_BACKGROUNDS``.

    Returns:
        One row per mixture: ``label`` the background class, ``text`` the transcript, ``snr_db``,
        ``stems`` ``{"speech": path, "background": path}``.
    """
    rows = []
    for i in range(n):
        rng, split = item_rng(seed, "mixtures", i), split_for(i)
        # offset by the split cycle so every split sees every background (i % 5 alone gave test only music)
        background = MIXTURE_BACKGROUNDS[(i + i // len(SPLIT_CYCLE)) % len(MIXTURE_BACKGROUNDS)]
        text = _sentence(split, rng)
        voice = choose_voice(split, i, rng)
        speech, params = speak_voice(text, voice, rng=rng)
        pads = rng.integers(int(0.1 * SAMPLE_RATE_HZ), int(0.5 * SAMPLE_RATE_HZ), 2)
        speech = np.pad(speech, (int(pads[0]), int(pads[1])))
        bg, bg_params = sound_clip(background, speech.size / SAMPLE_RATE_HZ, rng)
        snr = round(float(rng.uniform(*snr_db)), 2)
        mixture, speech_stem, bg_stem = mix_at_snr(speech, bg[: speech.size], snr)
        stem = f"audio/mixtures/{split}/mix-{i:06d}"
        save_wav(out_dir, f"{stem}.speech.wav", speech_stem)
        save_wav(out_dir, f"{stem}.background.wav", bg_stem)
        rows.append(LabelRow(source=f"{stem}.wav", kind="mixtures", split=split, engine=voice.split(":")[0],
                             seed=seed, label=background, text=text, voice=voice, snr_db=snr,
                             duration_s=save_wav(out_dir, f"{stem}.wav", mixture), sample_rate=SAMPLE_RATE_HZ,
                             stems=(("background", f"{stem}.background.wav"), ("speech", f"{stem}.speech.wav")),
                             params=json.dumps(params | {"background": bg_params}, sort_keys=True)))
    return rows


def write_music(out_dir: Path, *, n: int, seed: int, render_every: int = 4) -> list[LabelRow]:
    """Write ``n`` Bach chorales as MIDI, ``midi/music/<split>/<i>-<work>[_t<semitones>].mid``, and render
    every ``render_every``-th (0: none) to ``audio/music/<split>/...wav`` with fluidsynth when installed.

    The works are taken in a seeded order; past the last work they come round again transposed by a
    random non-zero interval (``TRANSPOSE_SEMITONES``).

    Returns:
        Per score a ``media="midi"`` row carrying the melody tokens (``note_pitches``, ``note_durations_ql``)
        and, per rendering, a ``media="audio"`` row whose ``midi`` names its score.
    """
    paths = chorale_paths()
    order = item_rng(seed, "music-order", 0).permutation(len(paths))
    rows = []
    for i in range(n):
        path, rng = paths[order[i % len(paths)]], item_rng(seed, "music", i)
        transpose = 0 if i < len(paths) else int(rng.choice(TRANSPOSE_SEMITONES))
        work, split = path.stem, work_split(path.stem)
        name = f"{i:06d}-{work}" + (f"_t{transpose:+d}" if transpose else "")
        score = load_chorale(path, transpose=transpose)
        pitches, durations = melody_tokens(score)
        rel = f"midi/music/{split}/{name}.mid"
        save_midi(score, out_dir / rel)
        params = json.dumps({"work": work, "transpose": transpose, "num_parts": len(score.parts)}, sort_keys=True)
        rows.append(LabelRow(source=rel, kind="music", media="midi", split=split, engine="music21", seed=seed,
                             midi=rel, note_pitches=pitches, note_durations_ql=durations, params=params))
        wav = f"audio/music/{split}/{name}.wav"
        if render_every and i % render_every == 0 and render_midi(out_dir / rel, out_dir / wav):
            info = sf.info(out_dir / wav)
            rows.append(LabelRow(source=wav, kind="music", split=split, engine="fluidsynth", seed=seed, midi=rel,
                                 duration_s=round(info.frames / info.samplerate, 6), sample_rate=info.samplerate,
                                 params=params))
    return rows


# Explicit registry of the corpus kinds `audiopipe synth KIND` accepts.
CORPUS_WRITERS = {"speech": write_speech, "sounds": write_sounds, "music": write_music, "mixtures": write_mixtures}


def write_and_upload(kind: str, out_url: str, storage: StorageSpec, *, start: int, stop: int, seed: int,
                     options: dict[str, Any] | None = None) -> tuple[list[LabelRow], int]:
    """Worker task: write items ``start .. stop-1`` of ``kind`` to a local temporary directory, upload them
    under ``out_url`` (so a worker on another machine needs no shared disk) -> ``(rows with URLs, files)``.

    Only ``speech`` takes a start index (the others are written whole, ``start`` must be 0); ``options`` are
    passed on to the writer (e.g. ``real`` for sounds).

    Raises:
        ConfigError: for another kind with ``start`` > 0. StorageError: when the store refuses the upload.
    """
    writer = CORPUS_WRITERS[kind]
    if start and kind != "speech":
        raise ConfigError(f"only speech is written in ranges; {kind} starts at 0, got {start}")
    with tempfile.TemporaryDirectory(prefix=f"audiopipe-synth-{kind}-") as tmp:
        rows = writer(Path(tmp), n=stop, seed=seed, **({"start": start} if start else {}), **(options or {}))
        num_files = sum(1 for p in Path(tmp).rglob("*") if p.is_file())
        prefix = upload_corpus(Path(tmp), out_url, storage)
    return [row.with_prefix(prefix) for row in rows], num_files


def labels_table(rows: list[LabelRow]) -> pa.Table:
    """The LABELS_V1 table of ``rows``, validated.

    Raises:
        SchemaError: on a duplicate ``source``, a kind/media/split outside ``LABELS_KINDS``/``LABELS_MEDIA``/
            ``LABELS_SPLITS``, or a column that does not match the contract.
    """
    sources = [r.source for r in rows]
    if len(set(sources)) != len(sources):
        dupes = sorted({s for s in sources if sources.count(s) > 1})
        raise SchemaError(f"labels have duplicate sources, e.g. {dupes[:3]}")
    for column, allowed in (("kind", LABELS_KINDS), ("media", LABELS_MEDIA), ("split", LABELS_SPLITS)):
        bad = sorted({getattr(r, column) for r in rows} - set(allowed))
        if bad:
            raise SchemaError(f"labels column {column!r} has values {bad}, allowed {allowed}")
    table = pa.Table.from_pylist([r.to_dict() for r in rows], schema=LABELS_V1)
    validate_table(table, LABELS_V1)
    return table


def upload_corpus(local_dir: Path, out_url: str, storage: StorageSpec) -> str:
    """Copy every file under ``local_dir`` to ``out_url`` keeping relative paths; returns the URL prefix
    (``to_url`` form, as in the manifest) that ``LabelRow.with_prefix`` takes.

    Raises:
        StorageError: saying what to fix when the store refuses or cannot be reached.
    """
    fs, root = open_fs(out_url, storage)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    targets = [join(root, p.relative_to(local_dir).as_posix()) for p in files]
    try:
        if isinstance(fs, LocalFileSystem):
            for parent in sorted({posixpath.dirname(t) for t in targets}):
                fs.makedirs(parent, exist_ok=True)
        if files:
            fs.put([str(p) for p in files], targets)
    except Exception as exc:  # noqa: BLE001 - translated into a message that says what to fix
        raise describe_storage_error(out_url, exc) from exc
    return to_url(fs, root)


def save_labels(table: pa.Table, out_url: str, storage: StorageSpec) -> str:
    """Publish ``table`` at ``out_url/labels/labels.parquet`` atomically (written last: the commit marker).

    Returns:
        The labels file's URL.
    """
    fs, root = open_fs(out_url, storage)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path = join(root, LABELS_PATH)
    try:
        write_bytes_atomic(fs, path, buf.getvalue())
    except Exception as exc:  # noqa: BLE001 - translated into a message that says what to fix
        raise describe_storage_error(out_url, exc) from exc
    return to_url(fs, path)

