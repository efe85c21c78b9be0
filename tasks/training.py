"""Training stage: feature shards + labels -> a trained Keras model registered with its card.

In: a ``TrainSpec`` (family, where the features and labels are, the registry, epochs...). Out: a small
``TrainResult`` (model ref, test metrics). ``train_model`` runs on one Dask worker (the GPU one when asked);
it checkpoints every epoch under ``work_dir/checkpoints/<run key>`` (``tasks/checkpoints.py``: checksum-verified
before a resume) so the same command resumes a killed run.
No Prefect or Dask imports here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.storage import StorageSpec

log = logging.getLogger(__name__)
FAMILIES = ("classify", "asr", "music", "separate")
LR_SCHEDULES = ("plateau", "cosine")
# Batches are grouped by length at these frame counts: 20% apart from 1 s to ~27 s, so a batch pads its rows
# by at most ~20%. On the speech corpus (median 2.7 s) the earlier (200, 400, 800, 1600) edges padded to 77%
# useful frames and trained at 76x real time; these pad to 92% and train at 94x (same model, batch 16).
BUCKET_EDGES = tuple(int(round(100 * 1.2**i)) for i in range(19))


@dataclass(frozen=True)
class TrainSpec:
    """One training job. ``model_name`` defaults to the family."""

    family: str
    features_url: str
    labels_url: str
    registry_url: str
    config_hash: str
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    patience: int = 4
    seed: int = 0
    require_gpu: bool = False
    model_name: str | None = None
    work_dir: str = ".audiopipe"
    model_overrides: dict = field(default_factory=dict)
    cache_examples: bool = True  # keep decoded train/val examples in RAM after epoch 1 (off for huge sets)
    # "plateau": halve the rate when validation loss stalls. "cosine": decay from learning_rate to 2% of it
    # over `epochs` (one warm-up epoch at a third of it), for a fixed budget of epochs.
    lr_schedule: str = "plateau"
    # Warm start (classify, asr): a registered model, REGISTRY:NAME@VERSION, whose weights and normalisation
    # the model starts from. Its family, feature partition, classes or vocabulary and architecture must match.
    init_from: str | None = None
    # asr: a text file (a sentence per line) to fit the character LM shipped with the model on, instead of
    # the training transcripts (tasks/train_lm.py)
    lm_text_url: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; trainable here: {', '.join(FAMILIES)}.")
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.learning_rate < 1:
            raise ConfigError("epochs and batch_size must be >= 1 and learning_rate in (0, 1).")
        if self.init_from is not None:
            from audiopipe.models.cards import parse_model_ref

            if self.family not in ("classify", "asr"):
                raise ConfigError(f"init_from (warm start) is supported for classify and asr, not {self.family!r}.")
            if not parse_model_ref(self.init_from).registry_url:
                raise ConfigError(f"init_from {self.init_from!r} must name its registry: REGISTRY_URL:NAME@VERSION.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")

    @property
    def run_key(self) -> str:
        """Same command -> same key -> same checkpoint folder (resume)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class TrainResult:
    model_ref: str
    metrics: dict
    epochs_run: int
    resumed_from_epoch: int
    device: str
    report_dir: str


def targets_for(spec: TrainSpec, labels: dict[str, dict]):
    """(target function, tf spec, classes or vocab) for the family."""
    import tensorflow as tf

    if spec.family == "classify":
        classes = sorted({row["label"] for row in labels.values() if row.get("label")})
        index = {c: i for i, c in enumerate(classes)}
        return (lambda row: np.int32(index[row["label"]])), tf.TensorSpec((), tf.int32), classes
    from audiopipe.models.asr_ctc import DEFAULT_VOCAB, encode_text

    return (lambda row: encode_text(row["text"]).astype(np.int32)), tf.TensorSpec((None,), tf.int32), DEFAULT_VOCAB


