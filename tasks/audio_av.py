"""Stage 1 of featurize, the formats libsndfile lacks: MP4/M4A, raw AAC (ADTS), WebM/Matroska, ASF/WMA.

In: a seekable file object whose first bytes name one of those containers (``sniff_container``). Out: an
``AvDecoder`` with the few members ``audio_io`` uses of a ``soundfile.SoundFile`` (``samplerate``,
``channels``, ``frames``, ``format``, ``subtype``, ``seek``, ``read``, ``close``), so segments are cut,
mixed down, resampled and checked by the same code as WAV/FLAC. PyAV (ffmpeg, bundled in its wheels)
decodes; it is used only for content libsndfile could not open. Memory stays at about one segment: the
decoder reads the file through the same guarded range reader, one packet at a time.
"""

from __future__ import annotations

import io

import numpy as np

from audiopipe.infra.errors import BadAudioError
from audiopipe.tasks.audio_containers import ASF_GUID, container_damage, mp4_has_no_index, read_at

_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_MP4_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
SNIFF_BYTES = 16
# Decoding starts this long before a seek target: AAC, Opus and WMA overlap each frame with the one before,
# so the first frame after a jump is wrong; a few frames later the output matches a decode from the start.
PREROLL_S = 0.5
# Decoders whose output after a jump never rejoins a decode from the start: WMA fills bands with noise from a
# generator that runs from the first frame (measured: up to 7 dB apart in a 10 s segment's log-mel after 2 s
# of pre-roll). Seeks in these decode from the start and discard; WMA decodes fast enough for that.
SEQUENTIAL_ONLY_CODECS = frozenset({"wmav1", "wmav2", "wmapro", "wmavoice", "wmalossless"})


def sniff_container(head: bytes) -> tuple[str, str] | None:
    """``(ffmpeg demuxer, description)`` of the container ``head`` (a file's first bytes) starts, if one
    PyAV decodes for audiopipe; None for anything else (which stays libsndfile's to judge).

    An MP4 file has a box type at byte 4; raw AAC (ADTS) starts with a 12-bit sync word and layer bits
    ``00``, which MPEG audio (MP3) never uses, so an MP3 is never taken for AAC.
    """
    if head[4:8] in _MP4_FIRST_BOXES:
        return "mov", "an MP4/M4A container"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "aac", "raw AAC (ADTS)"
    if head[:4] == _EBML_MAGIC:
        return "matroska", "a WebM/Matroska container"
    if head[:16] == ASF_GUID:
        return "asf", "an ASF/WMA container"
    return None


