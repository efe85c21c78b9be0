"""Separation training data: LABELS_V1 ``mixtures`` rows -> mixture/speech audio -> STFT magnitude batches.

In: a labels table whose ``kind="mixtures"`` rows name a mixture (``source``) and its clean stems (``stems`` =
JSON ``{"speech": URL, "background": URL}``), and the audio those URLs name. Out: ``MixtureItem`` records,
decoded mono waveforms at the model's rate, the per-bin statistics the model normalises with, and a
``tf.data.Dataset`` of magnitude batches (``separation_dataset``). ``tasks/train_separation.py`` trains and
evaluates on them; inference does not use this module. No Prefect or Dask imports here.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from audiopipe.infra.errors import BadAudioError, ConfigError
from audiopipe.infra.storage import StorageSpec, open_fs, split_protocol
from audiopipe.models.separation import SeparationConfig
from audiopipe.tasks.audio_io import resample, to_mono

SPLITS = ("train", "val", "test")
# Stems resampled from another rate may differ from the mixture by a sample; past this, the row is wrong.
STEM_LENGTH_TOLERANCE_SAMPLES = 2
# Floor for the per-bin std of log1p(magnitude): bins that are silent in all training audio (above the
# Nyquist of band-limited sources) must not blow up a test clip's faint energy there.
MIN_LOG_MAGNITUDE_STD = 1e-3
REMIX_SNR_DB = (-5.0, 10.0)  # synth's mixtures range, used when the labels record no SNR
BUCKET_EDGES_FRAMES = (256, 512, 1024, 2048)
AudioLoader = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class MixtureItem:
    """One labelled mixture: its URL, its clean stems' URLs, its split and SNR (dB, speech to background)."""

    source: str
    speech: str
    background: str
    split: str
    snr_db: float | None = None


def load_mixture_items(labels_url: str, storage: StorageSpec) -> tuple[list[MixtureItem], str]:
    """The ``kind="mixtures"`` audio rows of a LABELS_V1 table, and the sha256 of the table's bytes.

    Raises:
        ConfigError: the table cannot be read, has no mixtures rows, or a row lacks its speech/background stem.
    """
    fs, path = open_fs(labels_url, storage)
    try:
        blob = fs.cat_file(path)
        rows = pq.read_table(io.BytesIO(blob)).to_pylist()
    except (FileNotFoundError, ValueError) as exc:  # ValueError: pyarrow's ArrowInvalid (not Parquet)
        raise ConfigError(f"cannot read the labels table {labels_url}: {exc}") from exc
    items = []
    for row in rows:
        if row.get("kind") != "mixtures" or row.get("media", "audio") != "audio":
            continue
        try:
            stems = json.loads(row.get("stems") or "{}")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"labels row {row['source']} has a `stems` value that is not JSON") from exc
        if not stems.get("speech") or not stems.get("background"):
            raise ConfigError(f"labels row {row['source']} names no speech and background stems "
                              f"(stems={row.get('stems')!r}); separation needs both.")
        if row.get("split") not in SPLITS:
            raise ConfigError(f"labels row {row['source']} has split {row.get('split')!r}, not one of {SPLITS}")
        items.append(MixtureItem(row["source"], stems["speech"], stems["background"], row["split"], row.get("snr_db")))
    if not items:
        raise ConfigError(f"{labels_url} has no kind='mixtures' rows; make some with "
                          "`audiopipe synth mixtures OUT_URL --n N`.")
    return items, hashlib.sha256(blob).hexdigest()


def missing_files(items: list[MixtureItem], storage: StorageSpec) -> list[str]:
    """URLs of mixtures and stems that are not in the store, found with one listing per folder (not one
    request per file), so a bad labels table fails before training instead of mid-epoch inside ``tf.data``."""
    listed: dict[tuple[str, str], set[str]] = {}
    missing = []
    for url in (u for item in items for u in (item.source, item.speech, item.background)):
        fs, path = open_fs(url, storage)
        key = (split_protocol(url), posixpath.dirname(path))
        if key not in listed:
            try:
                listed[key] = {p.rstrip("/") for p in fs.ls(key[1], detail=False)}
            except FileNotFoundError:
                listed[key] = set()
        if path not in listed[key]:
            missing.append(url)
    return missing


