"""Device selection: CPU fallback, a loud failure when a GPU is demanded but absent, mixed-precision dtypes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from audiopipe.infra.errors import ConfigError
from audiopipe.models import asr_ctc, classifier, music_gen, separation
from audiopipe.models.device import select_device

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


@pytest.fixture()
def restore_policy():
    before = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(before)


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_cpu_selection_is_clean_and_logged(restore_policy, caplog):
    caplog.set_level("INFO", logger="audiopipe.models.device")
    keras.mixed_precision.set_global_policy("mixed_float16")  # left over from an earlier GPU call
    info = select_device(require_gpu=False)
    assert (info.kind, info.devices, info.dtype_policy, info.mixed_precision) == ("cpu", (), "float32", False)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert "CPU" in caplog.text


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_requiring_a_gpu_without_one_fails_loudly(restore_policy):
    with pytest.raises(ConfigError, match="GPU was required.*Refusing to train on CPU"):
        select_device(require_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_gpu_selection_turns_on_mixed_precision(restore_policy):
    info = select_device(require_gpu=True)
    assert info.kind == "gpu" and info.devices and info.mixed_precision
    assert keras.mixed_precision.global_policy().name == "mixed_float16"


def test_models_built_under_mixed_precision_keep_float32_outputs(restore_policy):
    """What a GPU run builds: float16 compute inside, float32 logits/probabilities/masks out."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    lengths = np.array([12, 7], dtype=np.int32)
    feats = np.random.default_rng(0).normal(size=(2, 12, 8)).astype(np.float32)
    asr = asr_ctc.build_ctc_asr(asr_ctc.CtcAsrConfig(n_mels=8, conv_channels=2, lstm_units=4, lstm_layers=1,
                                                     spec_augment=asr_ctc.SpecAugmentConfig(freq_mask_bins=2)))
    clf = classifier.build_classifier(classifier.ClassifierConfig(n_mels=8, n_classes=2, conv_channels=(2,),
                                                                  kernel_size=3, lstm_units=4))
    mus = music_gen.build_music_gen(music_gen.MusicGenConfig(n_pitches=5, n_durations=3, embed_dim=2,
                                                             lstm_units=4))
    sep = separation.build_separation(separation.SeparationConfig(n_fft=14, hop=4, hidden_units=4,
                                                                  lstm_layers=1))
    outputs = [asr.output, clf.output, *mus.output.values(), *sep.output.values()]
    assert all(out.dtype == "float32" for out in outputs)
    assert asr.get_layer("bilstm0").forward_layer.compute_dtype == "float16"
    logits = asr.predict({"features": feats, "lengths": lengths}, verbose=0)
    labels, _ = asr_ctc.encode_batch(["ab", "c"])
    assert np.all(np.isfinite(np.asarray(asr_ctc.ctc_loss(labels, logits, [2, 1], [3, 2]))))
    assert mus.predict({"pitch": np.ones((1, 4), np.int32), "duration": np.ones((1, 4), np.int32)},
                       verbose=0)["pitch"].dtype == np.float32
    assert music_gen.sample(mus, np.array([[1, 1]]), 2, rng=np.random.default_rng(0)).shape == (2, 2)
