"""Training stage (separation): LABELS_V1 ``mixtures`` rows -> a registered BiLSTM mask estimator.

In: a ``TrainSpec`` with ``family="separate"`` whose ``labels_url`` names a LABELS_V1 table with
``kind="mixtures"`` rows (``source`` = the mixture's URL, ``stems`` = JSON ``{"speech": URL, "background":
URL}``, ``split``), and the audio those URLs name. Out: a ``TrainResult``; the model is registered with its
test metrics (SI-SDR improvement of the estimate and of the oracle ideal ratio mask) and a report (training
curves, estimated vs ideal mask over the mixture's spectrogram) is written under
``work_dir/reports/<run key>``.

Separation does **not** train on the log-mel shards that ``featurize`` writes: the mask multiplies the
mixture's linear-frequency STFT, and the inverse STFT needs exactly those bins (a mel mask cannot be inverted
without an approximate pseudo-inverse, and the ideal ratio mask it is compared with is defined on the STFT).
So ``tasks/separation_data.py`` reads the mixture and its clean speech stem from the store, resamples
them to ``cfg.sampling_rate`` and computes magnitudes with ``models.separation.stft_mag_phase``, the same
function inference uses; ``spec.features_url`` and ``spec.config_hash`` are not used. This module trains,
evaluates, reports and registers. No Prefect or Dask imports here.

``spec.model_overrides`` takes ``SeparationConfig`` fields and the training options in ``TRAIN_OPTIONS``:
``crop_frames`` (random windows of that many STFT frames per training example; 0 = whole clips),
``remix_fraction`` (share of training examples remixed from a random speech/background stem pair) and
``cache_examples`` (keep the decoded training audio in memory after the first epoch).

``evaluate_separated`` recomputes the test metrics of a registered model on any mixtures table's split.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.storage import StorageSpec
from audiopipe.models.separation import SeparationConfig
from audiopipe.tasks.separation_data import (SPLITS, AudioLoader, MixtureItem, audio_loader, load_mixture_items,
                                             load_triplet, log_magnitude_stats, missing_files, separation_dataset)
from audiopipe.tasks.checkpoints import load_checkpoint
from audiopipe.tasks.training import TrainResult, TrainSpec, fit_with_checkpoints, write_training_report

log = logging.getLogger(__name__)

FAMILY = "separate"
# 256 frames = 2.05 s at hop 128 / 16 kHz: long enough for syllable context, short enough that a batch of
# crops costs the same whatever the clip lengths (as Open-Unmix's fixed-duration training chunks).
# remix_fraction: share of training examples remixed from random stem pairs (``training_pair``).
TRAIN_OPTIONS = {"crop_frames": 256, "remix_fraction": 0.8, "cache_examples": False}
# Open-Unmix trains with Adam; clipping the gradient norm guards the BiLSTMs against the odd exploding batch.
CLIPNORM = 5.0


def split_overrides(overrides: dict) -> tuple[SeparationConfig, dict]:
    """``spec.model_overrides`` -> (the ``SeparationConfig``, the training options merged over ``TRAIN_OPTIONS``).

    Raises:
        ConfigError: an unknown key, a negative ``crop_frames`` or a ``remix_fraction`` outside [0, 1].
    """
    cfg_keys = {f.name for f in fields(SeparationConfig)}
    unknown = set(overrides) - cfg_keys - set(TRAIN_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown separation overrides {sorted(unknown)}; use SeparationConfig fields "
                          f"{sorted(cfg_keys)} or training options {sorted(TRAIN_OPTIONS)}.")
    options = {**TRAIN_OPTIONS, **{k: v for k, v in overrides.items() if k in TRAIN_OPTIONS}}
    if int(options["crop_frames"]) < 0 or not 0.0 <= float(options["remix_fraction"]) <= 1.0:
        raise ConfigError(f"need crop_frames >= 0 (0: whole clips) and remix_fraction in [0, 1]: {options}")
    return SeparationConfig(**{k: v for k, v in overrides.items() if k in cfg_keys}), options


def evaluate_separation(model, items: list[MixtureItem], load: AudioLoader, *, cfg: SeparationConfig
                        ) -> tuple[dict, dict]:
    """SI-SDR improvements (dB) of the model's estimate and of the oracle IRM over the mixture, per test item.

    Returns:
        ``metrics`` (``si_sdri_db`` and ``oracle_irm_si_sdri_db`` means, ``fraction_of_oracle`` when the
        oracle improves at all, the means of the mixture's and estimate's SI-SDR, ``num_test``), and for the
        report the first item's mixture magnitude, ideal and estimated masks (``(frames, bins)``).
    """
    from audiopipe.models.separation import (apply_mask_istft, irm, separate, si_sdr, si_sdr_improvement,
                                             stft_mag_phase)

    model_i, oracle_i, mix_sdr, est_sdr, example = [], [], [], [], {}
    for item in items:
        mixture, speech, background = load_triplet(item, load)
        estimate = separate(model, mixture, cfg=cfg)
        ideal = irm(speech, background, cfg=cfg)
        model_i.append(si_sdr_improvement(speech, estimate, mixture))
        oracle_i.append(si_sdr_improvement(speech, apply_mask_istft(mixture, ideal, cfg=cfg), mixture))
        mix_sdr.append(si_sdr(speech, mixture))
        est_sdr.append(si_sdr(speech, estimate))
        if not example:
            magnitude = stft_mag_phase(mixture, cfg=cfg)[0]
            out = model.predict({"magnitude": magnitude[None], "lengths": np.array([len(magnitude)], np.int32)},
                                verbose=0)
            example = {"source": item.source, "snr_db": item.snr_db, "magnitude": magnitude, "ideal": ideal,
                       "estimated": np.asarray(out["mask"][0], np.float32)}
    metrics = {"si_sdri_db": float(np.mean(model_i)), "oracle_irm_si_sdri_db": float(np.mean(oracle_i)),
               "mixture_si_sdr_db": float(np.mean(mix_sdr)), "estimate_si_sdr_db": float(np.mean(est_sdr)),
               "num_test": len(items)}
    if metrics["oracle_irm_si_sdri_db"] > 0:  # a ratio to a non-improving oracle means nothing
        metrics["fraction_of_oracle"] = metrics["si_sdri_db"] / metrics["oracle_irm_si_sdri_db"]
    return metrics, example


def evaluate_separated(model, card, labels_url: str, storage: StorageSpec, split: str = "test") -> dict:
    """``evaluate_separation`` metrics of a registered separation model on ``split`` of any mixtures table.

    The STFT and model settings come from ``card.params["model_config"]``; the model carries its own
    normalisation. On the model's own labels and test split this reproduces the card's metrics.

    Returns:
        ``si_sdri_db``, ``oracle_irm_si_sdri_db``, ``fraction_of_oracle`` (when the oracle improves),
        ``mixture_si_sdr_db``, ``estimate_si_sdr_db`` (dB) and ``num_test`` (mixtures scored).

    Raises:
        ConfigError: no mixtures in ``split`` (naming the count per split), rows without their stems, or
            mixtures/stems missing from the store. BadAudioError: an unusable file (naming its URL).
    """
    items, _ = load_mixture_items(labels_url, storage)
    chosen = [i for i in items if i.split == split]
    if not chosen:
        counts = {s: sum(i.split == s for i in items) for s in SPLITS}
        raise ConfigError(f"{labels_url} has no mixtures in split {split!r} (mixtures per split: {counts}); "
                          "pass --split with one of those.")
    _require_audio(chosen, labels_url, storage)
    cfg = SeparationConfig.from_dict(dict(card.params["model_config"]))
    load = audio_loader(storage, sampling_rate=cfg.sampling_rate)
    return evaluate_separation(model, chosen, load, cfg=cfg)[0]


def _require_audio(items: list[MixtureItem], labels_url: str, storage: StorageSpec) -> None:
    """Raise ConfigError, naming one URL, when mixtures or stems of ``items`` are not in the store."""
    missing = missing_files(items, storage)
    if missing:
        raise ConfigError(f"{labels_url} names {len(missing)} audio files that are not in the store, "
                          f"e.g. {missing[0]}; fix the labels' source/stems URLs or upload the audio.")


def save_mask_figure(out: Path, example: dict, *, cfg: SeparationConfig) -> Path:
    """PNG of one test mixture: its spectrogram (dB), the ideal ratio mask, the estimated mask and their
    difference, on shared time (s) and frequency (kHz) axes. Returns the file's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    magnitude, ideal, estimated = example["magnitude"], example["ideal"], example["estimated"]
    extent = (0.0, magnitude.shape[0] * cfg.hop / cfg.sampling_rate, 0.0, cfg.sampling_rate / 2000)
    panels = (("mixture |STFT| (dB)", 20 * np.log10(magnitude + 1e-6), "magma", None),
              ("ideal ratio mask", ideal, "viridis", (0, 1)),
              ("estimated mask", estimated, "viridis", (0, 1)),
              ("estimated - ideal", estimated - ideal, "coolwarm", (-1, 1)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 10), sharex=True)
    for ax, (title, data, cmap, limits) in zip(axes, panels):
        image = ax.imshow(data.T, origin="lower", aspect="auto", extent=extent, cmap=cmap,
                          vmin=limits[0] if limits else None, vmax=limits[1] if limits else None)
        ax.set(title=title, ylabel="kHz")
        fig.colorbar(image, ax=ax)
    axes[-1].set_xlabel("time (s)")
    snr = f", SNR {example['snr_db']:.1f} dB" if example.get("snr_db") is not None else ""
    fig.suptitle(f"{example['source'].rsplit('/', 1)[-1]}{snr}")
    fig.tight_layout()
    path = out / "masks.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def train_separation(spec: TrainSpec, storage: StorageSpec) -> TrainResult:
    """Train the mask estimator on the mixtures in ``spec.labels_url``, evaluate on its test split, register.

    Resumes from this run's last checkpoint (``work_dir/checkpoints/<run key>``) when there is one.

    Raises:
        ConfigError: wrong family, bad overrides, no mixtures, an empty train/val/test split, or labels
            naming mixtures or stems that are not in the store.
        BadAudioError: a mixture or stem that cannot be used (naming its URL).
    """
    import keras

    from audiopipe.models.device import select_device
    from audiopipe.models.layers import set_feature_stats

    if spec.family != FAMILY:
        raise ConfigError(f"train_separation trains family {FAMILY!r}, not {spec.family!r}")
    cfg, options = split_overrides(spec.model_overrides)
    items, labels_sha256 = load_mixture_items(spec.labels_url, storage)
    by_split = {s: [i for i in items if i.split == s] for s in SPLITS}
    empty = [s for s in SPLITS if not by_split[s]]
    if empty:
        raise ConfigError(f"{spec.labels_url} has no mixtures in split(s) {empty}; make more with synth --n.")
    _require_audio(items, spec.labels_url, storage)
    device = select_device(spec.require_gpu)
    keras.utils.set_random_seed(spec.seed)
    load = audio_loader(storage, sampling_rate=cfg.sampling_rate, cache=bool(options["cache_examples"]))
    ckpt_dir = Path(spec.work_dir) / "checkpoints" / spec.run_key
    model, start_epoch = _model_or_checkpoint(spec, ckpt_dir, cfg)
    if start_epoch == 0:
        set_feature_stats(model, *log_magnitude_stats(by_split["train"], load, cfg=cfg))
    datasets = {"train": separation_dataset(
        by_split["train"], load, cfg=cfg, batch_size=spec.batch_size, crop_frames=int(options["crop_frames"]),
        remix_fraction=float(options["remix_fraction"]), shuffle=True, seed=spec.seed + start_epoch),
        "val": separation_dataset(by_split["val"], load, cfg=cfg, batch_size=spec.batch_size)}
    history = fit_with_checkpoints(spec, model, datasets, ckpt_dir, start_epoch)
    test_load = audio_loader(storage, sampling_rate=cfg.sampling_rate)
    metrics, example = evaluate_separation(model, by_split["test"], test_load, cfg=cfg)
    log.info("separation test metrics: %s", {k: round(v, 3) for k, v in metrics.items()})
    report = Path(spec.work_dir) / "reports" / spec.run_key
    write_training_report(report, spec, history, metrics, {}, ())
    index = report / "index.html"  # the shared report knows no masks: link ours below its curves
    index.write_text(index.read_text(encoding="utf-8") + "<h2>Masks, one test mixture</h2><img src="
                     f"'{save_mask_figure(report, example, cfg=cfg).name}'>", encoding="utf-8")
    ref = _register(spec, storage, model, cfg, options, metrics, history, labels_sha256,
                    {s: len(v) for s, v in by_split.items()})
    return TrainResult(str(ref), metrics, len(history.get("loss", [])), start_epoch, device.kind, str(report))