def _build(spec: TrainSpec, num_bins: int, vocab_or_classes):
    import keras

    if spec.family == "classify":
        from audiopipe.models.classifier import ClassifierConfig, build_classifier, classifier_loss

        fixed = sorted({"n_mels", "n_classes"} & set(spec.model_overrides))
        if fixed:
            raise ConfigError(f"classify model overrides {fixed} cannot be set: they come from the features "
                              "and the labels.")
        cfg = ClassifierConfig.from_dict({"n_mels": num_bins, "n_classes": len(vocab_or_classes),
                                          **spec.model_overrides})
        model = build_classifier(cfg)
        model.compile(keras.optimizers.Adam(spec.learning_rate), loss=classifier_loss(), metrics=["accuracy"])
        return model, cfg
    from audiopipe.models.asr_ctc import CtcAsrConfig, CtcLoss, build_ctc_asr

    cfg = CtcAsrConfig.from_dict({"n_mels": num_bins, **spec.model_overrides})
    model = build_ctc_asr(cfg)
    model.compile(keras.optimizers.Adam(spec.learning_rate, clipnorm=5.0), loss=CtcLoss())
    return model, cfg


def score_split(spec: TrainSpec, model, datasets, vocab_or_classes, decoder=None) -> tuple[dict, dict]:
    """Test-split metrics, plus arrays for the report (confusion matrix or transcripts).

    ``decoder`` (asr): ``(logits, lengths) -> texts``, e.g. a ``BeamDecoder``; greedy when None.
    """
    if spec.family == "classify":
        from audiopipe.models.classifier import accuracy, confusion_matrix, precision_recall

        y_true, y_pred = [], []
        for x, y in datasets["test"]:
            y_true.append(y.numpy())
            y_pred.append(np.argmax(model.predict(x, verbose=0), axis=-1))
        y_true, y_pred = np.concatenate(y_true), np.concatenate(y_pred)
        cm = confusion_matrix(y_true, y_pred, len(vocab_or_classes))
        precision, recall = (np.nan_to_num(a, nan=0.0) for a in precision_recall(cm))  # 0 when undefined
        metrics = {"accuracy": accuracy(y_true, y_pred), "num_test": int(len(y_true)),
                   **{f"precision_{c}": float(p) for c, p in zip(vocab_or_classes, precision)},
                   **{f"recall_{c}": float(r) for c, r in zip(vocab_or_classes, recall)}}
        return metrics, {"confusion": cm}
    from audiopipe.models.asr_ctc import decode_ids, greedy_decode
    from audiopipe.models.metrics import cer, wer

    decode = decoder or greedy_decode
    refs, hyps = [], []
    for x, y in datasets["test"]:
        logits = model.predict(x, verbose=0)
        hyps += decode(logits, x["lengths"].numpy())
        refs += [decode_ids(row[row > 0]) for row in y.numpy()]
    return {"cer": float(cer(refs, hyps)), "wer": float(wer(refs, hyps)), "num_test": len(refs)}, \
        {"transcripts": list(zip(refs, hyps))[:20]}


def train_model(spec: TrainSpec, storage: StorageSpec) -> TrainResult:
    """Train, evaluate on the test split, register; resumes from this run's last checkpoint if present."""
    if spec.family == "music":  # trains on note tokens from the labels, not on audio features
        from audiopipe.tasks.train_music import train_music

        return train_music(spec, storage)
    if spec.family == "separate":  # trains on STFT magnitudes of the mixtures and their stems
        from audiopipe.tasks.train_separation import train_separation

        return train_separation(spec, storage)
    import keras

    from audiopipe.models.data import norm_stats, open_shard_set
    from audiopipe.models.device import select_device
    from audiopipe.models.layers import set_feature_stats

    device = select_device(spec.require_gpu)
    keras.utils.set_random_seed(spec.seed)
    shards = open_shard_set(spec.features_url, spec.config_hash, spec.labels_url, storage)
    target, target_spec, vocab_or_classes = targets_for(spec, shards.labels)
    stats = norm_stats(shards, "train")
    datasets = _datasets(spec, shards, target, target_spec)
    ckpt_dir = Path(spec.work_dir) / "checkpoints" / spec.run_key
    model, cfg, start_epoch = model_or_checkpoint(spec, ckpt_dir, shards.num_bins, vocab_or_classes)
    if start_epoch == 0 and spec.init_from:
        stats = warm_start(model, cfg, spec, storage, vocab_or_classes)
    if start_epoch == 0:
        set_feature_stats(model, np.asarray(stats.mean), np.asarray(stats.std))
    history = fit_with_checkpoints(spec, model, datasets, ckpt_dir, start_epoch)
    metrics, extras = score_split(spec, model, datasets, vocab_or_classes)
    report = Path(spec.work_dir) / "reports" / spec.run_key
    write_training_report(report, spec, history, metrics, extras, vocab_or_classes)
    ref = register_model(spec, storage, model, cfg, shards, stats, vocab_or_classes, metrics, history, datasets)
    return TrainResult(str(ref), metrics, len(history.get("loss", [])), start_epoch, device.kind, str(report))


