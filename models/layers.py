"""Models: the custom Keras layers the four model families share.

In: channel-last feature tensors ``(batch, frames, features)`` padded with zeros past each row's length,
plus an int32 ``lengths`` tensor ``(batch,)`` in input frames. ``LengthMask`` zeroes padded frames (so a
conv or pooling sees exactly what it would see on an unpadded row); ``SequenceMask`` makes the explicit
padding mask handed to recurrent layers (so a bidirectional LSTM starts its backward pass at each row's
real end); ``BlankPadding`` makes padded CTC frames certain blanks. ``FeatureNormalization`` keeps the
training statistics inside the model; ``SpecAugment`` and ``FrameStack`` serve the recogniser.

Every layer is registered under the ``audiopipe`` package so ``.keras`` files load in safe mode; nothing
here is a ``Lambda``. ``lstm`` builds the only LSTM configuration the models use: the one Keras runs on
cuDNN when a GPU is present (``cudnn_ineligible_layers`` checks a built model for it).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from audiopipe.infra.errors import ConfigError

PACKAGE = "audiopipe"

# What Keras' TF backend requires to run an LSTM on cuDNN (keras/src/backend/tensorflow/rnn.py).
CUDNN_LSTM_CONFIG = {"activation": "tanh", "recurrent_activation": "sigmoid", "recurrent_dropout": 0.0,
                     "unroll": False, "use_bias": True}

# A logit this far below the blank makes a padded frame certain to be blank: exp(-1e4) is 0 in float32.
_BLANK_MARGIN = 1.0e4


def output_lengths(lengths: np.ndarray, subsample: int) -> np.ndarray:
    """Frames left after a ``subsample``-fold front end: ``ceil(length / subsample)``.

    Args:
        lengths: int ``(batch,)`` lengths in input frames.
        subsample: Front-end time reduction (1, 2, 4, ...).

    Returns:
        int32 ``(batch,)`` lengths in output frames.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    return ((lengths + subsample - 1) // subsample).astype(np.int32)


def _sequence_mask(lengths, x, subsample: int):
    """bool ``(batch, frames)`` over ``x``'s frame axis: frame index < ceil(length / subsample)."""
    positions = ops.arange(ops.shape(x)[1], dtype="int32")
    reduced = ops.floor_divide(ops.cast(lengths, "int32") + (subsample - 1), subsample)
    return positions[None, :] < ops.reshape(reduced, (-1, 1))


def lstm(units: int, *, return_sequences: bool = True, return_state: bool = False,
         name: str | None = None) -> keras.layers.LSTM:
    """An LSTM in the cuDNN-eligible configuration (tanh/sigmoid, no recurrent dropout, not unrolled, bias).

    Dropout goes in separate ``Dropout`` layers between recurrent layers: ``recurrent_dropout`` > 0 would
    force the slow generic kernel on GPU.
    """
    return keras.layers.LSTM(units, return_sequences=return_sequences, return_state=return_state,
                             name=name, **CUDNN_LSTM_CONFIG)


def cudnn_ineligible_layers(model: keras.Model) -> list[str]:
    """Names of the LSTM layers in ``model`` (also inside ``Bidirectional``) that cuDNN cannot run."""
    bad = []
    for layer in model.layers:
        inner = [layer.forward_layer, layer.backward_layer] if isinstance(layer, keras.layers.Bidirectional) \
            else [layer]
        for rnn in inner:
            if not isinstance(rnn, keras.layers.LSTM):
                continue
            cfg = rnn.get_config()
            if any(cfg[key] != value for key, value in CUDNN_LSTM_CONFIG.items()) or rnn.use_cudnn is False:
                bad.append(rnn.name)
    return bad


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeatureNormalization(keras.layers.Layer):
    """``(x - mean) / std`` per feature, with the statistics stored as (non-trainable) model weights.

    The statistics are computed over the training shards and set with ``set_feature_stats``; they then
    travel inside the ``.keras`` file, so a loaded model normalises exactly as it did in training.
    Input and output ``(batch, frames, num_features)``.
    """

    def __init__(self, num_features: int, **kwargs):
        super().__init__(**kwargs)
        self.num_features = int(num_features)
        self.supports_masking = True

    def build(self, input_shape):
        self.mean = self.add_weight(shape=(self.num_features,), initializer="zeros", trainable=False,
                                    name="mean")
        self.std = self.add_weight(shape=(self.num_features,), initializer="ones", trainable=False,
                                   name="std")

    def call(self, inputs):
        mean = ops.cast(self.mean, inputs.dtype)
        std = ops.cast(self.std, inputs.dtype)
        return (inputs - mean) / std

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features}


