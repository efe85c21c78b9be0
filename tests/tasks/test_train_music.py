"""Music training and generation on a tiny real corpus (12 chorales from ``synth``, 2 epochs, 16-unit LSTMs).

This checks the plumbing — labels -> tokens -> training -> bigram comparison -> registry -> resume ->
MIDI/WAV — not the quality, which ``benchmarks/quality.py`` measures on the full corpus.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from audiopipe.flows.generate import generate_music
from audiopipe.flows.synth import synth
from audiopipe.infra.errors import ConfigError
from audiopipe.infra.storage import StorageSpec
from audiopipe.models.registry import Registry
from audiopipe.tasks.corpora_music import SOUNDFONT
from audiopipe.tasks.evaluation import evaluate_registered
from audiopipe.tasks.train_music import MusicVocab, train_music
from audiopipe.tasks.training import TrainSpec

TINY = {"embed_dim": 4, "lstm_units": 16, "dropout": 0.0, "window": 32}


@pytest.fixture(scope="module")
def music_labels(tmp_path_factory) -> str:
    # seed 1: the first 12 works fall 8 train / 2 val / 2 test (splits are by work)
    return synth("music", str(tmp_path_factory.mktemp("music")), n=12, seed=1)["labels_url"]


@pytest.fixture(scope="module")
def trained(music_labels, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    spec = TrainSpec("music", "", music_labels, str(root / "registry"), "", epochs=2, batch_size=4,
                     learning_rate=1e-2, work_dir=str(root / "work"), model_overrides=TINY)
    return spec, train_music(spec, StorageSpec())


def test_vocab_round_trips_and_maps_unknown_notes_to_the_nearest():
    vocab = MusicVocab.of([60, 64, 62], [1.0, 0.5, 2.0])
    assert vocab.pitches_midi == (60, 61, 62, 63, 64) and vocab.durations_ql == (0.5, 1.0, 2.0)
    assert MusicVocab.from_strings(vocab.to_strings()) == vocab
    tokens, mapped = vocab.encode([60, 64, 70], [0.5, 1.0, 3.5])
    assert tokens.tolist() == [[1, 1], [5, 2], [5, 3]] and mapped == 1
    assert vocab.decode(tokens) == ([60, 64, 64], [0.5, 1.0, 2.0])
    with pytest.raises(ConfigError):
        MusicVocab.from_strings(["pitch:60", "velocity:3"])


def test_trains_registers_with_finite_metrics_and_a_bigram_baseline(trained):
    spec, result = trained
    metrics = result.metrics
    assert set(metrics) == {"nll_per_note", "bigram_nll_per_note", "nll_vs_bigram", "num_test_notes"}
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["num_test_notes"] > 0
    assert metrics["nll_vs_bigram"] == pytest.approx(metrics["nll_per_note"] / metrics["bigram_nll_per_note"])
    assert result.model_ref.endswith("music@1") and result.epochs_run == 2 and result.resumed_from_epoch == 0
    card = Registry(spec.registry_url).get_card("music@1")
    assert card.model_family == "music" and card.metrics == pytest.approx(metrics)
    assert card.training_data.shards == (spec.labels_url,) and len(card.training_data.manifest_hash) == 64
    vocab = MusicVocab.from_strings(card.vocabulary)
    assert card.params["model_config"]["n_pitches"] == vocab.n_pitches and card.extra["bigram_k"] > 0
    assert len(card.history["loss"]) == 2
    report = Path(result.report_dir)
    assert {"curves.png", "piano_roll.png", "index.html"} <= {p.name for p in report.iterdir()}
    assert "piano_roll.png" in (report / "index.html").read_text()


def test_evaluate_registered_reproduces_the_card_and_names_a_missing_split(trained, tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    spec, _ = trained
    ref, cache = f"{spec.registry_url}:music@1", str(tmp_path / "cache")
    out = evaluate_registered(ref, None, spec.labels_url, StorageSpec(), split="test", cache_dir=cache)
    card = Registry(spec.registry_url).get_card("music@1")
    assert out["model"].endswith("music@1") and out["split"] == "test" and out["transcripts"] == []
    assert out["metrics"] == pytest.approx(dict(card.metrics), rel=1e-5)
    table = pq.read_table(spec.labels_url.removeprefix("file://"))
    pq.write_table(table.filter(pc.field("split") != "test"), tmp_path / "no_test.parquet")
    with pytest.raises(ConfigError, match=r"no music scores in split 'test' \(scores per split: \{'train': \d+"):
        evaluate_registered(ref, "", str(tmp_path / "no_test.parquet"), StorageSpec(), cache_dir=cache)


def test_resumes_a_killed_run_from_its_last_checkpoint(trained):
    spec, _ = trained
    ckpt = Path(spec.work_dir) / "checkpoints" / spec.run_key
    # what the checkpoint folder holds when the run is killed after epoch 1 of 2
    state = json.loads((ckpt / "state.json").read_text())  # the finished run's, checksum included
    (ckpt / "state.json").write_text(json.dumps({**state, "epoch": 1, "done": False}))
    history = json.loads((ckpt / "history.json").read_text())
    (ckpt / "history.json").write_text(json.dumps({k: v[:1] for k, v in history.items()}))
    again = train_music(spec, StorageSpec())
    assert again.resumed_from_epoch == 1 and again.epochs_run == 2 and again.model_ref.endswith("music@2")
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["epoch"], state["done"], state["model_file"]) == (2, True, "final-0002.keras")


def test_generate_writes_midi_with_length_notes_and_a_wav(trained, tmp_path):
    from music21 import converter

    spec, result = trained
    out = generate_music(result.model_ref, str(tmp_path / "gen"), length=20, temperature=1.0, seed=3,
                         cache_dir=str(tmp_path / "cache"))
    midi = Path(out["midi_url"].removeprefix("file://"))
    assert midi.name == "music-v1-seed3.mid" and out["num_notes"] == 20
    # music21 splits notes at barlines into tied notes when it writes; stripTies merges them back
    notes = converter.parse(str(midi)).stripTies().flatten().notes
    assert [n.pitch.midi for n in notes] == out["pitches"] and len(notes) == 20
    # MIDI parsing quantizes to 1/4 and 1/3 quarter notes, hence the tolerance
    np.testing.assert_allclose([float(n.quarterLength) for n in notes], out["durations_ql"], atol=0.125)
    if shutil.which("fluidsynth") and SOUNDFONT.is_file():
        import soundfile as sf

        info = sf.info(out["wav_url"].removeprefix("file://"))
        assert info.samplerate == 16_000 and info.frames > 0
    else:
        assert out["wav_url"] is None
    same = generate_music("music@1", str(tmp_path / "gen2"), length=20, temperature=1.0, seed=3,
                          registry_url=spec.registry_url, cache_dir=str(tmp_path / "cache"))
    assert same["pitches"] == out["pitches"] and same["durations_ql"] == out["durations_ql"]


def test_bad_input_gives_clear_errors(music_labels, tmp_path):
    with pytest.raises(ConfigError, match="unknown music model override"):
        train_music(TrainSpec("music", "", music_labels, str(tmp_path / "r"), "", epochs=1,
                              work_dir=str(tmp_path / "w"), model_overrides={"units": 3}), StorageSpec())
    with pytest.raises(ConfigError, match="no labels table"):
        train_music(TrainSpec("music", "", str(tmp_path / "nope.parquet"), str(tmp_path / "r"), "",
                              work_dir=str(tmp_path / "w")), StorageSpec())
    with pytest.raises(ConfigError, match="--length"):
        generate_music("x@1", str(tmp_path), length=0, temperature=1.0, seed=0, registry_url=str(tmp_path))


def test_generate_refuses_a_non_music_model(trained, tmp_path):
    spec, _ = trained
    path, card = Registry(spec.registry_url).fetch("music@1", tmp_path / "cache")
    other = Registry(str(tmp_path / "other"))
    other.register("sounds", str(path), family="classify", metrics={}, feature_config={},
                   training_data=card.training_data)
    with pytest.raises(ConfigError, match="'classify' model"):
        generate_music(f"{other.url}:sounds@1", str(tmp_path / "gen"), length=1, temperature=1.0, seed=0)


def test_resume_is_refused_when_the_labels_changed_under_the_checkpoint(trained):
    spec, _ = trained
    data_file = Path(spec.work_dir) / "checkpoints" / spec.run_key / "music_data.json"
    saved = data_file.read_text()
    data_file.write_text(json.dumps({**json.loads(saved), "labels_sha256": "0" * 64}))
    try:
        with pytest.raises(ConfigError, match="labels changed"):
            train_music(spec, StorageSpec())
    finally:
        data_file.write_text(saved)
