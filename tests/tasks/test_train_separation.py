"""Separation training: tiny real mixtures from ``synth`` -> a registered mask estimator, resumable, reported."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audiopipe.flows.synth import synth
from audiopipe.infra.errors import BadAudioError, ConfigError
from audiopipe.infra.schemas import LABELS_V1
from audiopipe.infra.storage import StorageSpec
from audiopipe.tasks import separation_data as sd
from audiopipe.tasks import train_separation as ts
from audiopipe.tasks.training import TrainSpec

STORAGE = StorageSpec()
# n_fft 128 / hop 64 keeps a 3 s clip at ~750 frames x 65 bins; 48-frame crops keep the epochs short.
TINY = {"n_fft": 128, "hop": 64, "hidden_units": 8, "lstm_layers": 1, "dropout": 0.0, "crop_frames": 48}


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory) -> str:
    """12 mixtures (9 train, 1 val, 2 test) in a local store; returns the labels URL."""
    return synth("mixtures", str(tmp_path_factory.mktemp("mix")), 12, 0)["labels_url"]


@pytest.fixture(scope="module")
def trained(mixtures, tmp_path_factory):
    """The tiny model trained once on ``mixtures`` (registered as separate@1): (spec, result, its folder)."""
    root = tmp_path_factory.mktemp("trained")
    spec = _spec(mixtures, root)
    return spec, ts.train_separation(spec, STORAGE), root


def _spec(labels_url: str, tmp_path, **kw) -> TrainSpec:
    return TrainSpec("separate", features_url="", labels_url=labels_url, registry_url=str(tmp_path / "registry"),
                     config_hash="", epochs=2, batch_size=4, seed=0, work_dir=str(tmp_path / "work"),
                     model_overrides=dict(TINY), **kw)


def _rewrite_labels(labels_url: str, out, change) -> str:
    rows = [change(r) for r in pq.read_table(labels_url.removeprefix("file://")).to_pylist()]
    pq.write_table(pa.Table.from_pylist([r for r in rows if r], schema=LABELS_V1), out)
    return str(out)


def test_trains_registers_reports_and_resumes(mixtures, trained):
    from audiopipe.models.registry import Registry

    spec, first, root = trained
    m = first.metrics
    assert first.epochs_run == 2 and first.resumed_from_epoch == 0 and first.device in ("cpu", "gpu")
    assert m["num_test"] == 2 and all(math.isfinite(v) for v in m.values())
    assert m["oracle_irm_si_sdri_db"] > 0.0  # the ideal ratio mask always improves on the mixture
    assert m["fraction_of_oracle"] == pytest.approx(m["si_sdri_db"] / m["oracle_irm_si_sdri_db"])
    registry = Registry(spec.registry_url)
    card = registry.get_card("separate@latest")
    assert card.model_family == "separate" and card.metrics["si_sdri_db"] == pytest.approx(m["si_sdri_db"])
    assert card.feature_config["kind"] == "stft" and card.feature_config["n_fft"] == 128
    assert card.training_data.shards == (mixtures,) and len(card.training_data.manifest_hash) == 64
    assert len(card.normalization.mean) == 65 and min(card.normalization.std) > 0
    assert card.classes == ("speech",) and len(card.history["loss"]) == 2
    assert card.extra["split_counts"] == {"train": 9, "val": 1, "test": 2}
    loaded, _ = registry.load("separate@latest", root / "cache")  # checksum-verified, safe mode
    items, _ = sd.load_mixture_items(mixtures, STORAGE)
    again, _ = ts.evaluate_separation(loaded, [i for i in items if i.split == "test"],
                                      sd.audio_loader(STORAGE, sampling_rate=16_000), cfg=ts.split_overrides(TINY)[0])
    assert again["si_sdri_db"] == pytest.approx(m["si_sdri_db"], abs=1e-3)
    report = root / "work" / "reports" / spec.run_key
    assert (report / "masks.png").stat().st_size > 10_000 and (report / "curves.png").exists()
    assert "masks.png" in (report / "index.html").read_text()

    # A run killed after its first epoch: the checkpoint says epoch 1, so the same call trains only epoch 2.
    ckpt = root / "work" / "checkpoints" / spec.run_key
    state = json.loads((ckpt / "state.json").read_text())  # the finished run's, checksum included
    (ckpt / "state.json").write_text(json.dumps({**state, "epoch": 1, "done": False}))
    history = json.loads((ckpt / "history.json").read_text())
    (ckpt / "history.json").write_text(json.dumps({k: v[:1] for k, v in history.items()}))
    second = ts.train_separation(spec, STORAGE)
    assert second.resumed_from_epoch == 1 and second.epochs_run == 2
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["epoch"], state["done"], state["model_file"]) == (2, True, "final-0002.keras")
    assert registry.list_versions("separate") == [1, 2]
    assert second.metrics["oracle_irm_si_sdri_db"] == pytest.approx(m["oracle_irm_si_sdri_db"])


def test_evaluate_registered_reproduces_the_card_and_names_a_missing_split(mixtures, trained, tmp_path):
    from audiopipe.models.registry import Registry
    from audiopipe.tasks.evaluation import evaluate_registered

    spec, _, _ = trained
    ref, cache = f"{spec.registry_url}:separate@1", str(tmp_path / "cache")
    out = evaluate_registered(ref, None, mixtures, STORAGE, split="test", cache_dir=cache)
    card = Registry(spec.registry_url).get_card("separate@1")
    assert out["model"].endswith("separate@1") and out["split"] == "test" and out["transcripts"] == []
    assert set(out["metrics"]) == set(card.metrics) and out["metrics"]["num_test"] == 2
    assert out["metrics"] == pytest.approx(dict(card.metrics), abs=1e-3)
    no_test = _rewrite_labels(mixtures, tmp_path / "notest.parquet", lambda r: r if r["split"] != "test" else None)
    with pytest.raises(ConfigError, match=r"no mixtures in split 'test' \(mixtures per split: .*'test': 0"):
        evaluate_registered(ref, None, no_test, STORAGE, cache_dir=cache)


def test_training_pairs_remix_and_dataset_crops(mixtures):
    items, digest = sd.load_mixture_items(mixtures, STORAGE)
    cfg, options = ts.split_overrides(TINY)
    assert len(items) == 12 and len(digest) == 64 and options["crop_frames"] == 48
    load = sd.audio_loader(STORAGE, sampling_rate=cfg.sampling_rate, cache=True)
    mixture, speech, background = sd.load_triplet(items[1], load)
    assert mixture.shape == speech.shape == background.shape and mixture.dtype == np.float32
    np.testing.assert_allclose(mixture, speech + background, atol=2e-4)  # 16-bit rounding of three files
    rng = np.random.default_rng(0)
    same = sd.training_pair(items, 1, load, rng, remix_fraction=0.0, snr_range_db=(-5.0, 10.0))
    np.testing.assert_array_equal(same[0], mixture)
    remixed, stem = sd.training_pair(items, 1, load, rng, remix_fraction=1.0, snr_range_db=(0.0, 0.0))
    assert remixed.shape == stem.shape == speech.shape and np.abs(remixed).max() == pytest.approx(0.9, abs=1e-3)
    np.testing.assert_allclose(stem / np.abs(stem).max(), speech / np.abs(speech).max(), atol=1e-4)
    ds = sd.separation_dataset(items[1:5], load, cfg=cfg, batch_size=2, crop_frames=48, remix_fraction=0.5,
                               shuffle=True)
    for x, y in ds:
        assert x["magnitude"].shape[1] == 48 and x["magnitude"].shape == y["estimate"].shape
        assert x["magnitude"].shape[2] == cfg.num_bins and (x["lengths"].numpy() == 48).all()


def test_bad_input_gives_clear_errors(mixtures, tmp_path):
    with pytest.raises(ConfigError, match="cannot read the labels table"):
        ts.train_separation(_spec(str(tmp_path / "nope.parquet"), tmp_path), STORAGE)
    with pytest.raises(ConfigError, match="no kind='mixtures' rows"):
        ts.train_separation(_spec(_rewrite_labels(mixtures, tmp_path / "none.parquet", lambda r: None),
                                  tmp_path), STORAGE)
    with pytest.raises(ConfigError, match="unknown separation overrides"):
        ts.split_overrides({"n_mels": 80})
    with pytest.raises(ConfigError, match="remix_fraction"):
        ts.split_overrides({"remix_fraction": 1.5})
    with pytest.raises(ConfigError, match="split"):  # no val rows
        ts.train_separation(_spec(_rewrite_labels(mixtures, tmp_path / "noval.parquet",
                                                  lambda r: r if r["split"] != "val" else None), tmp_path), STORAGE)

    def lose_stem(row):
        if row["split"] == "train":
            stems = json.loads(row["stems"])
            stems["speech"] = stems["speech"].replace(".speech.wav", ".gone.wav")
            row["stems"] = json.dumps(stems)
        return row

    labels = _rewrite_labels(mixtures, tmp_path / "gone.parquet", lose_stem)
    with pytest.raises(ConfigError, match=r"names 9 audio files that are not in the store, e\.g\. .*\.gone\.wav"):
        ts.train_separation(_spec(labels, tmp_path), STORAGE)


def test_undecodable_audio_names_the_url(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    with pytest.raises(BadAudioError, match="bad.wav: cannot decode"):
        sd.load_mono(str(bad), STORAGE, sampling_rate=16_000)
    wav = io.BytesIO()
    import soundfile as sf

    sf.write(wav, np.zeros(800, np.float32), 8_000, format="WAV")
    (tmp_path / "ok.wav").write_bytes(wav.getvalue())
    assert sd.load_mono(str(tmp_path / "ok.wav"), STORAGE, sampling_rate=16_000).shape == (1600,)
