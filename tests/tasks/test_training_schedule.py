"""Learning-rate schedules of ``fit_with_checkpoints``: the rate Keras really used per epoch, and resume.

A tiny dense model on random regression data is enough: what is checked is the optimizer's rate in each
epoch's logs, which does not depend on the model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from audiopipe.infra.errors import ConfigError
from audiopipe.tasks.training import BUCKET_EDGES, TrainSpec, cosine_lr, fit_with_checkpoints


def _spec(tmp_path, **kw) -> TrainSpec:
    return TrainSpec("classify", "", "", "", "", work_dir=str(tmp_path), **kw)


def _model_and_data(seed: int = 0):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.01), loss="mse")
    return model, {"train": ds, "val": ds}


def test_cosine_schedule_warms_up_then_decays_to_two_percent(tmp_path):
    spec = _spec(tmp_path, epochs=10, learning_rate=0.003, lr_schedule="cosine")
    rates = [cosine_lr(spec, e) for e in range(spec.epochs)]
    assert rates[0] == pytest.approx(0.001)  # warm-up epoch at a third
    assert rates[1] == pytest.approx(0.003)  # then the full rate
    assert all(a > b for a, b in zip(rates[1:], rates[2:], strict=False))  # strictly decaying after
    assert rates[-1] == pytest.approx(0.003 * 0.02)


def test_fit_applies_the_cosine_rate_each_epoch_and_a_resume_continues_the_curve(tmp_path):
    spec = _spec(tmp_path, epochs=5, learning_rate=0.01, lr_schedule="cosine", patience=10)
    expected = [cosine_lr(spec, e) for e in range(spec.epochs)]

    # First run "killed" after 3 epochs: a spec with epochs=3 would have another curve, so stop the fit
    # from inside instead, as a kill between epochs leaves the checkpoint behind.
    import keras

    model, data = _model_and_data()

    class KillAfter3(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                self.model.stop_training = True

    ckpt = tmp_path / "ckpt"
    original_fit = model.fit
    model.fit = lambda *a, **kw: original_fit(*a, **{**kw, "callbacks": [*kw["callbacks"], KillAfter3()]})
    fit_with_checkpoints(spec, model, data, ckpt, 0)
    state = json.loads((ckpt / "state.json").read_text())
    assert len(json.loads((ckpt / "history.json").read_text())["loss"]) == 3
    (ckpt / "state.json").write_text(json.dumps({"epoch": 3}))  # a killed run never wrote "done"

    resumed = keras.saving.load_model(ckpt / state["model_file"])
    history = fit_with_checkpoints(spec, resumed, data, ckpt, 3)
    assert state["epoch"] == 3
    assert history["learning_rate"] == pytest.approx(expected, rel=1e-5)
    assert history["loss"][-1] < history["loss"][0]


def test_plateau_schedule_keeps_the_rate_until_validation_stalls(tmp_path):
    spec = _spec(tmp_path, epochs=3, learning_rate=0.01, patience=4)
    model, data = _model_and_data()
    history = fit_with_checkpoints(spec, model, data, tmp_path / "ckpt", 0)
    assert history["learning_rate"] == pytest.approx([0.01] * 3)  # loss falls every epoch: no halving


def test_unknown_schedule_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="lr_schedule 'linear'"):
        _spec(tmp_path, lr_schedule="linear")


def test_bucket_edges_bound_padding_to_twenty_percent():
    edges = np.asarray(BUCKET_EDGES)
    assert edges[0] == 100 and edges[-1] >= 2500  # 1 s to ~27 s at a 10 ms hop
    assert np.all(np.diff(edges) > 0)
    assert np.max(edges[1:] / edges[:-1]) <= 1.21


def test_transcript_html_marks_each_character_error():
    from audiopipe.tasks.training import transcript_html

    out = transcript_html("hello world", "helo wurldz")
    # the second l is missing (shown struck through in the output line), o -> u, z inserted
    assert "ref: hel<span class='del'>l</span>o w<span class='sub'>o</span>rld\n" in out
    assert "hyp: hel<span class='del'>l</span>o w<span class='sub'>u</span>rld<span class='ins'>z</span>" in out
    assert "(CER 27%)" in out  # 3 edits / 11 reference characters
    assert transcript_html("a<b", "a<b").count("span") == 0 and "a&lt;b" in transcript_html("a<b", "a<b")
    assert "<span class='del'>the cat</span>" in transcript_html("the cat", "")
    assert "empty reference" in transcript_html("", "x")


def test_classify_overrides_may_not_set_what_the_data_fixes():
    from audiopipe.tasks.training import _build

    spec = TrainSpec("classify", "f", "l", "r", "0" * 12, model_overrides={"n_classes": 3, "lstm_units": 8})
    with pytest.raises(ConfigError, match=r"\['n_classes'\] cannot be set"):
        _build(spec, 80, ["a", "b"])
    model, cfg = _build(TrainSpec("classify", "f", "l", "r", "0" * 12, model_overrides={"lstm_units": 8}), 80, ["a", "b"])
    assert (cfg.n_mels, cfg.n_classes, cfg.lstm_units) == (80, 2, 8) and model.output_shape[-1] == 2
