"""Stage 1+2 of featurize on a Dask worker: one work item (a file, or a chunk of a long file) -> features.

In: a ``WorkItem`` naming the object and the segments to compute. Out: an ``ItemResult`` holding an Arrow
``RecordBatch`` of FEATURES_V1 rows (one per segment) or a rejection reason. These functions run in
worker processes: they take only picklable arguments, open storage themselves and never import Prefect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

from audiopipe.infra.errors import BadAudioError
from audiopipe.infra.schemas import FEATURES_V1, features_to_numpy  # noqa: F401 - re-exported for readers
from audiopipe.infra.storage import StorageSpec, open_fs
from audiopipe.tasks.audio_io import AudioInfo, iter_segments, open_source, probe
from audiopipe.tasks.features import FeatureConfig, compute_features, finite_features


@dataclass(frozen=True)
class SourceFile:
    """One listed input object. ``version`` (ETag, or mtime+size) decides whether it changed.

    ``rejected`` is set when discovery already knows the object cannot be read (a dangling symlink, a link
    loop, a FIFO): the worker side turns it into a rejected manifest row with that reason, without opening it.
    """

    url: str
    size: int
    etag: str | None = None
    mtime: float | None = None
    rejected: str | None = None

    @property
    def version(self) -> str:
        return source_version(self.etag, self.mtime_us, self.size)

    @property
    def mtime_us(self) -> int | None:
        """Modification time in whole microseconds since the epoch: the manifest's precision."""
        return None if self.mtime is None else round(self.mtime * 1_000_000)


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def source_version(etag: str | None, mtime_us: int | None, size: int) -> str:
    """What identifies one version of an object: its ETag, else its mtime (microseconds) and size."""
    return etag if etag else f"{mtime_us}:{size}"


def us_to_datetime(mtime_us: int) -> datetime:
    """Exact microseconds -> aware UTC datetime (``datetime.fromtimestamp`` may round differently)."""
    return EPOCH + timedelta(microseconds=mtime_us)


def datetime_to_us(when: datetime) -> int:
    return (when - EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True)
class WorkItem:
    """Segments ``[first, stop)`` of one source; ``stop=None`` means to the end."""

    source: SourceFile
    first: int = 0
    stop: int | None = None


@dataclass
class ItemResult:
    """What a worker sends back for one item. ``batch`` is None when rejected or empty."""

    source: str
    reason: str | None = None
    info: AudioInfo | None = None
    batch: pa.RecordBatch | None = None
    num_segments: int = 0
    audio_s: float = 0.0
    busy_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Rejection:
    """Why a file is rejected, and its header when the header could be read (for the manifest row)."""

    reason: str
    info: AudioInfo | None = None


def header_of(exc: BadAudioError) -> AudioInfo | None:
    """The header a rejection read before refusing the file (``audio_io.HeaderRejected``), else None."""
    return getattr(exc, "info", None)


def probe_item(source: SourceFile, storage: StorageSpec) -> AudioInfo | Rejection:
    """Header of ``source`` (for planning chunks of a long file), or why it is rejected."""
    if source.rejected:
        return Rejection(source.rejected)
    fs, path = open_fs(source.url, storage)
    try:
        handle = open_source(fs, path, source.size, stream=True)
    except BadAudioError as exc:
        return Rejection(str(exc))
    with handle:
        try:
            snd, info = probe(handle, source.size)
        except BadAudioError as exc:
            return Rejection(str(exc), header_of(exc))
        snd.close()
    return info


def featurize_item(item: WorkItem, cfg: FeatureConfig, storage: StorageSpec) -> ItemResult:
    """Decode (by content, whatever the extension), check and featurize the item's segments.

    Bad audio, and features that come out NaN or Inf, become a rejected result (with the header when it
    was read); storage failures raise ``TransientStorageError`` so the shard is retried rather than the
    file being wrongly rejected.
    """
    started = time.perf_counter()
    url = item.source.url
    if item.source.rejected:
        return ItemResult(url, reason=item.source.rejected)
    fs, path = open_fs(url, storage)
    # a chunk of a long file reads only its byte ranges; a whole small file comes in one GET
    try:
        handle = open_source(fs, path, item.source.size, stream=item.stop is not None)
    except BadAudioError as exc:
        return ItemResult(url, reason=str(exc), busy_s=time.perf_counter() - started)
    try:
        snd, info = probe(handle, item.source.size)
    except BadAudioError as exc:
        handle.close()
        return ItemResult(url, reason=str(exc), info=header_of(exc), busy_s=time.perf_counter() - started)
    rows: list[tuple[int, float, float, np.ndarray]] = []
    try:
        for index, start_s, duration_s, samples in iter_segments(
            handle, snd, info, segment_seconds=cfg.segment_seconds, target_rate=cfg.sample_rate,
            first=item.first, stop=item.stop,
        ):
            rows.append((index, start_s, duration_s, finite_features(samples, cfg=cfg)))
    except BadAudioError as exc:
        return ItemResult(url, reason=str(exc), info=info, busy_s=time.perf_counter() - started)
    finally:
        snd.close()
        handle.close()
    audio_s = float(sum(r[2] for r in rows))
    return ItemResult(url, info=info, batch=feature_batch(url, rows, cfg=cfg), num_segments=len(rows),
                      audio_s=audio_s, busy_s=time.perf_counter() - started)


def feature_batch(source: str, rows: list[tuple[int, float, float, np.ndarray]], *, cfg: FeatureConfig
                  ) -> pa.RecordBatch:
    """FEATURES_V1 rows for one source, built from numpy without a Python loop over frames.

    Args:
        source: The input URL.
        rows: ``(segment, start_s, duration_s, features (num_frames, num_bins) float32)`` per segment.
    """
    frames = [r[3] for r in rows]
    n_frames = np.array([f.shape[0] for f in frames], dtype=np.int32)
    flat = np.concatenate([f.reshape(-1) for f in frames]) if frames else np.zeros(0, np.float32)
    bins = cfg.num_bins
    inner_offsets = np.arange(0, int(n_frames.sum()) + 1, dtype=np.int32) * bins
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat, type=pa.float32()))
    outer_offsets = np.concatenate([[0], np.cumsum(n_frames)]).astype(np.int32)
    features = pa.ListArray.from_arrays(pa.array(outer_offsets), inner)
    n = len(rows)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([source] * n, pa.string()),
            pa.array([r[0] for r in rows], pa.int32()),
            pa.array([r[1] for r in rows], pa.float64()),
            pa.array([r[2] for r in rows], pa.float64()),
            pa.array(n_frames),
            features.cast(FEATURES_V1.field("features").type),
            pa.array([cfg.config_hash] * n, pa.string()),
        ],
        schema=FEATURES_V1,
    )


def warm_up(cfg: FeatureConfig) -> float:
    """Import and run the feature code once on a worker, so the first real file doesn't pay for it."""
    started = time.perf_counter()
    compute_features(np.zeros(cfg.sample_rate // 10, np.float32), cfg=cfg)
    return time.perf_counter() - started