def set_feature_stats(model: keras.Model, mean: np.ndarray, std: np.ndarray,
                      *, layer_name: str = "feature_norm") -> None:
    """Store per-feature statistics in ``model``'s normalisation layer (the model's own weights).

    Raises:
        ConfigError: If the shapes do not match the model's features or a std is not positive.
    """
    layer = model.get_layer(layer_name)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    if mean.shape != (layer.num_features,) or std.shape != (layer.num_features,):
        raise ConfigError(f"feature statistics have shapes {mean.shape}/{std.shape}, but the model's "
                          f"'{layer_name}' expects ({layer.num_features},)")
    if not np.all(np.isfinite(mean)) or not np.all(std > 0):
        raise ConfigError("feature statistics must be finite with std > 0 (a constant feature needs a floor)")
    layer.set_weights([mean, std])


@keras.saving.register_keras_serializable(package=PACKAGE)
class LengthMask(keras.layers.Layer):
    """Zero the frames past each row's length, so a conv or pooling sees what an unpadded row gives.

    Call on ``[x, lengths]``: ``x`` ``(batch, frames, ...)`` after a ``subsample``-fold front end,
    ``lengths`` int ``(batch,)`` in *input* frames. Valid frames are ``ceil(lengths / subsample)``.
    """

    def __init__(self, subsample: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.subsample = int(subsample)

    def call(self, inputs):
        x, lengths = inputs
        valid = ops.cast(_sequence_mask(lengths, x, self.subsample), x.dtype)
        for _ in range(len(x.shape) - 2):
            valid = valid[..., None]
        return x * valid

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "subsample": self.subsample}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SequenceMask(keras.layers.Layer):
    """The padding mask for recurrent layers: bool ``(batch, frames)``, True on valid frames.

    Call on ``[x, lengths]`` as ``LengthMask``; pass the result explicitly, ``lstm_layer(x, mask=mask)``,
    so a bidirectional LSTM starts its backward pass at each row's real end. The mask is right-aligned
    padding, which is what cuDNN accepts.
    """

    def __init__(self, subsample: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.subsample = int(subsample)

    def call(self, inputs):
        x, lengths = inputs
        return _sequence_mask(lengths, x, self.subsample)

    def compute_output_spec(self, inputs):
        x, _ = inputs
        return keras.KerasTensor(x.shape[:2], dtype="bool")

    def get_config(self):
        return {**super().get_config(), "subsample": self.subsample}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpecAugment(keras.layers.Layer):
    """SpecAugment frequency and time masking (Park et al. 2019), in training only.

    Call on ``[x, lengths]`` with ``x`` ``(batch, frames, bins)`` already normalised (a masked value is 0,
    the feature mean). Each row gets ``num_freq_masks`` bands of ``U[0, freq_mask_bins]`` bins and
    ``num_time_masks`` spans of ``U[0, min(time_mask_frames, time_mask_max_fraction * length)]`` frames,
    placed inside the row's own length. At inference the layer is the identity.
    """

    def __init__(self, num_freq_masks: int = 2, freq_mask_bins: int = 15, num_time_masks: int = 2,
                 time_mask_frames: int = 25, time_mask_max_fraction: float = 0.2, seed: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_freq_masks = int(num_freq_masks)
        self.freq_mask_bins = int(freq_mask_bins)
        self.num_time_masks = int(num_time_masks)
        self.time_mask_frames = int(time_mask_frames)
        self.time_mask_max_fraction = float(time_mask_max_fraction)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _spans(self, size, max_width, num_masks, axis_len):
        # size: float (batch, 1) extent to place masks in; max_width: float (batch, 1) widest mask.
        batch = ops.shape(size)[0]
        positions = ops.cast(ops.arange(axis_len), "float32")[None, :]
        keep = ops.ones((batch, axis_len), dtype="bool")
        for _ in range(num_masks):
            width = ops.floor(keras.random.uniform((batch, 1), seed=self.seed_generator) * (max_width + 1))
            start = ops.floor(keras.random.uniform((batch, 1), seed=self.seed_generator) *
                              ops.maximum(size - width + 1, 1.0))
            keep = keep & ~((positions >= start) & (positions < start + width))
        return keep

    def call(self, inputs, training=None):
        x, lengths = inputs
        if not training:
            return x
        batch, num_frames, num_bins = ops.shape(x)[0], ops.shape(x)[1], x.shape[-1]
        lengths_f = ops.cast(ops.reshape(lengths, (-1, 1)), "float32")
        freq_keep = self._spans(ops.full((batch, 1), float(num_bins)), ops.full((batch, 1),
                                float(self.freq_mask_bins)), self.num_freq_masks, num_bins)
        time_width = ops.minimum(float(self.time_mask_frames), ops.floor(self.time_mask_max_fraction * lengths_f))
        time_keep = self._spans(lengths_f, time_width, self.num_time_masks, num_frames)
        keep = ops.cast(time_keep[:, :, None] & freq_keep[:, None, :], x.dtype)
        return x * keep

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "num_freq_masks": self.num_freq_masks,
                "freq_mask_bins": self.freq_mask_bins, "num_time_masks": self.num_time_masks,
                "time_mask_frames": self.time_mask_frames,
                "time_mask_max_fraction": self.time_mask_max_fraction, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FrameStack(keras.layers.Layer):
    """Stack ``factor`` consecutive frames into one: ``(batch, frames, f) -> (batch, ceil(frames/factor), factor*f)``.

    The sequence is right-padded with zeros to a multiple of ``factor`` first, so frame ``i`` of the output
    always holds input frames ``factor*i ... factor*i + factor - 1`` whatever the batch's padded length.
    """

    def __init__(self, factor: int, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, inputs):
        num_frames = ops.shape(inputs)[1]
        pad = (-num_frames) % self.factor
        x = ops.pad(inputs, [[0, 0], [0, pad], [0, 0]])
        return ops.reshape(x, (ops.shape(x)[0], -1, self.factor * inputs.shape[-1]))

    def compute_output_shape(self, input_shape):
        frames = None if input_shape[1] is None else -(-input_shape[1] // self.factor)
        return (input_shape[0], frames, self.factor * input_shape[2])

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FrameSplit(keras.layers.Layer):
    """Split each frame into ``factor`` frames: ``(batch, frames, factor*f) -> (batch, factor*frames, f)``.

    The inverse of ``FrameStack``: units ``[k*f, (k+1)*f)`` of frame ``i`` become frame ``factor*i + k``.
    The incoming mask (one entry per input frame) does not fit the output and is dropped; ``BlankPadding``
    marks the padded output frames instead.
    """

    def __init__(self, factor: int, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, inputs):
        return ops.reshape(inputs, (ops.shape(inputs)[0], -1, inputs.shape[-1] // self.factor))

    def compute_mask(self, inputs, previous_mask=None):
        return None

    def compute_output_shape(self, input_shape):
        frames = None if input_shape[1] is None else input_shape[1] * self.factor
        return (input_shape[0], frames, input_shape[2] // self.factor)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package=PACKAGE)
class BlankPadding(keras.layers.Layer):
    """Make every frame past a row's length a certain CTC blank (index 0); valid frames pass unchanged.

    Call on ``[logits, lengths]`` (``lengths`` in input frames, before the ``subsample``-fold front end).
    A padded frame then contributes log 1 = 0 to every CTC path that emits blank there and removes every
    other path, so CTC over the full padded length equals CTC over each row's own length, and greedy
    decoding of padded frames yields nothing. The output carries no mask, so Keras losses see the plain
    per-row CTC values.
    """

    def __init__(self, subsample: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.subsample = int(subsample)

    def call(self, inputs):
        logits, lengths = inputs
        valid = _sequence_mask(lengths, logits, self.subsample)[:, :, None]
        num_classes = logits.shape[-1]
        blank_row = ops.cast(ops.concatenate([ops.zeros((1,)), ops.full((num_classes - 1,), -_BLANK_MARGIN)]),
                             logits.dtype)
        return ops.where(valid, logits, blank_row[None, None, :])

    def compute_mask(self, inputs, previous_mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "subsample": self.subsample}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Log1p(keras.layers.Layer):
    """``log(1 + x)``: compresses STFT magnitudes before normalisation (shape unchanged)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        return ops.log1p(inputs)
