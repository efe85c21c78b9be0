"""Model-quality benchmark: synth a corpus, featurize it, train each model family within a time budget, and
compare the held-out metrics with the targets of issue 4 ("Quality").

Run on a quiet machine (or ``nice -n 10`` beside other work)::

    .venv/bin/python benchmarks/quality.py --family classify --minutes-budget 8
    .venv/bin/python benchmarks/quality.py --family asr --minutes-budget 20
    .venv/bin/python benchmarks/quality.py --family all          # 30 minutes of training per model

Per family it (1) synthesizes a corpus with ``flows.synth.synth`` into
``benchmarks/.data/quality/<family>/corpus`` (reused when present with the same size and seed), (2) featurizes
the audio (classify, asr) with ``FeatureConfig(segment_seconds=30)`` (incremental: a rerun skips done files),
(3) trains through ``train_model_flow`` on a Dask worker with epochs chosen to fit ``--minutes-budget``
(asr: from a short timing probe of the same architecture on real batches), and (4) reads the test metrics.
For asr the test split mixes held-out voices, training voices, espeak-ng and flite, so the registered model
is loaded back and the CER is computed per voice group (greedy decoding, plus CTC prefix beam search with a
character 4-gram LM fitted on the training transcripts when ``--beam`` is given a nonzero count).

Targets (issue 4): classify accuracy >= 0.95; asr CER <= 5% on held-out voices and <= 10% on flite voices
speaking unseen sentences; music NLL/note >= 20% below the bigram baseline; separation SI-SDRi >= 60% of
the oracle ideal ratio mask's. Results: a rich table on stdout, ``benchmarks/.data/quality/results.json``
(merged across runs, one entry per family) and ``results.md``, a block to paste under "## Model quality"
in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from audiopipe.infra.settings import apply_prefect_defaults
from audiopipe.tasks.training import BUCKET_EDGES

DATA = Path(__file__).resolve().parent / ".data" / "quality"
apply_prefect_defaults(DATA)  # before anything imports Prefect

RESULTS_JSON = DATA / "results.json"
RESULTS_MD = DATA / "results.md"
SEED = 0
FAMILIES = ("classify", "asr", "music", "separate")
CORPUS_KIND = {"classify": "sounds", "asr": "speech", "music": "music", "separate": "mixtures"}
DEFAULT_N = {"classify": 1200, "asr": 6000, "music": 800, "separate": 1500}  # music: 400 scores fell 0.2 pts short
SEPARATE_OVERRIDES = {"cache_examples": True}
TRAINERS = {"music": "audiopipe.tasks.train_music", "separate": "audiopipe.tasks.train_separation"}
ASR_OVERRIDES = {"frontend": "conv2d", "subsample": 4, "lstm_units": 192, "lstm_layers": 3}
CLASSIFY_EPOCHS = 15
# Fraction of the budget kept for what is not training epochs: Dask start-up, normalisation statistics,
# the test pass and registration (asr: plus the per-voice evaluation, which runs after the flow).
OVERHEAD_S = {"classify": 60.0, "asr": 150.0, "music": 45.0, "separate": 60.0}


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ corpus
def ensure_corpus(family: str, n: int) -> dict:
    """Synthesize ``n`` items of the family's corpus kind, or reuse the one already there."""
    from audiopipe.flows.synth import synth

    root = DATA / family / "corpus"
    meta_file = DATA / family / "corpus.json"
    labels = root / "labels" / "labels.parquet"
    if labels.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("n") == n and meta.get("seed") == SEED:
            log(f"{family}: reusing corpus {root} ({n} items)")
            return meta
    log(f"{family}: synthesizing {n} {CORPUS_KIND[family]} items into {root}")
    started = time.monotonic()
    summary = synth(CORPUS_KIND[family], str(root), n=n, seed=SEED)
    meta = {"n": n, "seed": SEED, "kind": CORPUS_KIND[family], "labels_url": summary["labels_url"],
            "num_rows": summary["num_rows"], "splits": summary["splits"], "engines": summary["engines"],
            "classes": summary["classes"], "synth_s": round(time.monotonic() - started, 1)}
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta


def corpus_audio_hours(labels_url: str) -> dict:
    """Audio hours per split from the labels' ``duration_s``."""
    rows = read_labels(labels_url)
    out: dict[str, float] = {}
    for row in rows:
        if row.get("duration_s"):
            out[row["split"]] = out.get(row["split"], 0.0) + row["duration_s"] / 3600
    return {k: round(v, 3) for k, v in sorted(out.items())}


