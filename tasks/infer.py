"""Bulk inference on a Dask worker: a group of recordings (or a chunk of a long one) -> model outputs.

In: an ``InferItem`` (recordings, or windows ``[first, stop)`` of one long recording) and an ``InferSpec``
(which model version, its feature config, the windowing, the decoder). Out: one ``InferOutput`` per
recording: timed words (transcribe, a whole recording), or the CTC log-probabilities of the item's frames
(transcribe, a chunk of a long recording: the shard decodes the joined chunks), class probabilities per
window (classify), or the URLs of the stems it wrote (separate); or a rejection reason, as in featurize. A
model output that is not finite (NaN/inf logits, probabilities or masks) rejects its recording.

Long recordings are cut into windows: each window's *core* (``window_s``) is what it answers for, and the
model also hears ``context_s`` of audio on either side, whose output is dropped. Window edges sit on the
model's output frame grid, so frames from consecutive windows join into one sequence with no frame lost or
doubled; decoding that joined sequence (greedy or beam search, ``models.ctc_align.decode_words``) cannot cut
or repeat a word at an edge.

The model is loaded once per worker process (``loaded_model``) through ``Registry.load``, which verifies the
file's sha256 before Keras opens it. Windows of all recordings in an item are sorted by length and run in
padded batches through one compiled ``tf.function``. No Prefect imports here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from audiopipe.infra.errors import BadAudioError, ConfigError
from audiopipe.infra.storage import StorageSpec, open_fs
from audiopipe.tasks.audio_io import AudioInfo, iter_segments, open_source, probe
from audiopipe.tasks.extract import SourceFile, header_of
from audiopipe.tasks.features import FeatureConfig, compute_features, padded_batch
from audiopipe.tasks.infer_channels import OneChannel

log = logging.getLogger(__name__)

TASKS = {"transcribe": "asr", "classify": "classify", "separate": "separate"}  # task -> model family
MAX_BATCH_FRAMES = 64_000  # padded input frames per model call (~640 s of 10 ms frames)
MIN_LOG_PROB = -1e4  # log-probabilities sent back as float16 are floored here (float16 ends at -65504)
CHANNEL_MODES = ("mix", "split")


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
    # transcribe: CTC prefix beam search of this width (1 = greedy), fused with the model version's
    # character LM (a file of its registry version, "" for none) at this weight and insertion bonus
    beam_width: int = 1
    lm_file: str = ""
    lm_weight: float = 0.0
    insertion_bonus: float = 0.0
    # transcribe: "mix" (channels mixed down to mono, as featurize does) or "split" (each channel transcribed
    # on its own: call recordings with agent and caller on separate channels)
    channels: str = "mix"
    # transcribe --gate: the classify model's spec; only windows whose top class is in gate_classes are
    # transcribed (tasks/infer_gate.py)
    gate: InferSpec | None = None
    gate_classes: tuple[str, ...] = ("speech",)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown inference task {self.task!r}; choose one of {', '.join(TASKS)}.")
        if self.channels not in CHANNEL_MODES:
            raise ConfigError(f"--channels must be one of {', '.join(CHANNEL_MODES)}, got {self.channels!r}.")
        if self.channels != "mix" and self.task != "transcribe":
            raise ConfigError(f"--channels {self.channels} is for transcribe only; {self.task} mixes channels down.")
        if self.window_s <= 0 or self.context_s < 0 or self.batch_size < 1:
            raise ConfigError("window_s must be > 0, context_s >= 0 and batch_size >= 1.")
        if self.beam_width < 1 or self.lm_weight < 0:
            raise ConfigError(f"beam_width must be >= 1 (1 = greedy) and lm_weight >= 0, got {self.beam_width} "
                              f"and {self.lm_weight}.")
        if self.lm_file and self.beam_width == 1:
            raise ConfigError("a character LM needs beam search: beam_width >= 2.")

    def describe_decoder(self) -> str:
        """How transcripts are decoded, in words (logs, ``_model.json``)."""
        if self.task != "transcribe":
            return ""
        if self.beam_width == 1:
            return "greedy (best path)"
        lm = f"{self.lm_file} x{self.lm_weight:g}" if self.lm_file else "no LM"
        return f"CTC prefix beam search, width {self.beam_width}, {lm}, insertion bonus {self.insertion_bonus:g}"

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

    @property
    def result_tag(self) -> str:
        """What identifies an answer in the manifest (``config_hash``) and in Dask keys: the model version,
        plus the channel mode when it is not the default (so a mix answer never passes for a split one)."""
        tag = self.model_tag if self.channels == "mix" else f"{self.model_tag} channels={self.channels}"
        if self.gate is not None:
            tag += f" gate={self.gate.model_tag}:{','.join(self.gate_classes)}"
        return tag


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
    # transcribe: (first global frame, log-probabilities float16 (frames, classes)) per window, in time order;
    # emptied once ``words`` holds the decoded recording (a whole recording is decoded on the worker)
    frames: list[tuple[int, np.ndarray]] = field(default_factory=list)
    words: list | None = None  # transcribe: ctc_align.Word, in time order
    # transcribe --channels split: the same two per input channel (``frames``/``words`` stay empty)
    channel_frames: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    channel_words: dict[int, list] = field(default_factory=dict)
    # transcribe --gate: windows not transcribed, (channel, index, start s, duration s, class, probability)
    gated: list[tuple] = field(default_factory=list)
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
    decoder: object = None  # transcribe: a ctc_decode.BeamDecoder, or None for greedy


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
    """How many times this process loaded each model (``REGISTRY_URL:name@version`` -> count); for tests and
    logs. Keyed by registry too: two registries' ``asr@1`` are different models."""
    return {f"{k[0]}:{k[1]}@{k[2]}": n for k, n in _LOADS.items()}


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
    from audiopipe.tasks.infer_decode import loaded_decoder

    return LoadedModel(model, predict, loaded_decoder(spec, storage) if spec.task == "transcribe" else None)


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
    if spec.gate is not None:
        warm_model(spec.gate, storage)
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
    channel: int | None = None  # --channels split: the input channel heard (None: mixed down)


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
        from audiopipe.tasks.infer_separate import separate_one

        return [separate_one(source, loaded, spec, storage) for source in item.sources]
    outputs, windows = [], []
    for source in item.sources:
        out = _decode_windows(source, item, spec, storage, windows, len(outputs))
        outputs.append(out)
    if spec.gate is not None:
        from audiopipe.tasks.infer_gate import gate_windows

        windows = gate_windows(windows, outputs, spec, storage)
    _run_batches(windows, outputs, loaded, spec)
    for out in outputs:
        if not out.ok:
            out.frames, out.classes, out.channel_frames = [], [], {}
            continue
        out.frames.sort(key=lambda piece: piece[0])
        out.classes.sort(key=lambda row: row[0])
        if spec.task == "transcribe" and item.stop is None and out.windows:  # whole: decode here, send words
            from audiopipe.tasks.infer_decode import decode_recording

            t0 = time.perf_counter()
            if spec.channels == "split":
                out.channel_words = {ch: decode_recording(pieces, spec, loaded.decoder)
                                     for ch, pieces in sorted(out.channel_frames.items())}
                out.channel_frames = {}
            else:
                out.words, out.frames = decode_recording(out.frames, spec, loaded.decoder), []
            out.timings["ctc_s"] += time.perf_counter() - t0
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
    started = time.perf_counter()
    mine = []
    try:
        channel, channels = 0, 1
        while channel < channels:  # mix: one pass; split: one pass per channel (the file is decoded again)
            handle, snd, out.info = _open(source, storage, stream=item.stop is not None)
            if spec.channels == "split":
                channels = out.info.channels
            try:
                _featurize(handle, snd, out, item, spec, slot, mine, None if spec.channels == "mix" else channel)
            finally:
                snd.close()
                handle.close()
            channel += 1
    except BadAudioError as exc:
        return InferOutput(source.url, reason=str(exc), info=out.info or header_of(exc),
                           timings=Counter(decode_s=time.perf_counter() - started))
    out.windows = len(mine)
    windows.extend(mine)
    return out


