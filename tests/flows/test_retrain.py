"""Retraining end to end on real parts: synth -> label tables landing over time -> retrain flow -> registry.

Real local files, Prefect's harness, real Dask LocalClusters, a tiny classifier (2 epochs): this checks the
plumbing (what counts as new, incremental featurize, the merged labels, both models scored on one held-out
set, the decision and the alias), not model quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audiopipe.flows.retrain import retrain_on_new_labels
from audiopipe.flows.synth import synth
from audiopipe.infra.errors import AudiopipeError, ConfigError
from audiopipe.infra.storage import StorageSpec
from audiopipe.models.registry import Registry
from audiopipe.tasks.evaluation import evaluate_registered
from audiopipe.tasks.retraining import check_request, decision_markdown, diff_tables, merge_labels, metric_rule

TINY = {"epochs": 2, "batch_size": 8, "model_overrides": {"conv_channels": [16], "lstm_units": 16}}


def land(work: Path, batch: str, seed: int, n: int = 48) -> str:
    """Synthesize a batch into the archive (its audio), then publish its table under the labels prefix."""
    synth("sounds", str(work / "archive" / batch), n, seed)
    (work / "labels").mkdir(exist_ok=True)
    shutil.copy(work / "archive" / batch / "labels" / "labels.parquet", work / "labels" / f"{batch}.parquet")
    return f"file://{work / 'labels' / batch}.parquet"


def make_holdout(work: Path, n: int = 16) -> None:
    """A fixed held-out table (all rows ``test``) whose audio sits in the archive too."""
    synth("sounds", str(work / "archive" / "holdout"), n, 3)
    table = pq.read_table(work / "archive" / "holdout" / "labels" / "labels.parquet")
    split = table.schema.get_field_index("split")
    pq.write_table(table.set_column(split, table.schema.field(split), pa.array(["test"] * table.num_rows)),
                   work / "holdout.parquet")


def params(work: Path, **extra) -> dict:
    return dict(labels_url=str(work / "labels"), audio_url=str(work / "archive"), features_url=str(work / "feat"),
                model=f"{work / 'reg'}:sounds", holdout_labels_url=str(work / "holdout.parquet"), family="classify",
                feature_config={"segment_seconds": 10.0}, train_params=TINY,
                settings={"workers": 1, "work_dir": str(work / "work")}, **extra)


def champion_then_new_batch(work: Path, train_params: dict = TINY) -> tuple[Registry, str]:
    """Version 1 trained on a first batch and promoted (no champion before it), then a second batch lands."""
    make_holdout(work)
    land(work, "batch-001", seed=1)
    assert retrain_on_new_labels(**{**params(work), "train_params": train_params})["challenger_version"] == 1
    return Registry(str(work / "reg")), land(work, "batch-002", seed=2)


def holdout_metrics(work: Path, ref: str) -> dict:
    return evaluate_registered(ref, str(work / "feat"), str(work / "holdout.parquet"), StorageSpec(),
                               cache_dir=str(work / "cache"))["metrics"]


def retrain_artifacts() -> list:
    """The ``retrain-sounds`` artifacts, newest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-sounds"])),
                                     sort=ArtifactSort.CREATED_DESC)


