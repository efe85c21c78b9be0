"""Flows ``transcribe``, ``classify-audio``, ``separate-sources``: recordings + a registered model -> results.

Plan (resolve the model and verify its checksum, list recordings, repair what a killed run left, skip the
ones this model version already answered) -> load the model once on every Dask worker -> one Prefect task
per shard, its recordings on Dask -> reconcile -> summary artifact. Incremental and exactly-once per model
version: rerun at any time; ``reprocess=True`` redoes every recording. Walkthrough: ``docs/flows/inference.md``.

Every parameter is plain JSON, so the flows deploy as they are (``infra/prefect.yaml``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from audiopipe.flows.safe_flow import safe_flow
from audiopipe.flows.shard_pool import shard_futures
from audiopipe.infra.credentials import refuse_credentials
from audiopipe.infra.errors import ConfigError, ShardsFailedError, StorageError
from audiopipe.infra.runners import dask_client, gpu_workers, num_workers
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, merged_storage_spec, open_fs
from audiopipe.tasks.discover import check_output_writable, list_audio_sources
from audiopipe.tasks.extract import SourceFile, datetime_to_us, source_version
from audiopipe.tasks.infer import TASKS, InferSpec, warm_model
from audiopipe.tasks.infer_layout import ResultLayout, write_model_info
from audiopipe.tasks.infer_run import InferShardResult, infer_shard
from audiopipe.tasks.progress import ProgressEvent, report
from audiopipe.tasks.shards import ShardPlan, plan_shards, read_manifest, reconcile

log = logging.getLogger(__name__)
DEFAULT_WINDOW_S = {"transcribe": 10.0, "separate": 20.0}  # classify uses the model's feature segments
DEFAULT_CONTEXT_S = {"transcribe": 1.0, "classify": 0.0, "separate": 0.5}


@dataclass
class InferSummary:
    """One bulk inference run in numbers (printed by the CLI, published as a Prefect artifact)."""

    task: str = ""
    model: str = ""
    recordings_listed: int = 0
    recordings_skipped: int = 0
    recordings_ok: int = 0
    recordings_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rows_written: int = 0
    shards_written: int = 0
    shards_failed: int = 0
    audio_hours: float = 0.0
    gated_hours: float = 0.0  # transcribe --gate: audio classified as non-speech and not transcribed
    startup_s: float = 0.0
    processing_s: float = 0.0
    wall_s: float = 0.0
    workers: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # worker seconds: decode, features, model, write
    reconciled: dict[str, int] = field(default_factory=dict)

    @property
    def x_realtime(self) -> float:
        return self.audio_hours * 3600 / self.wall_s if self.wall_s else 0.0

    def add(self, result: InferShardResult) -> None:
        self.shards_written += 1
        self.recordings_ok += result.num_ok
        self.rows_written += result.num_rows
        self.audio_hours += result.audio_s / 3600
        self.gated_hours += result.gated_s / 3600
        for reason, n in result.rejected.items():
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + n
            self.recordings_rejected += n
        for key, seconds in result.timings.items():
            self.timings[key] = self.timings.get(key, 0.0) + seconds

    def rows(self) -> list[tuple[str, str]]:
        out = [("model", self.model), ("recordings listed", str(self.recordings_listed)),
               ("skipped (already answered by this model version)", str(self.recordings_skipped)),
               ("ok", str(self.recordings_ok)), ("rejected", str(self.recordings_rejected))]
        out += [(f"  rejected: {reason}", str(n)) for reason, n in sorted(self.rejected_by_reason.items())]
        spent = sum(self.timings.values()) or 1.0
        out += [("audio hours", f"{self.audio_hours:.3f}")]
        if self.gated_hours:
            out += [("gated out (not speech)", f"{self.gated_hours * 3600:,.1f} s "
                                               f"({self.gated_hours / max(self.audio_hours, 1e-12):.0%})")]
        out += [
                ("wall time", f"{self.wall_s:.1f} s (start-up {self.startup_s:.1f} s)"),
                ("x real time", f"{self.x_realtime:,.1f}"), ("workers", str(self.workers)),
                ("result rows written", str(self.rows_written))]
        out += [(f"time in {k.removesuffix('_s')}", f"{v:.1f} s ({v / spent:.0%})")
                for k, v in sorted(self.timings.items())]
        return out

    def to_markdown(self) -> str:
        lines = [f"### {self.task} with {self.model}", "", "| | |", "|---|---|"]
        return "\n".join(lines + [f"| {k} | {v} |" for k, v in self.rows()])

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "x_realtime": self.x_realtime}


@dataclass(frozen=True)
class InferPlan:
    spec: InferSpec
    layout: ResultLayout
    shards: tuple[ShardPlan, ...]
    listed: int
    skipped: int
    reconciled: dict


def model_spec(task_name: str, model: str, storage: StorageSpec, *, in_url: str, work_dir: Path,
               window_s: float | None = None, batch_size: int = 32, decoder: dict | None = None,
               channels: str = "mix", gate: str | None = None, gate_classes: tuple[str, ...] = ("speech",),
               logger=None) -> InferSpec:
    """Resolve ``model`` and download it, verifying its checksum, before any work is planned.

    ``decoder`` (transcribe): ``beam_width``, ``lm_weight``, ``insertion_bonus`` overriding the setting
    stored on the card (``tasks.infer_decode.decoder_fields``); by default the model's LM and beam search.
    ``channels`` (transcribe): ``mix`` (default) or ``split`` (each input channel transcribed on its own).
    ``gate`` (transcribe): a ``classify`` model; only windows whose top class is in ``gate_classes`` are
    transcribed, windows of the gate's segment length (``tasks/infer_gate.py``).

    Raises:
        ConfigError: the model's family does not do this task, or its card lacks a usable feature config.
        IntegrityError: the stored model file does not match its card.
    """
    from audiopipe.models.registry import open_model_ref
    from audiopipe.tasks.infer import CHANNEL_MODES

    if channels not in CHANNEL_MODES or (channels != "mix" and task_name != "transcribe"):
        raise ConfigError(f"--channels must be one of {', '.join(CHANNEL_MODES)} (split: transcribe only), "
                          f"got {channels!r} for {task_name}.")
    registry, ref = open_model_ref(model, storage)
    _, card = registry.fetch(ref, work_dir / "models")  # verifies size and sha256; nothing is loaded yet
    if card.model_family != TASKS[task_name]:
        raise ConfigError(f"{ref.short} is a {card.model_family!r} model; `{task_name}` needs a "
                          f"{TASKS[task_name]!r} model.")
    if task_name != "separate" and "sample_rate" not in card.feature_config:
        raise ConfigError(f"{ref.short}'s card records no full feature config (trained before audiopipe 0.3?); "
                          "retrain it so inference can featurize audio the same way.")
    labels = tuple(card.vocabulary) if task_name == "transcribe" else tuple(card.classes)
    model_cfg = dict(card.params.get("model_config", {}))
    if task_name == "classify":  # the classifier answers per feature segment, the length it was trained on
        window = float(card.feature_config["segment_seconds"])
    else:
        window = window_s or DEFAULT_WINDOW_S[task_name]
    decoding = {}
    if task_name == "transcribe":
        from audiopipe.tasks.infer_decode import decoder_fields

        decoding, note = decoder_fields(card, **(decoder or {}))
        if note:  # a model registered before LMs were stored with it
            (logger or log).warning(note)
        if decoding["lm_file"]:  # verified now, like the model: a damaged LM stops the run before any work
            registry.fetch_file(ref, decoding["lm_file"], work_dir / "models")
    gating = {}
    if gate:
        gating = _gate_fields(gate, tuple(gate_classes), card, storage, in_url=in_url, work_dir=work_dir,
                              batch_size=batch_size, task_name=task_name)
        window = gating["gate"].window_s  # windows are the gate's segments: each is classified, then heard
    return InferSpec(task=task_name, registry_url=registry.url, model_name=ref.name, model_version=ref.version,
                     model_sha256=card.model_sha256, feature_config=dict(card.feature_config), labels=labels,
                     subsample=int(model_cfg.get("subsample", 1)), window_s=window,
                     context_s=DEFAULT_CONTEXT_S[task_name], batch_size=batch_size, in_url=in_url,
                     cache_dir=str(work_dir / "models"), channels=channels, **decoding, **gating)


def _gate_fields(gate: str, classes: tuple[str, ...], card, storage: StorageSpec, *, in_url: str, work_dir: Path,
                 batch_size: int, task_name: str) -> dict:
    """``InferSpec`` fields of ``--gate``: the classify model's own spec (fetched and verified now).

    Raises:
        ConfigError: not transcribe, a class the gate model lacks, or a gate featurizing at another rate.
    """
    if task_name != "transcribe":
        raise ConfigError(f"--gate is for transcribe only, not {task_name}.")
    spec = model_spec("classify", gate, storage, in_url=in_url, work_dir=work_dir, batch_size=batch_size)
    unknown = sorted(set(classes) - set(spec.labels)) if classes else ["(none given)"]
    if unknown:
        raise ConfigError(f"--gate-classes {', '.join(unknown)} not among {spec.model_tag}'s classes "
                          f"({', '.join(spec.labels)}).")
    if spec.features.sample_rate != int(card.feature_config["sample_rate"]):
        raise ConfigError(f"gate {spec.model_tag} featurizes at {spec.features.sample_rate} Hz, the recogniser at "
                          f"{card.feature_config['sample_rate']} Hz; both must hear the same decoded audio.")
    return {"gate": spec, "gate_classes": classes}


@task(name="plan-inference", cache_policy=NO_CACHE)
def plan_inference(task_name: str, in_url: str, out_url: str, model: str, storage: StorageSpec,
                   settings: RunSettings, reprocess: bool, window_s: float | None, batch_size: int,
                   decoder: dict | None = None, channels: str = "mix", gate: str | None = None,
                   gate_classes: tuple[str, ...] = ("speech",)) -> InferPlan:
    logger = get_run_logger()
    check_output_writable(out_url, storage)
    spec = model_spec(task_name, model, storage, in_url=in_url, work_dir=Path(settings.work_dir),
                      window_s=window_s, batch_size=batch_size, decoder=decoder, channels=channels, gate=gate, gate_classes=gate_classes,
                      logger=logger)
    if task_name == "transcribe":
        logger.info("%s: decoding with %s, channels %s, gate %s", spec.model_tag, spec.describe_decoder(),
                    spec.channels, "none" if spec.gate is None else f"{spec.gate.model_tag} keeps "
                    f"{', '.join(spec.gate_classes)}")
    sources = list_audio_sources(in_url, storage)
    fs, root = open_fs(out_url, storage)
    layout = ResultLayout(root, task_name, spec.model_name, spec.model_version)
    spec = _with_stems_url(spec, fs, layout)
    repaired = reconcile(fs, layout)
    write_model_info(out_url, storage, layout, {"model": spec.model_tag, "registry": spec.registry_url,
                                                "model_sha256": spec.model_sha256, "task": task_name,
                                                "feature_config": spec.feature_config, "labels": list(spec.labels),
                                                **({"decoder": spec.describe_decoder()} if task_name == "transcribe"
                                                   else {})})
    pending = sources if reprocess else _pending(sources, fs, layout, spec)
    shards = plan_shards(pending, settings.files_per_shard, by_size=True)  # similar lengths batch together
    logger.info("%s with %s: %d recordings listed, %d already answered, %d to process in %d shards",
                task_name, spec.model_tag, len(sources), len(sources) - len(pending), len(pending), len(shards))
    return InferPlan(spec, layout, tuple(shards), len(sources), len(sources) - len(pending), repaired)


def _with_stems_url(spec: InferSpec, fs, layout: ResultLayout) -> InferSpec:
    if spec.task != "separate":
        return spec
    from dataclasses import replace

    from audiopipe.infra.storage import to_url

    return replace(spec, stems_url=to_url(fs, f"{layout.base}/audio"))


def _pending(sources: list[SourceFile], fs, layout: ResultLayout, spec: InferSpec) -> list[SourceFile]:
    """Recordings without a manifest row for their current version (rejected ones are not retried).

    Raises:
        ConfigError: some recordings were answered by this model version with another ``--channels`` mode
            (the manifest's ``config_hash``, ``InferSpec.result_tag``): a partition holds one answer per
            recording, so this run refuses instead of skipping them as done or silently replacing them.
    """
    done, other = {}, {}
    for row in read_manifest(fs, layout, ["source", "etag", "mtime", "size", "config_hash"]).to_pylist():
        mtime_us = datetime_to_us(row["mtime"]) if row["mtime"] else None
        done[row["source"]] = source_version(row["etag"], mtime_us, row["size"])
        other[row["source"]] = row["config_hash"] if row["config_hash"] != spec.result_tag else None
    clash = [s for s in sources if done.get(s.url) == s.version and other.get(s.url)]
    if clash:
        was = other[clash[0].url]
        raise ConfigError(f"{len(clash)} recordings under {spec.in_url} were already answered here as {was!r} "
                          f"(e.g. {clash[0].url}); this run asks for {spec.result_tag!r}. Pass --reprocess to "
                          "redo every recording this way (replacing those results), or write to another output URL.")
    return [s for s in sources if done.get(s.url) != s.version]


def bulk_inference(task_name: str, in_url: str, out_url: str, model: str, *, reprocess: bool = False,
                   storage_options: dict | None = None, settings: dict | RunSettings | None = None,
                   window_s: float | None = None, batch_size: int = 32, gpu: bool = False,
                   decoder: dict | None = None, channels: str = "mix", gate: str | None = None,
                   gate_classes: tuple[str, ...] = ("speech",)) -> dict:
    """The body shared by the three flows (see their docstrings)."""
    started = time.perf_counter()
    settings = settings if isinstance(settings, RunSettings) else RunSettings(**(settings or {}))
    refuse_credentials(storage_options)  # a deployment's run: refused at deploy time, and here again
    storage = merged_storage_spec(storage_options)
    logger = get_run_logger()
    plan = plan_inference(task_name, in_url, out_url, model, storage, settings, reprocess, window_s, batch_size,
                          decoder, channels, gate, tuple(gate_classes))
    report(ProgressEvent(files_total=sum(len(s.files) for s in plan.shards)))
    summary = InferSummary(task=task_name, model=f"{plan.spec.registry_url}:{plan.spec.model_tag}",
                           recordings_listed=plan.listed, recordings_skipped=plan.skipped, reconciled=plan.reconciled)
    failures: list[str] = []
    if plan.shards:
        with dask_client(settings) as client:
            resources = _resources(client, gpu)
            pids = client.run(warm_model, plan.spec, storage)  # once per worker; fails here on a bad model
            summary.workers = num_workers(client)
            summary.startup_s = time.perf_counter() - started
            logger.info("model %s loaded on %d workers in %.1f s", plan.spec.model_tag, len(pids), summary.startup_s)
            processing = time.perf_counter()
            in_flight = settings.shards_in_flight(summary.workers)
            for shard, future in shard_futures(infer_shard, plan.shards, in_flight, spec=plan.spec, storage=storage,
                                               out_url=out_url, layout=plan.layout, settings=settings,
                                               resources=resources):
                try:
                    summary.add(future.result())
                except StorageError as exc:
                    failures.append(f"shard {shard.shard_id}: {exc}")
            summary.processing_s = time.perf_counter() - processing
    fs, _ = open_fs(out_url, storage)
    summary.reconciled = {k: v + reconcile(fs, plan.layout)[k] for k, v in plan.reconciled.items()}
    summary.shards_failed = len(failures)
    summary.wall_s = time.perf_counter() - started
    create_markdown_artifact(key=f"{task_name}-summary", markdown=summary.to_markdown(),
                             description=f"{task_name} {in_url} -> {out_url}")
    if failures:
        raise ShardsFailedError(f"{len(failures)} of {len(plan.shards)} shards could not be committed after retries "
                                f"(first: {failures[0]}). Committed shards are kept: run the same command again.",
                                summary.to_dict())
    return summary.to_dict()


def _resources(client, gpu: bool) -> dict | None:
    if not gpu:
        return None
    if not gpu_workers(client):
        raise ConfigError("--gpu was asked but no Dask worker advertises a GPU (start workers with "
                          "`dask worker --resources GPU=1`), so nothing would run.")
    return {"GPU": 1}


_RUNNER = ThreadPoolTaskRunner(max_workers=4)


@safe_flow(name="transcribe", task_runner=_RUNNER, validate_parameters=False)
def transcribe_flow(in_url: str, out_url: str, model: str, reprocess: bool = False,
                    storage_options: dict | None = None, settings: dict | None = None,
                    window_s: float | None = None, batch_size: int = 32, gpu: bool = False,
                    beam_width: int | None = None, lm_weight: float | None = None,
                    insertion_bonus: float | None = None, channels: str = "mix", gate: str | None = None,
                    gate_classes: list[str] | None = None) -> dict:
    """Transcribe every recording under ``in_url`` not yet transcribed by this model version.

    Args:
        in_url: Recordings (``s3://bucket/prefix``, ``file:///path``, a path).
        out_url: Results root; rows go to ``transcribe/model=<name>/version=<v>/`` under it.
        model: ``REGISTRY_URL:NAME@ALIAS|VERSION`` of an ``asr`` model, e.g. ``s3://models:asr@champion``.
        reprocess: Redo every recording, even those already answered by this model version.
        storage_options: Non-secret fsspec options; keys come from the environment.
        settings: ``RunSettings`` fields (workers, dask_address, files_per_shard...).
        window_s: Window core length for long recordings (default 10 s, plus 1 s of context each side).
        batch_size: Windows per model call.
        gpu: Run on Dask workers that advertise ``GPU`` (fails if there are none).
        beam_width: CTC prefix beam search width (1 = greedy). Default: the model card's setting (beam
            search with the character LM stored with the model; greedy for a model stored without one).
        lm_weight: Weight of the LM's log-probability (default: the card's, chosen on validation).
        insertion_bonus: Score bonus per character (default: the card's, chosen on validation).
        channels: ``mix`` (default: channels mixed down, ``channel`` null) or ``split`` (each input channel
            transcribed on its own, rows carry ``channel``, files label the speaker; mono counts as channel 0).
            A partition answered in the other mode is refused unless ``reprocess``.
        gate: ``REGISTRY_URL:NAME@ALIAS`` of a ``classify`` model: each window (the gate's segment length) is
            classified first and only those whose top class is in ``gate_classes`` (default ``["speech"]``)
            are transcribed; the rest become rows with empty text and ``gated_as`` set.
    """
    decoder = {k: v for k, v in (("beam_width", beam_width), ("lm_weight", lm_weight),
                                 ("insertion_bonus", insertion_bonus)) if v is not None}
    return bulk_inference("transcribe", in_url, out_url, model, reprocess=reprocess, storage_options=storage_options,
                          settings=settings, window_s=window_s, batch_size=batch_size, gpu=gpu, decoder=decoder,
                          channels=channels, gate=gate, gate_classes=tuple(gate_classes or ("speech",)))


@safe_flow(name="classify-audio", task_runner=_RUNNER, validate_parameters=False)
def classify_flow(in_url: str, out_url: str, model: str, reprocess: bool = False,
                  storage_options: dict | None = None, settings: dict | None = None,
                  batch_size: int = 32, gpu: bool = False) -> dict:
    """Class probabilities per segment and per recording for every recording not yet classified."""
    return bulk_inference("classify", in_url, out_url, model, reprocess=reprocess, storage_options=storage_options,
                          settings=settings, batch_size=batch_size, gpu=gpu)


@safe_flow(name="separate-sources", task_runner=_RUNNER, validate_parameters=False)
def separate_flow(in_url: str, out_url: str, model: str, reprocess: bool = False,
                  storage_options: dict | None = None, settings: dict | None = None,
                  window_s: float | None = None, gpu: bool = False) -> dict:
    """Speech and background stems (FLAC) for every recording not yet separated by this model version."""
    return bulk_inference("separate", in_url, out_url, model, reprocess=reprocess, storage_options=storage_options,
                          settings=settings, window_s=window_s, gpu=gpu)


FLOWS = {"transcribe": transcribe_flow, "classify": classify_flow, "separate": separate_flow}


def run_inference(task_name: str, in_url: str, out_url: str, model: str, *, settings: RunSettings, **kwargs) -> dict:
    """Run one of the flows in this process (what the CLI calls).

    Raises:
        ConfigError: ``storage_options`` hold a credential at any depth (named by key path), checked before
            Prefect starts or stores anything; credentials come from the environment.
    """
    refuse_credentials(kwargs.get("storage_options"))
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return FLOWS[task_name](in_url, out_url, model, settings=settings.model_dump(mode="json"), **kwargs)
