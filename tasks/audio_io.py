"""Stage 1 of featurize: one stored audio object -> mono float32 segments at the target rate.

In: an fsspec filesystem + path. Out: ``(segment_index, start_s, samples)`` for each segment of
``segment_seconds`` (of source time), each one decoded, downmixed, checked and resampled (soxr HQ) on
its own, so any chunk of segments can be computed on any worker with the same result. Small objects are
read whole in one GET; large ones are streamed, so a 2-hour recording never sits whole in memory.
Every reason a file cannot be used becomes a ``BadAudioError`` whose message starts with a category.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from audiopipe.infra.errors import BadAudioError, TransientStorageError

AUDIO_EXTENSIONS = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
                              ".m4a", ".aac"})
# libsndfile cannot decode AAC; these are accounted for (rejected with a reason), never silently skipped.
UNSUPPORTED_EXTENSIONS = frozenset({".m4a", ".aac"})
WHOLE_READ_MAX_BYTES = 32 * 1024 * 1024  # one GET below this; streamed with range reads above
STREAM_BLOCK_BYTES = 8 * 1024 * 1024
MAX_SEGMENT_BYTES = 1024 * 1024 * 1024  # channels x frames x 4 bytes of one decoded segment
MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ = 1_000, 768_000
# Declared vs decoded length: encoders' frame estimates (MP3 without a Xing header) may be off a little.
TRUNCATION_TOLERANCE = 0.005
# libsndfile's header log notes a data chunk longer than the file: "data : 96000 (should be 47978)" (WAV),
# "SSND : 132308 (should be 66131)" (AIFF).
_SHORT_CHUNK = re.compile(r"(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)")
_STREAMED_WAV_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)  # placeholders written by pipes/streamers: not truncation


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of one object. ``frames`` is per channel, at ``sample_rate``."""

    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


class _GuardedReader(io.RawIOBase):
    """A file object for soundfile that remembers storage errors.

    soundfile calls ``readinto`` from a C callback that swallows exceptions and reports end-of-file,
    which would turn a dropped connection into a silently "truncated" file. This wrapper records the
    error so the caller can raise it as transient after each soundfile call.
    """

    def __init__(self, raw) -> None:
        self._raw, self.error = raw, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buf) -> int:
        try:
            data = self._raw.read(len(buf))
        except Exception as exc:  # noqa: BLE001 - re-raised by check() outside the C callback
            self.error = exc
            raise
        buf[: len(data)] = data
        return len(data)

    def check(self, what: str) -> None:
        if self.error is not None:
            raise TransientStorageError(f"storage read failed while {what}: {type(self.error).__name__}: "
                                        f"{self.error}") from self.error

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_source(fs, path: str, size: int, *, stream: bool = False) -> io.IOBase:
    """Open ``path`` for decoding: whole bytes in memory when small, a guarded range reader when large
    or when ``stream`` asks for it (a header probe, or one chunk of a long file).

    Raises:
        BadAudioError: for a 0-byte object or one that disappeared since listing.
        TransientStorageError: when the store cannot be read.
    """
    if size == 0:
        raise BadAudioError("empty: the file has 0 bytes")
    try:
        if size <= WHOLE_READ_MAX_BYTES and not stream:
            return io.BytesIO(fs.cat_file(path))
        return _GuardedReader(fs.open(path, "rb", block_size=STREAM_BLOCK_BYTES, cache_type="readahead"))
    except FileNotFoundError as exc:
        raise BadAudioError("missing: the object was deleted after it was listed") from exc
    except Exception as exc:  # noqa: BLE001 - every other storage failure is worth a retry
        raise TransientStorageError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def probe(handle: io.IOBase) -> tuple[sf.SoundFile, AudioInfo]:
    """Open the decoder and check the header. The caller closes the returned ``SoundFile``.

    Raises:
        BadAudioError: not audio, header only, truncated WAV, implausible rate or channel count.
    """
    try:
        snd = sf.SoundFile(handle)
    except sf.LibsndfileError as exc:
        _raise_if_storage(handle, "opening")
        raise BadAudioError(f"undecodable: {_decoder_message(exc)}") from None
    except (RuntimeError, TypeError, ValueError) as exc:
        _raise_if_storage(handle, "opening")
        raise BadAudioError(f"undecodable: {exc}") from None
    info = AudioInfo(snd.samplerate, snd.channels, snd.frames, snd.format, snd.subtype)
    try:
        _check_header(snd, info)
    except BadAudioError:
        snd.close()
        raise
    return snd, info