class AvDecoder:
    """Sequential float32 reader over the first audio stream of a container, with sample-exact seeks where
    the container's time base resolves one sample (MP4, ADTS) and to its tick (1 ms: WebM, ASF) otherwise.

    ``frames`` comes from the container's duration; where it has none (raw AAC, a live WebM) it is counted
    from the packets' durations (a demux without decoding) and ``estimated`` is True.

    Raises (from the constructor):
        BadAudioError: ``truncated``, ``bad header``, ``no audio``, ``unsupported format`` or ``undecodable``.
    """

    def __init__(self, handle: io.IOBase, demuxer: str, what: str, size: int | None = None) -> None:
        self._handle, self._demuxer, self._what, self._size = handle, demuxer, what, size
        self._container = self._open()
        streams = self._container.streams.audio
        if not streams:
            self.close()
            raise BadAudioError(f"no audio: {what} that holds no audio stream")
        self._stream = stream = streams[0]
        ctx = stream.codec_context
        if ctx.codec is None:
            self.close()
            raise BadAudioError(f"unsupported format: {what} with {ctx.name or 'unknown'} audio, which the "
                                "bundled ffmpeg cannot decode")
        if not ctx.sample_rate or not ctx.channels:
            self.close()
            raise BadAudioError(f"undecodable: {what} in which ffmpeg finds no decodable {ctx.name} frame")
        self.samplerate, self.channels = int(ctx.sample_rate), int(ctx.channels)
        self.format, self.subtype = self._container.format.name.split(",")[0].upper(), ctx.name
        self.extra_info = ""
        self._tick = float(stream.time_base)
        # a container cut short or damaged (ffmpeg opens many such files): probe rejects it with the header
        self.damage = container_damage(handle, demuxer, size)
        self.frames, self.estimated = self._declared_frames()
        self._origin = self._first_len = None  # pts and length of the first decoded frame (sample 0)
        self._rewind()

    # ---- opening ------------------------------------------------------------------------------------

    def _open(self):
        import av

        self._handle.seek(0)
        try:
            return av.open(self._handle, mode="r", format=self._demuxer)
        except av.FFmpegError as exc:
            raise BadAudioError(self._unopenable(exc)) from None

    def _unopenable(self, exc: Exception) -> str:
        damage = container_damage(self._handle, self._demuxer, self._size)
        if damage:
            return damage
        if self._demuxer == "mov" and mp4_has_no_index(self._handle, self._size):
            return "bad header: the MP4 container has no 'moov' box (its index of the audio)"
        text = getattr(exc, "strerror", None) or str(exc)
        return f"undecodable: {self._what} that ffmpeg cannot read ({text})"

    def _declared_frames(self) -> tuple[int, bool]:
        stream, container = self._stream, self._container
        if self._demuxer != "aac":  # ADTS durations are guesses from the bit rate
            if stream.duration:
                return round(stream.duration * self._tick * self.samplerate), False
            if container.duration:
                return round(container.duration / 1_000_000 * self.samplerate), False
        return self._count_frames(), True

    def _count_frames(self) -> int:
        """Frames from the packets' durations, demuxed without decoding; a cut-off last ADTS frame is
        reported as truncation rather than counted. Remembered per file content in this process, as every
        chunk of a long file probes it again."""
        key = _content_key(self._handle, self._size)
        if key in _COUNTED:
            frames, damage = _COUNTED[key]
            self.damage = self.damage or damage
            return frames
        import av

        ticks, last = 0, None
        try:
            for packet in self._container.demux(self._stream):
                if packet.size:
                    ticks += packet.duration or 0
                    last = packet
        except av.FFmpegError as exc:
            self.damage = f"corrupt: demuxing failed after {ticks * self._tick:.2f} s: {exc}"
        if last is not None and self._demuxer == "aac":
            data = bytes(last)
            if len(data) >= 6 and data[0] == 0xFF:
                declared = ((data[3] & 0x03) << 11) | (data[4] << 3) | (data[5] >> 5)
                if declared > len(data):
                    self.damage = self.damage or (f"truncated: the last AAC frame declares {declared} bytes "
                                                  f"but the file holds {len(data)} of them")
        self._container.close()
        self._container = self._open()
        self._stream = self._container.streams.audio[0]
        frames = round(ticks * self._tick * self.samplerate)
        if key is not None:
            if len(_COUNTED) >= 256:
                _COUNTED.pop(next(iter(_COUNTED)))
            _COUNTED[key] = frames, self.damage
        return frames

    # ---- reading ------------------------------------------------------------------------------------

    def _rewind(self) -> None:
        self._position = 0  # index of the next sample ``read`` returns
        self._pending = np.zeros((0, self.channels), np.float32)
        self._frames_iter = self._decode()

    def _decode(self):
        """Decoded frames as ``(first sample index or None, (n, channels) float32)``."""
        import av

        packets = self._container.demux(self._stream)
        while True:
            try:
                packet = next(packets, None)
                if packet is None:
                    return
                frames = self._stream.decode(packet)
            except av.FFmpegError as exc:
                raise BadAudioError(self._failure(exc, packets)) from None
            for frame in frames:
                yield self._index_of(frame), _samples(frame, self.channels)

    def _failure(self, exc: Exception, packets) -> str:
        """A demux or decode error: truncation when nothing follows it, else corruption."""
        import av

        try:
            at_end = next(packets, None) is None
        except av.FFmpegError:
            at_end = False
        where = self._position / self.samplerate
        if at_end:
            return (f"truncated: {self._what} ends inside a frame, after {where:.2f} s of the declared "
                    f"{self.frames / self.samplerate:.2f} s")
        return f"corrupt: decoding failed near {where:.2f} s: {getattr(exc, 'strerror', None) or exc}"

    def _index_of(self, frame) -> int | None:
        if frame.pts is None:
            return None
        if self._origin is None:
            self._origin, self._first_len = frame.pts, frame.samples
        return round((frame.pts - self._origin) * self._tick * self.samplerate)

    def seek(self, target: int) -> int:
        """Position the reader at sample ``target``, decoding from up to ``PREROLL_S`` before it (from the
        start for ``SEQUENTIAL_ONLY_CODECS``)."""
        if self._origin is None:  # learn the first frame's pts (sample 0) before jumping anywhere
            self.read(1)
        if self.subtype in SEQUENTIAL_ONLY_CODECS:
            if target < self._position:
                self._restart()
        elif not self._position <= target <= self._position + PREROLL_S * self.samplerate:
            self._jump(target)
        self._skip(target)
        return target

    def _jump(self, target: int) -> None:
        preroll = PREROLL_S
        while True:
            start_s = target / self.samplerate - preroll
            if start_s <= 0:
                self._restart()
                return
            self._container.seek(self._origin + int(start_s / self._tick), stream=self._stream, backward=True)
            self._pending = np.zeros((0, self.channels), np.float32)
            self._frames_iter = self._decode()
            index, block = next(self._frames_iter, (None, None))
            if index is not None:
                index = self._snap(index, len(block))
                if index <= target:
                    self._position, self._pending = index, block
                    return
            preroll *= 4  # landed after the target (or nowhere): jump further back

    def _snap(self, index: int, frame_len: int) -> int:
        """A pts in coarse ticks (1 ms in WebM and ASF) places a frame only to about a tick (ASF stamps
        packets, not frames: 0.8 ms off was seen). Codecs cut the stream into equal frames after the first,
        so the frame starts at ``first + k * frame_len``: the one such position within two ticks is exact."""
        tick = self._tick * self.samplerate
        if tick <= 1 or not frame_len or self._first_len is None:
            return index
        snapped = self._first_len + round((index - self._first_len) / frame_len) * frame_len
        return snapped if abs(snapped - index) <= min(2 * tick, frame_len / 2 - 1) else index

    def _restart(self) -> None:
        self._container.close()
        self._container = self._open()
        self._stream = self._container.streams.audio[0]
        origin = self._origin
        self._rewind()
        self._origin = origin

    def _skip(self, target: int) -> None:
        while self._position < target:
            got = self.read(min(target - self._position, 1 << 20))
            if not len(got):
                return

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """Up to ``frames`` samples from the current position, ``(n, channels)`` float32 (fewer at the end)."""
        parts, have = [self._pending], len(self._pending)
        while have < frames:
            _, block = next(self._frames_iter, (None, None))
            if block is None:
                break
            parts.append(block)
            have += len(block)
        joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
        out, self._pending = joined[:frames], joined[frames:]
        self._position += len(out)
        return out

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None