@pytest.mark.slow
def test_first_model_then_nothing_new_then_challenger_kept(tmp_path, prefect_api):
    work = tmp_path
    make_holdout(work)
    table1 = land(work, "batch-001", seed=1)
    registry = Registry(str(work / "reg"))

    first = retrain_on_new_labels(**params(work))  # no champion yet: train and promote the first model
    assert first["status"] == "promote" and first["challenger_version"] == 1 and first["champion_version"] is None
    assert first["changes"]["added"] == [table1] and first["files_featurized"] == 64
    assert registry.aliases("sounds") == {"champion": 1}
    (decision,) = registry.list_decisions("sounds")
    assert decision.champion_version is None and decision.champion_metrics == {}
    assert decision.challenger_metrics == pytest.approx(holdout_metrics(work, f"{registry.url}:sounds@1"))
    state = json.loads((work / "reg" / "sounds" / "retrain" / "state.json").read_text())
    assert list(state["tables"]) == [table1] and state["trained_version"] == 1

    again = retrain_on_new_labels(**params(work))  # nothing new: nothing trained, nothing decided
    assert again["status"] == "up-to-date" and again["challenger_version"] is None
    assert registry.list_versions("sounds") == [1] and len(registry.list_decisions("sounds")) == 1

    table2 = land(work, "batch-002", seed=2)  # new audio and its labels land
    third = retrain_on_new_labels(**params(work, margin=1.0))  # no accuracy gain reaches 1.0: keep
    assert third["changes"] == {"added": [table2], "changed": [], "removed": []}
    assert third["files_featurized"] == 48  # only the new audio was featurized
    assert third["status"] == "keep" and third["challenger_version"] == 2
    assert registry.aliases("sounds") == {"champion": 1}
    decision = registry.list_decisions("sounds")[-1]
    assert (decision.champion_version, decision.challenger_version, decision.margin) == (1, 2, 1.0)
    assert decision.champion_metrics == pytest.approx(holdout_metrics(work, f"{registry.url}:sounds@1"))
    assert decision.challenger_metrics == pytest.approx(holdout_metrics(work, f"{registry.url}:sounds@2"))
    assert decision.evaluation["labels_url"] == str(work / "holdout.parquet")
    assert decision.evaluation["num_rows"] == 16 and decision.evaluation["split"] == "test"
    assert sorted(decision.evaluation["trained_on"]["tables"]) == [table1, table2]
    card = registry.get_card("sounds@2")  # trained with the champion's settings on the merged labels
    assert card.params["spec"]["labels_url"] == third["merged_labels_url"]
    assert card.params["spec"]["batch_size"] == 8 and card.params["spec"]["model_overrides"]["lstm_units"] == 16
    merged = pq.read_table(third["merged_labels_url"].removeprefix("file://"))
    assert merged.num_rows == 96 and merged["source"].to_pylist() == sorted(merged["source"].to_pylist())
    assert "**keep**" in decision_markdown(third, str(work / "labels"))
    assert retrain_artifacts()[0].data == decision_markdown(third, str(work / "labels"))

    # the CLI, on the same registry: the state records the kept run, so nothing is new
    from audiopipe.flows.cli import app

    args = ["retrain", str(work / "labels"), "--audio", str(work / "archive"), "--features", str(work / "feat"),
            "--model", f"{work / 'reg'}:sounds", "--holdout", str(work / "holdout.parquet"), "--workers", "1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1",
                                                "AUDIOPIPE_WORK_DIR": str(work / "work")})
    assert result.exit_code == 0, result.output
    assert "up-to-date" in result.stdout and registry.list_versions("sounds") == [1, 2]