def _featurize(handle, snd, out: InferOutput, item: InferItem, spec: InferSpec, slot: int, mine: list,
               channel: int | None) -> None:
    """Windows of the item's range, of one channel (``channel``) or mixed down (None), featurized into ``mine``.

    Each channel is featurized with the model's own feature config and windowed exactly as mono audio; the
    recording's audio seconds are counted once (on channel 0), not once per channel.
    """
    cfg = spec.features
    core_s, context_s = _windowing(spec, item, out.info)
    source = snd if channel is None or out.info.channels == 1 else OneChannel(snd, channel)
    iterator = iter_windows(handle, source, out.info, core_s=core_s, context_s=context_s, rate=cfg.sample_rate,
                            first=item.first, stop=item.stop)
    while True:
        t0 = time.perf_counter()
        window = next(iterator, None)
        out.timings["decode_s"] += time.perf_counter() - t0
        if window is None:
            break
        t0 = time.perf_counter()
        if channel is not None:
            window = replace(window, channel=channel)
        mine.append((slot, window, compute_features(window.samples, cfg=cfg)))
        out.timings["features_s"] += time.perf_counter() - t0
        if not channel:
            out.audio_s += window.core_s


def _windowing(spec: InferSpec, item: InferItem, info: AudioInfo) -> tuple[float, float]:
    """Window core and context for one recording.

    A whole transcription up to twice the window runs as one window: cutting a 14 s call into 10 s + 4 s
    only adds padding (measured: 1.36x the real frames) and a seam. Classification keeps the model's segments.
    """
    if spec.gate is None and spec.task == "transcribe" and item.stop is None and info.duration_s <= 2 * spec.window_s:
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
        x, lengths = padded_batch([b[2] for b in batch])
        y = loaded.predict(x, lengths).numpy()
        elapsed = time.perf_counter() - t0
        for row, (slot, window, f) in enumerate(batch):
            out = outputs[slot]
            out.timings["model_s"] += elapsed * len(f) / float(lengths.sum())
            if out.reason is not None:
                continue
            if spec.task == "transcribe":
                out.reason = nonfinite_reason(y[row][:_num_outputs(int(lengths[row]), spec)], window.core_start_s,
                                              "logits")
                if out.reason is None and window.channel is None:
                    out.frames.append(_core_frames(y[row], int(lengths[row]), window, spec))
                elif out.reason is None:
                    out.channel_frames.setdefault(window.channel, []).append(
                        _core_frames(y[row], int(lengths[row]), window, spec))
            else:
                out.reason = nonfinite_reason(y[row], window.core_start_s, "class probabilities")
                if out.reason is None:
                    out.classes.append((window.index, window.core_start_s, window.core_s,
                                        y[row].astype(np.float32)))


