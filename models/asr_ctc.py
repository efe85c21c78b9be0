"""Models: character CTC speech recognition, stacked bidirectional LSTMs over log-mel frames.

In: ``features`` float32 ``(batch, frames, n_mels)`` zero-padded past each row's length, and ``lengths``
int32 ``(batch,)`` in frames. Out: ``logits`` float32 ``(batch, ceil(frames / subsample), len(vocab) + 1)``
(with ``upsample`` > 1, up to ``upsample - 1`` more frames, all blank), unnormalised, index 0 the CTC blank
(``mask_index=0`` in ``keras.ops.ctc_loss``), index ``i`` the character ``vocab[i - 1]``. Frames past a
row's length are forced to blank (``layers.BlankPadding``), so the loss and the decoders may use the padded
length or the row's own length and get the same answer.

Pipeline: normalisation (training statistics stored in the model) -> SpecAugment (training only) ->
front end that divides time by ``subsample * upsample`` (2-D conv blocks, or frame stacking) ->
``lstm_layers`` x BiLSTM -> dense logits, ``upsample`` output frames per step. Decoding lives in
``models.ctc_decode`` (numpy only) and is re-exported here: ``greedy_decode``, ``beam_search_decode`` and
``BeamDecoder`` (CTC prefix beam search with an optional character n-gram LM, ``CharNgramLM``, and an
optional ``Lexicon``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import keras
import numpy as np
from keras import ops

from audiopipe.infra.errors import ConfigError
from audiopipe.models.layers import (PACKAGE, BlankPadding, FeatureNormalization, FrameSplit, FrameStack,
                                     LengthMask, SequenceMask, SpecAugment, lstm)

from audiopipe.models.ctc_decode import (_BOS, _EOS, BLANK, DEFAULT_VOCAB, PRUNE_LOGP, BeamDecoder,  # noqa: F401
                                         CharNgramLM, Lexicon, beam_search_decode, decode_ids, greedy_decode)

FRONTENDS = ("conv2d", "stack")


@dataclass(frozen=True)
class SpecAugmentConfig:
    """SpecAugment masks applied in training only (see ``layers.SpecAugment``)."""

    num_freq_masks: int = 2
    freq_mask_bins: int = 15
    num_time_masks: int = 2
    time_mask_frames: int = 25
    time_mask_max_fraction: float = 0.2

    def __post_init__(self):
        if min(self.num_freq_masks, self.freq_mask_bins, self.num_time_masks, self.time_mask_frames) < 0:
            raise ConfigError(f"SpecAugment counts and widths must be >= 0, got {self}")
        if not 0.0 <= self.time_mask_max_fraction <= 1.0:
            raise ConfigError(f"time_mask_max_fraction must be in [0, 1], got {self.time_mask_max_fraction}")


@dataclass(frozen=True)
class CtcAsrConfig:
    """Architecture of the CTC recogniser.

    Attributes:
        n_mels: Log-mel bins per input frame.
        vocab: Output characters; id ``i + 1`` is ``vocab[i]``, id 0 the blank.
        frontend: ``conv2d`` (``log2(reduction)`` blocks of 3x3 stride-2 conv + ReLU over time x mel) or
            ``stack`` (``reduction`` frames concatenated), ``reduction = subsample * upsample``.
        subsample: Time reduction of the output, 1, 2 or 4 (2 = 20 ms per output frame at a 10 ms hop).
        upsample: Output frames per recurrent step. The front end reduces time by ``subsample * upsample``
            (1, 2 or 4) and the classifier emits ``upsample`` frames from each BiLSTM step, so the LSTMs run
            at the cheaper rate while CTC keeps room for fast speech: at 40 ms per output, character CTC
            needs 0.6-1.0 of the frames for espeak-ng and flite speech, and some utterances cannot be
            aligned at all. Measured in a 30-minute CPU budget, 2 was worse than 1 (docs/benchmarks.md).
        conv_channels: Channels of each conv block (``conv2d`` only).
        lstm_units: Units per direction of each BiLSTM.
        lstm_layers: Number of stacked BiLSTMs.
        dropout: Dropout rate between recurrent layers.
        spec_augment: SpecAugment masks in training, or None for none.
    """

    n_mels: int = 80
    vocab: str = DEFAULT_VOCAB
    frontend: str = "conv2d"
    subsample: int = 4
    upsample: int = 1
    conv_channels: int = 32
    lstm_units: int = 192
    lstm_layers: int = 3
    dropout: float = 0.2
    spec_augment: SpecAugmentConfig | None = field(default_factory=SpecAugmentConfig)

    def __post_init__(self):
        if not self.vocab or len(set(self.vocab)) != len(self.vocab) or {_BOS, _EOS} & set(self.vocab):
            raise ConfigError(f"vocab must be non-empty with distinct characters, got {self.vocab!r}")
        if self.frontend not in FRONTENDS:
            raise ConfigError(f"frontend must be one of {FRONTENDS}, got {self.frontend!r}")
        if self.subsample not in (1, 2, 4):
            raise ConfigError(f"subsample must be 1, 2 or 4, got {self.subsample}")
        if self.upsample < 1 or self.reduction not in (1, 2, 4):
            raise ConfigError(f"subsample x upsample must be 1, 2 or 4, got {self.subsample} x {self.upsample}")
        if min(self.n_mels, self.conv_channels, self.lstm_units, self.lstm_layers) < 1:
            raise ConfigError(f"n_mels, conv_channels, lstm_units and lstm_layers must be >= 1: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.spec_augment is not None and self.spec_augment.freq_mask_bins >= self.n_mels:
            raise ConfigError(f"freq_mask_bins ({self.spec_augment.freq_mask_bins}) must be < n_mels")

    @property
    def reduction(self) -> int:
        """Time reduction of the front end: input frames per BiLSTM step."""
        return self.subsample * self.upsample

    @property
    def num_classes(self) -> int:
        """Output units: the characters plus the blank."""
        return len(self.vocab) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CtcAsrConfig:
        """From ``to_dict`` output or a partial dict of overrides: a missing key keeps its default,
        ``spec_augment`` may be a dict of ``SpecAugmentConfig`` fields or None (no SpecAugment).

        Raises:
            ConfigError: unknown keys, here or in ``spec_augment``.
        """
        data = dict(data)
        unknown = set(data) - {f.name for f in fields(cls)}
        spec = data.get("spec_augment")
        if isinstance(spec, dict):
            unknown |= {f"spec_augment.{k}" for k in set(spec) - {f.name for f in fields(SpecAugmentConfig)}}
        if unknown:
            raise ConfigError(f"unknown CtcAsrConfig keys {sorted(unknown)}")
        if isinstance(spec, dict):
            data["spec_augment"] = SpecAugmentConfig(**spec)
        return cls(**data)


def encode_text(text: str, *, vocab: str = DEFAULT_VOCAB) -> np.ndarray:
    """Text -> int32 ids ``1..len(vocab)`` (no blank). Raises ConfigError naming characters not in vocab."""
    index = {ch: i + 1 for i, ch in enumerate(vocab)}
    unknown = sorted(set(text) - index.keys())
    if unknown:
        raise ConfigError(f"text {text[:60]!r} has characters {unknown} outside the model vocabulary {vocab!r}")
    return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))


def encode_batch(texts: Sequence[str], *, vocab: str = DEFAULT_VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (int32 ``(batch, max_len)`` labels zero-padded, int32 ``(batch,)`` label lengths)."""
    encoded = [encode_text(t, vocab=vocab) for t in texts]
    lengths = np.array([len(e) for e in encoded], dtype=np.int32)
    labels = np.zeros((len(encoded), max(1, int(lengths.max(initial=0)))), dtype=np.int32)
    for row, ids in enumerate(encoded):
        labels[row, :len(ids)] = ids
    return labels, lengths


