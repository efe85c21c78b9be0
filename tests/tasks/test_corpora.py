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
from audiopipe.tasks import augment
from audiopipe.tasks import corpora_voices as voices
from audiopipe.tasks.corpora import (SOUND_CLASS_NAMES, LabelRow, labels_table, write_mixtures, write_music,
                                     write_sounds, write_speech)
from audiopipe.tasks.corpora_text import (TEXT_SOURCES, VOCAB, clean_sentence, load_lexicon, make_sentence,
                                          number_words, sentence_split)

SR = voices.SAMPLE_RATE_HZ
NUM_SPEECH = 70  # test items at 0, 10, ..., 60: held-out voices at 0, 20, 40, 60 (all four)


def _read(path: Path) -> np.ndarray:
    data, sr = sf.read(path, dtype="float32")
    assert sr == SR and data.ndim == 1
    return data


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _snr_db(speech: np.ndarray, background: np.ndarray) -> float:
    return 10 * np.log10(augment.power(speech) / augment.power(background))


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
        floor = 0.01 if {"gain", "clip"} & set(r.augment) else 0.3  # gain: down to -25 dB, clip: 0.3 of the peak
        assert floor < np.max(np.abs(x)) <= 1.0 and r.source.startswith(f"audio/speech/{r.split}/")


def test_transcripts_use_only_the_vocabulary(speech: tuple[Path, list[LabelRow]]) -> None:
    for r in speech[1]:
        assert set(r.text) <= set(VOCAB) and r.text and r.text == " ".join(r.text.split())
        assert json.loads(r.params)["text_source"] in TEXT_SOURCES


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_text_source_speaks_its_split(split: str) -> None:
    rng, seen = np.random.default_rng(3), {}
    for _ in range(300):
        text, source = make_sentence(split, rng)
        assert sentence_split(text) == split and set(text) <= set(VOCAB) and text == " ".join(text.split())
        seen.setdefault(source, []).append(text)
    assert set(seen) == set(TEXT_SOURCES)
    assert min(len(t.split()) for t in seen["commands"]) <= 3  # short prompts as well as long sentences
    assert any(" p m" in t or " a m" in t or "o'clock" in t for t in seen["call_centre"] + seen["numbers"])
    assert any(all(len(w) == 1 for w in t.split()[-4:]) for t in seen["spelled"])  # letter by letter
    assert not any(ch.isdigit() for texts in seen.values() for t in texts for ch in t)


def test_held_out_voices_and_sentences_only_in_test(speech: tuple[Path, list[LabelRow]]) -> None:
    rows = speech[1]
    held = set(voices.HELD_OUT_VOICES)
    assert {r.voice for r in rows if r.voice in held} == held  # all four spoke
    assert all(r.split == "test" for r in rows if r.voice in held)
    assert all(sentence_split(r.text) == r.split for r in rows)  # test sentences never in train/val
    train_variants = {r.voice.split("+")[-1] for r in rows if r.split != "test" and "+" in r.voice}
    assert not train_variants & {"f4", "m3"}
    assert {r.engine for r in rows if r.split == "train"} == {"espeak-ng", "flite", "festival", "piper"}
    assert {r.engine for r in rows if r.split == "test"} >= {"festival-hts"}  # the unseen engine
    assert all(json.loads(r.params)["held_out"] == (r.voice in held) for r in rows)
    assert {r.split for r in rows} == {"train", "val", "test"}


def test_training_voices_exclude_held_out() -> None:
    pool = sum((voices.training_voices(e) for e in voices.ENGINES), ())
    assert len(voices.training_voices("espeak-ng")) > 100 and len(voices.training_voices("flite")) >= 3
    assert voices.training_voices("festival") == ("festival:kal_diphone", "festival:ked_diphone")
    assert voices.training_voices("piper") == ("piper:joe",) and voices.training_voices("festival-hts") == ()
    assert not set(pool) & set(voices.HELD_OUT_VOICES)
    assert not any(v.endswith(("+f4", "+m3")) for v in pool)


def test_speech_is_deterministic(speech: tuple[Path, list[LabelRow]], tmp_path: Path) -> None:
    out, rows = speech
    again = write_speech(tmp_path, n=12, seed=7, start=4)  # a range on its own, as a Dask worker writes it
    assert [r.text for r in again] == [r.text for r in rows[4:12]] and any(r.engine == "piper" for r in again)
    for r, first in zip(again, rows[4:12]):
        if r.engine == "piper":  # its generator noise is unseeded inside the ONNX graph: same text and params only
            assert (r.voice, r.augment, r.params) == (first.voice, first.augment, first.params)
            continue
        assert r == first and (tmp_path / r.source).read_bytes() == (out / r.source).read_bytes()