def load_mono(url: str, storage: StorageSpec, *, sampling_rate: int) -> np.ndarray:
    """Decode ``url`` with soundfile -> float32 mono ``(num_samples,)`` at ``sampling_rate`` Hz.

    Raises:
        BadAudioError: missing, undecodable, empty or non-finite audio (the message names the URL).
    """
    fs, path = open_fs(url, storage)
    try:  # other storage errors propagate unchanged: they may be transient, the file may be fine
        blob = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise BadAudioError(f"{url}: no such file (the labels name audio that is not in the store)") from exc
    try:
        data, rate = sf.read(io.BytesIO(blob), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise BadAudioError(f"{url}: cannot decode audio: {exc}") from exc
    if data.size == 0 or not np.isfinite(data).all():
        raise BadAudioError(f"{url}: audio is empty or holds NaN/inf samples")
    return resample(to_mono(data), rate, sampling_rate)


def audio_loader(storage: StorageSpec, *, sampling_rate: int, cache: bool = False) -> AudioLoader:
    """``url -> load_mono(url)``; ``cache`` keeps each decoded file in memory (230 MB per hour of audio)."""
    memo: dict[str, np.ndarray] = {}

    def load(url: str) -> np.ndarray:
        if url in memo:
            return memo[url]
        samples = load_mono(url, storage, sampling_rate=sampling_rate)
        if cache:
            memo[url] = samples
        return samples

    return load


def load_triplet(item: MixtureItem, load: AudioLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mixture, speech, background) of one labelled mixture, float32 mono, trimmed to one length.

    Raises:
        BadAudioError: a file is unusable, or the stems' lengths differ from the mixture's by more than
            ``STEM_LENGTH_TOLERANCE_SAMPLES``.
    """
    audio = [load(url) for url in (item.source, item.speech, item.background)]
    lengths = [a.size for a in audio]
    if max(lengths) - min(lengths) > STEM_LENGTH_TOLERANCE_SAMPLES:
        raise BadAudioError(f"{item.source}: mixture and stems have different lengths {lengths} (samples); "
                            "the stems must be sample-aligned with the mixture.")
    n = min(lengths)
    return audio[0][:n], audio[1][:n], audio[2][:n]


def training_pair(items: list[MixtureItem], index: int, load: AudioLoader, rng: np.random.Generator, *,
                  remix_fraction: float, snr_range_db: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(mixture, clean speech) waveforms for training example ``index``.

    With probability ``remix_fraction`` (Open-Unmix's random track mixing) the item's speech stem is mixed
    by ``mix_at_snr``, as ``synth`` mixes, with a random item's background stem cut or padded at a random
    offset, at an SNR uniform in ``snr_range_db``: every epoch sees new mixtures. Otherwise, or when a stem
    is silent, the labelled mixture and its speech stem are used.
    """
    from audiopipe.tasks.corpora_sounds import fit_length, mix_at_snr

    item = items[index]
    if rng.random() < remix_fraction:
        speech = load(item.speech)
        background = fit_length(load(items[int(rng.integers(len(items)))].background), speech.size, rng)
        try:
            mixture, speech_stem, _ = mix_at_snr(speech, background, float(rng.uniform(*snr_range_db)))
            return mixture, speech_stem
        except ValueError:  # a silent stem has no SNR: fall back to the labelled mixture
            pass
    mixture, speech, _ = load_triplet(item, load)
    return mixture, speech


def log_magnitude_stats(items: list[MixtureItem], load: AudioLoader, *, cfg: SeparationConfig
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and std of ``log1p(|STFT|)`` over every frame of the training mixtures (float64 sums),
    the statistics the model's ``feature_norm`` layer applies after its ``Log1p``."""
    from audiopipe.models.separation import stft_mag_phase

    total, total_sq, count = np.zeros(cfg.num_bins), np.zeros(cfg.num_bins), 0
    for item in items:
        frames = np.log1p(stft_mag_phase(load(item.source), cfg=cfg)[0])
        total += frames.sum(axis=0, dtype=np.float64)
        total_sq += np.square(frames, dtype=np.float64).sum(axis=0)
        count += frames.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean, np.maximum(std, MIN_LOG_MAGNITUDE_STD)


def separation_dataset(items: list[MixtureItem], load: AudioLoader, *, cfg: SeparationConfig, batch_size: int,
                       crop_frames: int = 0, remix_fraction: float = 0.0, shuffle: bool = False, seed: int = 0):
    """A ``tf.data.Dataset`` of ``({"magnitude", "lengths"}, {"estimate": speech magnitude})`` batches.

    A generator makes each example (``training_pair``, then ``stft_mag_phase`` of mixture and speech), in a
    fresh random order per epoch when ``shuffle``, cut to a random window of ``crop_frames`` frames when
    longer; batches are bucketed by length and zero-padded; ``lengths`` (int32, frames) tells the model
    where each row's padding starts. One seeded generator drives order, remixes and crops.
    """
    import tensorflow as tf

    from audiopipe.models.separation import stft_mag_phase

    rng, snrs = np.random.default_rng(seed), [i.snr_db for i in items if i.snr_db is not None]
    snrs = (min(snrs), max(snrs)) if snrs else REMIX_SNR_DB  # the labelled mixtures' span

    def gen():
        for i in rng.permutation(len(items)) if shuffle else range(len(items)):
            pair = training_pair(items, int(i), load, rng, remix_fraction=remix_fraction, snr_range_db=snrs)
            mix, speech = (stft_mag_phase(x, cfg=cfg)[0] for x in pair)
            if crop_frames and len(mix) > crop_frames:
                start = int(rng.integers(len(mix) - crop_frames + 1))
                mix, speech = mix[start:start + crop_frames], speech[start:start + crop_frames]
            yield {"magnitude": mix, "lengths": np.int32(len(mix))}, {"estimate": speech}

    frames = tf.TensorSpec((None, cfg.num_bins), tf.float32)
    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        {"magnitude": frames, "lengths": tf.TensorSpec((), tf.int32)}, {"estimate": frames}))
    ds = ds.bucket_by_sequence_length(lambda x, y: x["lengths"], list(BUCKET_EDGES_FRAMES),
                                      [batch_size] * (len(BUCKET_EDGES_FRAMES) + 1))
    return ds.prefetch(tf.data.AUTOTUNE)