@pytest.mark.slow
def test_warm_start_fine_tunes_the_champion_and_refuses_other_classes(tmp_path, prefect_api):
    import numpy as np

    work = tmp_path
    registry, table2 = champion_then_new_batch(work)

    # At a learning rate of 1e-9 no weight moves measurably in one epoch: the challenger still holds exactly
    # what it started from, which must be the champion's weights and normalisation (not a fresh init).
    still = {**TINY, "epochs": 1, "learning_rate": 1e-9}
    second = retrain_on_new_labels(**{**params(work), "warm_start": True, "train_params": still})
    assert second["challenger_version"] == 2
    champion, champion_card = registry.load("sounds@1", work / "cache")
    challenger, card = registry.load("sounds@2", work / "cache")
    for a, b in zip(champion.get_weights(), challenger.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert card.params["spec"]["init_from"] == f"{registry.url}:sounds@1"
    assert card.normalization == champion_card.normalization
    assert second["decision"]["champion_version"] == 1  # judged against the existing champion

    # A new class changes the output layer: the champion's weights cannot be reused, and the error says so.
    relabelled = pq.read_table(table2.removeprefix("file://"))
    labels = relabelled["label"].to_pylist()
    labels[0] = "hiss"
    pq.write_table(relabelled.set_column(relabelled.schema.get_field_index("label"), "label", pa.array(labels)),
                   work / "labels" / "batch-003.parquet")
    with pytest.raises(ConfigError, match="cannot warm start .*classes"):
        retrain_on_new_labels(**{**params(work), "warm_start": True, "train_params": still})


@pytest.mark.slow
def test_better_challenger_replaces_an_existing_champion(tmp_path, prefect_api):
    work = tmp_path
    # A champion that never learned (lr 1e-9: chance level on 8 classes), so a trained challenger must beat it.
    registry, _ = champion_then_new_batch(work, {**TINY, "epochs": 1, "learning_rate": 1e-9})

    trained = {**TINY, "epochs": 4, "learning_rate": 1e-2}  # laid over the champion's settings
    second = retrain_on_new_labels(**{**params(work), "train_params": trained, "margin": 0.05})
    assert second["status"] == "promote" and (second["champion_version"], second["challenger_version"]) == (1, 2)
    assert registry.aliases("sounds") == {"champion": 2}
    decision = registry.list_decisions("sounds")[-1]
    assert decision.champion_metrics == pytest.approx(holdout_metrics(work, f"{registry.url}:sounds@1"))
    assert decision.challenger_metrics == pytest.approx(holdout_metrics(work, f"{registry.url}:sounds@2"))
    assert decision.challenger_metrics["accuracy"] >= decision.champion_metrics["accuracy"] + 0.05
    moves = registry.alias_history("sounds")
    assert [(m["version"], m["previous"]) for m in moves] == [(1, None), (2, 1)]
    assert "**promote**" in decision_markdown(second, str(work / "labels"))
    registry.rollback("sounds", reason="test")  # the previous champion is one step back
    assert registry.aliases("sounds") == {"champion": 1}


@pytest.mark.slow
def test_bad_inputs_fail_before_training(tmp_path, prefect_api):
    work = tmp_path
    land(work, "batch-001", seed=1, n=8)
    shutil.copy(work / "labels" / "batch-001.parquet", work / "holdout.parquet")  # the training labels again
    with pytest.raises(ConfigError, match="also in the training labels"):
        retrain_on_new_labels(**params(work))
    with pytest.raises(ConfigError, match="pass family"):
        retrain_on_new_labels(**{**params(work), "family": None})
    assert not (work / "feat").exists()
    synth("sounds", str(work / "elsewhere"), 4, 3)  # held-out audio outside the archive: never featurized
    shutil.copy(work / "elsewhere" / "labels" / "labels.parquet", work / "holdout.parquet")
    with pytest.raises(ConfigError, match="no manifest row"):
        retrain_on_new_labels(**params(work))
    assert not (work / "reg" / "sounds" / "versions").exists()


@pytest.mark.parametrize("kwargs, needle", [
    ({"model": "/r:sounds@champion"}, "REGISTRY_URL:NAME"),
    ({"model": "sounds"}, "REGISTRY_URL:NAME"),
    ({"margin": -0.1}, "margin"),
    ({"holdout_split": "dev"}, "holdout split"),
    ({"train_params": {"labels_url": "x"}}, "allowed"),
    ({"epochs": 0}, "epochs must be"),
    ({"storage_options": {"secret": "x"}}, "credentials"),
])
def test_request_checks(kwargs, needle):
    with pytest.raises(AudiopipeError, match=needle):
        check_request(**{"model": "/r:sounds", **kwargs})


@pytest.mark.parametrize("extra, needle", [
    (["--model", "classify"], "REGISTRY_URL:NAME"),
    (["--model", "/r:classify", "--train-params", "[1]"], "must be a JSON object"),
    (["--model", "/r:classify", "--margin", "-1"], "margin must be"),
])
def test_cli_user_errors_are_one_paragraph(tmp_path, extra, needle):
    from audiopipe.flows.cli import app

    args = ["retrain", "/l", "--audio", "/a", "--features", "/f", "--holdout", "/h.parquet", *extra]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "AUDIOPIPE_WORK_DIR": str(tmp_path)})
    assert result.exit_code == 2 and needle in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_metric_rule_and_table_diff():
    assert metric_rule("classify", None, None) == ("accuracy", True)
    assert metric_rule("asr", None, None) == ("cer", False)
    assert metric_rule("asr", "wer", None) == ("wer", False)
    with pytest.raises(ConfigError, match="higher_is_better"):
        metric_rule("classify", "num_test", None)
    assert diff_tables({"a": "1", "b": "1", "c": "1"}, {"a": "1", "b": "2", "d": "1"}) == {
        "added": ["d"], "changed": ["b"], "removed": ["c"]}


@pytest.mark.s3
def test_label_tables_on_s3_new_and_changed_are_seen(s3fs_client, bucket):
    """ETag versions, and a listing that sees tables landed since the last one (s3fs caches listings)."""
    from audiopipe.infra.storage import merged_storage_spec
    from audiopipe.tasks.retraining import list_label_tables

    storage = merged_storage_spec({})
    s3fs_client.pipe(f"{bucket}/labels/a.parquet", b"one")
    s3fs_client.pipe(f"{bucket}/labels/_tmp.parquet", b"ignored")
    first = list_label_tables(f"s3://{bucket}/labels", storage)
    assert list(first) == [f"s3://{bucket}/labels/a.parquet"]
    s3fs_client.pipe(f"{bucket}/labels/a.parquet", b"two")
    s3fs_client.pipe(f"{bucket}/labels/sub/b.parquet", b"three")
    second = list_label_tables(f"s3://{bucket}/labels", storage)
    assert diff_tables(first, second) == {"added": [f"s3://{bucket}/labels/sub/b.parquet"],
                                          "changed": [f"s3://{bucket}/labels/a.parquet"], "removed": []}


def test_merge_labels_later_table_wins(tmp_path):
    synth("sounds", str(tmp_path), 8, 1)
    labels = pq.read_table(tmp_path / "labels" / "labels.parquet")
    relabelled = labels.slice(0, 2).set_column(labels.schema.get_field_index("label"), "label",
                                               pa.array(["noise", "noise"]))
    merged, overridden = merge_labels([labels, relabelled])
    assert overridden == 2 and merged.num_rows == labels.num_rows
    rows = {r["source"]: r["label"] for r in merged.to_pylist()}
    assert [rows[s] for s in relabelled["source"].to_pylist()] == ["noise", "noise"]
