"""Training stage (music): the scores' melody tokens in a LABELS_V1 table -> a registered next-note model;
and the inverse, generated notes -> MIDI + WAV files in the store.

In: a ``TrainSpec`` with ``family="music"`` whose ``labels_url`` is a LABELS_V1 table (or the corpus folder
that holds ``labels/labels.parquet``). Only ``kind="music"``, ``media="midi"`` rows are used: their
``note_pitches`` (MIDI numbers) and ``note_durations_ql`` (quarter notes). ``spec.features_url`` and
``spec.config_hash`` are not used: this model reads symbolic notes, not audio features.
Out: a ``TrainResult``; the model is registered with its note vocabulary (``MusicVocab.to_strings``), the
held-out NLL per note next to an add-k bigram's (k tuned on the val split) and a report with a piano roll.
``evaluate_music`` recomputes those metrics for a registered model on any labels table's split.

Tokens: a ``MusicVocab`` built from the train split. Pitch token ``i + 1`` is ``pitches_midi[i]`` (every
MIDI number from the lowest to the highest training pitch), duration token ``i + 1`` is
``durations_ql[i]`` (the distinct training durations); token 0 is BOS in both. A val/test note outside the
vocabulary is mapped to the nearest token (pitch clamped, duration nearest in log2) and counted, so every
test note is scored, by the LSTM and the bigram alike. No Prefect or Dask here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from audiopipe.infra.errors import ConfigError, SchemaError
from audiopipe.infra.storage import StorageSpec, describe_storage_error, join, open_fs, to_url, write_bytes_atomic
from audiopipe.tasks.checkpoints import STATE_FILE, load_checkpoint
from audiopipe.tasks.training import TrainResult, TrainSpec, fit_with_checkpoints, write_training_report

log = logging.getLogger(__name__)

LABELS_FILE = "labels/labels.parquet"
DEFAULT_WINDOW = 64  # notes per training row; a chorale melody is 30-80 notes, so most are one row
TRAIN_OPTIONS = ("window",)  # model_overrides keys that are training options, not MusicGenConfig fields
BIGRAM_KS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)  # add-k grid; the best on val is the baseline
REPORT_SAMPLE_NOTES = 64
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MusicVocab:
    """Note values behind the tokens: pitch token ``i + 1`` = ``pitches_midi[i]``, duration token ``i + 1`` =
    ``durations_ql[i]``; 0 is BOS for both."""

    pitches_midi: tuple[int, ...]
    durations_ql: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.pitches_midi or not self.durations_ql:
            raise ConfigError("a music vocabulary needs at least one pitch and one duration")
        if any(d <= 0 for d in self.durations_ql) or list(self.durations_ql) != sorted(set(self.durations_ql)):
            raise ConfigError(f"durations must be positive, sorted and distinct: {self.durations_ql}")

    @property
    def n_pitches(self) -> int:
        return len(self.pitches_midi) + 1

    @property
    def n_durations(self) -> int:
        return len(self.durations_ql) + 1

    @classmethod
    def of(cls, pitches: Sequence[int], durations_ql: Sequence[float]) -> MusicVocab:
        """Every MIDI number from min to max of ``pitches`` (a contiguous range) and the distinct durations."""
        if len(pitches) == 0:
            raise ConfigError("no training notes to build a music vocabulary from")
        lo, hi = int(min(pitches)), int(max(pitches))
        return cls(tuple(range(lo, hi + 1)), tuple(sorted({round(float(d), 4) for d in durations_ql})))

    def encode(self, pitches: Sequence[int], durations_ql: Sequence[float]) -> tuple[np.ndarray, int]:
        """Notes -> int32 tokens ``(num_notes, 2)`` and how many notes had to be mapped to the nearest token."""
        p = np.asarray(pitches, dtype=np.int64)
        d = np.asarray(durations_ql, dtype=np.float64)
        lo = self.pitches_midi[0]
        p_tok = np.clip(p - lo, 0, len(self.pitches_midi) - 1) + 1
        grid = np.log2(np.asarray(self.durations_ql))
        d_idx = np.abs(np.log2(np.maximum(d, 1e-6))[:, None] - grid[None, :]).argmin(axis=1)
        mapped = (self.decode_pitches(p_tok) != p) | ~np.isclose(np.asarray(self.durations_ql)[d_idx], d, atol=1e-3)
        return np.stack([p_tok, d_idx + 1], axis=1).astype(np.int32), int(mapped.sum())

    def decode_pitches(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self.pitches_midi)[np.asarray(tokens) - 1]

    def decode(self, tokens: np.ndarray) -> tuple[list[int], list[float]]:
        """int tokens ``(num_notes, 2)`` (no BOS) -> MIDI pitches and durations in quarter notes."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 2)
        if tokens.size and (tokens.min() < 1 or tokens[:, 0].max() >= self.n_pitches
                            or tokens[:, 1].max() >= self.n_durations):
            raise ConfigError(f"note tokens outside this vocabulary ({self.n_pitches}, {self.n_durations})")
        return (self.decode_pitches(tokens[:, 0]).tolist(),
                np.asarray(self.durations_ql)[tokens[:, 1] - 1].tolist())

    def to_strings(self) -> tuple[str, ...]:
        """The card's ``vocabulary``: ``pitch:<midi>`` entries in token order, then ``duration:<ql>`` entries."""
        return tuple(f"pitch:{p}" for p in self.pitches_midi) + tuple(f"duration:{d:g}" for d in self.durations_ql)

    @classmethod
    def from_strings(cls, entries: Sequence[str]) -> MusicVocab:
        """Inverse of ``to_strings``. Raises ConfigError for entries that are not ``pitch:``/``duration:``."""
        pitches, durations = [], []
        for entry in entries:
            kind, _, value = entry.partition(":")
            if kind == "pitch":
                pitches.append(int(value))
            elif kind == "duration":
                durations.append(float(value))
            else:
                raise ConfigError(f"not a music vocabulary entry: {entry!r} (want pitch:N or duration:QL)")
        return cls(tuple(pitches), tuple(durations))


