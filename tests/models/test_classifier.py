"""Classifier: build, train a few steps on tiny separable data, save/load, padding, and the numpy metrics."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from audiopipe.infra.errors import ConfigError
from audiopipe.models import classifier as clf
from audiopipe.models.layers import CUDNN_LSTM_CONFIG, cudnn_ineligible_layers, set_feature_stats

TINY = clf.ClassifierConfig(n_mels=12, n_classes=3, conv_channels=(4, 4), kernel_size=3, lstm_units=8, dropout=0.0)


def _data(n: int, seed: int = 0):
    """Class c puts its energy in band c of the 'mel' axis; lengths vary, padding is zero."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % TINY.n_classes
    lengths = rng.integers(9, 30, size=n).astype(np.int32)
    x = rng.normal(scale=0.3, size=(n, 30, TINY.n_mels)).astype(np.float32)
    for row, (label, length) in enumerate(zip(labels, lengths)):
        x[row, :, 4 * label:4 * label + 4] += 1.5
        x[row, length:] = 0.0
    return {"features": x, "lengths": lengths}, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = clf.build_classifier(TINY)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=clf.classifier_loss())
    x, y = _data(24)
    history = model.fit(x, y, epochs=8, batch_size=8, verbose=0).history["loss"]
    path = tmp_path_factory.mktemp("clf") / "model.keras"
    model.save(path)
    return model, x, y, history, path


def test_fit_lowers_the_loss(trained):
    history = trained[3]
    assert history[-1] < 0.8 * history[0]


def test_output_is_a_distribution_over_classes(trained):
    model, x, _, _, _ = trained
    probs = model.predict(x, verbose=0)
    assert probs.shape == (24, TINY.n_classes) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_row_scores_the_same_alone_and_in_a_padded_batch(trained):
    model, x, _, _, _ = trained
    row = int(np.argmin(x["lengths"]))
    n = int(x["lengths"][row])
    alone = model.predict({"features": x["features"][row:row + 1, :n], "lengths": x["lengths"][row:row + 1]},
                          verbose=0)
    np.testing.assert_allclose(alone[0], model.predict(x, verbose=0)[row], atol=1e-5)


def test_save_load_round_trip_in_safe_mode(trained):
    model, x, _, _, path = trained
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_lstm_keeps_the_cudnn_configuration(trained):
    layer = trained[0].get_layer("lstm")
    assert {k: layer.get_config()[k] for k in CUDNN_LSTM_CONFIG} == CUDNN_LSTM_CONFIG
    assert cudnn_ineligible_layers(trained[0]) == []


def test_normalisation_statistics_travel_inside_the_model_file(tmp_path):
    model = clf.build_classifier(TINY)
    mean, std = np.linspace(-1, 1, TINY.n_mels), np.linspace(1, 2, TINY.n_mels)
    set_feature_stats(model, mean, std)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    for got, want in zip(loaded.get_layer("feature_norm").get_weights(), (mean, std)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ConfigError, match="expects"):
        set_feature_stats(model, mean[:3], std[:3])
    with pytest.raises(ConfigError, match="std > 0"):
        set_feature_stats(model, mean, np.zeros(TINY.n_mels))


@pytest.mark.parametrize("bad", [{"n_classes": 1}, {"kernel_size": 4}, {"conv_channels": (4, 0)},
                                 {"dropout": -0.1}])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        clf.ClassifierConfig(**bad)


def test_config_dict_round_trip():
    assert clf.ClassifierConfig.from_dict(TINY.to_dict()) == TINY
    partial = clf.ClassifierConfig.from_dict({"n_classes": 3, "conv_channels": [8]})  # defaults for the rest
    assert partial.conv_channels == (8,) and partial.lstm_units == clf.ClassifierConfig().lstm_units
    with pytest.raises(ConfigError, match=r"fields \['lstm_unitz'\]"):
        clf.ClassifierConfig.from_dict({"lstm_unitz": 8})


def test_metrics_by_hand():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    cm = clf.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert clf.accuracy(y_true, y_pred) == pytest.approx(3 / 5)
    precision, recall = clf.precision_recall(cm)
    np.testing.assert_allclose(precision[:2], [1 / 2, 2 / 3])
    assert np.isnan(precision[2])  # class 2 never predicted
    np.testing.assert_allclose(recall, [1 / 2, 1.0, 0.0])


def test_unknown_class_ids_are_a_clear_error():
    with pytest.raises(ConfigError, match="outside"):
        clf.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
