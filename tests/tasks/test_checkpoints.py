"""tasks/checkpoints: a checkpoint is resumed only when its model file matches the sha256 and size that
``state.json`` recorded; anything else is set aside, named in a warning, and the run starts over.

Real tiny Keras models saved to real files; the only thing stubbed is ``keras.saving.load_model`` where a
test proves it is never reached for an unverified file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from audiopipe.tasks.checkpoints import STATE_FILE, load_checkpoint, read_state, save_checkpoint
from audiopipe.tasks.training import TrainSpec, fit_with_checkpoints, model_or_checkpoint

X = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)
WARN = "audiopipe.tasks.checkpoints"


def tiny(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.01), loss="mse")
    return model


def _never_load(monkeypatch):
    import keras

    def refuse(*args, **kwargs):
        raise AssertionError("keras.saving.load_model called on an unverified checkpoint")

    monkeypatch.setattr(keras.saving, "load_model", refuse)


def _rejected(tmp_path, name: str = "run"):
    return sorted(tmp_path.glob(f"{name}.rejected-*"))


def test_saved_checkpoint_round_trips_and_names_its_file_and_checksum(tmp_path):
    ckpt, model = tmp_path / "run", tiny()
    save_checkpoint(model, ckpt, epoch=1, history={"loss": [1.0]})
    state = save_checkpoint(model, ckpt, epoch=2, history={"loss": [1.0, 0.5]})
    doc = json.loads((ckpt / STATE_FILE).read_text())
    blob = (ckpt / "epoch-0002.keras").read_bytes()
    assert doc == {"state_version": 1, "epoch": 2, "model_file": "epoch-0002.keras",
                   "model_sha256": hashlib.sha256(blob).hexdigest(), "model_size": len(blob)}
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0002.keras", "history.json", "state.json"]
    loaded, again = load_checkpoint(ckpt)
    assert again == state == read_state(ckpt)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0), rtol=1e-6)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_is_never_loaded_set_aside_and_named(tmp_path, monkeypatch, caplog, damage):
    ckpt = tmp_path / "run"
    state = save_checkpoint(tiny(), ckpt, epoch=3, history={"loss": [3.0, 2.0, 1.0]})
    path = ckpt / state.model_file
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = blob[:-100]
    path.write_bytes(bytes(blob))
    _never_load(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=WARN):
        assert load_checkpoint(ckpt) is None
    message = " ".join(r.getMessage() for r in caplog.records if r.name == WARN)
    assert str(path) in message and state.model_sha256 in message
    assert hashlib.sha256(bytes(blob)).hexdigest() in message
    assert ("truncated" if damage == "truncate" else "modified") in message and "starts over" in message
    (aside,) = _rejected(tmp_path)
    assert not ckpt.exists() and str(aside) in message  # kept whole for inspection, out of the run's way
    assert (aside / state.model_file).read_bytes() == bytes(blob)


@pytest.mark.parametrize("state_text, needle", [
    ('{"epoch": 2}', "older audiopipe"),  # written before checkpoints were verified: no checksum to check
    ("{not json", "older audiopipe"),
    ('{"epoch": 2, "model_file": "../other/model.keras", "model_sha256": "0", "model_size": 1}', "own folder"),
    ('{"epoch": 2, "model_file": "epoch-0009.keras", "model_sha256": "0", "model_size": 1}', "does not exist"),
])
def test_a_state_that_cannot_vouch_for_its_model_is_refused(tmp_path, monkeypatch, caplog, state_text, needle):
    ckpt = tmp_path / "run"
    save_checkpoint(tiny(), ckpt, epoch=2, history={"loss": [2.0, 1.0]})
    (ckpt / STATE_FILE).write_text(state_text)
    _never_load(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=WARN):
        assert load_checkpoint(ckpt) is None
    assert needle in caplog.text and str(ckpt) in caplog.text
    assert len(_rejected(tmp_path)) == 1 and not ckpt.exists()


def test_a_lambda_layer_is_refused_even_with_a_matching_checksum(tmp_path, caplog):
    """Whoever can write the checkpoint folder can also rewrite state.json: safe mode is the last line."""
    import keras

    marker = str(tmp_path / "code-ran")  # a str: the lambda's closure is serialized with it
    evil = keras.Sequential([keras.Input((4,)),
                             keras.layers.Lambda(lambda x: (open(marker, "w").close(), x)[1])])
    Path(marker).unlink()  # building the model called the lambda once; only a load may create it again
    ckpt = tmp_path / "run"
    save_checkpoint(evil, ckpt, epoch=1, history={"loss": [1.0]})
    with caplog.at_level(logging.WARNING, logger=WARN):
        assert load_checkpoint(ckpt) is None
    assert "passed its checksum but Keras refuses it in safe mode" in caplog.text and "Lambda" in caplog.text
    assert not Path(marker).exists() and len(_rejected(tmp_path)) == 1


def test_a_kill_before_the_state_commit_resumes_the_previous_epoch(tmp_path):
    """Epoch 2's model file and history were written, state.json still names epoch 1: resume after epoch 1."""
    ckpt, model = tmp_path / "run", tiny()
    first = save_checkpoint(model, ckpt, epoch=1, history={"loss": [1.0]})
    (ckpt / "epoch-0002.keras").write_bytes(b"PK half a zip")  # the model save the kill interrupted
    (ckpt / "history.json").write_text(json.dumps({"loss": [1.0, 0.9]}))
    loaded, state = load_checkpoint(ckpt)
    assert state == first and not _rejected(tmp_path)
    spec = TrainSpec("classify", "", "", "", "", epochs=3, patience=10, work_dir=str(tmp_path))
    data = _data()
    history = fit_with_checkpoints(spec, loaded, data, ckpt, state.epoch)
    assert len(history["loss"]) == 3 and history["loss"][0] == 1.0  # epoch 2 counted once, not twice
    assert read_state(ckpt).done and read_state(ckpt).epoch == 3
    assert [p.name for p in ckpt.glob("*.keras")] == ["final-0003.keras"]


def test_model_or_checkpoint_resumes_a_verified_checkpoint_and_restarts_after_tampering(tmp_path, caplog):
    spec = TrainSpec("classify", "", "", "", "", epochs=4, work_dir=str(tmp_path),
                     model_overrides={"conv_channels": [4], "lstm_units": 4})
    ckpt = tmp_path / "run"
    saved = tiny(3)
    state = save_checkpoint(saved, ckpt, epoch=2, history={"loss": [2.0, 1.0]})
    model, _, epoch = model_or_checkpoint(spec, ckpt, 8, ["a", "b"])
    assert epoch == 2 and model.count_params() == saved.count_params()
    path = ckpt / state.model_file
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 3] ^= 0x01  # one bit
    path.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger=WARN):
        model, cfg, epoch = model_or_checkpoint(spec, ckpt, 8, ["a", "b"])
    assert epoch == 0 and cfg.n_mels == 8 and model.output_shape[-1] == 2  # a fresh classifier
    assert str(path) in caplog.text and len(_rejected(tmp_path)) == 1


def _data():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, x[:, :2] * 2.0)).batch(8)
    return {"train": ds, "val": ds}