def _datasets(spec: TrainSpec, shards, target, target_spec) -> dict:
    from audiopipe.models.data import iter_examples, to_dataset

    def make(split: str, shuffle: int):
        return to_dataset(lambda: iter_examples(shards, split, target), shards.num_bins, batch_size=spec.batch_size,
                          target_spec=target_spec, shuffle=shuffle, seed=spec.seed,
                          bucket_edges=BUCKET_EDGES, cache=spec.cache_examples and split != "test")

    return {"train": make("train", 512), "val": make("val", 0), "test": make("test", 0)}


def model_or_checkpoint(spec: TrainSpec, ckpt_dir: Path, num_bins: int, vocab_or_classes):
    """(model, config, epochs done): this run's verified checkpoint, else a fresh model at epoch 0.

    A checkpoint that fails its checksum is set aside with a warning and the run starts over
    (``tasks/checkpoints.py`` says why).
    """
    from audiopipe.tasks.checkpoints import load_checkpoint

    model, cfg = _build(spec, num_bins, vocab_or_classes)
    resumed = load_checkpoint(ckpt_dir)
    if resumed is None:
        return model, cfg, 0
    model, state = resumed
    log.info("resuming %s from its checkpoint after epoch %d (%s, sha256 %s verified)", spec.run_key,
             state.epoch, state.model_file, state.model_sha256[:12])
    return model, cfg, state.epoch


def warm_start(model, cfg, spec: TrainSpec, storage: StorageSpec, vocab_or_classes):
    """Copy the weights of the registered model ``spec.init_from`` into ``model``; return its normalisation.

    The copied weights were learned on inputs normalised with that model's statistics, so those are kept
    (and registered with the new model) rather than recomputed on the new training split.

    Raises:
        ConfigError: the model is of another family, feature partition, class list / vocabulary or
            architecture (its card's ``model_config``), so its weights cannot be reused.
    """
    from audiopipe.models.data import NormStats
    from audiopipe.models.registry import Registry, parse_model_ref

    ref = parse_model_ref(spec.init_from)
    init, card = Registry(ref.registry_url, storage).load(ref, Path(spec.work_dir) / "model-cache")
    theirs = card.classes if spec.family == "classify" else card.vocabulary
    problems = [what for what, same in (
        (f"family {card.model_family!r} vs {spec.family!r}", card.model_family == spec.family),
        (f"feature partition {card.feature_config_hash!r} vs {spec.config_hash!r}",
         card.feature_config_hash == spec.config_hash),
        (f"classes/vocabulary {list(theirs)} vs {list(vocab_or_classes)}", tuple(theirs) == tuple(vocab_or_classes)),
        ("architecture (model_config)", card.params.get("model_config") == cfg.to_dict()),
    ) if not same]
    if card.normalization is None:
        problems.append("normalisation (it has no statistics)")
    if problems:
        raise ConfigError(f"cannot warm start from {spec.init_from}: it differs in {'; '.join(problems)}. "
                          "Train from scratch (no init_from / warm_start=false) to change these.")
    model.set_weights(init.get_weights())
    log.info("warm start: weights and normalisation of %s", spec.init_from)
    return NormStats(card.normalization.mean, card.normalization.std)


