"""Flow ``extract-features``: an audio archive under one URL -> Parquet feature shards under another.

Plan (list inputs, repair what a killed run left, skip what is done) -> fan out one Prefect task per shard
on a thread pool -> each shard runs its files on Dask workers and commits -> reconcile -> summary
artifact. Incremental and resumable: rerun the same command at any time; only new or changed files
are processed. Walkthrough: ``docs/flows/extract_features.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from audiopipe.flows.safe_flow import safe_flow
from audiopipe.flows.shard_pool import shard_futures
from audiopipe.infra.credentials import refuse_credentials
from audiopipe.infra.errors import ShardsFailedError, StorageError
from audiopipe.infra.runners import dask_client, num_workers
from audiopipe.infra.settings import RunSettings, run_settings
from audiopipe.infra.storage import StorageSpec, merged_storage_spec, open_fs
from audiopipe.tasks.discover import check_output_writable, list_audio_sources
from audiopipe.tasks.execute import ShardResult, extract_shard
from audiopipe.tasks.extract import SourceFile, datetime_to_us, source_version, warm_up
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.progress import ProgressEvent, report
from audiopipe.tasks.report import RunSummary, write_report
from audiopipe.tasks.shards import OutputLayout, ShardPlan, plan_shards, read_manifest, reconcile, write_config


@dataclass(frozen=True)
class RunPlan:
    """What a run will do: the shards to write and what was skipped."""

    shards: tuple[ShardPlan, ...]
    files_listed: int
    files_skipped: int
    reconciled: dict


def pending_sources(sources: list[SourceFile], done: dict[str, tuple[str, str]], retry_rejected: bool
                    ) -> list[SourceFile]:
    """Sources without a manifest row for their current version (or rejected ones, if retrying)."""
    out = []
    for s in sources:
        version, status = done.get(s.url, (None, None))
        if version != s.version or (retry_rejected and status == "rejected"):
            out.append(s)
    return out


@task(name="plan-featurize", cache_policy=NO_CACHE)
def plan_featurize(in_url: str, out_url: str, cfg: FeatureConfig, storage: StorageSpec,
                   settings: RunSettings, retry_rejected: bool) -> RunPlan:
    """Check the output, list inputs, repair leftovers and pick the files still to do."""
    logger = get_run_logger()
    check_output_writable(out_url, storage)
    sources = list_audio_sources(in_url, storage)
    fs, root = open_fs(out_url, storage)
    layout = OutputLayout(root, cfg.config_hash)
    repaired = reconcile(fs, layout)
    write_config(fs, layout, cfg)
    manifest = read_manifest(fs, layout, ["source", "etag", "mtime", "size", "status"])
    done = {}
    for row in manifest.to_pylist():
        mtime_us = datetime_to_us(row["mtime"]) if row["mtime"] else None
        done[row["source"]] = (source_version(row["etag"], mtime_us, row["size"]), row["status"])
    pending = pending_sources(sources, done, retry_rejected)
    shards = plan_shards(pending, settings.files_per_shard)
    logger.info("%d audio files listed, %d already done, %d to process in %d shards (config %s)",
                len(sources), len(sources) - len(pending), len(pending), len(shards), cfg.config_hash)
    return RunPlan(tuple(shards), len(sources), len(sources) - len(pending), repaired)


@safe_flow(name="extract-features", task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=False)
def extract_features(in_url: str, out_url: str, feature_config: FeatureConfig | dict | None = None,
                     settings: RunSettings | dict | None = None, storage_options: dict | None = None,
                     report_dir: str | None = None, retry_rejected: bool = False) -> dict:
    """Featurize every audio file under ``in_url`` into Parquet shards under ``out_url``.

    Args:
        in_url: Input archive (``s3://bucket/prefix``, ``file:///path``, a path, ``memory://...``).
        out_url: Output root; features and manifest go to ``features/`` and ``manifest/`` under it.
        feature_config: What to compute (default: 16 kHz log-mel, 80 bands, 30 s segments); a plain dict
            of ``FeatureConfig`` fields too, as deployment parameters arrive as JSON.
        settings: How to execute (workers, Dask address, shard size); a plain dict of ``RunSettings``
            fields too (unset fields come from the worker's ``AUDIOPIPE_*`` environment).
        storage_options: Non-secret fsspec options (``endpoint_url``...); keys come from the environment.
        report_dir: Local folder for an HTML report with example spectrograms.
        retry_rejected: Process rejected files again even if unchanged.

    Returns:
        The run summary as a dict (see ``RunSummary``).
    """
    started = time.perf_counter()
    cfg = _feature_config(feature_config)
    settings = _run_settings(settings)
    refuse_credentials(storage_options)  # a deployment's run: refused at deploy time, and here again
    storage = merged_storage_spec(storage_options)
    logger = get_run_logger()
    plan = plan_featurize(in_url, out_url, cfg, storage, settings, retry_rejected)
    report(ProgressEvent(files_total=sum(len(s.files) for s in plan.shards)))
    summary = RunSummary(files_listed=plan.files_listed, files_skipped=plan.files_skipped,
                         config_hash=cfg.config_hash, reconciled=plan.reconciled)
    failures: list[str] = []
    if plan.shards:
        with dask_client(settings) as client:
            client.run(warm_up, cfg)
            summary.workers = num_workers(client)
            summary.startup_s = time.perf_counter() - started
            logger.info("Dask ready with %d workers in %.1f s", summary.workers, summary.startup_s)
            processing_started = time.perf_counter()
            in_flight = settings.shards_in_flight(summary.workers)
            for plan_item, future in shard_futures(extract_shard, plan.shards, in_flight, cfg=cfg, storage=storage,
                                                   out_url=out_url, settings=settings):
                try:
                    _add_shard(summary, future.result())
                except StorageError as exc:
                    failures.append(f"shard {plan_item.shard_id}: {exc}")
            summary.processing_s = time.perf_counter() - processing_started
    fs, root = open_fs(out_url, storage)
    layout = OutputLayout(root, cfg.config_hash)
    summary.reconciled = {k: v + reconcile(fs, layout)[k] for k, v in plan.reconciled.items()}
    summary.shards_failed = len(failures)
    summary.wall_s = time.perf_counter() - started
    create_markdown_artifact(key="featurize-summary", markdown=summary.to_markdown(),
                             description=f"featurize {in_url} -> {out_url}")
    if report_dir:
        path = write_report(fs, layout, cfg, summary, Path(report_dir))
        logger.info("report written to %s", path)
    if failures:
        raise ShardsFailedError(f"{len(failures)} of {len(plan.shards)} shards could not be committed after retries "
                                f"(first: {failures[0]}). Committed shards are kept: run the same command again "
                                "to finish the rest.", summary.to_dict())
    return summary.to_dict()


def _feature_config(given: FeatureConfig | dict | None) -> FeatureConfig:
    """The flow's ``feature_config`` parameter as a ``FeatureConfig`` (deployments pass JSON dicts)."""
    if isinstance(given, dict):
        return FeatureConfig.from_dict(given)
    return given or FeatureConfig()


def _run_settings(given: RunSettings | dict | None) -> RunSettings:
    """The flow's ``settings`` parameter as ``RunSettings`` (deployments pass JSON dicts)."""
    if not isinstance(given, dict):
        return given or RunSettings()
    return run_settings(given)  # names the bad fields, not a traceback and not their values


def _add_shard(summary: RunSummary, result: ShardResult) -> None:
    summary.shards_written += 1
    summary.files_ok += result.num_ok
    summary.add_rejects(result.rejected)
    summary.rows_written += result.num_rows
    summary.audio_hours += result.audio_s / 3600
    summary.busy_s += result.busy_s


def featurize(in_url: str, out_url: str, *, feature_config: FeatureConfig, settings: RunSettings,
              storage_options: dict | None = None, report_dir: str | None = None,
              retry_rejected: bool = False) -> dict:
    """Run the flow in this process (what the CLI calls).

    Raises:
        ConfigError: ``storage_options`` hold a credential at any depth (named by key path), checked before
            Prefect starts or stores anything; credentials come from the environment.
    """
    refuse_credentials(storage_options)
    # Heartbeats let a Prefect server notice a crashed *deployed* run; an in-process run has its caller
    # watching, and Prefect 3.9 joins the heartbeat thread at exit (~1 s, the whole cost of a no-op rerun).
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return extract_features(in_url, out_url, feature_config=feature_config, settings=settings,
                        storage_options=storage_options, report_dir=report_dir, retry_rejected=retry_rejected)


if __name__ == "__main__":
    import sys

    print(featurize(sys.argv[1], sys.argv[2], feature_config=FeatureConfig(), settings=RunSettings()))
