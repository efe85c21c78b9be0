"""The character LM and decoder setting an ASR model is registered with (tasks/train_lm.py), stored in a real
registry beside model.keras with its checksum, and read back by inference (tasks/infer_decode.py)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import tensorflow as tf

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.storage import StorageSpec
from audiopipe.models.asr_ctc import DEFAULT_VOCAB, CtcAsrConfig, build_ctc_asr, encode_batch
from audiopipe.models.data import ShardSet
from audiopipe.models.registry import IntegrityError, Registry, TrainingData
from audiopipe.tasks.infer_decode import decoder_fields
from audiopipe.tasks.train_lm import LM_FILE, fit_decoder

TEXTS = {"train": ["the cat sat", "a dog ran", "the dog sat"], "val": ["the cat ran", "a cat"], "test": ["a dog"]}


def _shards() -> ShardSet:
    labels = {f"s3://b/{split}{i}.wav": {"split": split, "text": t}
              for split, texts in TEXTS.items() for i, t in enumerate(texts)}
    return ShardSet((), labels, 8, StorageSpec(), "")


def _model():
    import keras

    keras.utils.set_random_seed(0)
    return build_ctc_asr(CtcAsrConfig(n_mels=8, conv_channels=4, lstm_units=8, lstm_layers=1, spec_augment=None))


def _val(texts):
    rng = np.random.default_rng(0)
    labels, _ = encode_batch(texts)
    x = {"features": tf.constant(rng.normal(size=(len(texts), 60, 8)).astype(np.float32)),
         "lengths": tf.constant(np.array([60, 48][:len(texts)], np.int32))}
    return [(x, tf.constant(labels))]


def test_lm_is_fitted_on_training_transcripts_tuned_on_validation_and_stored_with_a_checksum(tmp_path):
    model = _model()
    files, extra = fit_decoder(model, _shards(), _val(TEXTS["val"]), DEFAULT_VOCAB, subsample=4, lm_text_url=None,
                               storage=StorageSpec())
    decoder = extra["decoder"]
    lm = json.loads(gzip.decompress(files[LM_FILE]))
    assert sum(lm["counts"]["\x02" * 5].values()) == len(TEXTS["train"])  # training split only
    assert decoder["lm"]["source"] == "training-split transcripts" and decoder["lm"]["sentences"] == 3
    assert decoder["chosen_on"] == "validation split, 2 utterances" and len(decoder["grid"]) == 9
    best = min(decoder["grid"], key=lambda g: g["val_cer"])
    assert decoder["val_cer_beam"] == best["val_cer"]
    assert (decoder["lm_weight"], decoder["insertion_bonus"]) == (best["lm_weight"], best["insertion_bonus"])
    registry = Registry(str(tmp_path / "reg"))
    ref = registry.register("asr", model, family="asr", metrics={"cer": 1.0}, feature_config={"kind": "logmel"},
                            training_data=TrainingData.of(["x"]), vocabulary=tuple(DEFAULT_VOCAB),
                            files=files, extra=extra)
    card = registry.get_card(ref)
    assert card.extra["files"][LM_FILE]["size"] == len(files[LM_FILE])
    fields, note = decoder_fields(card)
    assert note is None and fields == {"beam_width": 8, "lm_file": LM_FILE, "lm_weight": decoder["lm_weight"],
                                       "insertion_bonus": decoder["insertion_bonus"]}
    assert decoder_fields(card, beam_width=1)[0]["lm_file"] == ""  # greedy on request
    assert registry.fetch_file(ref, LM_FILE, tmp_path / "cache").read_bytes() == files[LM_FILE]
    stored = next((tmp_path / "reg").rglob(LM_FILE))
    stored.write_bytes(stored.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match="sha256"):
        registry.fetch_file(ref, LM_FILE, tmp_path / "cache2")
    with pytest.raises(Exception, match="no file 'other.json'"):
        registry.fetch_file(ref, "other.json", tmp_path / "cache2")


def test_lm_text_file_is_normalised_and_no_validation_set_keeps_the_defaults(tmp_path):
    (tmp_path / "lm.txt").write_text("Call me at 2:30pm!\n\n???\n")
    files, extra = fit_decoder(_model(), _shards(), [], DEFAULT_VOCAB, subsample=4,
                               lm_text_url=str(tmp_path / "lm.txt"), storage=StorageSpec())
    lm = json.loads(gzip.decompress(files[LM_FILE]))
    assert extra["decoder"]["lm"] == {"order": 6, "k": 0.05, "source": str(tmp_path / "lm.txt"), "sentences": 1,
                                      "contexts": len(lm["counts"])}
    assert lm["counts"]["\x02" * 5] == {"c": 1} and lm["counts"]["thirt"] == {"y": 1}  # "two thirty p m"
    assert (extra["decoder"]["lm_weight"], extra["decoder"]["insertion_bonus"]) == (0.3, 1.5)
    assert extra["decoder"]["chosen_on"] == "defaults (no validation utterances)"
    (tmp_path / "empty.txt").write_text("!!!\n")
    with pytest.raises(ConfigError, match="nothing to fit an LM on"):
        fit_decoder(_model(), _shards(), [], DEFAULT_VOCAB, subsample=4, lm_text_url=str(tmp_path / "empty.txt"),
                    storage=StorageSpec())