def fit_with_checkpoints(spec: TrainSpec, model, datasets, ckpt_dir: Path, start_epoch: int) -> dict:
    """``model.fit`` from ``start_epoch`` with early stopping, the spec's learning-rate schedule and a
    checkpoint (model + history, committed by ``state.json`` with the model's sha256) after every epoch;
    returns the whole history, earlier runs included. ``tasks/checkpoints.py`` has the folder's layout."""
    import keras

    from audiopipe.tasks.checkpoints import HISTORY_FILE, STATE_FILE, save_checkpoint

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history_file, state_file = ckpt_dir / HISTORY_FILE, ckpt_dir / STATE_FILE
    past = json.loads(history_file.read_text()) if history_file.exists() else {}
    # A kill after history.json but before state.json leaves one epoch too many here: the state decides.
    past = {k: list(v)[:start_epoch] for k, v in past.items()}

    class SaveState(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            for k, v in (logs or {}).items():
                past.setdefault(k, []).append(float(v))
            save_checkpoint(self.model, ckpt_dir, epoch=epoch + 1, history=past)
            publish_epoch(spec, epoch + 1, logs or {})

    finished = state_file.exists() and json.loads(state_file.read_text()).get("done", False)
    if start_epoch < spec.epochs and not finished:  # a run that stopped early is done, not resumable
        callbacks = [keras.callbacks.EarlyStopping(patience=spec.patience, restore_best_weights=True),
                     lr_callback(spec), SaveState()]
        with warnings.catch_warnings():
            # Bucketed tf.data batches have no length until an epoch has run, so Keras warns "Your input ran
            # out of data" once per fit although every epoch sees all batches; the datasets shuffle
            # themselves (to_dataset), so shuffle=False says what happens instead of Keras' ignored default.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(datasets["train"], validation_data=datasets["val"], epochs=spec.epochs,
                      initial_epoch=start_epoch, callbacks=callbacks, verbose=2, shuffle=False)
        # the restored best weights, not the last epoch's
        save_checkpoint(model, ckpt_dir, epoch=len(past.get("loss", [])), history=past, done=True)
    return past


