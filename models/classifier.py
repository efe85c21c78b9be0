"""Models: audio classification, Conv1D + pooling -> LSTM -> softmax over the classes.

In: ``features`` float32 ``(batch, frames, n_mels)`` zero-padded past each row's length, and ``lengths``
int32 ``(batch,)`` in frames. Out: class probabilities float32 ``(batch, n_classes)`` (softmax), the class
order being the one recorded with the model. After normalisation (training statistics stored in the model),
each conv block is Conv1D ('same', stride 1) + ReLU + max-pooling by 2; padded frames are zeroed after every
block so a row scores the same alone or in a padded batch. The LSTM reads the masked sequence and its
last valid state feeds the softmax.

Metrics (numpy): ``accuracy``, ``confusion_matrix``, ``precision_recall``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import keras
import numpy as np

from audiopipe.infra.errors import ConfigError
from audiopipe.models.layers import FeatureNormalization, LengthMask, SequenceMask, lstm


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the classifier.

    Attributes:
        n_mels: Log-mel bins per input frame.
        n_classes: Output classes (>= 2).
        conv_channels: Channels of each Conv1D block; each block halves the frame rate.
        kernel_size: Conv1D kernel, frames (odd, so 'same' padding is symmetric).
        lstm_units: LSTM units.
        dropout: Dropout rate before the LSTM and before the softmax.
    """

    n_mels: int = 80
    n_classes: int = 6
    conv_channels: tuple[int, ...] = (64, 64)
    kernel_size: int = 5
    lstm_units: int = 64
    dropout: float = 0.2

    def __post_init__(self):
        object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
        if self.n_mels < 1 or self.lstm_units < 1:
            raise ConfigError(f"n_mels and lstm_units must be >= 1: {self}")
        if self.n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {self.n_classes}")
        if any(c < 1 for c in self.conv_channels):
            raise ConfigError(f"conv_channels must all be >= 1, got {self.conv_channels}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def subsample(self) -> int:
        """Time reduction of the conv blocks."""
        return 2 ** len(self.conv_channels)

    def to_dict(self) -> dict:
        return {**asdict(self), "conv_channels": list(self.conv_channels)}

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        """From ``to_dict`` output or a partial dict of overrides (a missing key keeps its default).

        Raises:
            ConfigError: unknown keys.
        """
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown classify model fields {sorted(unknown)}; use ClassifierConfig fields "
                              f"{sorted(f.name for f in fields(cls))}.")
        return cls(**data)  # __post_init__ makes conv_channels a tuple


def build_classifier(cfg: ClassifierConfig) -> keras.Model:
    """Build the (uncompiled) classifier: ``{"features", "lengths"} -> probabilities (batch, n_classes)``."""
    features = keras.Input((None, cfg.n_mels), name="features")
    lengths = keras.Input((), dtype="int32", name="lengths")
    x = FeatureNormalization(cfg.n_mels, name="feature_norm")(features)
    x = LengthMask(1, name="input_zero")([x, lengths])
    for i, channels in enumerate(cfg.conv_channels):
        x = keras.layers.Conv1D(channels, cfg.kernel_size, padding="same", activation="relu", name=f"conv{i}")(x)
        x = LengthMask(2 ** i, name=f"conv_zero{i}")([x, lengths])
        # 'same' pooling by 2 pads only on the right, so frame i always pools input frames 2i and 2i+1;
        # a zeroed padded frame never wins a max against ReLU outputs (>= 0).
        x = keras.layers.MaxPooling1D(2, padding="same", name=f"pool{i}")(x)
    mask = SequenceMask(cfg.subsample, name="sequence_mask")([x, lengths])
    x = keras.layers.Dropout(cfg.dropout, name="dropout_in")(x)
    x = lstm(cfg.lstm_units, return_sequences=False, name="lstm")(x, mask=mask)
    x = keras.layers.Dropout(cfg.dropout, name="dropout_out")(x)
    probs = keras.layers.Dense(cfg.n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model({"features": features, "lengths": lengths}, probs, name="classifier")


def classifier_loss() -> keras.losses.Loss:
    """Cross-entropy on integer class ids against the softmax output."""
    return keras.losses.SparseCategoricalCrossentropy(name="class_xent")


def _check_labels(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true).astype(np.int64), np.asarray(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ConfigError(f"labels and predictions must be 1-D of one length, got {y_true.shape}, {y_pred.shape}")
    for name, ids in (("labels", y_true), ("predictions", y_pred)):
        if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
            raise ConfigError(f"{name} hold class ids outside [0, {n_classes}): {sorted(set(ids.tolist()))[:10]}")
    return y_true, y_pred


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 ``(n_classes, n_classes)``: row = true class, column = predicted class.

    Raises:
        ConfigError: If the arrays differ in shape or hold ids outside ``[0, n_classes)``.
    """
    y_true, y_pred = _check_labels(y_true, y_pred, n_classes)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of predictions equal to the label. Raises ConfigError on empty or mismatched input."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ConfigError(f"accuracy needs equal, non-empty shapes, got {y_true.shape}, {y_pred.shape}")
    return float(np.mean(y_true == y_pred))


def precision_recall(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall from a confusion matrix (rows true, columns predicted).

    Returns:
        float64 ``(n_classes,)`` each; NaN where undefined (a class never predicted has no precision,
        a class absent from the labels no recall).
    """
    cm = np.asarray(cm, dtype=np.float64)
    hits = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / cm.sum(axis=0), hits / cm.sum(axis=1)
