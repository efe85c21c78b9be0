"""Bulk inference on a Dask worker: a group of recordings (or a chunk of a long one) -> model outputs.

In: an ``InferItem`` (recordings, or windows ``[first, stop)`` of one long recording) and an ``InferSpec``
(which model version, its feature config, the windowing). Out: one ``InferOutput`` per recording: CTC frame
ids and probabilities (transcribe), class probabilities per window (classify), or the URLs of the stems it
wrote (separate); or a rejection reason, as in featurize.

Long recordings are cut into windows: each window's *core* (``window_s``) is what it answers for, and the
model also hears ``context_s`` of audio on either side, whose output is dropped. Window edges sit on the
model's output frame grid, so frames from consecutive windows join into one sequence with no frame lost or
doubled; greedy CTC over that joined sequence (``models.ctc_align``) cannot cut or repeat a word at an edge.

The model is loaded once per worker process (``loaded_model``) through ``Registry.load``, which verifies the
file's sha256 before Keras opens it. Windows of all recordings in an item are sorted by length and run in
padded batches through one compiled ``tf.function``. No Prefect imports here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from audiopipe.infra.errors import BadAudioError, ConfigError
from audiopipe.infra.storage import StorageSpec, join, open_fs, put_file_atomic
from audiopipe.tasks.audio_io import AudioInfo, iter_segments, open_source, probe
from audiopipe.tasks.extract import SourceFile, header_of
from audiopipe.tasks.features import FeatureConfig, compute_features

log = logging.getLogger(__name__)

TASKS = {"transcribe": "asr", "classify": "classify", "separate": "separate"}  # task -> model family
MAX_BATCH_FRAMES = 64_000  # padded input frames per model call (~640 s of 10 ms frames)


@dataclass(frozen=True)
class InferSpec:
    """Everything a worker needs to run one model version over recordings (small and picklable)."""

    task: str
    registry_url: str
    model_name: str
    model_version: int
    model_sha256: str
    feature_config: dict  # FeatureConfig fields (transcribe, classify) or the STFT settings (separate)
    labels: tuple[str, ...] = ()  # the ASR vocabulary (id i+1 = labels[i]) or the class names
    subsample: int = 1  # model output frames per input frame (ASR front end)
    window_s: float = 10.0
    context_s: float = 1.0
    batch_size: int = 32
    stems_url: str = ""  # separate: stems go under here, at the recording's path relative to in_url
    in_url: str = ""
    cache_dir: str = ".audiopipe/models"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown inference task {self.task!r}; choose one of {', '.join(TASKS)}.")
        if self.window_s <= 0 or self.context_s < 0 or self.batch_size < 1:
            raise ConfigError("window_s must be > 0, context_s >= 0 and batch_size >= 1.")

    @property
    def features(self) -> FeatureConfig:
        return FeatureConfig.from_dict(self.feature_config)

    @property
    def frame_s(self) -> float:
        """Seconds per model output frame (transcribe)."""
        cfg = self.features
        return cfg.hop_length * self.subsample / cfg.sample_rate

    @property
    def model_tag(self) -> str:
        return f"{self.model_name}@{self.model_version}"


@dataclass(frozen=True)
class InferItem:
    """Some recordings, whole (``first=0, stop=None``), or windows ``[first, stop)`` of one recording."""

    sources: tuple[SourceFile, ...]
    first: int = 0
    stop: int | None = None


@dataclass
class InferOutput:
    """What a worker sends back for one recording of an item (arrays are small: ids, not logits)."""

    source: str
    reason: str | None = None
    info: AudioInfo | None = None
    audio_s: float = 0.0
    windows: int = 0
    # transcribe: (first global frame, ids uint8, probs float16) per window, in time order
    frames: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    # classify: (window index, start s, duration s, probabilities float32) per window
    classes: list[tuple[int, float, float, np.ndarray]] = field(default_factory=list)
    stems: dict[str, str] = field(default_factory=dict)  # separate: stem name -> URL written
    timings: Counter = field(default_factory=Counter)  # decode_s, features_s, model_s

    @property
    def ok(self) -> bool:
        return self.reason is None


# ---- the model, once per worker process ---------------------------------------------------------------

@dataclass
class LoadedModel:
    model: object
    predict: object  # (inputs array, lengths) -> outputs, a compiled tf.function


_MODELS: dict[tuple, LoadedModel] = {}
_MODEL_LOCK = threading.Lock()
_LOADS: Counter = Counter()


def loaded_model(spec: InferSpec, storage: StorageSpec) -> LoadedModel:
    """This process's copy of the spec's model: fetched, checksum-verified and compiled on first use."""
    key = (spec.registry_url, spec.model_name, spec.model_version, spec.model_sha256)
    with _MODEL_LOCK:
        if key not in _MODELS:
            _MODELS[key] = _load(spec, storage)
            _LOADS[key] += 1
        return _MODELS[key]


def model_loads() -> dict[str, int]:
    """How many times this process loaded each model (``name@version`` -> count); for tests and logs."""
    return {f"{k[1]}@{k[2]}": n for k, n in _LOADS.items()}


def _load(spec: InferSpec, storage: StorageSpec) -> LoadedModel:
    import tensorflow as tf

    from audiopipe.models.registry import ModelRef, Registry

    _limit_tf_threads(tf)
    model, card = Registry(spec.registry_url, storage).load(
        ModelRef(spec.registry_url, spec.model_name, spec.model_version), spec.cache_dir)
    if card.model_sha256 != spec.model_sha256:
        raise ConfigError(f"{spec.model_tag} changed in the registry during the run (sha256 differs); rerun.")
    name = "magnitude" if spec.task == "separate" else "features"
    bins = int(model.input[name].shape[-1])
    signature = [tf.TensorSpec((None, None, bins), tf.float32), tf.TensorSpec((None,), tf.int32)]

    @tf.function(input_signature=signature)
    def predict(x, lengths):
        out = model({name: x, "lengths": lengths}, training=False)
        return out["mask"] if spec.task == "separate" else out

    log.info("loaded %s (%d parameters) in process %d", spec.model_tag, model.count_params(), os.getpid())
    return LoadedModel(model, predict)


def _limit_tf_threads(tf) -> None:
    """One intra-op thread per single-threaded Dask worker (more would oversubscribe the machine's cores)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        except RuntimeError:  # TF already initialised in this process: keep its pools
            pass


def warm_model(spec: InferSpec, storage: StorageSpec) -> int:
    """Load the model on this worker ahead of the first item (``client.run``); returns this process's PID.

    Also traces the compiled model function (its signature has open dimensions, so one trace serves every
    batch; ~1 s) and runs the feature code once (librosa's first call costs seconds): both belong to
    start-up, not to the first recordings.
    """
    loaded = loaded_model(spec, storage)
    bins = int(loaded.predict.input_signature[0].shape[-1])
    loaded.predict(np.zeros((1, 101, bins), np.float32), np.array([101], np.int32))  # trace the graph once
    if spec.task != "separate":
        compute_features(np.zeros(spec.features.sample_rate // 10, np.float32), cfg=spec.features)
    return os.getpid()


# ---- windows ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """Audio of one window: its core ``[core_start_s, core_start_s + core_s)`` plus context either side."""

    index: int
    core_start_s: float
    core_s: float
    start_s: float  # time of samples[0]
    samples: np.ndarray


def iter_windows(handle, snd, info: AudioInfo, *, core_s: float, context_s: float, rate: int, first: int = 0,
                 stop: int | None = None) -> Iterator[Window]:
    """Windows ``first <= k < stop`` of a recording, decoded segment by segment (bounded memory).

    Reads one core before ``first`` and one after ``stop`` for their context; at most three cores are
    in memory at a time.
    """
    ctx = int(round(context_s * rate))
    segments = iter_segments(handle, snd, info, segment_seconds=core_s, target_rate=rate,
                             first=max(0, first - 1), stop=None if stop is None else stop + 1)
    prev = cur = None

    def wanted(seg) -> bool:
        return seg is not None and seg[0] >= first and (stop is None or seg[0] < stop)

    for seg in segments:
        if wanted(cur):
            yield _window(prev, cur, seg, ctx, rate)
        prev, cur = cur, seg
    if wanted(cur):
        yield _window(prev, cur, None, ctx, rate)


def _window(prev, cur, nxt, ctx: int, rate: int) -> Window:
    empty = np.zeros(0, np.float32)
    head = prev[3][-ctx:] if prev is not None and ctx else empty
    tail = nxt[3][:ctx] if nxt is not None and ctx else empty
    samples = np.concatenate([head, cur[3], tail]) if len(head) or len(tail) else cur[3]
    return Window(cur[0], cur[1], cur[2], cur[1] - len(head) / rate, samples)


def num_windows(info: AudioInfo, core_s: float) -> int:
    from audiopipe.tasks.audio_io import num_segments

    return num_segments(info, core_s)


# ---- one item ---------------------------------------------------------------------------------------

def infer_item(item: InferItem, spec: InferSpec, storage: StorageSpec) -> list[InferOutput]:
    """Run the model over the item's recordings; one ``InferOutput`` each (rejected ones carry a reason).

    Raises:
        TransientStorageError: the store failed while reading (the shard is retried, nothing is rejected).
        IntegrityError / RegistryError: the model file does not match its card (the run stops).
    """
    loaded = loaded_model(spec, storage)
    if spec.task == "separate":
        return [_separate_one(source, loaded, spec, storage) for source in item.sources]
    outputs, windows = [], []
    for source in item.sources:
        out = _decode_windows(source, item, spec, storage, windows, len(outputs))
        outputs.append(out)
    _run_batches(windows, outputs, loaded, spec)
    for out in outputs:
        if out.ok:
            out.frames.sort(key=lambda piece: piece[0])
            out.classes.sort(key=lambda row: row[0])
    return outputs


def _open(source: SourceFile, storage: StorageSpec, stream: bool):
    fs, path = open_fs(source.url, storage)
    handle = open_source(fs, path, source.size, stream=stream)
    try:
        snd, info = probe(handle)
    except BaseException:
        handle.close()
        raise
    return handle, snd, info


def _decode_windows(source: SourceFile, item: InferItem, spec: InferSpec, storage: StorageSpec,
                    windows: list, slot: int) -> InferOutput:
    """Decode and featurize the source's windows into ``windows`` as ``(slot, Window, features)``."""
    out = InferOutput(source.url, reason=source.rejected)  # rejected at discovery (dangling symlink...)
    if out.reason:
        return out
    cfg = spec.features
    started = time.perf_counter()
    mine = []
    try:
        handle, snd, out.info = _open(source, storage, stream=item.stop is not None)
        core_s, context_s = _windowing(spec, item, out.info)
        try:
            iterator = iter_windows(handle, snd, out.info, core_s=core_s, context_s=context_s,
                                    rate=cfg.sample_rate, first=item.first, stop=item.stop)
            while True:
                t0 = time.perf_counter()
                window = next(iterator, None)
                out.timings["decode_s"] += time.perf_counter() - t0
                if window is None:
                    break
                t0 = time.perf_counter()
                mine.append((slot, window, compute_features(window.samples, cfg=cfg)))
                out.timings["features_s"] += time.perf_counter() - t0
                out.audio_s += window.core_s
        finally:
            snd.close()
            handle.close()
    except BadAudioError as exc:
        return InferOutput(source.url, reason=str(exc), info=out.info or header_of(exc),
                           timings=Counter(decode_s=time.perf_counter() - started))
    out.windows = len(mine)
    windows.extend(mine)
    return out


def _windowing(spec: InferSpec, item: InferItem, info: AudioInfo) -> tuple[float, float]:
    """Window core and context for one recording.

    A whole transcription up to twice the window runs as one window: cutting a 14 s call into 10 s + 4 s
    only adds padding (measured: 1.36x the real frames) and a seam. Classification keeps the model's segments.
    """
    if spec.task == "transcribe" and item.stop is None and info.duration_s <= 2 * spec.window_s:
        return (info.frames + 1) / info.sample_rate, 0.0
    return spec.window_s, spec.context_s


def _run_batches(windows: list, outputs: list[InferOutput], loaded: LoadedModel, spec: InferSpec) -> None:
    """Windows sorted by length, in padded batches; each batch's outputs go back to their recordings."""
    order = sorted(range(len(windows)), key=lambda i: windows[i][2].shape[0])
    start = 0
    while start < len(order):
        longest = windows[order[min(start + spec.batch_size, len(order)) - 1]][2].shape[0]
        size = max(1, min(spec.batch_size, MAX_BATCH_FRAMES // max(1, longest)))
        batch = [windows[i] for i in order[start:start + size]]
        start += size
        t0 = time.perf_counter()
        feats = [b[2] for b in batch]
        lengths = np.array([f.shape[0] for f in feats], np.int32)
        x = np.zeros((len(feats), int(lengths.max()), feats[0].shape[1]), np.float32)
        for row, f in enumerate(feats):
            x[row, :len(f)] = f
        y = loaded.predict(x, lengths).numpy()
        elapsed = time.perf_counter() - t0
        for row, (slot, window, f) in enumerate(batch):
            out = outputs[slot]
            out.timings["model_s"] += elapsed * len(f) / float(lengths.sum())
            if spec.task == "transcribe":
                out.frames.append(_core_frames(y[row], int(lengths[row]), window, spec))
            else:
                out.classes.append((window.index, window.core_start_s, window.core_s, y[row].astype(np.float32)))


def _core_frames(logits: np.ndarray, num_input_frames: int, window: Window, spec: InferSpec
                 ) -> tuple[int, np.ndarray, np.ndarray]:
    """The window's output frames inside its core, as (first global frame index, ids, probs)."""
    from audiopipe.models.ctc_align import frame_outputs
    from audiopipe.models.layers import output_lengths

    frame_s = spec.frame_s
    valid = int(output_lengths(np.array([num_input_frames]), spec.subsample)[0])
    ids, probs = frame_outputs(logits[:valid])
    # global frame index of each output frame; the core is [core_start, core_end) on that grid
    offset = int(round(window.start_s / frame_s))
    core_first = int(round(window.core_start_s / frame_s))
    core_stop = int(round((window.core_start_s + window.core_s) / frame_s))
    lo, hi = max(0, core_first - offset), max(0, min(valid, core_stop - offset))
    return core_first if lo < hi else offset + lo, ids[lo:hi], probs[lo:hi]


# ---- separation: one recording at a time, stems streamed to local FLAC files, then uploaded ------------

STEMS = ("speech", "background")


def stem_urls(spec: InferSpec, source_url: str) -> dict[str, str]:
    """Where the stems of ``source_url`` go: ``<stems_url>/<path relative to in_url>/<stem>.flac``."""
    from audiopipe.tasks.infer_layout import relative_source

    rel = relative_source(spec.in_url, source_url)
    return {stem: join(spec.stems_url, rel, f"{stem}.flac") for stem in STEMS}


def _separate_one(source: SourceFile, loaded: LoadedModel, spec: InferSpec, storage: StorageSpec) -> InferOutput:
    import soundfile as sf

    from audiopipe.models.separation import SeparationConfig, apply_mask_istft, stft_mag_phase

    out = InferOutput(source.url, reason=source.rejected)  # rejected at discovery (dangling symlink...)
    if out.reason:
        return out
    settings = spec.feature_config
    cfg = SeparationConfig(sampling_rate=int(settings["sampling_rate"]), n_fft=int(settings["n_fft"]),
                           hop=int(settings["hop"]))
    rate = cfg.sampling_rate
    tmp = tempfile.mkdtemp(prefix="audiopipe-stems-")
    paths = {stem: os.path.join(tmp, f"{stem}.flac") for stem in STEMS}
    try:
        try:
            handle, snd, out.info = _open(source, storage, stream=True)
        except BadAudioError as exc:
            return InferOutput(source.url, reason=str(exc), info=header_of(exc))
        writers = {stem: sf.SoundFile(p, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16")
                   for stem, p in paths.items()}
        try:
            for window in iter_windows(handle, snd, out.info, core_s=spec.window_s, context_s=spec.context_s,
                                       rate=rate):
                t0 = time.perf_counter()
                magnitude, _ = stft_mag_phase(window.samples, cfg=cfg)
                mask = loaded.predict(magnitude[None], np.array([len(magnitude)], np.int32)).numpy()[0]
                speech = apply_mask_istft(window.samples, mask, cfg=cfg)
                out.timings["model_s"] += time.perf_counter() - t0
                lo = int(round((window.core_start_s - window.start_s) * rate))
                core = slice(lo, lo + int(round(window.core_s * rate)))
                writers["speech"].write(np.clip(speech[core], -1, 1))
                writers["background"].write(np.clip(window.samples[core] - speech[core], -1, 1))
                out.audio_s += window.core_s
                out.windows += 1
        except BadAudioError as exc:
            return InferOutput(source.url, reason=str(exc), info=out.info)
        finally:
            for w in writers.values():
                w.close()
            snd.close()
            handle.close()
        if out.windows == 0:
            return InferOutput(source.url, reason="empty: no audio samples", info=out.info)
        t0 = time.perf_counter()
        for stem, url in stem_urls(spec, source.url).items():
            fs, path = open_fs(url, storage)
            put_file_atomic(fs, paths[stem], path)
            out.stems[stem] = url
        out.timings["write_s"] += time.perf_counter() - t0
        return out
    finally:
        for p in paths.values():
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(tmp)