def cosine_lr(spec: TrainSpec, epoch: int) -> float:
    """Learning rate of 0-based ``epoch`` under the cosine schedule: a third of the rate for the first
    epoch (Adam's early steps on a fresh LSTM are the unstable ones), then a cosine from the full rate down
    to 2% of it at the last epoch. A function of the epoch alone, so a resumed run continues the curve."""
    import math

    if epoch == 0 and spec.epochs > 2:
        return spec.learning_rate / 3
    span = max(1, spec.epochs - 2)
    progress = min(1.0, max(0, epoch - 1) / span) if spec.epochs > 2 else epoch / max(1, spec.epochs - 1)
    floor = 0.02 * spec.learning_rate
    return floor + (spec.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_callback(spec: TrainSpec):
    """The Keras callback that applies ``spec.lr_schedule``."""
    import keras

    if spec.lr_schedule == "cosine":
        return keras.callbacks.LearningRateScheduler(lambda epoch, lr: cosine_lr(spec, epoch))
    return keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=max(1, spec.patience // 2))


EPOCH_TOPIC = "audiopipe-train-epoch"


def publish_epoch(spec: TrainSpec, epoch: int, logs: dict) -> None:
    """Send one epoch's metrics to the Dask scheduler's event log, where the flow relays them to Prefect.

    A no-op outside a Dask worker (a direct call of ``train_model``).
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(EPOCH_TOPIC, {"run": spec.run_key, "epoch": epoch, "epochs": spec.epochs,
                                   "metrics": {k: float(v) for k, v in logs.items()}})


def register_model(spec, storage, model, cfg, shards, stats, vocab_or_classes, metrics, history, datasets=None):
    """Save ``model`` and register it with its card (metrics, data snapshot, normalisation, params); an asr
    model also gets its character LM file and decoder setting (``tasks.train_lm``, tuned on ``datasets["val"]``)."""
    from audiopipe.models.registry import Normalization, Registry, TrainingData

    files, extra = {}, {}
    if spec.family == "asr" and datasets is not None:
        from audiopipe.tasks.train_lm import fit_decoder

        files, extra = fit_decoder(model, shards, datasets["val"], "".join(vocab_or_classes), subsample=cfg.subsample,
                                   lm_text_url=spec.lm_text_url, storage=storage)
    registry = Registry(spec.registry_url, storage)
    snapshot = shards.snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        return registry.register(
            spec.model_name or spec.family, str(path), family=spec.family, metrics=metrics,
            feature_config=_feature_config(spec, storage).to_dict(), config_hash=spec.config_hash,
            training_data=TrainingData.of(snapshot["parts"], snapshot["parts_sha256"]),
            normalization=Normalization.of(np.asarray(stats.mean), np.asarray(stats.std)),
            vocabulary=tuple(vocab_or_classes) if spec.family == "asr" else (),
            classes=tuple(vocab_or_classes) if spec.family == "classify" else (),
            params={"spec": asdict(spec), "model_config": cfg.to_dict()}, history=history, files=files, extra=extra)


def _feature_config(spec: TrainSpec, storage: StorageSpec):
    """The full feature config of the training partition: inference featurizes new audio with it."""
    from audiopipe.infra.storage import open_fs
    from audiopipe.tasks.shards import OutputLayout, read_config

    fs, root = open_fs(spec.features_url, storage)
    return read_config(fs, OutputLayout(root, spec.config_hash))


def write_training_report(out: Path, spec: TrainSpec, history: dict, metrics: dict, extras: dict,
                          vocab_or_classes) -> Path:
    """Training curves (PNG), plus a confusion matrix (classify) or example transcripts (asr), in index.html."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "val_loss"):
        if history.get(key):
            ax.plot(range(1, len(history[key]) + 1), history[key], label=key)
    ax.set(xlabel="epoch", ylabel="loss", title=f"{spec.family} training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
    body = "<img src='curves.png'>"
    if "confusion" in extras:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(extras["confusion"], cmap="Blues")
        ax.set(xticks=range(len(vocab_or_classes)), yticks=range(len(vocab_or_classes)),
               xticklabels=vocab_or_classes, yticklabels=vocab_or_classes, xlabel="predicted", ylabel="true")
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
        for (i, j), v in np.ndenumerate(extras["confusion"]):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "confusion.png", dpi=90)
        plt.close(fig)
        body += "<img src='confusion.png'>"
    if extras.get("transcripts"):
        body += f"<h2>Test transcripts</h2>{TRANSCRIPT_LEGEND}"
        body += "".join(transcript_html(ref, hyp) for ref, hyp in extras["transcripts"])
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in metrics.items())
    (out / "index.html").write_text(f"<!doctype html><meta charset='utf-8'>{TRANSCRIPT_CSS}<h1>{spec.family}</h1>"
                                    f"<table>{rows}</table>{body}", encoding="utf-8")
    return out / "index.html"


TRANSCRIPT_CSS = ("<style>.tx{font-family:monospace;white-space:pre-wrap;margin:.6em 0}"
                  ".sub{background:#fdd;color:#a00}.del{background:#eee;color:#888;text-decoration:line-through}"
                  ".ins{background:#ffe3b3;color:#940}</style>")
TRANSCRIPT_LEGEND = ("<p>Errors against the reference: <span class='sub'>substituted</span>, "
                     "<span class='del'>deleted</span> (missing from the output), <span class='ins'>inserted</span>.</p>")


def transcript_html(reference: str, hypothesis: str) -> str:
    """One reference/hypothesis pair as HTML, each character error marked (jiwer's character alignment)."""
    import html

    from audiopipe.models.metrics import cer, char_alignment

    css = {"substitute": "sub", "delete": "del", "insert": "ins"}

    def span(kind: str, text: str) -> str:
        text = html.escape(text)
        return f"<span class='{css[kind]}'>{text}</span>" if kind in css else text

    if not reference:  # jiwer aligns nothing against an empty reference
        return f"<p class='tx'>ref: \nhyp: {span('insert', hypothesis)}   (empty reference)</p>"
    ref = hyp = ""
    for chunk in char_alignment(reference, hypothesis):
        ref += span(chunk.kind, chunk.reference) if chunk.kind != "insert" else ""
        hyp += span(chunk.kind, chunk.reference if chunk.kind == "delete" else chunk.hypothesis)
    return f"<p class='tx'>ref: {ref}\nhyp: {hyp}   (CER {cer([reference], [hypothesis]):.0%})</p>"