_COUNTED: dict[tuple, tuple[int, str | None]] = {}  # content key -> (frames, damage) of counted files


def _content_key(handle: io.IOBase, size: int | None) -> tuple | None:
    """Size plus the first and last 64 KiB: the same for every chunk of one object, different for others."""
    import hashlib

    where = handle.tell()  # ffmpeg reads on from here
    try:
        end = size if size is not None else handle.seek(0, io.SEEK_END)
        head = read_at(handle, 0, 65_536)
        tail = read_at(handle, max(0, end - 65_536), 65_536)
        return end, hashlib.sha256(head + tail).hexdigest()
    except (OSError, ValueError):
        return None
    finally:
        handle.seek(where)


def _samples(frame, channels: int) -> np.ndarray:
    """One decoded frame -> ``(n, channels)`` float32 in [-1, 1], whatever ffmpeg's sample format."""
    name = frame.format.name
    raw = frame.to_ndarray()
    block = raw.T if frame.format.is_planar else raw.reshape(-1, channels)
    if name.startswith("s16"):
        return block.astype(np.float32) * np.float32(1 / 32768)
    if name.startswith("s32"):
        return (block.astype(np.float64) * (1 / 2147483648)).astype(np.float32)
    if name.startswith("u8"):
        return (block.astype(np.float32) - 128) * np.float32(1 / 128)
    return np.ascontiguousarray(block, dtype=np.float32)
