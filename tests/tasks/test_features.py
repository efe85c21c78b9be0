"""Features equal librosa on the reference pipeline, for every input layout; FeatureConfig validation."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace

import librosa
import numpy as np
import pytest
import soundfile as sf
import soxr

from audiopipe.infra.errors import BadAudioError, ConfigError
from audiopipe.infra.storage import StorageSpec
from audiopipe.tasks.extract import WorkItem, featurize_item, features_to_numpy
from audiopipe.tasks.features import FEATURE_KINDS, FeatureConfig, compute_features, finite_features, num_frames_for

TOLERANCE_DB = 1e-3  # the contract: max |ours - librosa| per coefficient


def reference_features(raw: bytes, kind: str, *, start: int = 0, stop: int | None = None,
                       target_sr: int = 16_000) -> np.ndarray:
    """librosa called directly: sf.read -> channel mean -> soxr HQ -> melspectrogram/power_to_db (-> mfcc).

    Returns (num_frames, num_bins), i.e. librosa's output transposed.
    """
    data, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    data = data[start:stop]
    y = data.mean(axis=1)
    if sr != target_sr:
        y = soxr.resample(y, sr, target_sr, quality="HQ")
    mel = librosa.feature.melspectrogram(y=y, sr=target_sr, n_fft=400, hop_length=160, n_mels=80)
    logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    if kind == "logmel":
        return logmel.T
    return librosa.feature.mfcc(S=logmel, n_mfcc=40).T


# (sample rate, channels, container, subtype)
LAYOUTS = [
    (8000, 1, "WAV", "PCM_16"),
    (8000, 1, "FLAC", "PCM_24"),
    (16000, 1, "WAV", "PCM_24"),
    (16000, 1, "FLAC", "PCM_16"),
    (22050, 1, "WAV", "FLOAT"),
    (22050, 1, "FLAC", "PCM_24"),
    (44100, 1, "WAV", "PCM_16"),
    (44100, 2, "WAV", "FLOAT"),
    (44100, 2, "FLAC", "PCM_16"),
    (48000, 2, "WAV", "PCM_24"),
    (48000, 2, "FLAC", "PCM_24"),
    (48000, 6, "WAV", "PCM_16"),
    (44100, 6, "FLAC", "PCM_24"),
    (22050, 6, "WAV", "FLOAT"),
]


@pytest.mark.parametrize("kind", FEATURE_KINDS)
@pytest.mark.parametrize(("sr", "channels", "fmt", "subtype"), LAYOUTS,
                         ids=[f"{sr}Hz-{ch}ch-{fmt}-{st}" for sr, ch, fmt, st in LAYOUTS])
def test_features_equal_librosa(mem, encode, signal, kind, sr, channels, fmt, subtype):
    raw = encode(signal(sr, 3.0, channels), sr, fmt, subtype)
    src = mem.put_bytes(f"in.{fmt.lower()}", raw)
    cfg = FeatureConfig(kind=kind)

    result = featurize_item(WorkItem(src), cfg, StorageSpec())

    assert result.ok, result.reason
    assert result.info.sample_rate == sr and result.info.channels == channels
    assert result.num_segments == 1
    table = result.batch
    (got,) = features_to_numpy(table.column("features"), cfg.num_bins)
    want = reference_features(raw, kind)
    assert got.dtype == np.float32
    assert got.shape == want.shape == (num_frames_for(3 * 16000, cfg=cfg), cfg.num_bins)
    assert np.max(np.abs(got - want)) <= TOLERANCE_DB
    row = table.to_pylist()[0]
    assert row["source"] == src.url
    assert row["segment"] == 0 and row["start_s"] == 0.0
    assert row["duration_s"] == pytest.approx(3.0)
    assert row["n_frames"] == want.shape[0]
    assert row["config_hash"] == cfg.config_hash


@pytest.mark.parametrize("kind", FEATURE_KINDS)
@pytest.mark.parametrize(("sr", "channels"), [(44100, 2), (16000, 1), (22050, 6)])
def test_multi_segment_equal_librosa_per_slice(mem, encode, signal, kind, sr, channels):
    raw = encode(signal(sr, 3.5, channels, seed=1), sr, "WAV", "PCM_16")
    src = mem.put_bytes("long.wav", raw)
    cfg = FeatureConfig(kind=kind, segment_seconds=1.0)

    result = featurize_item(WorkItem(src), cfg, StorageSpec())

    assert result.ok, result.reason
    assert result.num_segments == 4
    rows = result.batch.to_pylist()
    got = features_to_numpy(result.batch.column("features"), cfg.num_bins)
    assert [r["segment"] for r in rows] == [0, 1, 2, 3]
    assert [r["start_s"] for r in rows] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert [r["duration_s"] for r in rows] == pytest.approx([1.0, 1.0, 1.0, 0.5])
    assert result.audio_s == pytest.approx(3.5)
    for i, features in enumerate(got):
        want = reference_features(raw, kind, start=i * sr, stop=min((i + 1) * sr, int(3.5 * sr)))
        assert features.shape == want.shape, i
        assert rows[i]["n_frames"] == want.shape[0]
        assert np.max(np.abs(features - want)) <= TOLERANCE_DB, i


def test_work_item_chunk_equals_same_segments_of_whole_file(mem, encode, signal):
    raw = encode(signal(22050, 3.5, 2, seed=2), 22050, "FLAC", "PCM_16")
    src = mem.put_bytes("chunk.flac", raw)
    cfg = FeatureConfig(segment_seconds=1.0)

    whole = featurize_item(WorkItem(src), cfg, StorageSpec())
    part = featurize_item(WorkItem(src, first=1, stop=3), cfg, StorageSpec())

    assert part.ok and part.num_segments == 2
    assert part.batch.column("segment").to_pylist() == [1, 2]
    whole_f = features_to_numpy(whole.batch.column("features"), cfg.num_bins)
    part_f = features_to_numpy(part.batch.column("features"), cfg.num_bins)
    np.testing.assert_array_equal(part_f[0], whole_f[1])
    np.testing.assert_array_equal(part_f[1], whole_f[2])


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_compute_features_shape_dtype_and_layout(signal, kind):
    cfg = FeatureConfig(kind=kind)
    x = signal(16000, 1.0)[:, 0]
    out = compute_features(x, cfg=cfg)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    assert out.shape == (num_frames_for(16000, cfg=cfg), 80 if kind == "logmel" else 40)


# ------------------------------------------------------------------ FeatureConfig


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sample_rate": 999}, "sample_rate"),
        ({"sample_rate": 384_001}, "sample_rate"),
        ({"n_fft": 15}, "n_fft"),
        ({"n_fft": 65_537}, "n_fft"),
        ({"hop_length": 0}, "hop_length"),
        ({"hop_length": 401}, "hop_length"),
        ({"n_mels": 0}, "n_mels"),
        ({"n_mels": 202}, "n_mels"),  # n_fft//2+1 = 201
        ({"kind": "mfcc", "n_mfcc": 0}, "n_mfcc"),
        ({"kind": "mfcc", "n_mfcc": 81}, "n_mfcc"),
        ({"segment_seconds": 0.49}, "segment_seconds"),
        ({"segment_seconds": 3600.5}, "segment_seconds"),
        ({"kind": "spectrogram"}, "unknown feature kind"),
        ({"kind": "LOGMEL"}, "unknown feature kind"),
        ({"kind": ""}, "unknown feature kind"),
    ],
)
def test_invalid_config_raises(changes, message):
    with pytest.raises(ConfigError, match=message):
        FeatureConfig(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"sample_rate": 1000}, {"sample_rate": 384_000}, {"n_fft": 16, "hop_length": 16, "n_mels": 9, "n_mfcc": 9},
        {"hop_length": 400}, {"n_mels": 201}, {"n_mfcc": 80}, {"segment_seconds": 0.5},
        {"segment_seconds": 3600}, {"kind": "mfcc"},
    ],
)
def test_boundary_configs_are_valid(changes):
    FeatureConfig(**changes)


def test_unknown_kind_message_names_the_choices():
    with pytest.raises(ConfigError) as err:
        FeatureConfig(kind="chroma")
    assert "'chroma'" in str(err.value)
    for choice in FEATURE_KINDS:
        assert choice in str(err.value)


def test_config_hash_stable_for_equal_configs():
    a = FeatureConfig(kind="mfcc", n_mels=64, n_mfcc=20)
    b = FeatureConfig.from_dict({"kind": "mfcc", "n_mels": 64, "n_mfcc": 20})
    assert a == b
    assert a.config_hash == b.config_hash
    assert len(a.config_hash) == 12 and int(a.config_hash, 16) >= 0
    # the documented recipe: sha256 of the canonical JSON of the fields, n_mfcc dropped for logmel
    fields = {"kind": "logmel", "sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 80,
              "segment_seconds": 30.0}
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    assert FeatureConfig().config_hash == hashlib.sha256(blob).hexdigest()[:12]


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "mfcc"}, {"sample_rate": 22050}, {"n_fft": 512}, {"hop_length": 128}, {"n_mels": 64},
        {"segment_seconds": 10.0}, {"segment_seconds": 30.5},
    ],
)
def test_config_hash_differs_when_any_field_differs(changes):
    base = FeatureConfig()
    assert replace(base, **changes).config_hash != base.config_hash


def test_config_hash_n_mfcc_matters_for_mfcc_only():
    assert FeatureConfig(kind="logmel", n_mfcc=13).config_hash == FeatureConfig(kind="logmel", n_mfcc=40).config_hash
    assert FeatureConfig(kind="mfcc", n_mfcc=13).config_hash != FeatureConfig(kind="mfcc", n_mfcc=40).config_hash


def test_config_hashes_all_distinct_over_a_grid():
    configs = [FeatureConfig(kind=k, n_mels=m, n_mfcc=c) for k in FEATURE_KINDS for m in (40, 80) for c in (13, 40)]
    hashes = {c: c.config_hash for c in configs}
    # logmel ignores n_mfcc: 2 (logmel) + 4 (mfcc) distinct partitions
    assert len(set(hashes.values())) == 6


def test_from_dict_round_trip_and_unknown_keys():
    cfg = FeatureConfig(kind="mfcc", n_mfcc=13, segment_seconds=5.0)
    assert FeatureConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown feature config keys \['n_bins'\]"):
        FeatureConfig.from_dict({"kind": "logmel", "n_bins": 3})
    with pytest.raises(ConfigError, match="n_mels"):
        FeatureConfig.from_dict({"n_mels": 0})


@pytest.mark.parametrize(("kind", "bins"), [("logmel", 64), ("mfcc", 20)])
def test_num_bins(kind, bins):
    assert FeatureConfig(kind=kind, n_mels=64, n_mfcc=20).num_bins == bins


# ------------------------------------------------------------------ num_frames_for


@pytest.mark.parametrize("num_samples", [1, 159, 160, 161, 399, 400, 401, 1600, 16_000, 16_159, 48_017])
@pytest.mark.parametrize("hop", [160, 128])
def test_num_frames_for_matches_actual(num_samples, hop):
    cfg = FeatureConfig(hop_length=hop)
    x = np.random.default_rng(num_samples).standard_normal(num_samples).astype(np.float32) * 0.1
    actual = compute_features(x, cfg=cfg).shape[0]
    librosa_frames = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=400, hop_length=hop, n_mels=80).shape[1]
    assert num_frames_for(num_samples, cfg=cfg) == actual == librosa_frames


@pytest.mark.parametrize("n_mels", [8, 32])
def test_logmel_with_few_mels_is_valid_without_touching_n_mfcc(n_mels):
    cfg = FeatureConfig(kind="logmel", n_mels=n_mels)
    assert cfg.num_bins == n_mels


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_finite_features_are_the_computed_features(signal, kind):
    cfg = FeatureConfig(kind=kind)
    y = signal(16000, 1.0)[:, 0] * np.float32(1e5)  # loud but representable: kept, not rescaled
    np.testing.assert_array_equal(finite_features(y, cfg=cfg), compute_features(y, cfg=cfg))


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_finite_features_refuse_an_overflowed_power_spectrum(signal, kind):
    cfg = FeatureConfig(kind=kind)
    y = signal(16000, 1.0)[:, 0]
    y = y / np.abs(y).max() * np.float32(1e18)
    assert np.isfinite(y).all() and not np.isfinite(compute_features(y, cfg=cfg)).all()  # what is guarded
    with pytest.raises(BadAudioError, match=r"^samples far outside \[-1, 1\]: peak 1e\+18 overflows"):
        finite_features(y, cfg=cfg)
