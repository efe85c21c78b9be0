"""The sounds corpus with real recordings (``tasks/corpora_real.py``): clips cut from real OGG files made
here, labels, the split by package, the fetch from Debian's archive (one small real package, skipped when
apt cannot reach it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiopipe.flows.synth import real_cache_dir, synth
from audiopipe.infra.errors import ConfigError
from audiopipe.tasks import corpora_real as real
from audiopipe.tasks.corpora import labels_table, write_sounds
from audiopipe.tasks.corpora_real import (COARSE_LABELS, META_FILE, REAL_PACKAGES, RealPackage, fetch_package,
                                          load_pool, package_by_name, real_clip, track_split)

MUSIC_DIR = "usr/share/games/demo/music"
SFX_DIR = "usr/share/games/demo/sounds"


def _write_ogg(path: Path, x: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, rate, format="OGG", subtype="VORBIS")


def _melody(rate: int, seconds: float, seed: int) -> np.ndarray:
    """Stereo notes with harmonics: something a real track could hold."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    pitch = 220.0 * 2 ** (rng.integers(0, 12, size=int(seconds * 4)) / 12)
    f = pitch[np.minimum((t * 4).astype(int), pitch.size - 1)]
    mono = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / rate) + 0.1 * np.sin(4 * np.pi * np.cumsum(f) / rate)
    return np.stack([mono, 0.8 * mono], axis=1).astype(np.float32)


def _names_in(pkg: RealPackage, folder: str, ext: str, splits: tuple[str, ...]) -> list[str]:
    """File names whose split (by ``track_split``'s hash) covers ``splits``, one each."""
    found: dict[str, str] = {}
    for k in range(200):
        name = f"{folder}/track{k}.{ext}"
        found.setdefault(track_split(pkg, name), name)
        if all(s in found for s in splits):
            return [found[s] for s in splits]
    raise AssertionError("no names for every split")


def _fake_cache(root: Path) -> tuple[Path, tuple[RealPackage, ...]]:
    """Two 'fetched' packages of real OGG files: one trained on (music + effects in train and val), one held
    out whole (test), laid out as ``fetch_package`` leaves them."""
    heard = RealPackage("demo-heard", "GPL-2+", music=(f"{MUSIC_DIR}/*.ogg",), style="demo style",
                        effects=(f"{SFX_DIR}/*.ogg",), exclude=("speech.ogg",))
    held = RealPackage("demo-held", "CC0", music=(f"{MUSIC_DIR}/*.ogg",), style="other style",
                       effects=(f"{SFX_DIR}/*.ogg",), holdout=True)
    rng = np.random.default_rng(0)
    for pkg in (heard, held):
        base = root / pkg.name
        splits = ("test",) if pkg.holdout else ("train", "val")
        for i, rel in enumerate(_names_in(pkg, MUSIC_DIR, "ogg", splits)):
            _write_ogg(base / rel, _melody(44_100, 6.0, i), 44_100)  # longer than any clip: cut at an offset
        for rel in _names_in(pkg, SFX_DIR, "ogg", splits):  # shorter than any clip: padded
            burst = rng.standard_normal(11_025) * np.exp(-np.arange(11_025) / 2_000)
            _write_ogg(base / rel, (0.5 * burst).astype(np.float32), 22_050)
        if pkg.exclude:  # a file left out by name (speech in an effects folder)
            _write_ogg(base / SFX_DIR / "speech.ogg", _melody(22_050, 1.0, 9)[:, 0], 22_050)
        (base / META_FILE).write_text(json.dumps({"package": pkg.name, "version": "1.0-1"}))
    return root, (heard, held)


def test_real_clips_have_the_clip_length_rate_and_labels(tmp_path: Path) -> None:
    cache, packages = _fake_cache(tmp_path / "cache")
    pool = load_pool(cache, packages)
    assert pool.summary() == {"effects/test": {"demo-held": 1}, "effects/train": {"demo-heard": 1},
                              "effects/val": {"demo-heard": 1}, "music/test": {"demo-held": 1},
                              "music/train": {"demo-heard": 1}, "music/val": {"demo-heard": 1}}
    for role in ("music", "effects"):
        for split, package in (("train", "demo-heard"), ("val", "demo-heard"), ("test", "demo-held")):
            x, params = real_clip(pool, role, split, 2.5, np.random.default_rng(1))
            assert x.dtype == np.float32 and x.shape == (40_000,)
            assert 0.1 <= float(np.max(np.abs(x))) <= 0.9 and params["package"] == package
            assert params["source_rate_hz"] == (44_100 if role == "music" else 22_050)
            assert ("style" in params) == (role == "music") and not params["track"].endswith("speech.ogg")
    # the music clip is cut from the track at the offset it reports, resampled to 16 kHz
    x, params = real_clip(pool, "music", "train", 1.0, np.random.default_rng(5))
    track = pool.tracks("music", "train")["demo-heard"][0]
    ref, _ = real.read_excerpt(track.path, params["offset_s"], 1.0)
    assert params["offset_s"] > 0 and np.allclose(x, ref * (params["peak"] / np.max(np.abs(ref))), atol=1e-5)