def _check_header(snd: sf.SoundFile, info: AudioInfo) -> None:
    if not MIN_SAMPLE_RATE_HZ <= info.sample_rate <= MAX_SAMPLE_RATE_HZ:
        raise BadAudioError(f"bad header: implausible sample rate {info.sample_rate} Hz")
    if info.channels < 1 or info.channels > 1024:
        raise BadAudioError(f"bad header: implausible channel count {info.channels}")
    short = _SHORT_CHUNK.search(snd.extra_info or "")
    if short and int(short.group(1)) not in _STREAMED_WAV_SIZES and int(short.group(2)) < int(short.group(1)):
        declared, present = int(short.group(1)), int(short.group(2))
        raise BadAudioError(f"truncated: the header declares {declared} bytes of audio data "
                            f"but the file holds {present}")
    if info.frames == 0:
        raise BadAudioError("no audio: the header is valid but the file holds 0 samples")


def _decoder_message(exc: sf.LibsndfileError) -> str:
    text = getattr(exc, "error_string", "") or str(exc)
    if "Format not recognised" in text or "not recognised" in text.lower():
        return "not an audio format libsndfile recognises (wrong extension, or not audio at all)"
    return f"the decoder failed: {text.strip()}"


def _raise_if_storage(handle: io.IOBase, what: str) -> None:
    if isinstance(handle, _GuardedReader):
        handle.check(what)


def segment_frames(info: AudioInfo, segment_seconds: float) -> int:
    """Source frames per segment (the last segment may be shorter)."""
    return max(1, round(segment_seconds * info.sample_rate))


def num_segments(info: AudioInfo, segment_seconds: float) -> int:
    """Segments of ``segment_seconds`` covering the whole recording (at least one)."""
    step = segment_frames(info, segment_seconds)
    return max(1, -(-info.frames // step))


def to_mono(block: np.ndarray) -> np.ndarray:
    """Average channels of a ``(frames, channels)`` float32 block into ``(frames,)``.

    Column adds instead of ``mean(axis=1)``: measured ~5x faster on interleaved stereo here.
    """
    if block.shape[1] == 1:
        return block[:, 0]
    acc = np.add(block[:, 0], block[:, 1])  # same sums as copy-then-add, one pass fewer
    for ch in range(2, block.shape[1]):
        acc += block[:, ch]
    acc *= np.float32(1.0 / block.shape[1])
    return acc


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """soxr HQ resampling (librosa's default ``res_type``); a no-op at equal rates."""
    if rate_in == rate_out:
        return samples
    return soxr.resample(samples, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def iter_segments(handle: io.IOBase, snd: sf.SoundFile, info: AudioInfo, *, segment_seconds: float,
                  target_rate: int, first: int = 0, stop: int | None = None
                  ) -> Iterator[tuple[int, float, float, np.ndarray]]:
    """Yield ``(index, start_s, duration_s, mono samples at target_rate)`` for segments ``first <= i < stop``.

    Times are of the source recording; the last segment may be shorter than ``segment_seconds``.

    Raises:
        BadAudioError: NaN/Inf samples, a segment too large to decode, or fewer frames than declared.
        TransientStorageError: when a streamed read fails underneath the decoder.
    """
    step = segment_frames(info, segment_seconds)
    total = num_segments(info, segment_seconds)
    stop = total if stop is None else min(stop, total)
    if step * info.channels * 4 > MAX_SEGMENT_BYTES:
        raise BadAudioError(f"too large: one {segment_seconds:g} s segment of {info.channels} channels at "
                            f"{info.sample_rate} Hz needs > {MAX_SEGMENT_BYTES >> 20} MiB; lower --segment-seconds")
    if first * step >= info.frames:
        return  # the file is shorter than when it was planned: nothing in this range
    if first:
        try:
            snd.seek(first * step)
        except sf.LibsndfileError as exc:
            _raise_if_storage(handle, "seeking")
            raise BadAudioError(f"corrupt: cannot seek to {first * segment_seconds:g} s: "
                                f"{_decoder_message(exc)}") from None
        _raise_if_storage(handle, "seeking")
    for index in range(first, stop):
        want = min(step, info.frames - index * step)
        try:
            block = snd.read(want, dtype="float32", always_2d=True)
        except sf.LibsndfileError as exc:
            _raise_if_storage(handle, "decoding")
            raise BadAudioError(f"corrupt: decoding failed at {index * segment_seconds:g} s: "
                                f"{_decoder_message(exc)}") from None
        _raise_if_storage(handle, "decoding")
        _check_length(block.shape[0], want, index, step, info)
        if block.shape[0] == 0:
            return
        mono = to_mono(block)
        if not np.isfinite(mono).all():
            raise BadAudioError(f"invalid samples: NaN or Inf in the segment starting at {index * segment_seconds:g} s")
        rate = info.sample_rate
        yield index, index * step / rate, block.shape[0] / rate, resample(mono, rate, target_rate)


def _check_length(got: int, want: int, index: int, step: int, info: AudioInfo) -> None:
    if got >= want:
        return
    decoded = index * step + got
    shortfall = info.frames - decoded
    if shortfall > max(TRUNCATION_TOLERANCE * info.frames, 2 * 1152):
        raise BadAudioError(f"truncated: the header declares {info.frames} frames "
                            f"({info.duration_s:.2f} s) but only {decoded} could be decoded")
