"""Flow ``retrain-on-new-labels``: new LABELS_V1 tables under a prefix -> a challenger judged on a fixed held-out set.

In: a prefix of label tables (new ones land there over time), the audio archive they point into, the
featurize output root, a registered model (``REGISTRY_URL:NAME``) and a fixed held-out labels table.
Out: nothing when no table is new or changed; otherwise a new model version trained on every table, a
recorded champion/challenger decision (promoted only when better by ``margin`` on the held-out set), the
retrain state and a markdown artifact.

Steps: list the tables and compare them with ``REG/NAME/retrain/state.json`` (what the last successful run
trained on) -> nothing new: artifact, return -> merge every table into ``REG/NAME/retrain/labels/`` ->
featurize the archive with the champion's feature config (incremental: only new audio) -> train with the
champion's ``TrainSpec`` on a Dask worker (the ``train-model`` subflow) -> evaluate champion and challenger
on the held-out table -> ``compare_and_promote`` -> write the state. Contract: ``docs/registry.md``
("Retraining").
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from audiopipe.flows.extract_features import featurize
from audiopipe.flows.safe_flow import safe_flow
from audiopipe.flows.train_model import train_model_flow
from audiopipe.infra.errors import ConfigError
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, join, merged_storage_spec
from audiopipe.models.data import open_shard_set
from audiopipe.models.registry import CHAMPION, ModelCard, Registry
from audiopipe.tasks.evaluation import evaluate_registered
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.retraining import (DEFAULT_METRIC, RETRAIN_DIR, STATE_FILE, RetrainRequest, challenger_spec,
                                        check_holdout, check_request, decision_markdown, diff_tables, inputs_key,
                                        list_label_tables, load_labels, merge_labels, metric_rule, read_state,
                                        write_bytes, write_state)


@task(name="evaluate-on-holdout", cache_policy=NO_CACHE)
def evaluate_on_holdout(model_ref: str, features_url: str, holdout_url: str, storage: StorageSpec, split: str,
                        cache_dir: str) -> dict:
    """``evaluate_registered`` on the held-out table: the metrics a decision compares."""
    return evaluate_registered(model_ref, features_url, holdout_url, storage, split=split,
                               cache_dir=cache_dir)["metrics"]


@safe_flow(name="retrain-on-new-labels")
def retrain_on_new_labels(labels_url: str, audio_url: str, features_url: str, model: str,
                          holdout_labels_url: str, margin: float = 0.0, metric: str | None = None,
                          higher_is_better: bool | None = None, holdout_split: str = "test",
                          epochs: int | None = None, warm_start: bool = False, family: str | None = None,
                          feature_config: dict | None = None, train_params: dict | None = None,
                          storage_options: dict | None = None, settings: dict | None = None) -> dict:
    """Retrain ``model`` when label tables under ``labels_url`` are new or changed; promote only if better.

    Args:
        labels_url: Prefix of LABELS_V1 Parquet tables (every ``*.parquet`` below it), or one table.
        audio_url: The audio archive the labels point into (held-out audio included).
        features_url: Featurize output root; the champion's feature partition is brought up to date there.
        model: ``REGISTRY_URL:NAME``; the ``champion`` alias is the model to beat.
        holdout_labels_url: A fixed LABELS_V1 table disjoint from training; both models are scored on it.
        margin: Promote only if the challenger beats the champion by at least this (metric units).
        metric: Decision metric (default: ``accuracy`` for classify, ``cer`` for asr).
        higher_is_better: Needed only for a metric whose direction is not known.
        holdout_split: Rows of the held-out table to score.
        epochs: Maximum epochs (default: the champion's).
        warm_start: Start the challenger from the champion's weights and normalisation (fine-tuning) instead
            of from scratch. Needs the same classes (classify) and architecture; the first model (no
            champion yet) is trained from scratch.
        family: ``classify`` or ``asr``, for the first model (no champion yet); default: the model name
            when it is one of those (``audiopipe train`` names models after their family).
        feature_config: ``FeatureConfig`` fields for the first model (later ones keep the champion's).
        train_params: ``TrainSpec`` fields (``TUNABLE``) laid over the champion's (``batch_size``...).
        storage_options: Non-secret fsspec options; keys come from the environment.
        settings: ``RunSettings`` fields (workers, dask_address, work_dir...); training uses one worker.

    Returns:
        ``{"status": "up-to-date" | "promote" | "keep", "model", "champion_version", "challenger_version",
        "tables", "changes", "decision", "merged_labels_url", "files_featurized", "state_url"}``.
    """
    logger = get_run_logger()
    req = check_request(model, margin=margin, metric=metric, higher_is_better=higher_is_better,
                        holdout_split=holdout_split, epochs=epochs, train_params=train_params,
                        storage_options=storage_options)
    run_settings = RunSettings(**(settings or {}))
    storage = merged_storage_spec(storage_options)
    registry = Registry(req.registry_url, storage)
    champion = registry.aliases(req.name).get(CHAMPION)
    card = registry.get_card(f"{req.name}@{champion}") if champion is not None else None
    family = _family(card, family, req.name)
    cfg = _feature_config(card, feature_config)
    rule = metric_rule(family, req.metric, req.higher_is_better)
    state_url = join(registry.url, req.name, RETRAIN_DIR, STATE_FILE)
    tables = list_label_tables(labels_url, storage)
    changes = diff_tables(read_state(state_url, storage).get("tables", {}), tables)
    result = {"model": req.name, "champion_version": champion, "challenger_version": None, "tables": tables,
              "changes": changes, "decision": None, "merged_labels_url": None, "files_featurized": 0,
              "state_url": state_url}
    if champion is not None and not any(changes.values()):
        logger.info("no new or changed label tables under %s (%d known); nothing to train", labels_url, len(tables))
        result["status"] = "up-to-date"
        _publish(result, labels_url)
        return result
    logger.info("label tables %s; champion %s", {k: len(v) for k, v in changes.items()},
                f"v{champion}" if champion is not None else "none (the first model is trained and promoted)")
    merged_url, evaluation = _prepare_labels(registry, req, tables, holdout_labels_url, card, family, storage)
    summary = featurize(audio_url, features_url, feature_config=cfg, settings=run_settings,
                        storage_options=storage_options)
    open_shard_set(features_url, cfg.config_hash, holdout_labels_url, storage)  # held-out audio featurized?
    champion_ref = f"{registry.url}:{req.name}@{champion}" if champion is not None else None
    init = {"init_from": champion_ref} if warm_start and champion_ref else {}
    spec = challenger_spec(card, family, req.train_params, features_url=features_url, labels_url=merged_url,
                           registry_url=registry.url, config_hash=cfg.config_hash, model_name=req.name,
                           work_dir=str(run_settings.work_dir), **init)
    logger.info("challenger starts from %s", f"the champion's weights ({champion_ref})" if init else "scratch")
    trained = train_model_flow(spec, run_settings.model_copy(update={"workers": 1}), storage_options)
    challenger = registry.resolve(trained["model_ref"])
    cache = str(Path(run_settings.work_dir) / "models")
    scores = {ref: evaluate_on_holdout(ref, features_url, holdout_labels_url, storage, req.holdout_split, cache)
              for ref in (champion_ref, str(challenger)) if ref}
    decision = registry.compare_and_promote(
        req.name, challenger.version, metric=rule[0], higher_is_better=rule[1], margin=req.margin,
        champion_metrics=scores.get(champion_ref), challenger_metrics=scores[str(challenger)],
        evaluation={**evaluation, "features_url": features_url, "config_hash": cfg.config_hash})
    write_state(state_url, storage, labels_url, tables, merged_url, decision.to_dict(), _flow_run_id())
    logger.info("decision: %s (%s)", decision.decision, decision.reason)
    result.update(status=decision.decision, challenger_version=challenger.version, decision=decision.to_dict(),
                  merged_labels_url=merged_url, files_featurized=summary.get("files_ok", 0))
    _publish(result, labels_url)
    return result


def _prepare_labels(registry: Registry, req: RetrainRequest, tables: Mapping[str, str], holdout_url: str,
                    card: ModelCard | None, family: str, storage: StorageSpec) -> tuple[str, dict]:
    """Merge every table, check the held-out set against it, publish the merged table.

    Returns:
        The merged table's URL and the ``evaluation`` record of the held-out set (for the decision).
    """
    merged, overridden = merge_labels([load_labels(url, storage)[0] for url in tables])
    holdout, holdout_sha = load_labels(holdout_url, storage)
    num_rows = check_holdout(holdout, merged, req.holdout_split, _classes(family, card, merged))
    merged_url = join(registry.url, req.name, RETRAIN_DIR, "labels", f"labels-{inputs_key(tables)}.parquet")
    buf = io.BytesIO()
    pq.write_table(merged, buf)
    write_bytes(merged_url, storage, buf.getvalue())
    get_run_logger().info("merged %d tables into %s (%d rows, %d overridden by a later table)", len(tables),
                          merged_url, merged.num_rows, overridden)
    return merged_url, {"labels_url": holdout_url, "labels_sha256": holdout_sha, "split": req.holdout_split,
                        "num_rows": num_rows, "flow_run_id": _flow_run_id(),
                        "trained_on": {"merged_labels_url": merged_url, "tables": dict(tables)}}


def _family(card: ModelCard | None, given: str | None, name: str) -> str:
    if card is not None:
        if given and given != card.model_family:
            raise ConfigError(f"family {given!r} differs from the champion's ({card.model_family!r}).")
        return card.model_family
    family = given or (name if name in DEFAULT_METRIC else None)  # as `audiopipe train` names models
    if not family:
        raise ConfigError("there is no champion yet: pass family (classify or asr) for the first model "
                          "(or name the model after its family).")
    return family


def _feature_config(card: ModelCard | None, given: dict | None) -> FeatureConfig:
    if card is None:
        return FeatureConfig.from_dict(given or {})
    cfg = FeatureConfig.from_dict(dict(card.feature_config))
    if given and FeatureConfig.from_dict(given) != cfg:
        raise ConfigError(f"feature_config differs from the champion's ({cfg.to_dict()}); a retrain keeps the "
                          "champion's features. Train a new model to change them.")
    return cfg


def _classes(family: str, card: ModelCard | None, merged: pa.Table) -> list[str] | None:
    """Classes both models can score (classify): the champion's and the new labels' in common."""
    if family != "classify":
        return None
    found = {c for c in merged["label"].to_pylist() if c}
    return sorted(found & set(card.classes)) if card is not None else sorted(found)


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def _publish(result: Mapping, labels_url: str) -> None:
    name = result["model"]
    create_markdown_artifact(key=f"retrain-{name.replace('_', '-')}", markdown=decision_markdown(result, labels_url),
                             description=f"retrain {name}: {result['status']}")


if __name__ == "__main__":
    import sys

    # python -m audiopipe.flows.retrain LABELS_PREFIX AUDIO_URL FEATURES_URL REGISTRY:NAME HOLDOUT_TABLE
    print(retrain_on_new_labels(*sys.argv[1:6], family="classify", train_params={"epochs": 2}))
