"""Training end to end on real parts: synth -> featurize -> train on a Dask worker -> registry.

Tiny corpus and 2 epochs: this checks the plumbing (labels joined to shards, checkpoints, resume,
registry card, report), not model quality (that is benchmarks/quality territory). One test SIGKILLs a real
training process mid-run and resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audiopipe.flows.extract_features import featurize
from audiopipe.flows.synth import synth
from audiopipe.flows.train_model import detect_config_hash, train_model_flow
from audiopipe.infra.errors import ConfigError
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec
from audiopipe.models.registry import Registry
from audiopipe.tasks.evaluation import evaluate_registered
from audiopipe.tasks.checkpoints import read_state
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.training import TrainSpec, train_model

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    root = tmp_path_factory.mktemp("sounds")
    synth("sounds", str(root / "corpus"), 64, 1)
    return root


def test_classifier_trains_registers_and_resumes(sounds, tmp_path, prefect_api, caplog):
    settings = RunSettings(workers=1, work_dir=tmp_path / "work")
    featurize(str(sounds / "corpus" / "audio"), str(tmp_path / "feat"), feature_config=_cfg(), settings=settings)
    config_hash = detect_config_hash(str(tmp_path / "feat"), StorageSpec())
    spec = TrainSpec("classify", str(tmp_path / "feat"), str(sounds / "corpus" / "labels" / "labels.parquet"),
                     str(tmp_path / "reg"), config_hash, epochs=2, batch_size=8, work_dir=str(tmp_path / "work"))
    with caplog.at_level("INFO", logger="prefect"):
        first = train_model_flow(spec, settings)
    # each epoch's metrics reach the flow run's log as the worker finishes it
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("val_loss" in line for line in epoch_lines)
    assert first["model_ref"].endswith("classify@1") and first["epochs_run"] == 2
    assert 0.0 <= first["metrics"]["accuracy"] <= 1.0 and first["metrics"]["num_test"] > 0
    assert (Path(first["report_dir"]) / "confusion.png").exists()
    registry = Registry(str(tmp_path / "reg"))
    card = registry.get_card(registry.resolve("classify@1"))
    assert card.classes and len(card.normalization.mean) == 80 and card.training_data.shards
    # the full feature config travels with the model: inference featurizes new audio with it
    assert FeatureConfig.from_dict(card.feature_config) == _cfg()
    model, _ = registry.load(registry.resolve("classify@1"), tmp_path / "cache")
    assert model.output_shape[-1] == len(card.classes)
    # evaluate recomputes the card's test metrics from the registry and the shards
    scored = evaluate_registered(first["model_ref"], str(tmp_path / "feat"),
                                 str(sounds / "corpus" / "labels" / "labels.parquet"), StorageSpec(),
                                 cache_dir=str(tmp_path / "cache2"))
    assert scored["metrics"]["accuracy"] == pytest.approx(card.metrics["accuracy"])
    # labels with a class the model never saw, and a feature config the model was not trained on
    labels = pq.read_table(sounds / "corpus" / "labels" / "labels.parquet")
    labels = labels.set_column(labels.schema.get_field_index("label"), "label",
                               pa.array(["kazoo"] + labels["label"].to_pylist()[1:]))
    pq.write_table(labels, tmp_path / "kazoo.parquet")
    with pytest.raises(ConfigError, match="kazoo"):
        evaluate_registered(first["model_ref"], str(tmp_path / "feat"), str(tmp_path / "kazoo.parquet"),
                            StorageSpec(), cache_dir=str(tmp_path / "cache2"))
    # a beam-search decoder is for asr models; the CLI says which options go together
    from audiopipe.models.asr_ctc import BeamDecoder

    with pytest.raises(ConfigError, match="applies to asr models"):
        evaluate_registered(first["model_ref"], str(tmp_path / "feat"), str(sounds / "corpus" / "labels" /
                            "labels.parquet"), StorageSpec(), cache_dir=str(tmp_path / "cache2"), decoder=BeamDecoder())
    from typer.testing import CliRunner

    from audiopipe.flows.cli import app

    base = ["evaluate", first["model_ref"], "--data", str(tmp_path / "feat"),
            "--labels", str(sounds / "corpus" / "labels" / "labels.parquet")]
    for extra, needle in ((["--lm-text", "x.txt"], "need --beam-width"), (["--beam-width", "4"], "applies to asr")):
        result = CliRunner().invoke(app, base + extra, env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
    # `train --model-config` sets architecture fields; a wrong one is named before anything is trained
    base = ["train", "classify", "--features", str(tmp_path / "feat"), "--registry", str(tmp_path / "reg"),
            "--labels", str(sounds / "corpus" / "labels" / "labels.parquet"), "--epochs", "1"]
    env = {"COLUMNS": "200", "NO_COLOR": "1", "AUDIOPIPE_WORK_DIR": str(tmp_path / "work")}
    for config, needle in (("[16]", "must be a JSON object"), ('{"lstm_unitz": 8}', "fields ['lstm_unitz']")):
        result = CliRunner().invoke(app, base + ["--model-config", config], env=env)
        assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
    assert registry.list_versions("classify") == [1]
    featurize(str(sounds / "corpus" / "audio"), str(tmp_path / "feat"), settings=settings,
              feature_config=_cfg().__class__(segment_seconds=10.0, n_mels=40))
    with pytest.raises(ConfigError, match="no committed feature shards"):
        evaluate_registered(first["model_ref"], str(tmp_path / "other"), str(tmp_path / "kazoo.parquet"),
                            StorageSpec(), cache_dir=str(tmp_path / "cache2"))
    # the same command again: the checkpoint says 2 of 2 epochs are done, so nothing is refit
    again = train_model_flow(spec, settings)
    assert again["resumed_from_epoch"] == 2 and again["model_ref"].endswith("classify@2")
    state = json.loads((tmp_path / "work" / "checkpoints" / spec.run_key / "state.json").read_text())
    assert state["epoch"] == 2


def test_asr_trains_with_partial_overrides_and_registers_its_vocabulary(tmp_path, prefect_api):
    """The asr path of train_model: speech from synth, CTC training on a worker, the card's vocabulary and
    model config; ``model_overrides`` may name only some fields, SpecAugment's as a dict."""
    synth("speech", str(tmp_path / "speech"), 24, 1)
    settings = RunSettings(workers=1, work_dir=tmp_path / "work")
    featurize(str(tmp_path / "speech" / "audio"), str(tmp_path / "feat"), feature_config=_cfg(), settings=settings)
    overrides = {"lstm_units": 16, "lstm_layers": 1, "conv_channels": 8, "spec_augment": {"num_time_masks": 1},
                 "subsample": 2, "upsample": 2}
    spec = TrainSpec("asr", str(tmp_path / "feat"), str(tmp_path / "speech" / "labels" / "labels.parquet"),
                     str(tmp_path / "reg"), detect_config_hash(str(tmp_path / "feat"), StorageSpec()), epochs=1,
                     batch_size=8, lr_schedule="cosine", model_overrides=overrides, work_dir=str(tmp_path / "work"))
    result = train_model_flow(spec, settings)
    assert result["model_ref"].endswith("asr@1") and 0.0 <= result["metrics"]["cer"]
    card = Registry(str(tmp_path / "reg")).get_card("asr@1")
    config = card.params["model_config"]
    assert config["lstm_units"] == 16 and config["spec_augment"]["num_time_masks"] == 1
    assert config["spec_augment"]["num_freq_masks"] == 2 and config["dropout"] == 0.2  # defaults kept
    assert "".join(card.vocabulary).startswith(" '") and len(card.vocabulary) == 28
    assert (config["subsample"], config["upsample"]) == (2, 2)
    decoder = card.extra["decoder"]  # the character LM ships with the model (tasks/train_lm.py)
    assert decoder["lm_file"] in card.extra["files"] and decoder["lm"]["source"] == "training-split transcripts"
    report = (Path(result["report_dir"]) / "index.html").read_text()
    assert "Test transcripts" in report and report.count("<p class='tx'>ref: ") == result["metrics"]["num_test"]


