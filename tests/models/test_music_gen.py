"""Note model: build, train a few steps, save/load, sampling, NLL per note and the bigram baseline."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from audiopipe.infra.errors import ConfigError
from audiopipe.models import music_gen as mg
from audiopipe.models.layers import CUDNN_LSTM_CONFIG, cudnn_ineligible_layers

TINY = mg.MusicGenConfig(n_pitches=8, n_durations=4, embed_dim=4, lstm_units=8, dropout=0.0)
# A scale up and down with a fixed rhythm: learnable, and never BOS (token 0).
PIECES = [np.array([[p, 1 + i % 3] for i, p in enumerate([1, 2, 3, 4, 5, 6, 7, 6, 5, 4, 3, 2] * 2)])] * 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = mg.build_music_gen(TINY)
    model.compile(optimizer=keras.optimizers.Adam(2e-2), loss=mg.music_losses())
    x, y, w = mg.next_note_arrays(PIECES, window=12)
    history = model.fit(x, y, sample_weight=w, epochs=12, batch_size=2, verbose=0).history["loss"]
    path = tmp_path_factory.mktemp("music") / "model.keras"
    model.save(path)
    return model, history, path


def test_fit_lowers_the_loss(trained):
    history = trained[1]
    assert history[-1] < 0.8 * history[0]


def test_two_heads_with_expected_shapes():
    model = mg.build_music_gen(TINY)
    x, _, _ = mg.next_note_arrays(PIECES[:2])
    out = model.predict(x, verbose=0)
    assert out["pitch"].shape == (2, 24, TINY.n_pitches) and out["duration"].shape == (2, 24, TINY.n_durations)
    assert out["pitch"].dtype == np.float32


def test_next_note_arrays_shift_by_one_and_weight_padding():
    x, y, w = mg.next_note_arrays([np.array([[3, 1], [4, 2], [5, 3]]), np.array([[6, 1]])], window=2)
    assert x["pitch"].tolist() == [[0, 3], [4, 0], [0, 0]]
    assert y["pitch"].tolist() == [[3, 4], [5, 0], [6, 0]]
    assert x["duration"].tolist() == [[0, 1], [2, 0], [0, 0]]
    assert w["pitch"].tolist() == w["duration"].tolist() == [[1, 1], [1, 0], [1, 0]]


def test_untrained_nll_is_near_uniform_and_training_lowers_it(trained):
    fresh = mg.build_music_gen(TINY)
    uniform = math.log(TINY.n_pitches) + math.log(TINY.n_durations)
    assert mg.nll_per_note(fresh, PIECES) == pytest.approx(uniform, abs=0.2)
    assert mg.nll_per_note(trained[0], PIECES) < uniform - 0.5


def test_nll_per_note_matches_the_keras_loss(trained):
    model = trained[0]
    x, y, w = mg.next_note_arrays(PIECES)
    logits = model.predict(x, verbose=0)
    losses = mg.music_losses()
    keras_nll = sum(float(losses[h](y[h], logits[h])) for h in ("pitch", "duration"))
    assert mg.nll_per_note(model, PIECES) == pytest.approx(keras_nll, rel=1e-4)


def test_save_load_round_trip_in_safe_mode(trained):
    model, _, path = trained
    loaded = keras.saving.load_model(path, safe_mode=True)
    x, _, _ = mg.next_note_arrays(PIECES[:1])
    for head, value in loaded.predict(x, verbose=0).items():
        np.testing.assert_allclose(value, model.predict(x, verbose=0)[head], atol=1e-6)


def test_lstms_keep_the_cudnn_configuration(trained):
    for name in ("lstm1", "lstm2"):
        cfg = trained[0].get_layer(name).get_config()
        assert {k: cfg[k] for k in CUDNN_LSTM_CONFIG} == CUDNN_LSTM_CONFIG
    assert cudnn_ineligible_layers(trained[0]) == []


def test_sample_is_repeatable_in_range_and_follows_the_full_model(trained):
    model = trained[0]
    seed = PIECES[0][:3]
    a = mg.sample(model, seed, 6, temperature=1.0, rng=np.random.default_rng(7))
    b = mg.sample(model, seed, 6, temperature=1.0, rng=np.random.default_rng(7))
    assert a.shape == (6, 2) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert a[:, 0].min() >= 1 and a[:, 0].max() < TINY.n_pitches and a[:, 1].min() >= 1
    # Near-zero temperature = argmax: the step-by-step state must give what the whole-sequence model gives.
    greedy = mg.sample(model, seed, 5, temperature=1e-4, rng=np.random.default_rng(0))
    x, _, _ = mg.next_note_arrays([np.concatenate([seed, greedy])])
    logits = model.predict(x, verbose=0)
    for head, col in (("pitch", 0), ("duration", 1)):
        best = logits[head][0, len(seed):, 1:].argmax(-1) + 1  # BOS is never drawn
        np.testing.assert_array_equal(best, greedy[:, col])


def test_sample_refuses_a_bad_temperature(trained):
    with pytest.raises(ConfigError):
        mg.sample(trained[0], PIECES[0][:2], 3, temperature=0.0)


def test_bigram_nll_matches_hand_computation():
    bigram = mg.BigramModel.fit([np.array([1, 2]), np.array([1])], vocab_size=3, k=1.0)
    # BOS->1 seen twice of 2: (2+1)/(2+3); 1->2 seen once of 1: (1+1)/(1+3).
    assert bigram.nll_per_token([np.array([1, 2])]) == pytest.approx(-(math.log(3 / 5) + math.log(2 / 4)) / 2)
    # 2->1 unseen, context 2 never seen: k / (0 + 3k) = 1/3.
    assert bigram.nll_per_token([np.array([1, 2, 1])]) == pytest.approx(
        -(math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 3)
    with pytest.raises(ConfigError):
        bigram.nll_per_token([np.array([5])])


def test_config_dict_round_trip_and_validation():
    assert mg.MusicGenConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ConfigError):
        mg.MusicGenConfig(n_pitches=1)