@pytest.mark.parametrize("voice", ["espeak-ng:en-us", "flite:awb", "flite:kal", "flite:kal16", "flite:rms",
                                   "flite:slt", "festival:kal_diphone", "festival:ked_diphone",
                                   "festival-hts:cmu_us_slt_arctic_hts", "piper:joe"])
def test_every_engine_says_a_sentence(voice: str) -> None:
    text = "please call me back at two thirty p m tomorrow"
    x, params = voices.speak_voice(text, voice, rng=np.random.default_rng(0))
    assert x.dtype == np.float32 and np.max(np.abs(x)) == pytest.approx(0.9, abs=1e-3) and params
    assert 1.5 < x.size / SR < 6.0  # nine words at a speaking rate, neither empty nor a runaway
    frames = x[: x.size // 400 * 400].reshape(-1, 400)  # 25 ms frames: speech has loud and quiet ones
    level_db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    assert np.percentile(level_db, 90) - np.percentile(level_db, 10) > 15


def test_festival_batch_keeps_order_and_refuses_bad_text() -> None:
    said = voices.festival_many([("one", "kal_diphone", 1.0), ("one two three four five six", "ked_diphone", 1.0)])
    assert said[0][0].size < said[1][0].size and [sr for _, sr in said] == [16000, 16000]
    with pytest.raises(ValueError, match="VOCAB"):
        voices.festival_many([('say "hi") (quit', "kal_diphone", 1.0)])


def test_add_noise_and_babble_hit_the_snr() -> None:
    rng = np.random.default_rng(0)
    x = voices.speak_voice("a short test sentence", "espeak-ng:en-us", rng=rng)[0]
    for snr in (0.0, 17.5, 30.0):
        y = augment.add_noise(x, snr_db=snr, color="pink", rng=rng)
        assert _snr_db(x, y - x) == pytest.approx(snr, abs=0.05)
        y = augment.add_babble(x, voices.babble_bank(), talkers=4, snr_db=snr, rng=rng)
        assert _snr_db(x, y - x) == pytest.approx(snr, abs=0.05)


def _peak_hz(x: np.ndarray) -> float:
    return float(np.fft.rfftfreq(x.size, 1 / SR)[np.argmax(np.abs(np.fft.rfft(x * np.hanning(x.size))))])


def test_speed_pitch_vtlp_move_frequencies() -> None:
    tone = (0.5 * np.sin(2 * np.pi * 500 * np.arange(SR) / SR)).astype(np.float32)
    fast = augment.speed(tone, 1.1)
    assert fast.size == pytest.approx(SR / 1.1, abs=2) and _peak_hz(fast) == pytest.approx(550, abs=3)
    up = augment.pitch_shift(tone, 12.0)
    assert up.size == tone.size and _peak_hz(up[2000:-2000]) == pytest.approx(1000, abs=10)
    warped = augment.vtlp(tone, 1.1)
    assert warped.size == tone.size and _peak_hz(warped[2000:-2000]) == pytest.approx(550, abs=20)


@pytest.mark.parametrize("codec", augment.CODECS)
def test_telephone_chain(codec: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SR).astype(np.float32) * 0.1
    tel = augment.telephone(x, codec=codec)
    spec_in, spec_out = np.abs(np.fft.rfft(x)), np.abs(np.fft.rfft(tel))
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    assert tel.shape == x.shape and spec_out[freqs > 4500].mean() < 0.01 * spec_in[freqs > 4500].mean()
    assert spec_out[(freqs > 800) & (freqs < 2500)].mean() > 0.4 * spec_in[(freqs > 800) & (freqs < 2500)].mean()
    clean = augment.telephone(x)
    err_db = 10 * np.log10(augment.power(clean) / max(augment.power(tel - clean), 1e-20))
    assert {"linear": err_db > 100, "mulaw": 25 < err_db < 45, "alaw": 25 < err_db < 45, "gsm": err_db < 25}[codec]
    dropped = augment.telephone(x, codec=codec, drop_rate=0.5, rng=rng)
    assert augment.power(dropped) < 0.8 * augment.power(tel)
    with pytest.raises(ValueError, match="codec"):
        augment.telephone(x, codec="opus")


def test_reverb_uses_room_impulse_responses() -> None:
    bank = augment.rir_bank()
    assert len(bank) == 24 and bank == augment.rir_bank()  # fixed by the seed
    click = np.zeros(SR, np.float32)
    click[100] = 1.0
    for ir in bank[:4]:
        wet = augment.reverb(click, ir)
        tail = wet[100 + int(0.05 * SR):]
        assert wet.shape == click.shape and augment.power(wet) == pytest.approx(augment.power(click), rel=1e-3)
        assert np.sum(tail**2) > 0.01 * np.sum(wet**2)  # energy keeps arriving 50 ms after the direct sound


def test_augment_speech_records_what_it_did() -> None:
    x = voices.speak_voice("a short test sentence for the chain", "flite:kal", rng=np.random.default_rng(0))[0]
    seen: set[str] = set()
    for i in range(60):
        y, applied, snr_db, params = augment.augment_speech(x, rng=np.random.default_rng(i), babble=voices.babble_bank())
        seen |= set(applied)
        assert (snr_db is not None) == bool({"noise", "babble"} & set(applied)) and np.max(np.abs(y)) <= 1.0
        assert -85 <= params["floor_db"] <= -65 and np.count_nonzero(y == 0) < 10  # no digital silence
        assert ("speed" in applied) == (y.size != x.size)
    assert seen == set(augment.AUGMENT_PROBABILITIES)


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


def test_synth_speech_runs_ranges_on_dask_workers(tmp_path: Path) -> None:
    counts = synth("speech", str(tmp_path / "out"), 7, 7, None, workers=2, chunk_items=3)
    assert counts["tasks"] == 4 and counts["num_rows"] == counts["num_files"] == 7  # 2 per worker: ranges of 2
    table = pq.read_table(tmp_path / "out/labels/labels.parquet", use_threads=False).to_pylist()
    assert [Path(r["source"]).name for r in table] == [f"speech-{i:06d}.wav" for i in range(7)]
    local = write_speech(tmp_path / "local", n=7, seed=7)
    assert [(r["text"], r["voice"], r["augment"]) for r in table] == [(r.text, r.voice, list(r.augment)) for r in local]
    assert all(Path(r["source"].removeprefix("file://")).is_file() for r in table)


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


def test_evaluation_groups_report_voices_engines_and_each_degradation(speech) -> None:
    hts = voices.voice_groups("festival-hts:cmu_us_slt_arctic_hts", "festival-hts")
    assert hts == ["held_out_voices", "held_out:festival-hts:cmu_us_slt_arctic_hts", "held_out_engine", "held_out_natural"]
    assert voices.voice_groups("flite:rms", "flite") == ["held_out_voices", "held_out:flite:rms"]
    assert voices.voice_groups("piper:joe", "piper") == ["training_voices_piper", "training_natural"]
    assert augment.degradation_groups([], {}, None) == ["clean"]
    assert augment.degradation_groups(["reverb", "babble", "telephone"], {"codec": "gsm"}, 7.5) == [
        "reverb", "babble", "telephone", "telephone:gsm", "snr 0-10 dB"]
    assert augment.degradation_groups(["noise"], {}, 30.0) == ["noise", "snr 20-30 dB"]
    for r in speech[1]:  # every label row can be grouped from what the labels carry
        groups = augment.degradation_groups(r.augment, json.loads(r.params), r.snr_db)
        assert groups == ["clean"] or set(r.augment) <= set(groups)


def test_lm_training_text_holds_every_source_and_no_held_out_sentence() -> None:
    from audiopipe.tasks.corpora_text import load_sentences, training_text

    text = training_text(300, seed=1)
    fortunes = load_sentences()["train"]
    extra = text[len(fortunes):]
    assert text[:len(fortunes)] == list(fortunes) and len(extra) == 300
    assert all(sentence_split(t) == "train" for t in extra)
    assert any(t.startswith("press ") or " dollars" in t for t in extra)


def test_only_speech_is_written_in_ranges(tmp_path: Path) -> None:
    from audiopipe.infra.storage import StorageSpec
    from audiopipe.tasks.corpora import write_and_upload

    with pytest.raises(ConfigError, match="only speech"):
        write_and_upload("sounds", str(tmp_path), StorageSpec({}), start=8, stop=16, seed=0)