@dataclass(frozen=True)
class ScoreNotes:
    """One score's melody from the labels: MIDI pitches and durations in quarter notes, same length."""

    source: str
    split: str
    pitches: tuple[int, ...]
    durations_ql: tuple[float, ...]


def load_music_scores(labels_url: str, storage: StorageSpec) -> tuple[list[ScoreNotes], str, str]:
    """Read the scores (``kind=music``, ``media=midi`` rows) of a LABELS_V1 table.

    Args:
        labels_url: The table, or a corpus folder holding ``labels/labels.parquet``.

    Returns:
        ``(scores, labels_file_url, sha256 of the labels file bytes)``.

    Raises:
        ConfigError: no such file, or no music scores in it. SchemaError: pitches and durations of unequal length.
    """
    import pyarrow.parquet as pq

    fs, path = open_fs(labels_url, storage)
    try:
        if fs.isdir(path):
            path = join(path, LABELS_FILE)
        blob = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"no labels table at {labels_url}: run `audiopipe synth music OUT` and pass "
                          "OUT/labels/labels.parquet") from exc
    except OSError as exc:
        raise describe_storage_error(labels_url, exc) from exc
    rows = pq.read_table(io.BytesIO(blob), columns=["source", "kind", "media", "split", "note_pitches",
                                                    "note_durations_ql"]).to_pylist()
    scores = []
    for row in rows:
        if row["kind"] != "music" or row["media"] != "midi" or not row["note_pitches"]:
            continue
        if len(row["note_pitches"]) != len(row["note_durations_ql"] or ()):
            raise SchemaError(f"labels row {row['source']}: note_pitches and note_durations_ql differ in length")
        scores.append(ScoreNotes(row["source"], row["split"], tuple(row["note_pitches"]),
                                 tuple(row["note_durations_ql"])))
    if not scores:
        raise ConfigError(f"{labels_url} has no music scores (rows with kind=music, media=midi and notes)")
    return scores, to_url(fs, path), hashlib.sha256(blob).hexdigest()


def tokens_by_split(scores: Sequence[ScoreNotes], vocab: MusicVocab) -> tuple[dict[str, list[np.ndarray]], dict]:
    """Encode every score; returns ``{split: [tokens (num_notes, 2)]}`` and ``{split: notes mapped}``.

    Raises:
        ConfigError: a split without scores (say how many of each there are).
    """
    pieces: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    mapped = dict.fromkeys(SPLITS, 0)
    for score in scores:
        tokens, num_mapped = vocab.encode(score.pitches, score.durations_ql)
        pieces[score.split].append(tokens)
        mapped[score.split] += num_mapped
    if not all(pieces.values()):
        counts = {s: len(p) for s, p in pieces.items()}
        raise ConfigError(f"music training needs scores in every split, the labels have {counts}; "
                          "synthesize more scores (`audiopipe synth music --n`, 40 or more)")
    return pieces, mapped