def read_labels(labels_url: str) -> list[dict]:
    import pyarrow.parquet as pq

    path = labels_url.removeprefix("file://")
    return pq.read_table(path).to_pylist()


def ensure_features(family: str, workers: int) -> tuple[str, str, float]:
    """Featurize the corpus audio (incremental); returns (features_url, config_hash, seconds)."""
    from audiopipe.flows.extract_features import featurize
    from audiopipe.infra.settings import RunSettings
    from audiopipe.tasks.features import FeatureConfig

    cfg = FeatureConfig(segment_seconds=30)
    in_url, out_url = str(DATA / family / "corpus"), str(DATA / family / "features")
    started = time.monotonic()
    log(f"{family}: featurizing {in_url} -> {out_url} (config {cfg.config_hash})")
    summary = featurize(in_url, out_url, feature_config=cfg,
                        settings=RunSettings(workers=workers, work_dir=DATA / "work"))
    seconds = time.monotonic() - started
    log(f"{family}: featurize done in {seconds:.0f} s: {summary.get('files_ok')} files processed, "
        f"{summary.get('files_skipped')} skipped")
    return out_url, cfg.config_hash, seconds


# --------------------------------------------------------------------------------------------- training
def run_training(spec, workers_memory: str) -> tuple[dict, float]:
    from audiopipe.flows.train_model import train_model_flow
    from audiopipe.infra.settings import RunSettings

    started = time.monotonic()
    result = train_model_flow(spec, RunSettings(workers=1, work_dir=DATA / "work",
                                                worker_memory_limit=workers_memory))
    return result, time.monotonic() - started


def make_spec(family: str, features_url: str, labels_url: str, config_hash: str, **kw):
    from audiopipe.tasks.training import TrainSpec

    return TrainSpec(family=family, features_url=features_url, labels_url=labels_url,
                     registry_url=str(DATA / "registry"), config_hash=config_hash, seed=SEED,
                     model_name=f"quality-{family}", work_dir=str(DATA / "work"), **kw)


def checkpoint_history(spec) -> dict:
    path = Path(spec.work_dir) / "checkpoints" / spec.run_key / "history.json"
    return json.loads(path.read_text()) if path.exists() else {}


def probe_asr_epoch_s(features_url: str, config_hash: str, labels_url: str, overrides: dict,
                      batch_size: int, lr: float, steps: int = 12) -> dict:
    """Seconds per training epoch of the asr model, from ``steps`` real batches after a warm-up.

    Runs in-process (TensorFlow's own thread pools use both cores, as in the Dask worker), streaming the
    shards as training does. Scales the measured seconds per input frame by the training split's frames;
    the first epoch of the real run is the check (it was ~1.3x the probe's figure under load here).
    """
    import keras
    import tensorflow as tf

    from audiopipe.infra.storage import StorageSpec
    from audiopipe.models.asr_ctc import CtcAsrConfig, CtcLoss, build_ctc_asr, encode_text
    from audiopipe.models.data import iter_examples, open_shard_set, to_dataset

    shards = open_shard_set(features_url, config_hash, labels_url, StorageSpec({}))
    cfg = CtcAsrConfig.from_dict({"n_mels": shards.num_bins, **overrides})
    model = build_ctc_asr(cfg)
    model.compile(keras.optimizers.Adam(lr, clipnorm=5.0), loss=CtcLoss())
    ds = to_dataset(lambda: iter_examples(shards, "train", lambda r: encode_text(r["text"]).astype(np.int32)),
                    shards.num_bins, batch_size=batch_size, target_spec=tf.TensorSpec((None,), tf.int32),
                    shuffle=512, seed=SEED, bucket_edges=BUCKET_EDGES)
    frames, started = 0, 0.0
    # Streamed, as in training: reading and decoding the shards is part of an epoch's cost.
    for step, (x, y) in enumerate(ds.take(steps + 3)):
        if step == 3:  # after warm-up (tracing and graph build for the first bucket shapes)
            started = time.perf_counter()
        model.train_on_batch(x, y)
        if step >= 3:
            frames += int(np.sum(x["lengths"].numpy()))
    seconds = time.perf_counter() - started
    rows = read_labels(labels_url)
    train_frames = sum(r["duration_s"] * 100 for r in rows if r["split"] == "train")
    val_frames = sum(r["duration_s"] * 100 for r in rows if r["split"] == "val")
    per_frame = seconds / max(frames, 1)
    # Forward-only validation costs about a third of a training step per frame. Real epochs run slower than
    # the probe's steady batches (each bucket's last partial batch, new shapes traced, the Dask worker): on
    # 2026-11-25 idle epochs took 128-143 s against a 110 s estimate, hence the factor.
    epoch_s = 1.25 * per_frame * (train_frames + val_frames / 3)
    return {"s_per_audio_hour": round(per_frame * 360_000, 1), "epoch_s_estimate": round(epoch_s, 1),
            "probe_batches": steps, "probe_s": round(seconds, 1), "params": int(model.count_params())}


