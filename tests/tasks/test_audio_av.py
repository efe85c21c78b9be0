"""Formats libsndfile lacks (M4A/AAC, raw AAC, MP4, WebM, WMA) and Ogg Opus: real files encoded here with
PyAV's encoders are featurized exactly like an independent decode of the same file; seeks into a chunk
equal a decode from the start; broken files get specific reasons; long files stream in bounded memory."""

from __future__ import annotations

import io
import tracemalloc

import av
import fsspec
import numpy as np
import pytest
import soundfile as sf

from audiopipe.infra.errors import TransientStorageError
from audiopipe.infra.storage import StorageSpec
from audiopipe.tasks.audio_av import AvDecoder
from audiopipe.tasks.audio_encode import ENCODED_FORMATS, encode_audio
from audiopipe.tasks.audio_io import (AUDIO_EXTENSIONS, _GuardedReader, iter_segments, open_source, probe,
                                      resample, to_mono)
from audiopipe.tasks.extract import SourceFile, WorkItem, featurize_item, probe_item
from audiopipe.tasks.features import FeatureConfig, compute_features
from tests.tasks.conftest import make_signal

CFG = FeatureConfig()
FORMATS = list(ENCODED_FORMATS)  # m4a, aac, mp4, opus, webm, wma
# (sample rate, channels) per format: rates each codec takes, mono and stereo both covered
SHAPE = {"m4a": (44100, 2), "aac": (22050, 1), "mp4": (48000, 2), "opus": (48000, 1), "webm": (48000, 2),
         "wma": (44100, 2)}
# encoder delay and end padding the container does not trim (raw AAC has no place to say it), in seconds
PADDING_S = {"m4a": 0.0, "aac": 0.1, "mp4": 0.0, "opus": 0.0, "webm": 0.03, "wma": 0.05}


def _independent_decode(data: bytes, fmt: str) -> np.ndarray:
    """Every sample of the file, decoded from the start by PyAV (libsndfile for Ogg Opus), (frames, channels)."""
    if fmt == "opus":
        return sf.read(io.BytesIO(data), dtype="float32", always_2d=True)[0]
    with av.open(io.BytesIO(data)) as container:
        return np.concatenate([f.to_ndarray().T for f in container.decode(audio=0)]).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_featurized_like_its_decoded_samples(mem, fmt):
    assert f".{fmt}" in AUDIO_EXTENSIONS
    sr, channels = SHAPE[fmt]
    signal = make_signal(sr, 2.0, channels)
    data = encode_audio(signal, sr, fmt)

    result = featurize_item(WorkItem(mem.put_bytes(f"clip.{fmt}", data)), CFG, StorageSpec())

    assert result.ok, result.reason
    assert (result.info.sample_rate, result.info.channels) == (sr, channels)
    assert 2.0 <= result.info.duration_s <= 2.0 + PADDING_S[fmt] + 0.01, result.info
    decoded = _independent_decode(data, fmt)
    # the container's duration, to within audio_io's truncation tolerance (ms-rounded in WebM, WMA's last frame)
    assert abs(len(decoded) - result.info.frames) <= 2304
    decoded = decoded[: result.info.frames]
    want = compute_features(resample(to_mono(decoded), sr, CFG.sample_rate), cfg=CFG)
    got = np.asarray(result.batch.column("features")[0].as_py(), np.float32)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # and the decoded audio is the signal encoded: same loudness, same strongest tone
    start = round(PADDING_S[fmt] * sr) if fmt == "aac" else 0
    sent, back = signal[:, 0], decoded[start:start + len(signal), 0]
    assert np.sqrt(np.mean(back**2)) == pytest.approx(np.sqrt(np.mean(sent**2)), rel=0.1)
    assert np.argmax(np.abs(np.fft.rfft(back))) == pytest.approx(np.argmax(np.abs(np.fft.rfft(sent))), abs=2)