def test_gpu_requested_without_gpu_workers_fails_loudly(sounds, tmp_path, prefect_api):
    spec = TrainSpec("classify", str(tmp_path), str(sounds), str(tmp_path / "reg"), "0" * 12, require_gpu=True)
    with pytest.raises(ConfigError, match="GPU"):
        train_model_flow(spec, RunSettings(workers=1, work_dir=tmp_path / "work"))


def test_labels_for_sources_never_featurized_are_refused(sounds, tmp_path, prefect_api):
    from audiopipe.models.data import open_shard_set

    feat = tmp_path / "feat"
    featurize(str(sounds / "corpus" / "audio"), str(feat), feature_config=_cfg(),
              settings=RunSettings(workers=1, work_dir=tmp_path / "work"))
    labels = pq.read_table(sounds / "corpus" / "labels" / "labels.parquet")
    ghost = [dict(labels.slice(0, 1).to_pylist()[0], source="file:///nowhere/ghost.wav")]
    ghost = pa.Table.from_pylist(ghost, schema=labels.schema)
    pq.write_table(pa.concat_tables([labels, ghost]), tmp_path / "ghost.parquet")
    with pytest.raises(ConfigError, match="no manifest row"):
        open_shard_set(str(feat), detect_config_hash(str(feat), StorageSpec()), str(tmp_path / "ghost.parquet"),
                       StorageSpec())
    with pytest.raises(ConfigError, match="no committed feature shards"):  # empty: nothing featurized there
        open_shard_set(str(tmp_path / "empty"), "0" * 12, str(tmp_path / "ghost.parquet"), StorageSpec())


