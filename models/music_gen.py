"""Models: symbolic music generation, two stacked LSTMs predicting the next note from the previous ones.

A note is a pair of tokens, ``(pitch, duration)``; a piece is an int array ``(num_notes, 2)``. Token 0 of
both vocabularies is reserved for the sequence start (BOS); tokenizers map real pitches and durations to
``1..n - 1``. Design: **two softmax heads** over one shared history, not a joint vocabulary. The model reads
the previous note (both tokens embedded and concatenated) and outputs ``P(pitch_t | notes < t)`` and
``P(duration_t | notes < t)``; the note's probability is their product. Two small softmaxes need far less
data than one over every (pitch, duration) pair, and sampling stays simple.

In: ``{"pitch": int32 (batch, steps), "duration": int32 (batch, steps)}`` = ``[BOS] + notes[:-1]``.
Out: ``{"pitch": float32 logits (batch, steps, n_pitches), "duration": (batch, steps, n_durations)}``.
The model is causal, so right-padding a batch changes nothing before the padding; padded steps are left
out of the loss with per-step sample weights (``next_note_arrays`` returns them).

Baseline: ``BigramModel`` over joint note ids ``pitch * n_durations + duration`` (add-k smoothed), so
``nll_per_note`` and ``BigramModel.nll_per_token`` score the same events: nats per note.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import keras
import numpy as np

from audiopipe.infra.errors import ConfigError
from audiopipe.models.layers import lstm

BOS = 0


@dataclass(frozen=True)
class MusicGenConfig:
    """Architecture of the note model.

    Attributes:
        n_pitches: Pitch vocabulary, BOS included (e.g. 128 MIDI pitches + rest + BOS = 130).
        n_durations: Duration vocabulary, BOS included.
        embed_dim: Embedding size of each token.
        lstm_units: Units of each of the two stacked LSTMs.
        dropout: Dropout rate between and after the LSTMs.
    """

    n_pitches: int = 130
    n_durations: int = 24
    embed_dim: int = 32
    lstm_units: int = 256
    dropout: float = 0.2

    def __post_init__(self):
        if self.n_pitches < 2 or self.n_durations < 2:
            raise ConfigError(f"n_pitches and n_durations must be >= 2 (BOS + one token): {self}")
        if self.embed_dim < 1 or self.lstm_units < 1:
            raise ConfigError(f"embed_dim and lstm_units must be >= 1: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MusicGenConfig:
        return cls(**data)


def build_music_gen(cfg: MusicGenConfig) -> keras.Model:
    """Build the (uncompiled) note model; see the module docstring for inputs and outputs."""
    pitch = keras.Input((None,), dtype="int32", name="pitch")
    duration = keras.Input((None,), dtype="int32", name="duration")
    x = keras.layers.Concatenate(name="note_embedding")([
        keras.layers.Embedding(cfg.n_pitches, cfg.embed_dim, name="pitch_embedding")(pitch),
        keras.layers.Embedding(cfg.n_durations, cfg.embed_dim, name="duration_embedding")(duration)])
    # return_state=True lets `sample` reuse these very layers one step at a time with carried state.
    x, _, _ = lstm(cfg.lstm_units, return_state=True, name="lstm1")(x)
    x = keras.layers.Dropout(cfg.dropout, name="dropout1")(x)
    x, _, _ = lstm(cfg.lstm_units, return_state=True, name="lstm2")(x)
    x = keras.layers.Dropout(cfg.dropout, name="dropout2")(x)
    outputs = {"pitch": keras.layers.Dense(cfg.n_pitches, dtype="float32", name="pitch_logits")(x),
               "duration": keras.layers.Dense(cfg.n_durations, dtype="float32", name="duration_logits")(x)}
    return keras.Model({"pitch": pitch, "duration": duration}, outputs, name="music_gen")


def music_losses() -> dict[str, keras.losses.Loss]:
    """One cross-entropy (from logits) per head; their sum is the note's negative log-likelihood."""
    return {head: keras.losses.SparseCategoricalCrossentropy(from_logits=True, name=f"{head}_xent")
            for head in ("pitch", "duration")}


