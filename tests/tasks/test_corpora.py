"""Labelled corpora (``audiopipe synth``): real espeak-ng, flite, fortunes, music21 and fluidsynth, tiny n."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from audiopipe.flows.synth import synth
from audiopipe.infra.errors import ConfigError, SchemaError
from audiopipe.infra.schemas import LABELS_V1
from audiopipe.tasks import corpora_voices as voices
from audiopipe.tasks.corpora import (SOUND_CLASS_NAMES, LabelRow, labels_table, write_mixtures, write_music,
                                     write_sounds, write_speech)
from audiopipe.tasks.corpora_text import VOCAB, clean_sentence, load_lexicon, number_words, sentence_split

SR = voices.SAMPLE_RATE_HZ
NUM_SPEECH = 50  # test items at 0, 10, ..., 40: held-out voices at 0, 20, 40 (all three)


def _read(path: Path) -> np.ndarray:
    data, sr = sf.read(path, dtype="float32")
    assert sr == SR and data.ndim == 1
    return data


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _snr_db(speech: np.ndarray, background: np.ndarray) -> float:
    return 10 * np.log10(voices.power(speech) / voices.power(background))


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[LabelRow]]:
    out = tmp_path_factory.mktemp("speech")
    return out, write_speech(out, n=NUM_SPEECH, seed=7)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[LabelRow]]:
    out = tmp_path_factory.mktemp("sounds")
    return out, write_sounds(out, n=2 * len(SOUND_CLASS_NAMES), seed=7)


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[LabelRow]]:
    out = tmp_path_factory.mktemp("mixtures")
    return out, write_mixtures(out, n=10, seed=7)


@pytest.mark.parametrize(("value", "words"), [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (42, "forty two"), (100, "one hundred"),
    (1984, "one thousand nine hundred eighty four"), (2_000_005, "two million five"),
])
def test_number_words(value: int, words: str) -> None:
    assert number_words(value) == words


@pytest.mark.parametrize(("raw", "clean"), [
    ("A horse!", None),  # too short
    ("Don't count your chickens before they hatch.", "don't count your chickens before they hatch"),
    ("He paid 1,000 dollars & left.", "he paid one thousand dollars and left"),
    ("The well-known author wrote it", "the well known author wrote it"),
    ("NASA launched a rocket today", None),  # acronym: said letter by letter or not, unclear
    ("Mr Smith went to the city", None),  # abbreviation: said "mister"
    ("J R R Tolkien wrote many books", None),  # initials
    ("I have 3rd class tickets here", None),  # digits inside a word
    ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen", None),
])
def test_clean_sentence(raw: str, clean: str | None) -> None:
    assert clean_sentence(raw, lexicon=load_lexicon()) == clean


def test_speech_labels_match_files(speech: tuple[Path, list[LabelRow]]) -> None:
    out, rows = speech
    assert len(rows) == NUM_SPEECH
    assert {r.source for r in rows} == _files(out)
    for r in rows:
        x = _read(out / r.source)
        assert r.duration_s == pytest.approx(x.size / SR, abs=1e-4) and r.sample_rate == SR
        assert 0.05 < np.max(np.abs(x)) <= 1.0 and r.source.startswith(f"audio/speech/{r.split}/")


def test_transcripts_use_only_the_vocabulary(speech: tuple[Path, list[LabelRow]]) -> None:
    for r in speech[1]:
        assert set(r.text) <= set(VOCAB) and 3 <= len(r.text.split()) <= 15 and r.text == r.text.strip()


def test_held_out_voices_and_sentences_only_in_test(speech: tuple[Path, list[LabelRow]]) -> None:
    rows = speech[1]
    held = set(voices.HELD_OUT_VOICES)
    assert {r.voice for r in rows if r.voice in held} == held  # all three spoke
    assert all(r.split == "test" for r in rows if r.voice in held)
    assert all(sentence_split(r.text) == r.split for r in rows)  # test sentences never in train/val
    train_variants = {r.voice.split("+")[-1] for r in rows if r.split != "test" and "+" in r.voice}
    assert not train_variants & {"f4", "m3"}
    assert {r.engine for r in rows if r.split == "train"} == {"espeak-ng", "flite"}
    assert {r.split for r in rows} == {"train", "val", "test"}


def test_training_voices_exclude_held_out() -> None:
    pool = voices.training_voices("espeak-ng") + voices.training_voices("flite")
    assert len(voices.training_voices("espeak-ng")) > 100 and len(voices.training_voices("flite")) >= 3
    assert not set(pool) & set(voices.HELD_OUT_VOICES)
    assert not any(v.endswith(("+f4", "+m3")) for v in pool)


def test_speech_is_deterministic(speech: tuple[Path, list[LabelRow]], tmp_path: Path) -> None:
    out, rows = speech
    again = write_speech(tmp_path, n=4, seed=7)
    assert again == rows[:4]
    for r in again:
        assert (tmp_path / r.source).read_bytes() == (out / r.source).read_bytes()


def test_add_noise_hits_the_snr() -> None:
    rng = np.random.default_rng(0)
    x = voices.speak_voice("a short test sentence", "espeak-ng:en-us", rng=rng)[0]
    for snr in (5.0, 17.5, 30.0):
        y = voices.add_noise(x, snr_db=snr, color="pink", rng=rng)
        assert _snr_db(x, y - x) == pytest.approx(snr, abs=0.05)


def test_telephone_reverb_mulaw() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SR).astype(np.float32) * 0.1
    tel = voices.telephone(x)
    spec_in, spec_out = np.abs(np.fft.rfft(x)), np.abs(np.fft.rfft(tel))
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    assert tel.shape == x.shape and spec_out[freqs > 4500].mean() < 0.01 * spec_in[freqs > 4500].mean()
    assert spec_out[(freqs > 800) & (freqs < 2500)].mean() > 0.5 * spec_in[(freqs > 800) & (freqs < 2500)].mean()
    rev = voices.reverb(x, rt60_s=0.4, wet=0.5, rng=rng)
    assert rev.shape == x.shape and voices.power(rev) == pytest.approx(voices.power(x), rel=1e-3)
    law = voices.mulaw(x)
    assert len(np.unique(voices.mulaw(np.linspace(-1, 1, 10_000)))) <= 256
    assert np.max(np.abs(law - x)) < 0.01


def test_sounds_classes_all_present(sounds: tuple[Path, list[LabelRow]]) -> None:
    out, rows = sounds
    assert [r.label for r in rows] == list(SOUND_CLASS_NAMES) * 2 and len(SOUND_CLASS_NAMES) >= 6
    assert {r.source for r in rows} == _files(out)
    for r in rows:
        x = _read(out / r.source)
        assert 1.0 <= r.duration_s <= 3.0 and x.size == round(r.duration_s * SR)
        assert Path(r.source).name.startswith(f"{r.label}-")
        peak = float(np.max(np.abs(x)))
        assert peak < 1e-3 if r.label == "silence" else peak > 0.09
        assert (r.voice is not None) == (r.label == "speech")


def test_mixture_stems_sum_and_snr(mixtures: tuple[Path, list[LabelRow]]) -> None:
    out, rows = mixtures
    assert {r.label for r in rows} == {"music", "noise", "rain", "engine", "clapping"}
    for r in rows:
        stems = dict(r.stems)
        mix, sp, bg = _read(out / r.source), _read(out / stems["speech"]), _read(out / stems["background"])
        assert mix.shape == sp.shape == bg.shape and r.duration_s == pytest.approx(mix.size / SR, abs=1e-4)
        assert np.max(np.abs(mix - (sp + bg))) < 2e-4  # 16-bit rounding of three files
        assert -5.0 <= r.snr_db <= 10.0 and _snr_db(sp, bg) == pytest.approx(r.snr_db, abs=0.5)
        assert set(r.text) <= set(VOCAB)


def test_music_midi_parses_back(tmp_path: Path) -> None:
    from music21 import converter

    rows = write_music(tmp_path, n=2, seed=3, render_every=2)
    scores = [r for r in rows if r.media == "midi"]
    assert len(scores) == 2 and {r.source for r in rows} == _files(tmp_path)
    for r in scores:
        assert r.midi == r.source and r.source.endswith(".mid")
        parsed = converter.parse(str(tmp_path / r.source))
        assert len(parsed.parts) >= 4 and len(parsed.flatten().notes) > len(r.note_pitches) > 10
        assert len(r.note_pitches) == len(r.note_durations_ql)
        assert all(48 <= p <= 86 for p in r.note_pitches) and all(d > 0 for d in r.note_durations_ql)
    audio = [r for r in rows if r.media == "audio"]
    if shutil.which("fluidsynth") is None:
        assert audio == []
        return
    assert len(audio) == 1 and audio[0].midi == scores[0].source and audio[0].engine == "fluidsynth"
    data, sr = sf.read(tmp_path / audio[0].source)
    assert sr == 16_000 and np.max(np.abs(data)) > 0.01 and audio[0].duration_s > 5


def test_labels_table_checks(sounds: tuple[Path, list[LabelRow]]) -> None:
    rows = sounds[1]
    table = labels_table(rows)
    assert table.schema.equals(LABELS_V1, check_metadata=False) and table.num_rows == len(rows)
    with pytest.raises(SchemaError, match="duplicate"):
        labels_table(rows + rows[:1])
    bad = LabelRow(source="x.wav", kind="sounds", split="training", engine="numpy", seed=0)
    with pytest.raises(SchemaError, match="split"):
        labels_table([bad])


def test_synth_publishes_to_any_url(tmp_path: Path) -> None:
    counts = synth("mixtures", str(tmp_path / "out"), 3, 0, None)
    assert counts["num_rows"] == 3 and counts["num_files"] == 9 and sum(counts["splits"].values()) == 3
    table = pq.read_table(tmp_path / "out/labels/labels.parquet", use_threads=False)
    assert table.schema.equals(LABELS_V1, check_metadata=False)
    for row in table.to_pylist():
        assert row["source"].startswith("file://" + str(tmp_path / "out/audio/mixtures/"))
        for url in [row["source"], *json.loads(row["stems"]).values()]:
            assert Path(url.removeprefix("file://")).is_file()


def test_synth_to_memory_store(mem) -> None:
    counts = synth("sounds", mem.url("corpus"), 8, 1, {})
    assert counts["classes"] == {name: 1 for name in SOUND_CLASS_NAMES}
    fs = fsspec.filesystem("memory")
    table = pq.read_table(io.BytesIO(fs.cat_file(f"{mem.root}/corpus/labels/labels.parquet")), use_threads=False)
    assert all(fs.exists(s.removeprefix("memory://")) for s in table.column("source").to_pylist())


@pytest.mark.parametrize(("kind", "n", "seed", "match"), [
    ("poetry", 1, 0, "unknown corpus kind"), ("speech", 0, 0, "--n"), ("speech", 1, -1, "--seed"),
])
def test_synth_rejects_bad_arguments(tmp_path: Path, kind: str, n: int, seed: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        synth(kind, str(tmp_path), n, seed, None)
    assert not any(tmp_path.iterdir())


def test_every_split_of_mixtures_sees_every_background(tmp_path):
    from collections import defaultdict

    from audiopipe.tasks.corpora import MIXTURE_BACKGROUNDS, write_mixtures

    rows = write_mixtures(tmp_path, n=50, seed=0)
    seen = defaultdict(set)
    for row in rows:
        seen[row.split].add(row.label)
    assert all(seen[split] == set(MIXTURE_BACKGROUNDS) for split in ("train", "val", "test")), dict(seen)


def test_synth_cli_hours_picks_the_count_and_reports_the_audio(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from audiopipe.flows.cli import app
    from audiopipe.flows.synth import MEAN_ITEM_SECONDS, items_for_hours

    assert items_for_hours("sounds", 0.01) == round(36 / MEAN_ITEM_SECONDS["sounds"]) == 17
    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    result = CliRunner().invoke(app, ["synth", "sounds", str(tmp_path / "out"), "--hours", "0.01"], env=env)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out/labels/labels.parquet", use_threads=False)
    hours = sum(table.column("duration_s").to_pylist()) / 3600
    assert table.num_rows == 17 and 0.007 < hours < 0.013  # the mean length is an estimate
    assert f"audio_hours │ {round(hours, 3)}" in result.output
    both = CliRunner().invoke(app, ["synth", "sounds", str(tmp_path / "x"), "--n", "3", "--hours", "1"], env=env)
    assert both.exit_code == 2 and "not both" in both.output and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="positive"):
        items_for_hours("speech", 0)