# One training process: train_model, the function a Dask worker runs for `audiopipe train`, called as is.
TRAIN_PROCESS = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
from audiopipe.infra.storage import StorageSpec
from audiopipe.tasks.training import TrainSpec, train_model
result = train_model(TrainSpec(**json.loads(sys.argv[1])), StorageSpec())
print("RESULT " + json.dumps({"resumed_from_epoch": result.resumed_from_epoch, "epochs_run": result.epochs_run,
                              "model_ref": result.model_ref}))
"""


def test_sigkilled_training_resumes_from_its_last_checkpoint(sounds, tmp_path, prefect_api):
    """A training process is SIGKILLed after its first checkpoint; the same command run again resumes after
    the last committed epoch, keeps the epochs already trained, and ends where an uninterrupted run ends."""
    featurize(str(sounds / "corpus" / "audio"), str(tmp_path / "feat"), feature_config=_cfg(),
              settings=RunSettings(workers=1, work_dir=tmp_path / "work"))
    common = dict(family="classify", features_url=str(tmp_path / "feat"),
                  labels_url=str(sounds / "corpus" / "labels" / "labels.parquet"),
                  config_hash=detect_config_hash(str(tmp_path / "feat"), StorageSpec()), epochs=4, batch_size=8,
                  patience=10, model_overrides={"conv_channels": [8], "lstm_units": 8})
    spec = TrainSpec(registry_url=str(tmp_path / "reg"), work_dir=str(tmp_path / "killed"), **common)
    ckpt = Path(spec.work_dir) / "checkpoints" / spec.run_key
    cmd = [sys.executable, "-c", TRAIN_PROCESS, json.dumps(asdict(spec))]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((ckpt / "state.json").exists() and read_state(ckpt).epoch >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = read_state(ckpt)
    assert 1 <= at_kill.epoch < spec.epochs and not at_kill.done, "the run must die mid-training"
    kept = json.loads((ckpt / "history.json").read_text())["loss"][:at_kill.epoch]

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert f"resuming {spec.run_key} from its checkpoint after epoch {at_kill.epoch}" in out
    assert result["resumed_from_epoch"] == at_kill.epoch and result["model_ref"].endswith("classify@1")
    card = Registry(spec.registry_url).get_card("classify@1")
    assert card.history["loss"][:at_kill.epoch] == pytest.approx(kept)  # the epochs before the kill, not redone

    whole = train_model(TrainSpec(registry_url=str(tmp_path / "reg2"), work_dir=str(tmp_path / "whole"), **common),
                        StorageSpec())
    assert whole.resumed_from_epoch == 0 and result["epochs_run"] == whole.epochs_run == spec.epochs
    assert len(card.history["loss"]) == len(Registry(str(tmp_path / "reg2")).get_card("classify@1").history["loss"])
    assert read_state(ckpt).done and read_state(ckpt).epoch == spec.epochs


def _cfg():
    from audiopipe.tasks.features import FeatureConfig

    return FeatureConfig(segment_seconds=10.0)