def _model_or_checkpoint(spec: TrainSpec, ckpt_dir: Path, cfg: SeparationConfig):
    """A freshly built and compiled model (epoch 0) or the checkpoint of a killed run and its epoch."""
    import keras

    from audiopipe.models.separation import build_separation, separation_losses

    resumed = load_checkpoint(ckpt_dir)  # verified against state.json; a bad one is set aside: start over
    if resumed is not None:
        model, state = resumed
        log.info("resuming %s from its checkpoint after epoch %d (%s, sha256 %s verified)", spec.run_key,
                 state.epoch, state.model_file, state.model_sha256[:12])
        return model, state.epoch
    model = build_separation(cfg)
    model.compile(keras.optimizers.Adam(spec.learning_rate, clipnorm=CLIPNORM), loss=separation_losses())
    return model, 0


def _register(spec: TrainSpec, storage: StorageSpec, model, cfg: SeparationConfig, options: dict, metrics: dict,
              history: dict, labels_sha256: str, split_counts: dict):
    """Save ``model`` and register it; the training data is the labels table (URL + content hash)."""
    from audiopipe.models.registry import Normalization, Registry, TrainingData

    norm = model.get_layer("feature_norm")
    feature_config = {"kind": "stft", "sampling_rate": cfg.sampling_rate, "n_fft": cfg.n_fft, "hop": cfg.hop,
                      "window": "hann", "center": True, "magnitude": "linear"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        return Registry(spec.registry_url, storage).register(
            spec.model_name or spec.family, str(path), family=FAMILY, metrics=metrics,
            feature_config=feature_config, training_data=TrainingData.of([spec.labels_url], labels_sha256),
            normalization=Normalization.of(np.asarray(norm.mean), np.asarray(norm.std)), classes=("speech",),
            params={"spec": asdict(spec), "model_config": cfg.to_dict(), "train_options": options,
                    "optimizer": {"name": "adam", "clipnorm": CLIPNORM}, "split_counts": split_counts},
            history=history, extra={"labels_url": spec.labels_url, "split_counts": split_counts,
                                    "normalization_of": "log1p(|STFT| of the mixture)"})