def note_datasets(pieces: dict[str, list[np.ndarray]], *, batch_size: int, window: int, seed: int) -> dict:
    """``tf.data`` of ``(inputs, targets, sample_weights)`` (``next_note_arrays``) for train (shuffled) and val."""
    import tensorflow as tf

    from audiopipe.models.music_gen import next_note_arrays

    def make(split: str, shuffle: bool):
        x, y, w = next_note_arrays(pieces[split], window=window)
        ds = tf.data.Dataset.from_tensor_slices((x, y, w))
        if shuffle:
            ds = ds.shuffle(len(w["pitch"]), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return {"train": make("train", True), "val": make("val", False)}


def tuned_bigram(pieces: dict[str, list[np.ndarray]], *, cfg):
    """The add-k bigram over joint note ids fitted on train, k chosen from ``BIGRAM_KS`` by val NLL."""
    from audiopipe.models.music_gen import BigramModel, joint_note_ids

    joint = {s: [joint_note_ids(p, cfg) for p in pieces[s]] for s in ("train", "val")}
    counts = BigramModel.fit(joint["train"], vocab_size=cfg.n_pitches * cfg.n_durations).counts
    candidates = [BigramModel(counts, k) for k in BIGRAM_KS]
    return min(candidates, key=lambda m: m.nll_per_token(joint["val"]))


def music_metrics(model, bigram, test: list[np.ndarray], *, cfg) -> dict[str, float]:
    """Held-out NLL per note (nats) of the LSTM and the bigram on ``test``, and their ratio."""
    from audiopipe.models.music_gen import joint_note_ids, nll_per_note

    nll = nll_per_note(model, test)
    bigram_nll = bigram.nll_per_token([joint_note_ids(p, cfg) for p in test])
    return {"nll_per_note": nll, "bigram_nll_per_note": bigram_nll, "nll_vs_bigram": nll / bigram_nll,
            "num_test_notes": float(sum(len(p) for p in test))}


def evaluate_music(model, card, labels_url: str, storage: StorageSpec, split: str = "test") -> dict[str, float]:
    """``music_metrics`` of a registered music model on ``split`` of any labels table's scores.

    The notes are encoded with the model's own vocabulary (``card.vocabulary``; notes outside it go to the
    nearest token, as in training). The bigram baseline is refitted on the train split of the model's
    training labels (``card.extra["labels_url"]``) with the card's ``bigram_k``, not re-tuned: it is the
    baseline the card's metrics were measured against, so the model's own test split reproduces them.

    Args:
        model: The loaded next-note model. card: Its ``ModelCard`` (family ``music``).
        labels_url: A LABELS_V1 table, or a corpus folder holding ``labels/labels.parquet``.
        split: Which split of ``labels_url`` to score.

    Returns:
        ``nll_per_note``, ``bigram_nll_per_note``, ``nll_vs_bigram`` (nats per note, ratio), ``num_test_notes``.

    Raises:
        ConfigError: no scores in ``split`` (naming the count per split), or training labels that are gone
            or changed since the model was registered (the baseline could not be rebuilt).
    """
    from audiopipe.models.music_gen import BigramModel, MusicGenConfig, joint_note_ids

    cfg = MusicGenConfig.from_dict(dict(card.params["model_config"]))
    vocab = MusicVocab.from_strings(card.vocabulary)
    scores, _, _ = load_music_scores(labels_url, storage)
    test = [vocab.encode(s.pitches, s.durations_ql)[0] for s in scores if s.split == split]
    if not test:
        counts = {s: sum(x.split == s for x in scores) for s in sorted({x.split for x in scores})}
        raise ConfigError(f"{labels_url} has no music scores in split {split!r} (scores per split: {counts}); "
                          "pass --split with one of those.")
    train_url = card.extra["labels_url"]
    try:
        train_scores, _, sha256 = load_music_scores(train_url, storage)
    except ConfigError as exc:
        raise ConfigError(f"the bigram baseline is fitted on the model's training labels, which cannot be read: "
                          f"{exc}") from exc
    if sha256 != card.extra["labels_sha256"]:
        raise ConfigError(f"the training labels {train_url} changed since {card.name}@{card.version} was "
                          "trained (sha256 differs), so its bigram baseline cannot be rebuilt; restore them.")
    train = [joint_note_ids(vocab.encode(s.pitches, s.durations_ql)[0], cfg) for s in train_scores
             if s.split == "train"]
    bigram = BigramModel.fit(train, vocab_size=cfg.n_pitches * cfg.n_durations, k=float(card.extra["bigram_k"]))
    return music_metrics(model, bigram, test, cfg=cfg)


def generate_notes(model, vocab: MusicVocab, *, length: int, temperature: float, seed: int,
                   primer: Sequence[tuple[int, float]] = ()) -> tuple[list[int], list[float]]:
    """Sample ``length`` notes after ``primer`` (``(midi, ql)`` pairs, mapped to the nearest tokens; empty =
    start from BOS). Returns MIDI pitches and quarter-note durations of the primer plus the new notes."""
    from audiopipe.models.music_gen import sample

    seed_tokens = np.zeros((0, 2), dtype=np.int32)
    if len(primer):
        seed_tokens, _ = vocab.encode([p for p, _ in primer], [d for _, d in primer])
    new = sample(model, seed_tokens, length, temperature=temperature, rng=np.random.default_rng(seed))
    return vocab.decode(np.concatenate([seed_tokens, new]))


def save_midi_and_wav(pitches: Sequence[int], durations_ql: Sequence[float], out_url: str, name: str,
                      storage: StorageSpec) -> dict[str, str | None]:
    """Write the melody as ``out_url/<name>.mid`` and, when fluidsynth and FluidR3_GM are installed, a
    16 kHz rendering ``out_url/<name>.wav``; returns ``{"midi_url", "wav_url"}`` (``wav_url`` None when skipped)."""
    from music21 import note, stream

    from audiopipe.tasks.corpora_music import render_midi, save_midi

    part = stream.Part()
    for p, d in zip(pitches, durations_ql, strict=True):
        part.append(note.Note(int(p), quarterLength=float(d)))
    fs, root = open_fs(out_url, storage)
    urls: dict[str, str | None] = {"midi_url": None, "wav_url": None}
    with tempfile.TemporaryDirectory(prefix="audiopipe-generate-") as tmp:
        midi, wav = Path(tmp) / f"{name}.mid", Path(tmp) / f"{name}.wav"
        save_midi(stream.Score([part]), midi)
        rendered = render_midi(midi, wav)
        for key, local in (("midi_url", midi), ("wav_url", wav if rendered else None)):
            if local is None:
                continue
            target = join(root, local.name)
            try:
                write_bytes_atomic(fs, target, local.read_bytes())
            except OSError as exc:
                raise describe_storage_error(out_url, exc) from exc
            urls[key] = to_url(fs, target)
    return urls


def piano_roll_png(path: Path, melodies: dict[str, tuple[Sequence[int], Sequence[float]]]) -> Path:
    """One piano-roll panel per ``title -> (pitches, durations_ql)``, time in quarter notes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(melodies), 1, figsize=(9, 2.2 * len(melodies)), squeeze=False)
    for ax, (title, (pitches, durations)) in zip(axes[:, 0], melodies.items()):
        onsets = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
        for t, d, p in zip(onsets, durations, pitches):
            ax.broken_barh([(t, d * 0.95)], (p - 0.4, 0.8), color="tab:blue")
        ax.set(title=title, xlabel="quarter notes", ylabel="MIDI pitch", xlim=(0, max(float(sum(durations)), 1.0)))
        if len(pitches):
            ax.set_ylim(min(pitches) - 2, max(pitches) + 2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def train_music(spec: TrainSpec, storage: StorageSpec) -> TrainResult:
    """Train the next-note model on the labels' scores, score it against the bigram, register it.

    Checkpoints after every epoch under ``work_dir/checkpoints/<run key>``; the same spec resumes there.
    ``spec.model_overrides`` takes ``MusicGenConfig`` fields (not the vocabulary sizes) and ``window``.

    Raises:
        ConfigError: bad overrides, a split without scores, or labels changed under a checkpoint.
    """
    import keras

    from audiopipe.models.device import select_device

    device = select_device(spec.require_gpu)
    keras.utils.set_random_seed(spec.seed)
    scores, labels_url, labels_sha256 = load_music_scores(spec.labels_url, storage)
    train_notes = [s for s in scores if s.split == "train"]
    vocab = MusicVocab.of([p for s in train_notes for p in s.pitches],
                          [d for s in train_notes for d in s.durations_ql])
    pieces, mapped = tokens_by_split(scores, vocab)
    window = int(spec.model_overrides.get("window", DEFAULT_WINDOW))
    if window < 2:
        raise ConfigError(f"window must be >= 2 notes, got {window}")
    ckpt_dir = Path(spec.work_dir) / "checkpoints" / spec.run_key
    model, cfg, start_epoch = _model_or_checkpoint(spec, ckpt_dir, vocab, labels_sha256)
    datasets = note_datasets(pieces, batch_size=spec.batch_size, window=window, seed=spec.seed)
    history = fit_with_checkpoints(spec, model, datasets, ckpt_dir, start_epoch)
    bigram = tuned_bigram(pieces, cfg=cfg)
    metrics = music_metrics(model, bigram, pieces["test"], cfg=cfg)
    log.info("music: NLL/note %.3f vs bigram (k=%g) %.3f on %d test notes", metrics["nll_per_note"], bigram.k,
             metrics["bigram_nll_per_note"], metrics["num_test_notes"])
    report = _report(spec, model, vocab, pieces["test"][0], history, metrics)
    extra = {"labels_url": labels_url, "labels_sha256": labels_sha256, "bigram_k": bigram.k,
             "notes_mapped_to_nearest_token": mapped, "window": window}
    ref = _register(spec, storage, model, cfg, vocab, metrics, history, extra,
                    {s: len(p) for s, p in pieces.items()})
    return TrainResult(str(ref), metrics, len(history.get("loss", [])), start_epoch, device.kind, str(report))


def _model_or_checkpoint(spec: TrainSpec, ckpt_dir: Path, vocab: MusicVocab, labels_sha256: str):
    """A fresh compiled model, or the checkpoint of this run key (its labels must not have changed)."""
    import keras

    from audiopipe.models.music_gen import MusicGenConfig, build_music_gen, music_losses

    overrides = {k: v for k, v in spec.model_overrides.items() if k not in TRAIN_OPTIONS}
    if {"n_pitches", "n_durations"} & set(overrides):
        raise ConfigError("n_pitches and n_durations come from the training notes; do not override them")
    try:
        cfg = MusicGenConfig(n_pitches=vocab.n_pitches, n_durations=vocab.n_durations, **overrides)
    except TypeError as exc:
        raise ConfigError(f"unknown music model override in {sorted(overrides)}: {exc}; use "
                          f"embed_dim, lstm_units, dropout or {', '.join(TRAIN_OPTIONS)}") from exc
    data_file, state = ckpt_dir / "music_data.json", ckpt_dir / STATE_FILE
    data = {"labels_sha256": labels_sha256, "vocabulary": list(vocab.to_strings())}
    if state.exists():
        if not data_file.exists() or json.loads(data_file.read_text()) != data:
            raise ConfigError(f"the labels changed since checkpoint {ckpt_dir} was written; delete that folder "
                              "to start over, or train on the labels it was made from")
        resumed = load_checkpoint(ckpt_dir)  # verified against state.json; a bad one is set aside: start over
        if resumed is not None:
            model, saved = resumed
            log.info("resuming %s from its checkpoint after epoch %d (%s, sha256 %s verified)", spec.run_key,
                     saved.epoch, saved.model_file, saved.model_sha256[:12])
            return model, cfg, saved.epoch
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    data_file.write_text(json.dumps(data))
    model = build_music_gen(cfg)
    model.compile(keras.optimizers.Adam(spec.learning_rate, clipnorm=5.0), loss=music_losses())
    return model, cfg, 0


def _report(spec: TrainSpec, model, vocab: MusicVocab, test_piece: np.ndarray, history: dict,
            metrics: dict) -> Path:
    """Curves and metrics (``write_training_report``) plus a piano roll: a sample vs a held-out melody."""
    out = Path(spec.work_dir) / "reports" / spec.run_key
    index = write_training_report(out, spec, history, metrics, {}, vocab.to_strings())
    generated = generate_notes(model, vocab, length=REPORT_SAMPLE_NOTES, temperature=1.0, seed=spec.seed)
    piano_roll_png(out / "piano_roll.png", {f"generated ({REPORT_SAMPLE_NOTES} notes, T=1, seed {spec.seed})":
                                            generated, "a held-out (test) melody": vocab.decode(test_piece)})
    with index.open("a", encoding="utf-8") as fh:
        fh.write("<h2>piano roll</h2><img src='piano_roll.png'>")
    return out


def _register(spec: TrainSpec, storage: StorageSpec, model, cfg, vocab: MusicVocab, metrics: dict,
              history: dict, extra: dict, num_scores: dict):
    from audiopipe.models.registry import Registry, TrainingData

    params = {"spec": asdict(spec), "model_config": cfg.to_dict(), "splits": num_scores,
              "vocab": {"pitches_midi": list(vocab.pitches_midi), "durations_ql": list(vocab.durations_ql)}}
    return Registry(spec.registry_url, storage).register(
        spec.model_name or spec.family, model, family="music", metrics=metrics, feature_config={},
        training_data=TrainingData.of([extra["labels_url"]], extra["labels_sha256"]),
        vocabulary=vocab.to_strings(), params=params, history=history, extra=extra)