def _broken(fmt: str, case: str) -> bytes:
    sr, channels = SHAPE[fmt]
    good = encode_audio(make_signal(sr, 1.0, channels), sr, fmt)
    return {"truncated": good[: len(good) // 2],
            "random_bytes": np.random.default_rng(7).bytes(5000),
            "zero_length": b""}[case]


BROKEN = [(fmt, case, want) for fmt in FORMATS
          for case, want in (("truncated", "truncated: "), ("random_bytes", "undecodable: "),
                             ("zero_length", "empty: the file has 0 bytes"))]


@pytest.mark.parametrize(("fmt", "case", "prefix"), BROKEN, ids=[f"{f}-{c}" for f, c, _ in BROKEN])
def test_broken_files_get_specific_reasons(mem, fmt, case, prefix):
    result = featurize_item(WorkItem(mem.put_bytes(f"bad.{fmt}", _broken(fmt, case))), CFG, StorageSpec())

    assert not result.ok and result.batch is None
    assert result.reason.startswith(prefix), result.reason


def test_truncation_reasons_name_the_container(mem):
    reasons = {fmt: featurize_item(WorkItem(mem.put_bytes(f"cut.{fmt}", _broken(fmt, "truncated"))), CFG,
                                   StorageSpec()).reason for fmt in FORMATS}
    assert reasons["m4a"].startswith("truncated: the MP4 'mdat' box declares ")
    assert reasons["aac"].startswith("truncated: the last AAC frame declares ")
    assert reasons["opus"].startswith("truncated: the last Ogg page declares ")
    assert reasons["webm"].startswith("truncated: the Matroska Segment declares ")
    assert reasons["wma"].startswith("truncated: the ASF data object declares ")


def test_a_cut_container_keeps_its_header_on_the_rejected_row(mem):
    result = featurize_item(WorkItem(mem.put_bytes("cut.webm", _broken("webm", "truncated"))), CFG, StorageSpec())
    assert result.reason.startswith("truncated")
    assert (result.info.sample_rate, result.info.channels, result.info.format) == (48000, 2, "MATROSKA")


# ------------------------------------------------------------------ long files: chunks, estimates, memory

LONG_S, SEG_S = 70.0, 10.0


@pytest.fixture(scope="module")
def long_files() -> dict[str, bytes]:
    return {fmt: encode_audio(make_signal(16000 if fmt != "webm" else 48000, LONG_S, 1, seed=3),
                              16000 if fmt != "webm" else 48000, fmt) for fmt in ("m4a", "aac", "webm", "wma")}


def _segments(data: bytes, first: int, stop: int | None, *, streamed: bool):
    fs = fsspec.filesystem("memory")
    path = f"/long-{first}-{streamed}"
    fs.pipe_file(path, data)
    handle = open_source(fs, path, len(data), stream=streamed)
    snd, info = probe(handle, len(data))
    try:
        return info, [(i, s, d, compute_features(x, cfg=CFG)) for i, s, d, x in
                      iter_segments(handle, snd, info, segment_seconds=SEG_S, target_rate=CFG.sample_rate,
                                    first=first, stop=stop)]
    finally:
        snd.close()
        handle.close()
        fs.rm(path)


@pytest.mark.parametrize("fmt", ["m4a", "aac", "webm", "wma"])
def test_a_chunk_read_with_a_seek_equals_the_decode_from_the_start(long_files, fmt):
    data = long_files[fmt]
    info_w, whole = _segments(data, 0, None, streamed=False)
    info_c, chunk = _segments(data, 3, 5, streamed=True)  # seeks to 30 s, through range reads

    assert info_c == info_w
    assert [r[:3] for r in chunk] == [r[:3] for r in whole[3:5]] == [(3, 30.0, 10.0), (4, 40.0, 10.0)]
    for (_, _, _, a), (_, _, _, b) in zip(chunk, whole[3:5]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)  # bit-equal here; AAC at 44.1 kHz stereo ~1e-5


@pytest.mark.parametrize("fmt", ["m4a", "aac", "webm", "wma"])
def test_probe_gives_rate_channels_and_duration_from_the_container(mem, long_files, fmt):
    data = long_files[fmt]
    info = probe_item(mem.put_bytes(f"long.{fmt}", data), StorageSpec())
    decoder = AvDecoder(io.BytesIO(data), *{"m4a": ("mov", "m"), "aac": ("aac", "a"), "webm": ("matroska", "w"),
                                             "wma": ("asf", "w")}[fmt])
    assert decoder.estimated == (fmt == "aac")  # raw AAC has no duration: counted from its packets
    assert (info.sample_rate, info.channels) == (48000 if fmt == "webm" else 16000, 1)
    assert LONG_S <= info.duration_s <= LONG_S + PADDING_S[fmt] + 0.01
    decoded = len(_independent_decode(data, fmt))
    assert abs(decoded - info.frames) <= 2304  # the truncation tolerance of audio_io._check_length
    decoder.close()


@pytest.fixture(scope="module")
def six_minute_m4a() -> bytes:
    sr, seconds = 16000, 360.0
    blocks = (make_signal(sr, 60.0, 1, seed=k) for k in range(int(seconds // 60)))
    buf = io.BytesIO()
    from audiopipe.tasks.audio_encode import write_encoded

    write_encoded(buf, blocks, sr, "m4a")
    return buf.getvalue()


def test_a_long_m4a_streams_in_bounded_memory(six_minute_m4a):
    """Decoded audio never accumulates: peak Python/numpy memory stays near one 30 s segment (0.96 MB of
    float32 at 16 kHz x a few copies), far below the whole decode (23 MB)."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/six.m4a", six_minute_m4a)
    handle = open_source(fs, "/six.m4a", len(six_minute_m4a), stream=True)
    assert isinstance(handle, _GuardedReader)
    snd, info = probe(handle, len(six_minute_m4a))
    tracemalloc.start()
    try:
        segments = sum(1 for _ in iter_segments(handle, snd, info, segment_seconds=30.0, target_rate=16000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        snd.close()
        handle.close()
        fs.rm("/six.m4a")
    assert segments == 12
    assert peak < 8 * 1024 * 1024, peak


class _DropsAfter(io.RawIOBase):
    """A store connection that resets after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int) -> None:
        self._buf, self._limit = io.BytesIO(data), limit

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def read(self, n: int = -1) -> bytes:
        if self._buf.tell() >= self._limit:
            raise ConnectionResetError("connection reset by peer")
        return self._buf.read(min(n, self._limit - self._buf.tell()) if n >= 0 else self._limit - self._buf.tell())


@pytest.mark.parametrize("fmt", ["m4a", "webm", "wma"])
def test_a_store_failure_while_decoding_is_transient_not_a_rejection(long_files, fmt):
    data = long_files[fmt]
    handle = _GuardedReader(_DropsAfter(data, len(data) // 2))
    with pytest.raises(TransientStorageError, match="storage read failed"):
        snd, info = probe(handle, len(data))
        for _ in iter_segments(handle, snd, info, segment_seconds=SEG_S, target_rate=16000):
            pass


def test_a_video_file_without_audio_is_no_audio(mem):
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    result = featurize_item(WorkItem(mem.put_bytes("silent_film.mp4", buf.getvalue())), CFG, StorageSpec())
    assert result.reason == "no audio: an MP4/M4A container that holds no audio stream"


def test_source_file_of_an_m4a_on_local_disk(tmp_path):
    path = tmp_path / "local.m4a"
    path.write_bytes(encode_audio(make_signal(44100, 1.0, 2), 44100, "m4a"))
    result = featurize_item(WorkItem(SourceFile(str(path), path.stat().st_size)), CFG, StorageSpec())
    assert result.ok and result.info.format == "MOV" and result.info.subtype == "aac"