def nonfinite_reason(values: np.ndarray, start_s: float, what: str) -> str | None:
    """None if every value is finite, else the rejection reason (the recording is never written as ok)."""
    finite = np.isfinite(values)
    if finite.all():
        return None
    bad = int(values.size - np.count_nonzero(finite))
    return (f"non-finite model output: {bad} of {values.size} {what} are NaN or Inf in the window at "
            f"{start_s:.1f} s (the model's weights, or this recording's features, overflow)")


def _num_outputs(num_input_frames: int, spec: InferSpec) -> int:
    from audiopipe.models.layers import output_lengths

    return int(output_lengths(np.array([num_input_frames]), spec.subsample)[0])


def _core_frames(logits: np.ndarray, num_input_frames: int, window: Window, spec: InferSpec
                 ) -> tuple[int, np.ndarray]:
    """The window's output frames inside its core: (first global frame index, log-probabilities float16).

    float16 keeps log-probabilities to about 0.01 nats; they are floored at ``MIN_LOG_PROB``, far below
    any score the decoders tell apart (the caller has checked that the logits are finite).
    """
    from audiopipe.models.ctc_decode import log_softmax

    frame_s = spec.frame_s
    valid = _num_outputs(num_input_frames, spec)
    log_probs = np.maximum(log_softmax(logits[:valid]), MIN_LOG_PROB).astype(np.float16)
    # global frame index of each output frame; the core is [core_start, core_end) on that grid
    offset = int(round(window.start_s / frame_s))
    core_first = int(round(window.core_start_s / frame_s))
    core_stop = int(round((window.core_start_s + window.core_s) / frame_s))
    lo, hi = max(0, core_first - offset), max(0, min(valid, core_stop - offset))
    return core_first if lo < hi else offset + lo, log_probs[lo:hi]