def required_frames(ids: np.ndarray) -> int:
    """Fewest output frames CTC needs for ``ids``: one per label plus a blank between repeated labels."""
    ids = np.asarray(ids)
    return int(len(ids) + np.count_nonzero(ids[1:] == ids[:-1]))


def _conv2d_frontend(x, lengths, cfg: CtcAsrConfig):
    x = keras.layers.Reshape((-1, cfg.n_mels, 1), name="frontend_expand")(x)
    for block in range(int(math.log2(cfg.reduction))):
        # Fixed one-frame padding on both sides, then a 'valid' stride-2 conv: 'same' padding would put the
        # odd frame on the left or right depending on the batch's padded length.
        x = keras.layers.ZeroPadding2D(((1, 1), (1, 1)), name=f"frontend_pad{block}")(x)
        x = keras.layers.Conv2D(cfg.conv_channels, 3, strides=2, activation="relu", name=f"frontend_conv{block}")(x)
        x = LengthMask(2 ** (block + 1), name=f"frontend_zero{block}")([x, lengths])
    bins = cfg.n_mels
    for _ in range(int(math.log2(cfg.reduction))):
        bins = -(-bins // 2)
    return keras.layers.Reshape((-1, bins * (cfg.conv_channels if cfg.reduction > 1 else 1)),
                                name="frontend_flatten")(x)


def build_ctc_asr(cfg: CtcAsrConfig) -> keras.Model:
    """Build the (uncompiled) recogniser: ``{"features", "lengths"} -> logits``; see the module docstring."""
    features = keras.Input((None, cfg.n_mels), name="features")
    lengths = keras.Input((), dtype="int32", name="lengths")
    x = FeatureNormalization(cfg.n_mels, name="feature_norm")(features)
    if cfg.spec_augment is not None:
        x = SpecAugment(**asdict(cfg.spec_augment), name="spec_augment")([x, lengths])
    x = LengthMask(1, name="input_zero")([x, lengths])
    if cfg.frontend == "conv2d":
        x = _conv2d_frontend(x, lengths, cfg)
    elif cfg.reduction > 1:
        x = FrameStack(cfg.reduction, name="frame_stack")(x)
    mask = SequenceMask(cfg.reduction, name="sequence_mask")([x, lengths])
    for i in range(cfg.lstm_layers):
        x = keras.layers.Dropout(cfg.dropout, name=f"dropout{i}")(x)
        x = keras.layers.Bidirectional(lstm(cfg.lstm_units, name=f"lstm{i}"), name=f"bilstm{i}")(x, mask=mask)
    x = keras.layers.Dropout(cfg.dropout, name="dropout_out")(x)
    logits = keras.layers.Dense(cfg.num_classes * cfg.upsample, dtype="float32", name="classifier")(x)
    if cfg.upsample > 1:
        logits = FrameSplit(cfg.upsample, dtype="float32", name="upsample")(logits)
    logits = BlankPadding(cfg.subsample, dtype="float32", name="logits")([logits, lengths])
    return keras.Model({"features": features, "lengths": lengths}, logits, name="ctc_asr")


def ctc_loss(labels, logits, label_lengths, logit_lengths):
    """Per-row CTC negative log-likelihood, nats.

    Args:
        labels: int ``(batch, max_label_len)``, ids ``1..N``, zero-padded.
        logits: float ``(batch, frames, N + 1)`` unnormalised, blank at 0.
        label_lengths: int ``(batch,)``.
        logit_lengths: int ``(batch,)`` in *output* frames: ``layers.output_lengths(lengths, subsample)``.

    Returns:
        float32 ``(batch,)``.
    """
    return ops.ctc_loss(ops.cast(labels, "int32"), logits, ops.cast(label_lengths, "int32"),
                        ops.cast(logit_lengths, "int32"), mask_index=BLANK)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CtcLoss(keras.losses.Loss):
    """Keras loss: ``y_true`` zero-padded labels ``(batch, L)``, ``y_pred`` the model's logits.

    Label lengths are the nonzero counts (0 is the blank, never a label). The logit length is the padded
    length: exact, because the model makes every padded frame a certain blank (``layers.BlankPadding``).
    """

    def __init__(self, name: str = "ctc_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        labels = ops.cast(y_true, "int32")
        label_lengths = ops.sum(ops.cast(labels != BLANK, "int32"), axis=-1)
        logit_lengths = ops.full((ops.shape(y_pred)[0],), ops.shape(y_pred)[1], dtype="int32")
        return ctc_loss(labels, y_pred, label_lengths, logit_lengths)
