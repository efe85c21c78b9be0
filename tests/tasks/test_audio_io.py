"""Decoding: every rejection has a specific reason; every decodable file is accepted; streaming == whole read."""

from __future__ import annotations

import io
import struct

import fsspec
import numpy as np
import pytest
import soundfile as sf

from audiopipe.infra.errors import BadAudioError
from audiopipe.infra.storage import StorageSpec
from audiopipe.tasks import synth
from audiopipe.tasks.audio_io import (
    AUDIO_EXTENSIONS,
    MAX_CHANNELS,
    WHOLE_READ_MAX_BYTES,
    AudioInfo,
    _GuardedReader,
    iter_segments,
    num_segments,
    open_source,
    probe,
    segment_frames,
    to_mono,
)
from audiopipe.tasks.extract import Rejection, SourceFile, WorkItem, featurize_item, probe_item
from audiopipe.tasks.features import FeatureConfig, compute_features

CFG = FeatureConfig()


def _tone_wav(encode, sr=16000, seconds=1.0, subtype="PCM_16") -> bytes:
    return encode(synth.tone(440.0, seconds, sr), sr, "WAV", subtype)


def _bad_cases(encode) -> dict[str, tuple[str, bytes]]:
    """{case: (file name, bytes)} of files that must be rejected."""
    good = _tone_wav(encode)
    header_only = io.BytesIO()
    with sf.SoundFile(header_only, "w", samplerate=16000, channels=1, format="WAV", subtype="PCM_16"):
        pass
    nan = synth.tone(440.0, 1.0, 16000)
    nan[4000:4100] = np.nan
    inf = synth.tone(440.0, 1.0, 16000)
    inf[100] = np.inf
    mp3 = encode(synth.tone(440.0, 3.0, 22050), 22050, "MP3", "MPEG_LAYER_III")
    garbage = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return {
        "empty": ("empty.wav", b""),
        "text_as_flac": ("not_audio.flac", b"This is plain text pretending to be FLAC.\n"),
        "wav_cut_mid_data": ("truncated.wav", good[: 44 + (len(good) - 44) // 2 + 1]),
        "header_only": ("header_only.wav", header_only.getvalue()),
        "nan_float_wav": ("nan.wav", encode(nan, 16000, "WAV", "FLOAT")),
        "inf_float_wav": ("inf.wav", encode(inf, 16000, "WAV", "FLOAT")),
        "mp3_half": ("truncated.mp3", mp3[: len(mp3) // 2]),
        "random_ogg": ("corrupt.ogg", b"XXXX" + garbage),
        "m4a": ("song.m4a", b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + garbage),
        "adts_aac": ("SONG.AAC", ADTS_HEADER + garbage),
        # decoded by content, not by name: AAC named .wav is still AAC, random bytes named .aac are not
        "m4a_named_wav": ("song.wav", b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + garbage),
        "garbage_named_aac": ("noise.aac", b"XXXX" + garbage),
    }


# An ADTS frame header: sync 0xFFF, MPEG-4, layer 00, no CRC; AAC LC, 44.1 kHz, 2 channels.
ADTS_HEADER = bytes([0xFF, 0xF1, 0x50, 0x80, 0x02, 0x1F, 0xFC])


BAD_EXPECTED = [
    ("empty", "empty"),
    ("text_as_flac", "undecodable"),
    ("wav_cut_mid_data", "truncated"),
    ("header_only", "no audio"),
    ("nan_float_wav", "invalid samples"),
    ("inf_float_wav", "invalid samples"),
    ("mp3_half", "truncated"),
    ("random_ogg", "undecodable"),
    # sniffed containers that PyAV would decode, with broken insides (tests/tasks/test_audio_av.py: real ones)
    ("m4a", "bad header: the MP4 box at byte 32 is not a valid box"),
    ("adts_aac", "undecodable: raw AAC (ADTS) in which ffmpeg finds no decodable aac frame"),
    ("m4a_named_wav", "bad header: the MP4 box at byte 32 is not a valid box"),
    ("garbage_named_aac", "undecodable: not an audio format libsndfile recognises"),
]


@pytest.mark.parametrize(("case", "prefix"), BAD_EXPECTED, ids=[c for c, _ in BAD_EXPECTED])
def test_rejection_reason_is_specific(mem, encode, case, prefix):
    name, data = _bad_cases(encode)[case]
    src = mem.put_bytes(name, data)

    result = featurize_item(WorkItem(src), CFG, StorageSpec())

    assert not result.ok
    assert result.reason.startswith(prefix), result.reason
    assert result.batch is None
    assert result.num_segments == 0


def test_truncated_wav_reason_gives_sizes(mem, encode):
    good = _tone_wav(encode)  # 16000 frames x 2 bytes
    src = mem.put_bytes("t.wav", good[:44 + 16001])
    reason = featurize_item(WorkItem(src), CFG, StorageSpec()).reason
    assert reason == "truncated: the header declares 32000 bytes of audio data but the file holds 16001"


def test_missing_object_is_rejected_as_missing(mem):
    fs = fsspec.filesystem("memory")
    with pytest.raises(BadAudioError, match="^missing"):
        open_source(fs, f"{mem.root}/gone.wav", 1234)


def test_probe_item_reports_header_or_reason(mem, encode):
    ok = mem.put_bytes("ok.wav", encode(np.zeros((8000, 2), np.float32), 8000, "WAV", "PCM_16"))
    bad = mem.put_bytes("bad.wav", b"RIFF nonsense")
    cut = mem.put_bytes("cut.wav", _tone_wav(encode)[:44 + 1000])
    info = probe_item(ok, StorageSpec())
    assert info == AudioInfo(8000, 2, 8000, "WAV", "PCM_16")
    assert info.duration_s == 1.0
    rejected = probe_item(bad, StorageSpec())
    assert isinstance(rejected, Rejection) and rejected.reason.startswith("undecodable") and rejected.info is None
    truncated = probe_item(cut, StorageSpec())  # the header was read: the rejection keeps it
    assert truncated.reason.startswith("truncated")
    assert truncated.info == AudioInfo(16000, 1, 500, "WAV", "PCM_16")  # frames: what libsndfile finds present
    at_discovery = probe_item(SourceFile(ok.url, ok.size, rejected="dangling symlink: target /x does not exist"),
                              StorageSpec())
    assert at_discovery == Rejection("dangling symlink: target /x does not exist")


def _wav_header(channels: int, sample_rate: int, frames: int, data: bytes | None = None) -> bytes:
    """A PCM_16 WAV whose header declares ``channels`` x ``frames`` at ``sample_rate`` (data zeros unless given)."""
    data = bytes(frames * channels * 2) if data is None else data
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_too_many_channels_has_its_own_reason_and_keeps_the_header(mem):
    src = mem.put_bytes("array.wav", _wav_header(1000, 48000, 10))

    result = featurize_item(WorkItem(src), CFG, StorageSpec())

    assert result.reason == (f"too many channels: the header declares 1000; audiopipe mixes at most {MAX_CHANNELS} "
                             "down to mono (split the channels into separate files first)")
    assert (result.info.sample_rate, result.info.channels, result.info.frames) == (48000, 1000, 10)


def test_more_channels_than_libsndfile_opens_is_too_many_channels(mem):
    result = featurize_item(WorkItem(mem.put_bytes("huge.wav", _wav_header(2000, 48000, 2))), CFG, StorageSpec())
    assert result.reason.startswith("too many channels: the header declares more than 1024"), result.reason


def test_most_channels_supported_still_decode(mem, encode):
    block = np.tile(synth.tone(440.0, 0.1, 16000)[:, None], (1, MAX_CHANNELS))
    result = featurize_item(WorkItem(mem.put_audio("atmos.wav", block, 16000, subtype="PCM_16")), CFG,
                            StorageSpec())
    assert result.ok, result.reason
    assert result.info.channels == MAX_CHANNELS


@pytest.mark.parametrize(("case", "header"), [
    ("truncated", AudioInfo(16000, 1, 2500, "WAV", "PCM_16")),  # frames of the data present
    ("bad_rate", AudioInfo(500, 1, 100, "WAV", "PCM_16")),
    ("header_only", AudioInfo(16000, 1, 0, "WAV", "PCM_16")),
])
def test_rejected_after_reading_the_header_keeps_it(mem, encode, case, header):
    data = {"truncated": _tone_wav(encode)[:44 + 5001],
            "bad_rate": _wav_header(1, 500, 100),
            "header_only": _wav_header(1, 16000, 0)}[case]
    result = featurize_item(WorkItem(mem.put_bytes(f"{case}.wav", data)), CFG, StorageSpec())
    assert not result.ok
    assert result.info == header, result.reason


@pytest.mark.parametrize("name", ["song.m4a", "SONG.AAC", "tone.mp3", "tone.flac", "tone.ogg"])
def test_readable_audio_under_a_wrong_audio_extension_is_featurized(mem, encode, name):
    assert "." + name.rsplit(".", 1)[1].lower() in AUDIO_EXTENSIONS  # listed by discovery, then read by content
    wav = _tone_wav(encode)
    as_wav = featurize_item(WorkItem(mem.put_bytes("tone.wav", wav)), CFG, StorageSpec())

    result = featurize_item(WorkItem(mem.put_bytes(name, wav)), CFG, StorageSpec())

    assert result.ok, result.reason
    assert result.info == AudioInfo(16000, 1, 16000, "WAV", "PCM_16")
    np.testing.assert_array_equal(np.asarray(result.batch.column("features")[0].as_py()),
                                  np.asarray(as_wav.batch.column("features")[0].as_py()))


def test_discovery_rejection_is_returned_without_reading(mem):
    src = SourceFile(mem.url("never-written.wav"), 12, rejected="symlink loop: /a leads back to a link")
    result = featurize_item(WorkItem(src), CFG, StorageSpec())
    assert result.reason == "symlink loop: /a leads back to a link"
    assert result.batch is None and result.info is None


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
@pytest.mark.parametrize("peak", [1e18, 1e30])
def test_finite_samples_that_overflow_the_features_are_rejected_by_name(mem, encode, kind, peak):
    x = synth.tone(440.0, 1.0, 16000) * np.float32(peak / 0.5)
    src = mem.put_audio("loud.wav", x, 16000, subtype="FLOAT")
    assert np.isfinite(sf.read(io.BytesIO(mem.fs.cat_file(src.url.removeprefix("memory:/"))))[0]).all()

    result = featurize_item(WorkItem(src), FeatureConfig(kind=kind), StorageSpec())

    assert not result.ok and result.batch is None
    assert result.reason.startswith("samples far outside [-1, 1]: peak "), result.reason
    assert f"{float(np.max(np.abs(x))):.3g}" in result.reason
    assert result.info == AudioInfo(16000, 1, 16000, "WAV", "FLOAT")


def test_loud_but_representable_float_samples_are_kept(mem, encode):
    x = synth.tone(440.0, 1.0, 16000) * np.float32(2e6)  # far outside [-1, 1], features still finite
    result = featurize_item(WorkItem(mem.put_audio("loud.wav", x, 16000, subtype="FLOAT")), CFG, StorageSpec())
    assert result.ok, result.reason
    assert np.isfinite(np.asarray(result.batch.column("features")[0].as_py())).all()


def test_channels_that_overflow_when_mixed_down_are_named(mem):
    x = np.full((1600, 2), 3e38, np.float32)  # finite, but the two channels' sum is not
    result = featurize_item(WorkItem(mem.put_audio("huge.wav", x, 16000, subtype="FLOAT")), CFG, StorageSpec())
    assert result.reason.startswith("samples far outside [-1, 1]: peak 3e+38"), result.reason


def _good_cases(encode) -> dict[str, tuple[str, bytes, int, int, int]]:
    """{case: (file name, bytes, sample rate, channels, frames)} of files that must decode."""
    tone8 = synth.tone(300.0, 1.0, 8000)
    six = np.stack([synth.tone(200.0 + 100 * c, 0.5, 48000) for c in range(6)], axis=1)
    t22 = synth.tone(440.0, 1.0, 22050)
    return {
        "silence": ("silence.wav", encode(np.zeros(16000, np.float32), 16000, "WAV", "PCM_16"), 16000, 1, 16000),
        "one_sample_16k": ("one.wav", encode(np.array([0.25], np.float32), 16000, "WAV", "PCM_16"), 16000, 1, 1),
        "one_sample_44k": ("one44.wav", encode(np.array([0.25], np.float32), 44100, "WAV", "FLOAT"), 44100, 1, 1),
        "ten_ms": ("short.wav", encode(synth.tone(440.0, 0.01, 16000), 16000, "WAV", "PCM_16"), 16000, 1, 160),
        "ten_ms_48k_stereo": ("short48.flac", encode(np.zeros((480, 2), np.float32) + 0.1, 48000, "FLAC", "PCM_16"),
                              48000, 2, 480),
        "8k": ("mono_8k.wav", encode(tone8, 8000, "WAV", "PCM_16"), 8000, 1, 8000),
        "6ch": ("surround.wav", encode(six, 48000, "WAV", "PCM_16"), 48000, 6, 24000),
        "24bit": ("pcm24.wav", encode(t22, 22050, "WAV", "PCM_24"), 22050, 1, 22050),
        "aiff": ("tone.aiff", encode(t22, 22050, "AIFF", "PCM_16"), 22050, 1, 22050),
        "ogg": ("tone.ogg", encode(t22, 22050, "OGG", "VORBIS"), 22050, 1, 22050),
        "mp3": ("tone.mp3", encode(synth.tone(440.0, 2.0, 44100), 44100, "MP3", "MPEG_LAYER_III"), 44100, 1, None),
        "upper_ext": ("LOUD.WAV", _tone_wav(encode), 16000, 1, 16000),
    }


GOOD = ["silence", "one_sample_16k", "one_sample_44k", "ten_ms", "ten_ms_48k_stereo", "8k", "6ch", "24bit",
        "aiff", "ogg", "mp3", "upper_ext"]


@pytest.mark.parametrize("case", GOOD)
@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_decodable_file_is_never_rejected(mem, encode, case, kind):
    name, data, sr, channels, frames = _good_cases(encode)[case]
    src = mem.put_bytes(name, data)
    cfg = FeatureConfig(kind=kind)

    result = featurize_item(WorkItem(src), cfg, StorageSpec())

    assert result.ok, result.reason
    assert (result.info.sample_rate, result.info.channels) == (sr, channels)
    if frames is not None:
        assert result.info.frames == frames
        assert result.audio_s == pytest.approx(frames / sr)
    assert result.num_segments == 1
    features = result.batch.column("features")[0].as_py()
    assert len(features) == result.batch.column("n_frames")[0].as_py() >= 1
    assert all(len(frame) == cfg.num_bins for frame in features)
    assert np.isfinite(np.asarray(features)).all()


@pytest.mark.parametrize("channels", [1, 2, 3, 6, 8])
def test_to_mono_equals_column_mean(channels):
    block = np.random.default_rng(channels).uniform(-1, 1, (1000, channels)).astype(np.float32)
    mono = to_mono(block)
    assert mono.shape == (1000,)
    assert mono.dtype == np.float32
    np.testing.assert_allclose(mono, block.mean(axis=1), atol=1e-6, rtol=0)


def test_to_mono_does_not_modify_input():
    block = np.arange(12, dtype=np.float32).reshape(6, 2)
    before = block.copy()
    to_mono(block)
    np.testing.assert_array_equal(block, before)


@pytest.mark.parametrize(
    ("sr", "frames", "seconds", "step", "count"),
    [
        (16000, 16000, 1.0, 16000, 1),
        (16000, 16001, 1.0, 16000, 2),
        (44100, int(3.5 * 44100), 1.0, 44100, 4),
        (22050, 22050 * 60, 30.0, 661500, 2),
        (8000, 1, 30.0, 240000, 1),
        (11025, 11025, 0.5, 5512, 3),  # round(5512.5) = 5512 (banker's), so 3 segments
    ],
)
def test_segment_plan(sr, frames, seconds, step, count):
    info = AudioInfo(sr, 1, frames, "WAV", "PCM_16")
    assert segment_frames(info, seconds) == step
    assert num_segments(info, seconds) == count


# ------------------------------------------------------------------ streaming branch

LONG_SR = 16000
LONG_SECONDS = 18 * 60  # 18 min of 16-bit mono: 34.56 MB > WHOLE_READ_MAX_BYTES
SEG_S = 30.0


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("long") / "long_16k.wav"
    rng = np.random.default_rng(11)
    block = 1 << 20
    total = LONG_SR * LONG_SECONDS
    with sf.SoundFile(path, "w", samplerate=LONG_SR, channels=1, format="WAV", subtype="PCM_16") as f:
        for start in range(0, total, block):
            n = min(block, total - start)
            t = np.arange(start, start + n) / LONG_SR
            freq = 300.0 + 50.0 * ((start // block) % 7)
            f.write((0.25 * np.sin(2 * np.pi * freq * t) + 0.03 * rng.standard_normal(n)).astype(np.float32))
    return str(path)


def _features(handle, first, stop):
    snd, info = probe(handle)
    try:
        return info, [(i, s, d, compute_features(x, cfg=CFG))
                      for i, s, d, x in iter_segments(handle, snd, info, segment_seconds=SEG_S,
                                                      target_rate=CFG.sample_rate, first=first, stop=stop)]
    finally:
        snd.close()


def test_streaming_branch_equals_whole_read(long_wav):
    fs = fsspec.filesystem("file")
    size = fs.size(long_wav)
    assert size > WHOLE_READ_MAX_BYTES

    streamed = open_source(fs, long_wav, size)
    assert isinstance(streamed, _GuardedReader)  # the branch under test
    try:
        info_s, rows_s = _features(streamed, 10, 13)
    finally:
        streamed.close()
    assert streamed.error is None
    with open(long_wav, "rb") as fh:
        whole = io.BytesIO(fh.read())
    info_w, rows_w = _features(whole, 10, 13)

    assert info_s == info_w == AudioInfo(LONG_SR, 1, LONG_SR * LONG_SECONDS, "WAV", "PCM_16")
    assert [r[:3] for r in rows_s] == [r[:3] for r in rows_w] == [(10, 300.0, 30.0), (11, 330.0, 30.0),
                                                                   (12, 360.0, 30.0)]
    for (_, _, _, a), (_, _, _, b) in zip(rows_s, rows_w):
        np.testing.assert_array_equal(a, b)


def test_streaming_featurize_item_last_chunk(long_wav):
    """featurize_item on the large file (streamed) for the last segments: correct indices and durations."""
    fs = fsspec.filesystem("file")
    src_url = "file://" + long_wav
    result = featurize_item(WorkItem(SourceFile(src_url, fs.size(long_wav)), first=35, stop=None), CFG,
                            StorageSpec())
    assert result.ok, result.reason
    assert result.batch.column("segment").to_pylist() == [35]
    assert result.batch.column("start_s").to_pylist() == [1050.0]
    assert result.audio_s == 30.0


# ------------------------------------------------------------------ regressions (bugs found by these tests)


def test_truncated_aiff_is_rejected_as_truncated(mem, encode):
    raw = encode(synth.tone(440.0, 3.0, 22050), 22050, "AIFF", "PCM_16")
    src = mem.put_bytes("cut.aiff", raw[: len(raw) // 2])
    result = featurize_item(WorkItem(src), CFG, StorageSpec())
    assert not result.ok
    assert result.reason.startswith("truncated"), result.reason


def test_work_item_past_the_end_does_not_crash(mem, encode):
    src = mem.put_bytes("short.wav", encode(np.full(16000, 0.1, np.float32), 16000, "WAV", "PCM_16"))
    result = featurize_item(WorkItem(src, first=5), CFG, StorageSpec())
    assert result.ok or result.reason
    assert result.num_segments == 0
