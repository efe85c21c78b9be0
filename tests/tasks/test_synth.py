"""Tests for audiopipe.tasks.synth (real espeak-ng, local tmp dirs only)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiopipe.tasks import synth
from audiopipe.tasks.audio_io import probe
from audiopipe.tasks.synth import (
    CorpusSpec,
    espeak_voices,
    noise,
    speak,
    tone,
    write_demo_corpus,
    write_messy_archive,
)

LONG_S = 5.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo_corpus(root, CorpusSpec(seed=7))


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("messy")
    return root, write_messy_archive(root, seed=3, long_file_s=LONG_S)


def _wav_data_chunk(raw: bytes) -> tuple[int, int]:
    """Return (declared data size, bytes actually present after the data header)."""
    pos = 12
    while pos + 8 <= len(raw):
        cid, size = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        if cid == b"data":
            return size, len(raw) - (pos + 8)
        pos += 8 + size + (size & 1)
    raise AssertionError("no data chunk")


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ primitives


def test_voices_available() -> None:
    voices = espeak_voices()
    assert len(voices) >= 4
    assert all(isinstance(v, str) and v for v in voices)
    assert len(set(voices)) == len(voices)
    assert "en-us+f3" in voices


def test_speak_returns_nonsilent_float32() -> None:
    x, sr = speak("The quick brown fox jumps over the lazy dog.", voice="en-us", speed_wpm=170)
    assert sr == 22050
    assert x.dtype == np.float32 and x.ndim == 1
    assert 1.0 < x.size / sr < 6.0
    assert np.abs(x).max() <= 1.0
    assert np.sqrt(np.mean(x**2)) > 0.01


def test_speak_without_espeak_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="espeak-ng"):
        speak("hello", voice="en")


def test_tone_shape_and_amplitude() -> None:
    x = tone(440.0, 0.5, 16000, amplitude=0.3)
    assert x.dtype == np.float32 and x.shape == (8000,)
    assert 0.29 < np.abs(x).max() <= 0.3
    peak_bin = np.argmax(np.abs(np.fft.rfft(x)))
    assert abs(peak_bin * 16000 / x.size - 440.0) < 4.0


@pytest.mark.parametrize("color", ["white", "pink", "brown"])
def test_noise_colors(color: str) -> None:
    sr = 16000
    x = noise(2.0, sr, color=color, rng=np.random.default_rng(0), amplitude=0.1)
    assert x.dtype == np.float32 and x.shape == (2 * sr,)
    assert np.isclose(np.abs(x).max(), 0.1, atol=1e-6)
    power = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(x.size, 1 / sr)
    low, high = power[(f > 50) & (f < 200)].mean(), power[(f > 4000) & (f < 7000)].mean()
    ratio_db = 10 * np.log10(low / high)
    expected = {"white": (-3, 3), "pink": (8, 20), "brown": (30, 50)}[color]
    assert expected[0] < ratio_db < expected[1]


def test_noise_is_seeded_and_validates_color() -> None:
    a = noise(0.1, 8000, color="pink", rng=np.random.default_rng(1))
    b = noise(0.1, 8000, color="pink", rng=np.random.default_rng(1))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        noise(0.1, 8000, color="purple", rng=np.random.default_rng(1))


# ------------------------------------------------------------------ demo corpus


def test_demo_writes_exactly_the_manifest(demo: tuple[Path, dict[str, str]]) -> None:
    root, manifest = demo
    assert _files_under(root) == set(manifest)
    assert set(manifest.values()) == {"ok", "rejected", "ignored"}
    assert manifest["notes.txt"] == "ignored"
    assert manifest["sous dossier/café été.wav"] == "ok"
    assert sum(k.startswith("speech/") for k in manifest) == 6


def test_demo_covers_formats_and_rates(demo: tuple[Path, dict[str, str]]) -> None:
    root, manifest = demo
    infos = [sf.info(root / rel) for rel, e in manifest.items() if e == "ok"]
    kinds = {(i.format, i.samplerate, i.channels) for i in infos}
    assert ("WAV", 16000, 1) in kinds and ("WAV", 8000, 1) in kinds
    assert ("FLAC", 44100, 2) in kinds
    assert {"OGG", "MP3"} <= {i.format for i in infos}
    voices = {rel.split("_", 2)[2].rsplit("_", 1)[0] for rel in manifest if rel.startswith("speech/")}
    assert len(voices) >= 4


def test_demo_ok_files_decode_nonsilent(demo: tuple[Path, dict[str, str]]) -> None:
    root, manifest = demo
    for rel in (r for r, e in manifest.items() if e == "ok"):
        data, _ = sf.read(root / rel, always_2d=True)
        assert data.shape[0] > 0, rel
        assert np.abs(data).max() > 0.01, rel


def test_demo_rejected_files_are_broken(demo: tuple[Path, dict[str, str]]) -> None:
    root, manifest = demo
    bad = {r for r, e in manifest.items() if e == "rejected"}
    names = ("empty.wav", "not_audio.flac", "truncated.wav", "header_only.wav", "corrupt.ogg")
    assert bad == {f"bad/{n}" for n in names}
    assert (root / "bad/empty.wav").stat().st_size == 0
    for rel in ("bad/empty.wav", "bad/not_audio.flac", "bad/corrupt.ogg"):
        with pytest.raises(sf.LibsndfileError):
            sf.info(root / rel)
    assert sf.info(root / "bad/header_only.wav").frames == 0
    declared, present = _wav_data_chunk((root / "bad/truncated.wav").read_bytes())
    assert present < declared and present % 2 == 1  # cut mid-data, mid-sample


def test_demo_ignored_file_is_not_audio(demo: tuple[Path, dict[str, str]]) -> None:
    root, _ = demo
    with pytest.raises(sf.LibsndfileError):
        sf.info(root / "notes.txt")


def test_demo_without_bad_files(tmp_path: Path) -> None:
    manifest = write_demo_corpus(tmp_path, CorpusSpec(n_speech=1, n_tones=1, n_noise=1, include_bad=False))
    assert "rejected" not in manifest.values()
    assert not (tmp_path / "bad").exists()
    assert _files_under(tmp_path) == set(manifest)


def test_demo_same_seed_is_byte_identical(demo: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, manifest = demo
    again = write_demo_corpus(tmp_path, CorpusSpec(seed=7))
    assert again == manifest
    non_speech = [r for r in manifest if not r.startswith("speech/")]
    assert any(r.endswith(".ogg") for r in non_speech)  # libsndfile's random ogg serial is pinned
    for rel in non_speech:
        assert (root / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_demo_other_seed_differs(demo: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, _ = demo
    write_demo_corpus(tmp_path, CorpusSpec(n_speech=0, seed=8, include_bad=False))
    assert (root / "noise/white_00.wav").read_bytes() != (tmp_path / "noise/white_00.wav").read_bytes()


# ------------------------------------------------------------------ messy archive


def test_messy_writes_manifest_and_decodes(messy: tuple[Path, dict[str, str]]) -> None:
    root, manifest = messy
    assert _files_under(root) == set(manifest)
    for rel, expectation in manifest.items():
        if expectation != "ok":
            continue
        with open(root / rel, "rb") as fh:  # m4a, webm, wma...: the pipeline's decoder, not libsndfile alone
            snd, info = probe(fh)
            snd.close()
        assert info.frames > 0, rel
        duration = info.duration_s
        if rel.startswith("long/"):
            assert duration == pytest.approx(LONG_S)
        else:
            assert 0.5 <= duration <= (6.0 if rel.startswith("speech/") else 4.0), rel


def test_messy_formats_and_names(messy: tuple[Path, dict[str, str]]) -> None:
    root, manifest = messy
    subtype = {rel: sf.info(root / rel).subtype for rel in manifest
               if rel.startswith("formats/") and rel.endswith(".wav")}
    assert {rel.rsplit(".", 1)[1] for rel in manifest if rel.startswith("formats/")} >= {
        "m4a", "aac", "mp4", "opus", "webm", "wma"}  # decoded through PyAV (Ogg Opus: libsndfile)
    assert subtype["formats/pcm24.wav"] == "PCM_24"
    assert subtype["formats/float32.wav"] == "FLOAT"
    assert subtype["formats/int32.wav"] == "PCM_32"
    assert sf.info(root / "formats/surround_48k_6ch.wav").channels == 6
    assert sf.info(root / "formats/surround_48k_6ch.wav").samplerate == 48000
    assert sf.info(root / "formats/stereo_44k.wav").channels == 2
    assert sf.info(root / "formats/mono_8k.wav").samplerate == 8000
    assert sf.info(root / "formats/tone.aiff").format == "AIFF"
    assert {"formats/UPPER.WAV", "formats/Mixed.Flac"} <= set(manifest)
    assert any(len(Path(r).parts) >= 4 for r in manifest)  # three directory levels
    assert any(not r.isascii() and not r.startswith("sous") for r in manifest)
    assert any(" " in Path(r).name for r in manifest)


def test_messy_silence_and_long_file(messy: tuple[Path, dict[str, str]]) -> None:
    root, manifest = messy
    assert manifest["formats/silence.wav"] == "ok"
    assert np.abs(sf.read(root / "formats/silence.wav")[0]).max() == 0.0
    long_data, sr = sf.read(root / "long/long_16k.wav")
    assert sr == 16000 and long_data.ndim == 1
    assert np.sqrt(np.mean(long_data**2)) > 0.05


def test_messy_rejected_extras(messy: tuple[Path, dict[str, str]]) -> None:
    root, manifest = messy
    assert manifest["bad/nan.wav"] == manifest["bad/truncated.mp3"] == "rejected"
    nan_data, _ = sf.read(root / "bad/nan.wav")
    assert np.isnan(nan_data).any()
    mp3 = root / "bad/truncated.mp3"
    try:
        decoded = sf.read(mp3)[0].shape[0]
    except sf.LibsndfileError:
        return
    assert decoded < sf.info(mp3).frames  # header promises more than the bytes hold


def test_messy_same_seed_is_byte_identical(messy: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, manifest = messy
    assert write_messy_archive(tmp_path, seed=3, long_file_s=LONG_S) == manifest
    for rel in manifest:
        if not rel.startswith("speech/"):
            assert (root / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