def next_note_arrays(pieces: Sequence[np.ndarray], *, window: int | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Teacher-forcing arrays: inputs ``[BOS] + notes[:-1]``, targets ``notes``, right-padded.

    Args:
        pieces: int ``(num_notes, 2)`` arrays of (pitch, duration) tokens, none of them BOS.
        window: Cut each piece into windows of this many notes (the last one shorter); None = whole pieces.

    Returns:
        ``(inputs, targets, weights)``: dicts keyed ``pitch``/``duration`` of int32 ``(rows, steps)``
        tokens and float32 ``(rows, steps)`` sample weights (1 on real notes, 0 on padding; one entry per
        head because Keras wants per-output weights for per-step weighting).
    """
    rows = []
    for piece in pieces:
        piece = np.asarray(piece, dtype=np.int32).reshape(-1, 2)
        previous = np.concatenate([[[BOS, BOS]], piece[:-1]])
        step = window or max(len(piece), 1)
        rows += [(previous[i:i + step], piece[i:i + step]) for i in range(0, len(piece), step)]
    if not rows:
        raise ConfigError("no notes to make training rows from")
    steps = max(len(target) for _, target in rows)
    inputs, targets = np.zeros((2, len(rows), steps, 2), dtype=np.int32)
    weights = np.zeros((len(rows), steps), dtype=np.float32)
    for r, (previous, target) in enumerate(rows):
        inputs[r, :len(target)], targets[r, :len(target)], weights[r, :len(target)] = previous, target, 1.0
    split = lambda a: {"pitch": a[..., 0], "duration": a[..., 1]}  # noqa: E731
    return split(inputs), split(targets), {"pitch": weights, "duration": weights}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def nll_per_note(model: keras.Model, pieces: Sequence[np.ndarray], *, batch_size: int = 32) -> float:
    """Mean negative log-likelihood of every note of ``pieces`` (first note from BOS), nats per note."""
    inputs, targets, weights = next_note_arrays(pieces)
    logits = model.predict(inputs, batch_size=batch_size, verbose=0)
    mask = weights["pitch"]
    total = np.zeros(mask.shape)
    for head in ("pitch", "duration"):
        log_probs = _log_softmax(logits[head])
        total -= np.take_along_axis(log_probs, targets[head][..., None], axis=-1)[..., 0]
    return float((total * mask).sum() / mask.sum())


def _step_model(model: keras.Model) -> keras.Model:
    """The trained layers rewired for one step with explicit LSTM state (shares the weights)."""
    units = model.get_layer("lstm1").units
    pitch = keras.Input((1,), dtype="int32", name="pitch")
    duration = keras.Input((1,), dtype="int32", name="duration")
    states = [keras.Input((units,), name=f"state{i}") for i in range(4)]
    x = model.get_layer("note_embedding")([model.get_layer("pitch_embedding")(pitch),
                                           model.get_layer("duration_embedding")(duration)])
    x, h1, c1 = model.get_layer("lstm1")(x, initial_state=states[:2])
    x, h2, c2 = model.get_layer("lstm2")(x, initial_state=states[2:])
    outputs = [model.get_layer("pitch_logits")(x), model.get_layer("duration_logits")(x), h1, c1, h2, c2]
    return keras.Model([pitch, duration, *states], outputs, name="music_gen_step")


def _draw(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    log_probs = _log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    log_probs[BOS] = -np.inf  # BOS only ever starts a sequence
    probs = np.exp(log_probs - log_probs.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def sample(model: keras.Model, seed_tokens: np.ndarray, length: int, *, temperature: float = 1.0,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Continue ``seed_tokens`` by ``length`` notes drawn from the model.

    Args:
        model: A model from ``build_music_gen`` (trained or loaded).
        seed_tokens: int ``(num_seed, 2)`` (pitch, duration) notes; may be empty (start from BOS).
        length: Notes to generate.
        temperature: Softmax temperature (> 0); below 1 sharpens, above 1 flattens.
        rng: Random generator; pass a seeded one for repeatable output.

    Returns:
        int32 ``(length, 2)``: the generated notes only (not the seed).
    """
    if temperature <= 0 or length < 0:
        raise ConfigError(f"temperature must be > 0 and length >= 0, got {temperature}, {length}")
    rng = rng if rng is not None else np.random.default_rng()
    step = _step_model(model)
    units = model.get_layer("lstm1").units
    states = [np.zeros((1, units), dtype=np.float32) for _ in range(4)]
    history = [(BOS, BOS)] + [tuple(int(t) for t in note) for note in np.asarray(seed_tokens).reshape(-1, 2)]
    generated = []
    for i in range(len(history) - 1 + length):
        note = history[i] if i < len(history) else generated[-1]
        out = step.predict_on_batch([np.array([[note[0]]]), np.array([[note[1]]]), *states])
        states = [np.asarray(s) for s in out[2:]]
        if i >= len(history) - 1:
            generated.append((_draw(out[0][0, -1], temperature, rng), _draw(out[1][0, -1], temperature, rng)))
    return np.array(generated, dtype=np.int32).reshape(-1, 2)


class BigramModel:
    """Add-k smoothed bigram over integer tokens, with BOS (token 0) as the start context.

    ``P(b | a) = (count(a, b) + k) / (count(a) + k * vocab_size)``.
    """

    def __init__(self, counts: np.ndarray, k: float):
        if k <= 0:
            raise ConfigError(f"k must be > 0, got {k}")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.k = float(k)
        vocab = self.counts.shape[0]
        self.log_probs = np.log(self.counts + self.k) - np.log(self.counts.sum(axis=1, keepdims=True)
                                                               + self.k * vocab)

    @classmethod
    def fit(cls, sequences: Sequence[np.ndarray], *, vocab_size: int, k: float = 1.0) -> BigramModel:
        """Count transitions ``BOS -> x_1 -> x_2 ...`` over int token ``sequences``."""
        counts = np.zeros((vocab_size, vocab_size), dtype=np.int64)
        for seq in sequences:
            seq = _check_tokens(seq, vocab_size)
            path = np.concatenate([[BOS], seq])
            np.add.at(counts, (path[:-1], path[1:]), 1)
        return cls(counts, k)

    def nll_per_token(self, sequences: Sequence[np.ndarray]) -> float:
        """Mean negative log-likelihood per token (first token from BOS), nats."""
        total, count = 0.0, 0
        for seq in sequences:
            path = np.concatenate([[BOS], _check_tokens(seq, self.counts.shape[0])])
            total -= self.log_probs[path[:-1], path[1:]].sum()
            count += len(path) - 1
        if count == 0:
            raise ConfigError("no tokens to score")
        return float(total / count)


def _check_tokens(seq: np.ndarray, vocab_size: int) -> np.ndarray:
    seq = np.asarray(seq, dtype=np.int64).ravel()
    if seq.size and (seq.min() < 0 or seq.max() >= vocab_size):
        raise ConfigError(f"tokens outside [0, {vocab_size}): min {seq.min()}, max {seq.max()}")
    return seq


def joint_note_ids(piece: np.ndarray, cfg: MusicGenConfig) -> np.ndarray:
    """(pitch, duration) notes ``(num_notes, 2)`` -> joint ids ``pitch * n_durations + duration`` for the bigram."""
    piece = np.asarray(piece, dtype=np.int64).reshape(-1, 2)
    return piece[:, 0] * cfg.n_durations + piece[:, 1]