# --------------------------------------------------------------------------------------------- asr eval
def asr_group(row: dict) -> list[str]:
    """The voice groups of a test utterance (held-out voices, the held-out engine, natural-sounding voices)."""
    from audiopipe.tasks.corpora_voices import voice_groups

    return voice_groups(row.get("voice"), row.get("engine"))


def asr_conditions(row: dict) -> list[str]:
    """The recording conditions of a test utterance, each degradation on its own (a row may be in several)."""
    from audiopipe.tasks.augment import degradation_groups

    return degradation_groups(row.get("augment"), json.loads(row.get("params") or "{}"), row.get("snr_db"))


def asr_logits(model, subsample: int, shards, split: str, limit: int | None = None):
    """(rows, refs, greedy hyps, per-row logits) of a split, decoded in length-sorted batches of 32."""
    from audiopipe.models.asr_ctc import greedy_decode
    from audiopipe.models.data import iter_examples
    from audiopipe.models.layers import output_lengths

    examples = sorted(iter_examples(shards, split, lambda r: r), key=lambda e: e[0].shape[0])
    if limit is not None:  # an even spread over lengths, not the shortest ones
        examples = examples[::max(1, len(examples) // limit)][:limit]
    hyps, logits_all = [], []
    for start in range(0, len(examples), 32):
        batch = examples[start:start + 32]
        lengths = np.array([f.shape[0] for f, _ in batch], np.int32)
        feats = np.zeros((len(batch), int(lengths.max()), shards.num_bins), np.float32)
        for i, (f, _) in enumerate(batch):
            feats[i, :f.shape[0]] = f
        logits = model.predict({"features": feats, "lengths": lengths}, verbose=0)
        out_len = output_lengths(lengths, subsample)
        hyps += greedy_decode(logits, out_len)
        logits_all += [logits[i, :out_len[i]] for i in range(len(batch))]
    rows = [row for _, row in examples]
    return rows, [row["text"] for row in rows], hyps, logits_all


def beam_decode(logits: list[np.ndarray], setting: dict, lms: dict, lexicon) -> list[str]:
    from audiopipe.models.asr_ctc import BeamDecoder

    decoder = BeamDecoder(beam_width=setting["beam_width"], lm=lms[setting["lm_order"]],
                          lm_weight=setting["lm_weight"], insertion_bonus=setting["insertion_bonus"],
                          lexicon=lexicon if setting["lexicon"] else None)
    return decoder(_pad(logits), np.array([a.shape[0] for a in logits]))


def tune_beam(val_logits: list[np.ndarray], val_refs: list[str], lms: dict, lexicon, beam_width: int) -> dict:
    """The beam-search setting with the lowest CER on validation utterances (never on the test split)."""
    from audiopipe.models.metrics import cer

    trials = []
    for order in sorted(lms):
        for use_lexicon in (False, True):
            for weight in (0.3, 0.6, 1.0):
                for bonus in (0.5, 1.5, 2.5):
                    setting = {"beam_width": beam_width, "lm_order": order, "lm_weight": weight,
                               "insertion_bonus": bonus, "lexicon": use_lexicon}
                    trials.append((float(cer(val_refs, beam_decode(val_logits, setting, lms, lexicon))), setting))
    best_cer, best = min(trials, key=lambda t: t[0])
    return {**best, "val_cer": round(best_cer, 4), "trials": len(trials)}


def evaluate_asr_groups(model_ref: str, features_url: str, config_hash: str, labels_url: str,
                        beam_max: int, beam_width: int, val_utts: int = 200) -> dict:
    """Load the registered model, decode the test split, and report CER/WER per voice group.

    Greedy decoding for every test utterance. With ``beam_max`` > 0, also CTC prefix beam search with a
    character n-gram LM and optionally the ``wamerican`` lexicon: the LM is fitted on the text source's
    training-split sentences (``corpora_text.load_sentences()["train"]``: no test or validation sentence),
    and the LM order, weight, insertion bonus and lexicon are chosen on ``val_utts`` validation utterances,
    then applied unchanged to up to ``beam_max`` test utterances per group.
    """
    from audiopipe.infra.storage import StorageSpec
    from audiopipe.models.asr_ctc import CharNgramLM, Lexicon
    from audiopipe.models.data import open_shard_set
    from audiopipe.models.metrics import cer, wer
    from audiopipe.models.registry import Registry
    from audiopipe.tasks.corpora_text import load_lexicon, load_sentences

    started = time.monotonic()
    model, card = Registry(str(DATA / "registry")).load(model_ref, DATA / "work" / "model-cache")
    subsample = int(card.params["model_config"]["subsample"])
    shards = open_shard_set(features_url, config_hash, labels_url, StorageSpec({}))
    rows, refs, hyps, logits_all = asr_logits(model, subsample, shards, "test")
    groups: dict[str, list[int]] = {"all_test": list(range(len(rows)))}
    for i, row in enumerate(rows):
        for g in asr_group(row):
            groups.setdefault(g, []).append(i)
    out: dict = {"greedy": {}, "examples": []}
    for g, idx in sorted(groups.items()):
        out["greedy"][g] = {"cer": float(cer([refs[i] for i in idx], [hyps[i] for i in idx])),
                            "wer": float(wer([refs[i] for i in idx], [hyps[i] for i in idx])), "n": len(idx)}
    conditions: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        for c in asr_conditions(row):
            conditions.setdefault(c, []).append(i)
    out["greedy_by_condition"] = {c: {"cer": float(cer([refs[i] for i in idx], [hyps[i] for i in idx])),
                                      "n": len(idx)} for c, idx in sorted(conditions.items())}
    for i in range(0, len(rows), max(1, len(rows) // 8))[:8]:
        out["examples"].append({"voice": rows[i]["voice"], "ref": refs[i], "hyp": hyps[i]})
    out["greedy_s"] = round(time.monotonic() - started, 1)
    if beam_max > 0:
        started = time.monotonic()
        lm_text = load_sentences()["train"]
        lms = {order: CharNgramLM.fit(lm_text, order=order) for order in (4, 6)}
        lexicon = Lexicon(load_lexicon())
        _, val_refs, _, val_logits = asr_logits(model, subsample, shards, "val", limit=val_utts)
        best = tune_beam(val_logits, val_refs, lms, lexicon, beam_width)
        log(f"asr: beam setting chosen on {len(val_refs)} validation utterances: {best}")
        beam_hyps: dict[int, str] = {}
        out["beam"] = {}
        for g in ("held_out_voices", "held_out_engine", "training_voices_flite", "training_voices_espeak_ng"):
            idx = groups.get(g, [])[:beam_max]
            todo = [i for i in idx if i not in beam_hyps]
            if todo:
                beam_hyps.update(zip(todo, beam_decode([logits_all[i] for i in todo], best, lms, lexicon)))
            if idx:
                out["beam"][g] = {
                    "cer": float(cer([refs[i] for i in idx], [beam_hyps[i] for i in idx])),
                    "wer": float(wer([refs[i] for i in idx], [beam_hyps[i] for i in idx])),
                    "greedy_cer_same_rows": float(cer([refs[i] for i in idx], [hyps[i] for i in idx])),
                    "n": len(idx)}
        out["beam_settings"] = {**best, "lm": f"char {best['lm_order']}-gram, add-k 0.05, "
                                f"{len(lm_text)} training-split sentences of the text source",
                                "lexicon_words": len(lexicon.words) if best["lexicon"] else 0}
        out["beam_s"] = round(time.monotonic() - started, 1)
    return out


def _pad(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(arrays), max(a.shape[0] for a in arrays), arrays[0].shape[1]), np.float32)
    out[:, :, 0] = 50.0  # past a row's length: a certain blank (never read: lengths bound the search)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
    return out


# ------------------------------------------------------------------------------------------- families
def run_classify(args, budget_s: float) -> dict:
    n = args.n or DEFAULT_N["classify"]
    meta = ensure_corpus("classify", n)
    features_url, config_hash, feat_s = ensure_features("classify", args.workers)
    epochs = args.epochs or CLASSIFY_EPOCHS
    spec = make_spec("classify", features_url, meta["labels_url"], config_hash, epochs=epochs,
                     batch_size=32, learning_rate=2e-3, patience=5)
    log(f"classify: training {epochs} epochs (run key {spec.run_key})")
    result, train_s = run_training(spec, "4GiB")
    m = result["metrics"]
    return {"metrics": {"accuracy": m["accuracy"]}, "targets": [target("accuracy", m["accuracy"], ">=", 0.95)],
            "details": {"num_test": m["num_test"], "per_class_recall": {k[7:]: round(v, 3) for k, v in m.items()
                                                                        if k.startswith("recall_")}},
            "corpus": {**meta, "audio_hours": corpus_audio_hours(meta["labels_url"])},
            "training": training_info(spec, result, train_s, feat_s, budget_s)}


def run_asr(args, budget_s: float) -> dict:
    n = args.n or DEFAULT_N["asr"]
    meta = ensure_corpus("asr", n)
    features_url, config_hash, feat_s = ensure_features("asr", args.workers)
    overrides = {**ASR_OVERRIDES, **json.loads(args.asr_overrides or "{}")}
    # Batch 32 trained at 1.37x the audio per second of batch 16 here (real batches, same model); the cosine
    # schedule spends the fixed budget of epochs at a decaying rate instead of waiting for plateaus.
    batch_size, lr = args.batch_size or 32, 2e-3
    probe = None
    epochs = args.epochs
    if not epochs:
        log("asr: timing probe on real batches")
        probe = probe_asr_epoch_s(features_url, config_hash, meta["labels_url"], overrides, batch_size, lr)
        epochs = max(1, int((budget_s - OVERHEAD_S["asr"]) // probe["epoch_s_estimate"]))
        log(f"asr: probe {probe}; budget {budget_s / 60:.0f} min -> {epochs} epochs")
    spec = make_spec("asr", features_url, meta["labels_url"], config_hash, epochs=epochs, batch_size=batch_size,
                     learning_rate=lr, lr_schedule="cosine", patience=4, model_overrides=overrides)
    log(f"asr: training {epochs} epochs, batch {batch_size}, lr {lr}, {overrides} (run key {spec.run_key})")
    result, train_s = run_training(spec, "6GiB")
    log(f"asr: flow metrics {result['metrics']}; evaluating per voice group")
    groups = evaluate_asr_groups(result["model_ref"], features_url, config_hash, meta["labels_url"],
                                 beam_max=args.beam, beam_width=8)
    return {"metrics": asr_metrics(result["metrics"], groups), "targets": asr_targets(groups),
            "details": {"groups": groups, "probe": probe, "model_overrides": overrides},
            "corpus": {**meta, "audio_hours": corpus_audio_hours(meta["labels_url"])},
            "training": training_info(spec, result, train_s, feat_s, budget_s)}


def reevaluate_asr(args, previous: dict) -> dict:
    """Decode the model of an earlier asr run again (new decoding settings), without training."""
    features_url, config_hash, _ = ensure_features("asr", args.workers)
    groups = evaluate_asr_groups(previous["training"]["model_ref"], features_url, config_hash,
                                 previous["corpus"]["labels_url"], beam_max=args.beam, beam_width=8)
    flow_metrics = {"cer": previous["metrics"]["cer_all_test"], "wer": previous["metrics"]["wer_all_test"]}
    return {**previous, "metrics": asr_metrics(flow_metrics, groups), "targets": asr_targets(groups),
            "details": {**previous["details"], "groups": groups}}


def asr_metrics(flow_metrics: dict, groups: dict) -> dict:
    return {"cer_all_test": flow_metrics["cer"], "wer_all_test": flow_metrics["wer"],
            **{f"cer_{k}": v["cer"] for k, v in groups["greedy"].items()}}


def asr_targets(groups: dict) -> list[dict]:
    g = groups["greedy"]
    held, flite = g["held_out_voices"]["cer"], g.get("training_voices_flite", {}).get("cer", float("nan"))
    targets = [target("cer_held_out_voices (greedy)", held, "<=", 0.05),
               target("cer_flite_unseen_sentences (greedy)", flite, "<=", 0.10)]
    b = groups.get("beam", {})
    if "held_out_voices" in b:
        targets.append(target(f"cer_held_out_voices (beam+LM, {b['held_out_voices']['n']} utts)",
                              b["held_out_voices"]["cer"], "<=", 0.05))
    if "training_voices_flite" in b:
        targets.append(target(f"cer_flite_unseen_sentences (beam+LM, {b['training_voices_flite']['n']} utts)",
                              b["training_voices_flite"]["cer"], "<=", 0.10))
    return targets


def run_trained_elsewhere(family: str, args, budget_s: float) -> dict:
    """music / separate: train only if the training module exists (written in parallel by others)."""
    module = TRAINERS[family]
    if importlib.util.find_spec(module) is None:
        log(f"{family}: skipped, {module} does not exist yet")
        return {"skipped": f"{module} does not exist yet"}
    n = args.n or DEFAULT_N[family]
    meta = ensure_corpus(family, n)
    corpus_url = str(DATA / family / "corpus")
    overrides = dict(SEPARATE_OVERRIDES) if family == "separate" else {}
    common = {"batch_size": 16, "learning_rate": 1e-3, "patience": 4, "model_overrides": overrides}
    try:
        epochs, probe = args.epochs, None
        if not epochs:
            # One-epoch run to time an epoch (its flow overhead included, so the estimate errs long); its
            # checkpoint is then copied to the full run's key, which resumes after that epoch.
            first = make_spec(family, corpus_url, meta["labels_url"], "none", epochs=1, **common)
            timing_file = Path(first.work_dir) / "checkpoints" / f"{first.run_key}.timing.json"
            if timing_file.exists():  # the 1-epoch run is done (a rerun would only evaluate): reuse its time
                first_s = json.loads(timing_file.read_text())["flow_s"]
            else:
                log(f"{family}: timing run of 1 epoch (run key {first.run_key})")
                _, first_s = run_training(first, "6GiB")
                timing_file.write_text(json.dumps({"flow_s": first_s}))
            epoch_s = max(first_s - 20.0, 0.25 * first_s)  # ~20 s of the flow is start-up and evaluation
            epochs = max(2, 1 + int((budget_s - first_s - OVERHEAD_S[family]) // epoch_s))
            probe = {"one_epoch_flow_s": round(first_s, 1), "epoch_s_estimate": round(epoch_s, 1)}
        spec = make_spec(family, corpus_url, meta["labels_url"], "none", epochs=epochs, **common)
        if probe:
            import shutil

            src = Path(first.work_dir) / "checkpoints" / first.run_key
            dst = Path(spec.work_dir) / "checkpoints" / spec.run_key
            if src.exists() and not dst.exists():
                shutil.copytree(src, dst)
                state = json.loads((dst / "state.json").read_text())
                state.pop("done", None)  # the 1-epoch run finished; the copy goes on from its epoch
                (dst / "state.json").write_text(json.dumps(state))
        log(f"{family}: training {epochs} epochs (run key {spec.run_key}; probe {probe})")
        result, train_s = run_training(spec, "6GiB")
        if probe:
            train_s += probe["one_epoch_flow_s"]
    except Exception as exc:  # noqa: BLE001 - code under construction: report, do not abort the other families
        log(f"{family}: training failed: {type(exc).__name__}: {exc}")
        return {"skipped": f"training failed: {type(exc).__name__}: {str(exc)[:300]}"}
    m = result["metrics"]
    targets = []
    if family == "music":
        model_nll = _first(m, "nll_per_note", "nll_per_token", "test_nll", "nll")
        bigram = _first(m, "bigram_nll_per_note", "bigram_nll_per_token", "bigram_nll")
        if model_nll is not None and bigram:
            targets.append(target("NLL/note reduction vs bigram", 1 - model_nll / bigram, ">=", 0.20))
    else:
        model_sdri = _first(m, "si_sdri", "si_sdr_improvement", "si_sdri_db", "si_sdr_improvement_db")
        oracle = _first(m, "oracle_irm_si_sdri_db", "oracle_irm_si_sdri", "irm_si_sdri", "oracle_si_sdri",
                        "oracle_si_sdri_db", "irm_si_sdr_improvement")
        if model_sdri is not None and oracle:
            targets.append(target("SI-SDRi / oracle IRM SI-SDRi", model_sdri / oracle, ">=", 0.60))
    if not targets:
        targets.append({"name": "(metric names not recognised)", "value": None, "op": "", "target": None,
                        "met": False, "margin": None})
    return {"metrics": m, "targets": targets, "details": {"probe": probe, "model_overrides": overrides},
            "corpus": {**meta, "audio_hours": corpus_audio_hours(meta["labels_url"])},
            "training": training_info(spec, result, train_s, 0.0, budget_s)}


def _first(metrics: dict, *names: str):
    for name in names:
        if name in metrics:
            return float(metrics[name])
    return None


def target(name: str, value: float, op: str, goal: float) -> dict:
    met = bool(value >= goal) if op == ">=" else bool(value <= goal)
    return {"name": name, "value": float(value), "op": op, "target": goal, "met": met,
            "margin": float(value - goal)}


def training_info(spec, result: dict, train_s: float, feat_s: float, budget_s: float) -> dict:
    history = checkpoint_history(spec)
    return {"budget_min": round(budget_s / 60, 1), "flow_min": round(train_s / 60, 2),
            "featurize_min": round(feat_s / 60, 2), "epochs_planned": spec.epochs,
            "epochs_run": result["epochs_run"], "resumed_from_epoch": result["resumed_from_epoch"],
            "device": result["device"], "model_ref": result["model_ref"], "report_dir": result["report_dir"],
            "batch_size": spec.batch_size, "learning_rate": spec.learning_rate,
            "lr_schedule": spec.lr_schedule, "run_key": spec.run_key,
            "loss": [round(v, 4) for v in history.get("loss", [])],
            "val_loss": [round(v, 4) for v in history.get("val_loss", [])]}


# -------------------------------------------------------------------------------------------- reporting
def machine() -> dict:
    import psutil

    load = os.getloadavg()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "python": platform.python_version(),
            "loadavg_at_end": [round(x, 2) for x in load], "niceness": os.nice(0)}


def fmt_value(t: dict) -> str:
    v = t.get("value")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    pct = "cer" in t["name"] or "accuracy" in t["name"] or "/" in t["name"] or "reduction" in t["name"]
    return f"{v:.1%}" if pct else f"{v:.3g}"


def fmt_target(t: dict) -> str:
    if t.get("target") is None:
        return "n/a"
    return f"{'≥' if t['op'] == '>=' else '≤'} {t['target']:.0%}"


def fmt_margin(t: dict) -> str:
    if t.get("margin") is None or math.isnan(t["margin"]):
        return "n/a"
    if t["met"]:
        return f"met ({abs(t['margin']) * 100:.1f} pts to spare)"
    return f"missed by {abs(t['margin']) * 100:.1f} pts"


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="audiopipe model quality")
    for col in ("family", "metric", "value", "target", "result", "corpus", "train min", "epochs"):
        table.add_column(col)
    for family, res in results["families"].items():
        if "skipped" in res:
            table.add_row(family, "-", "-", "-", f"skipped: {res['skipped']}", "-", "-", "-")
            continue
        tr = res["training"]
        for t in res["targets"]:
            table.add_row(family, t["name"], fmt_value(t), fmt_target(t),
                          ("[green]" if t["met"] else "[red]") + fmt_margin(t), str(res["corpus"]["n"]),
                          f"{tr['flow_min']:.1f}", f"{tr['epochs_run']}/{tr['epochs_planned']}")
    Console(width=160).print(table)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["## Model quality", "",
             f"Measured by `benchmarks/quality.py` on {m['cores']} cores ({m['cpu']}, {m['memory_gb']} GB RAM, "
             f"CPU only; other work sometimes shared it, see the notes below), Python {m['python']}. Corpora come from "
             "`audiopipe synth` (seed 0), features are 16 kHz log-mel, 80 bands, 10 ms hop; each model trained "
             "through `train_model_flow` on one Dask worker. \"train min\" is the whole training flow "
             "(start-up, statistics pass, epochs, test pass, registration).", "",
             "| family | metric (test split) | value | target | result | corpus | train min (budget) | epochs |",
             "|---|---|---:|---:|---|---|---:|---:|"]
    notes = []
    for family, res in results["families"].items():
        if "skipped" in res:
            lines.append(f"| {family} | – | – | – | skipped: {res['skipped']} | – | – | – |")
            continue
        c, tr = res["corpus"], res["training"]
        hours = sum(c.get("audio_hours", {}).values())
        corpus = f"{c['n']} {c['kind']}" + (f", {hours:.1f} h" if hours else "")
        for t in res["targets"]:
            word = "met" if t["met"] else "missed"
            verdict = fmt_margin(t).replace(word, f"**{word}**", 1)
            lines.append(f"| {family} | {t['name']} | {fmt_value(t)} | {fmt_target(t)} | "
                         f"{verdict} | {corpus} | "
                         f"{tr['flow_min']:.1f} ({tr['budget_min']:.0f}) | {tr['epochs_run']}/{tr['epochs_planned']} |")
        if family == "asr":
            g = res["details"]["groups"]["greedy"]
            parts = ", ".join(f"{k} {v['cer']:.1%} (n={v['n']})" for k, v in g.items())
            mo = res["details"].get("model_overrides", {})
            augment = "SpecAugment" if mo.get("spec_augment", "default") is not None else "no SpecAugment"
            notes.append(f"- asr greedy CER by voice group: {parts}. Model: {mo.get('frontend', 'conv2d')} front end "
                         f"(subsample {mo.get('subsample', 4)}, upsample {mo.get('upsample', 1)}), "
                         f"{mo.get('lstm_layers', 3)}×BiLSTM"
                         f"({mo.get('lstm_units', 192)}), dropout {mo.get('dropout', 0.2)}, {augment}; batch "
                         f"{tr['batch_size']}, lr {tr['learning_rate']} ({tr.get('lr_schedule', 'plateau')} schedule).")
            if res["details"].get("probe"):
                p = res["details"]["probe"]
                notes.append(f"- asr training cost (timing probe): {p['s_per_audio_hour']:.0f} s per hour of "
                             f"audio per epoch, ~{p['epoch_s_estimate'] / 60:.1f} min per epoch estimated "
                             "on this corpus.")
            if "greedy_by_condition" in res["details"]["groups"]:
                notes.append("- asr greedy CER by recording condition (test split): " + ", ".join(
                    f"{k} {v['cer']:.1%} (n={v['n']})"
                    for k, v in res["details"]["groups"]["greedy_by_condition"].items()) + ".")
            if "beam" in res["details"]["groups"]:
                b = res["details"]["groups"]["beam"]
                bs = res["details"]["groups"]["beam_settings"]
                chosen = (f"{'wamerican lexicon' if bs['lexicon'] else 'no lexicon'}; chosen on validation "
                          f"utterances, val CER {bs['val_cer']:.1%}") if "val_cer" in bs else "fixed setting"
                notes.append(f"- asr beam search (width {bs['beam_width']}, {bs['lm']}, weight {bs['lm_weight']}, "
                             f"insertion bonus {bs['insertion_bonus']}, {chosen}): "
                             + ", ".join(f"{k} {v['cer']:.1%} vs greedy {v['greedy_cer_same_rows']:.1%} "
                                         f"(n={v['n']})" for k, v in b.items()) + ".")
        if family == "music":
            m = res["metrics"]
            notes.append(f"- music: NLL/note {m['nll_per_note']:.3f} nats vs add-k bigram "
                         f"{m['bigram_nll_per_note']:.3f} on {m.get('num_test_notes', 0):.0f} test notes "
                         "(held-out works).")
        if family == "separate":
            m = res["metrics"]
            notes.append(f"- separate: SI-SDRi {m['si_sdri_db']:.2f} dB vs oracle IRM "
                         f"{m['oracle_irm_si_sdri_db']:.2f} dB on {m.get('num_test', 0)} test mixtures "
                         f"(mixture SI-SDR {m['mixture_si_sdr_db']:.2f} dB).")
        if family == "classify":
            rec = res["details"]["per_class_recall"]
            worst = sorted(rec.items(), key=lambda kv: kv[1])[:3]
            notes.append(f"- classify ({res['details']['num_test']} test clips, {len(rec)} classes): lowest "
                         f"recall {', '.join(f'{k} {v:.0%}' for k, v in worst)}.")
    lines += ["", *notes, "", f"Measured {results['updated']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=(*FAMILIES, "all"), default="all")
    parser.add_argument("--minutes-budget", type=float, default=30.0, help="training minutes per model")
    parser.add_argument("--n", type=int, default=None,
                        help=f"corpus size (default per family: {DEFAULT_N})")
    parser.add_argument("--epochs", type=int, default=None,
                        help="fixed epochs (default: classify 15, asr from a timing probe and the budget)")
    parser.add_argument("--batch-size", type=int, default=None, help="asr batch size (default 32)")
    parser.add_argument("--beam", type=int, default=150,
                        help="asr: beam-search up to this many test utterances per voice group (0: greedy only)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers for featurize")
    parser.add_argument("--asr-overrides", default=None,
                        help='asr: JSON of CtcAsrConfig fields over the defaults, e.g. \'{"dropout": 0.0}\'')
    parser.add_argument("--reevaluate", action="store_true",
                        help="asr: decode the last run's registered model again (no training)")
    parser.add_argument("--report-only", action="store_true",
                        help="only print the table and rewrite results.md from results.json")
    args = parser.parse_args(argv)
    families = FAMILIES if args.family == "all" else (args.family,)
    DATA.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {"families": {}}
    if args.report_only:
        families = ()
    budget_s = args.minutes_budget * 60
    for family in families:
        started = time.monotonic()
        if family == "classify":
            res = run_classify(args, budget_s)
        elif family == "asr":
            res = reevaluate_asr(args, results["families"]["asr"]) if args.reevaluate \
                else run_asr(args, budget_s)
        else:
            res = run_trained_elsewhere(family, args, budget_s)
        res["wall_min"] = round((time.monotonic() - started) / 60, 2)
        results["families"][family] = res
        results["machine"] = machine()
        results["updated"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        results["families"] = {f: results["families"][f] for f in FAMILIES if f in results["families"]}
        RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str))
        RESULTS_MD.write_text(markdown(results))
        log(f"{family}: done in {res['wall_min']:.1f} min; wrote {RESULTS_JSON}")
    if not results["families"]:
        print(f"no results yet in {RESULTS_JSON}")
        return 1
    RESULTS_MD.write_text(markdown(results))
    print_table(results)
    print(RESULTS_MD.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
