"""Small real models for the bulk-inference tests, registered like trained ones.

Training a recogniser takes minutes, so these models keep the trained models' inputs, outputs and card
fields with untrained weights. ``per_frame_asr`` has no recurrence: each output frame depends only on its own
4 input frames, so windowed inference must reproduce a single pass over the whole recording exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from audiopipe.infra.storage import StorageSpec
from audiopipe.models.registry import Registry, TrainingData
from audiopipe.tasks.features import FeatureConfig

VOCAB = " 'abcdefghijklmnopqrstuvwxyz"
FEATURES = FeatureConfig(n_mels=40, segment_seconds=3.0)


def per_frame_asr(n_mels: int = FEATURES.n_mels, seed: int = 0, upsample: int = 1):
    """Output frames every ``4 // upsample`` input frames, each from one stack of 4 (``CtcAsrConfig.upsample``)."""
    import keras

    from audiopipe.models.layers import BlankPadding, FrameSplit, FrameStack

    keras.utils.set_random_seed(seed)
    features = keras.Input((None, n_mels), name="features")
    lengths = keras.Input((), dtype="int32", name="lengths")
    x = FrameStack(4, name="frame_stack")(features)
    logits = keras.layers.Dense(upsample * (len(VOCAB) + 1), name="classifier",
                                kernel_initializer=keras.initializers.RandomNormal(stddev=0.05))(x)
    if upsample > 1:
        logits = FrameSplit(upsample, name="upsample")(logits)
    logits = BlankPadding(4 // upsample, name="logits")([logits, lengths])
    return keras.Model({"features": features, "lengths": lengths}, logits, name="per_frame_asr")


def register_asr(registry_url: str, storage: StorageSpec = StorageSpec(), *, model=None, name: str = "asr",
                 upsample: int = 1) -> str:
    model = model or per_frame_asr(upsample=upsample)
    ref = Registry(registry_url, storage).register(
        name, model, family="asr", metrics={"cer": 0.5}, feature_config=FEATURES.to_dict(),
        training_data=TrainingData.of(["made-in-test"]), vocabulary=tuple(VOCAB),
        params={"model_config": {"subsample": 4 // upsample, "upsample": upsample}})
    return f"{registry_url}:{ref.name}@{ref.version}"


def register_classifier(registry_url: str, storage: StorageSpec = StorageSpec(), classes=("noise", "tone")) -> str:
    from audiopipe.models.classifier import ClassifierConfig, build_classifier

    model = build_classifier(ClassifierConfig(n_mels=FEATURES.n_mels, n_classes=len(classes), conv_channels=(8,),
                                              lstm_units=8))
    ref = Registry(registry_url, storage).register(
        "classify", model, family="classify", metrics={"accuracy": 0.5}, feature_config=FEATURES.to_dict(),
        training_data=TrainingData.of(["made-in-test"]), classes=tuple(classes), params={"model_config": {}})
    return f"{registry_url}:{ref.name}@{ref.version}"


def register_separator(registry_url: str, storage: StorageSpec = StorageSpec()) -> str:
    from audiopipe.models.separation import SeparationConfig, build_separation

    cfg = SeparationConfig(n_fft=128, hop=32, hidden_units=8, lstm_layers=1)
    stft = {"kind": "stft", "sampling_rate": cfg.sampling_rate, "n_fft": cfg.n_fft, "hop": cfg.hop}
    ref = Registry(registry_url, storage).register(
        "separate", build_separation(cfg), family="separate", metrics={"si_sdr_improvement_db": 1.0},
        feature_config=stft, training_data=TrainingData.of(["made-in-test"]), classes=("speech",),
        params={"model_config": cfg.to_dict()})
    return f"{registry_url}:{ref.name}@{ref.version}"


def voiced(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Speech-like audio: bursts of harmonic tones and noise separated by pauses (float32, -0.5..0.5)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = np.zeros_like(t)
    start = 0.0
    while start < seconds:
        length, f0 = rng.uniform(0.2, 1.2), rng.uniform(90, 250)
        on = (t >= start) & (t < start + length)
        out[on] = 0.3 * np.sin(2 * np.pi * f0 * t[on]) + 0.1 * np.sin(2 * np.pi * 3 * f0 * t[on])
        out[on] += 0.05 * rng.standard_normal(on.sum())
        start += length + rng.uniform(0.05, 0.8)
    return out.astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, rate, subtype="PCM_16")
    return path