def test_sounds_corpus_with_real_audio_labels_and_split_by_package(tmp_path: Path) -> None:
    cache, packages = _fake_cache(tmp_path / "cache")
    pool = load_pool(cache, packages)
    cycle = 8 + len(real.REAL_SLOTS)
    rows = write_sounds(tmp_path / "out", n=cycle * 6, seed=3, real=pool)  # cycles: test, 4 train, val
    labels_table(rows)  # a valid LABELS_V1 table
    assert {r.label for r in rows} == {"speech", "music", "sound", "silence"} == set(COARSE_LABELS.values())
    real_rows = [r for r in rows if r.engine.startswith("debian:")]
    assert len(real_rows) == 6 * 5 and {r.split for r in real_rows} == {"train", "val", "test"}
    for r in real_rows:
        params = json.loads(r.params)
        assert r.engine == f"debian:{params['package']}" and params["version"] == "1.0-1"
        assert (params["package"] == "demo-held") == (r.split == "test")  # held out whole, never trained on
        assert r.label == ("music" if params["track"].startswith(MUSIC_DIR) else "sound")
        data, rate = sf.read(tmp_path / "out" / r.source)
        assert rate == 16_000 and data.ndim == 1 and data.size == round(r.duration_s * 16_000)
    synthetic = [json.loads(r.params).get("class") for r in rows if r.label == "sound" and r.engine == "numpy"]
    assert set(synthetic) == {"noise", "alarm", "rain", "engine", "clapping"}
    assert len({r.source for r in rows}) == len(rows)


def test_quiet_tracks_are_drawn_again_then_refused(tmp_path: Path) -> None:
    pkg = RealPackage("demo-quiet", "CC0", music=(f"{MUSIC_DIR}/*.ogg",), holdout=True)
    _write_ogg(tmp_path / pkg.name / MUSIC_DIR / "fade.ogg", np.full(44_100, 1e-4, np.float32), 44_100)
    (tmp_path / pkg.name / META_FILE).write_text(json.dumps({"version": "1"}))
    with pytest.raises(ConfigError, match="quieter than"):
        real_clip(load_pool(tmp_path, (pkg,)), "music", "test", 1.0, np.random.default_rng(0))


def test_registered_packages_hold_out_music_and_sounds_and_never_asterisk() -> None:
    held = [p for p in REAL_PACKAGES if p.holdout]
    assert any(p.music for p in held) and any(p.effects for p in held)
    assert all(track_split(p, "x.ogg") == "test" for p in held)
    assert all(track_split(p, f"t{k}.ogg") != "test" for p in REAL_PACKAGES if not p.holdout for k in range(50))
    assert all(p.licence and not p.name.startswith("asterisk") for p in REAL_PACKAGES)
    for name in ("asterisk-moh-opsound-wav", "asterisk-core-sounds-en"):
        with pytest.raises(ConfigError, match="asterisk"):
            package_by_name(name)
        with pytest.raises(ConfigError, match="asterisk"):
            RealPackage(name, "GPL-2")


def test_unfetched_packages_and_real_for_other_kinds_are_clear_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="not in the real-audio cache"):
        load_pool(tmp_path, REAL_PACKAGES[:1])
    with pytest.raises(ConfigError, match="sounds corpus only"):
        synth("speech", str(tmp_path / "x"), 2, 0, real=True)
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(ConfigError, match="apt-get, dpkg-deb not found"):
        fetch_package(package_by_name("sound-theme-freedesktop"), tmp_path / "cache")
    monkeypatch.setenv("AUDIOPIPE_CACHE", str(tmp_path / "c"))
    assert real_cache_dir() == tmp_path / "c" / "debian-audio"
    assert real_cache_dir(str(tmp_path / "d")) == tmp_path / "d"


@pytest.mark.slow
def test_fetch_extracts_a_real_debian_package_once(tmp_path: Path) -> None:
    """sound-theme-freedesktop (0.4 MB) through apt-get download + dpkg-deb -x; skipped offline."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not installed")
    pkg = package_by_name("sound-theme-freedesktop")
    try:
        dest = fetch_package(pkg, tmp_path)
    except ConfigError as exc:
        if "apt-get download" in str(exc):
            pytest.skip(f"Debian's archive not reachable: {exc}")
        raise
    kept = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert f"usr/share/doc/{pkg.name}/copyright" in kept and META_FILE in kept
    audio = [k for k in kept if k.endswith(".oga")]
    assert len(audio) >= 10 and not any("audio-channel-" in k for k in audio)  # spoken channel names left out
    assert len(kept) == len(audio) + 2 and not list(tmp_path.glob(".*"))  # nothing else, no temporary folder
    meta = json.loads((dest / META_FILE).read_text())
    assert meta["package"] == pkg.name and meta["licence"] == pkg.licence and "%3a" not in meta["version"]
    stamp = (dest / META_FILE).stat().st_mtime_ns
    assert fetch_package(pkg, tmp_path) == dest and (dest / META_FILE).stat().st_mtime_ns == stamp  # idempotent
    x, params = real_clip(load_pool(tmp_path, (pkg,)), "effects", "train", 2.0, np.random.default_rng(0))
    assert x.shape == (32_000,) and params["package"] == pkg.name
