"""Bulk inference, one shard: run its recordings on Dask, stitch long ones, write results, commit.

In: a ``ShardPlan`` (recordings), an ``InferSpec``. Out: an ``InferShardResult`` (counts and timings). Small
recordings travel to Dask in groups (their windows are batched together on the worker); recordings above
``PROBE_MIN_BYTES`` are probed and cut into chunks of ``CHUNK_WINDOWS`` windows, stitched back here by their
global frame index. A worker death follows featurize's rule: the item's recordings are retried one at a
time, and only a recording that kills a worker every time is rejected ("worker crash").
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from distributed import Client, Future, KilledWorker, get_client
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from audiopipe.infra.errors import AudiopipeError
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, is_transient, open_fs, write_bytes_atomic
from audiopipe.tasks.audio_io import AudioInfo, num_segments
from audiopipe.tasks.execute import (_SUSPECT_LOCK, CRASH_CATEGORY, PROBE_MIN_BYTES, failure_reason, header_columns,
                                     in_completion_order, probe_files, reject_category, retry_if_transient)
from audiopipe.tasks.extract import Rejection, SourceFile, us_to_datetime
from audiopipe.tasks.infer import InferItem, InferOutput, InferSpec, infer_item
from audiopipe.tasks.infer_layout import ResultLayout, class_rows, relative_source, stem_rows, table_of
from audiopipe.tasks.progress import ProgressEvent, report
from audiopipe.tasks.shards import ShardPlan, commit_intent, manifest_table, now_utc, write_table_atomic

log = logging.getLogger(__name__)

CHUNK_WINDOWS = 12  # windows per Dask item of a long recording (~2 min at 10 s windows)
# Small recordings per item, up to about this many bytes or recordings: full batches on the worker (measured
# +23% throughput over 4 MiB / 32, as the model ran half-empty batches of ~11 windows).
GROUP_BYTES = 16 * 1024 * 1024
GROUP_FILES = 64
WINDOW_PER_SHARD = 3  # items in flight per shard


@dataclass
class InferShardResult:
    shard_id: str
    num_files: int = 0
    num_ok: int = 0
    num_rows: int = 0
    audio_s: float = 0.0
    gated_s: float = 0.0  # transcribe --gate: audio seconds classified as non-speech, not transcribed
    wall_s: float = 0.0
    timings: Counter = field(default_factory=Counter)  # decode_s, features_s, model_s, write_s
    rejected: Counter = field(default_factory=Counter)

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())


@dataclass
class _State:
    source: SourceFile
    pending: int = 0
    reason: str | None = None
    info: AudioInfo | None = None
    audio_s: float = 0.0
    outputs: list[InferOutput] = field(default_factory=list)
    words: dict | None = None  # transcribe, a long recording: decoded here from its chunks' frames, per channel


def item_key(item: InferItem, spec: InferSpec) -> str:
    blob = "\n".join(f"{s.url}\t{s.version}" for s in item.sources) + f"\t{item.first}\t{spec.result_tag}"
    return f"{spec.task}-" + hashlib.sha1(blob.encode()).hexdigest()[:24]


def plan_items(client: Client, files: tuple[SourceFile, ...], spec: InferSpec, storage: StorageSpec,
               states: dict[str, _State]) -> list[InferItem]:
    """Groups of small recordings; chunks of windows of large ones (probed on a worker first). Recordings
    rejected at discovery or by their probe get their reason (and header) in ``states`` and no item."""
    chunked = spec.task != "separate"  # separation streams one recording per item, start to end
    large = [f for f in files if f.size > PROBE_MIN_BYTES and not f.rejected] if chunked else []
    probes = probe_files(client, large, storage, lambda f: item_key(InferItem((f,)), spec))
    core_s = spec.window_s  # transcribe: the window core; classify: the model's feature segment
    items, group, group_bytes = [], [], 0
    for f in sorted(files, key=lambda f: f.size):
        probed = Rejection(f.rejected) if f.rejected else probes.get(f.url)
        if isinstance(probed, Rejection):
            states[f.url].reason, states[f.url].info = probed.reason, probed.info
            continue
        if probed is not None:
            total = num_segments(probed, core_s)
            items += [InferItem((f,), first, min(first + CHUNK_WINDOWS, total))
                      for first in range(0, total, CHUNK_WINDOWS)]
            continue
        if not chunked:
            items.append(InferItem((f,)))
            continue
        group.append(f)
        group_bytes += f.size
        if group_bytes >= GROUP_BYTES or len(group) >= GROUP_FILES:
            items.append(InferItem(tuple(group)))
            group, group_bytes = [], 0
    if group:
        items.append(InferItem(tuple(group)))
    return items


def _resolve(item: InferItem, future: Future) -> list[InferOutput] | None:
    """The item's outputs; None when its worker died (the caller retries its recordings alone).

    A failure is otherwise judged as in featurize (``execute.failure_reason``), with one difference: an
    ``AudiopipeError`` raised by the item itself means the model cannot be used (checksum, registry), so it
    stops the run instead of rejecting every recording.

    Raises:
        Exception: the item has no answer because the client cancelled it or is closing (Ctrl-C, the flow
            stopping); its error is re-raised so the shard does not commit. A rejection is never retried.
        TransientStorageError: the store failed, not the recording (the shard is retried).
    """
    try:
        return future.result()
    except KilledWorker:
        future.release()
        return None
    except Exception as exc:
        if future.status == "error" and isinstance(exc, AudiopipeError) and not is_transient(exc):
            future.release()
            raise
        reason = failure_reason(future, exc, item.sources[0].url)
        return [InferOutput(s.url, reason=reason) for s in item.sources]


def _run(client: Client, items: list[InferItem], spec: InferSpec, storage: StorageSpec, window: int,
         resources: dict | None):
    attempt = uuid.uuid4().hex[:8]

    def submit(item: InferItem) -> Future:
        return client.submit(infer_item, item, spec, storage, key=f"{item_key(item, spec)}-{attempt}", retries=0,
                             resources=resources)

    for item, future in in_completion_order(items, submit, window):
        yield item, _resolve(item, future)


def run_infer_shard(client: Client, plan: ShardPlan, spec: InferSpec, storage: StorageSpec, out_url: str,
                    layout: ResultLayout, resources: dict | None = None) -> InferShardResult:
    """Infer every recording of ``plan``, write its results and side files, then commit its manifest part.

    Raises:
        TransientStorageError: the store failed; nothing of this shard is committed, so a retry redoes it.
    """
    started = time.perf_counter()
    states = {f.url: _State(f) for f in plan.files}
    items = plan_items(client, plan.files, spec, storage, states)
    for item in items:
        for s in item.sources:
            states[s.url].pending += 1
    for state in states.values():
        if state.reason is not None:
            report(ProgressEvent(files=1, rejected=1))
    suspects: list[InferItem] = []
    for item, outputs in _run(client, items, spec, storage, WINDOW_PER_SHARD, resources):
        if outputs is None:
            suspects += [InferItem((s,), item.first, item.stop) for s in item.sources]
            continue
        _absorb(states, outputs)
    for suspect in suspects:  # alone, one at a time in the whole process: bystanders succeed
        with _SUSPECT_LOCK:
            for item, outputs in _run(client, [suspect], spec, storage, 1, resources):
                _absorb(states, outputs or [InferOutput(
                    s.url, reason=f"{CRASH_CATEGORY}: the worker process died every time it processed this "
                                  "recording (crash or out of memory); quarantined") for s in item.sources])
    _decode_chunked(states, spec, storage)
    return _commit(plan, states, spec, storage, out_url, layout, started)


def _decode_chunked(states: dict[str, _State], spec: InferSpec, storage: StorageSpec) -> None:
    """Long recordings come back as chunks of CTC frames: join and decode each here, as one sequence (so
    no word is cut or repeated at a chunk edge). Whole recordings were decoded on their worker."""
    if spec.task != "transcribe":
        return
    from audiopipe.tasks.infer_channels import pieces_by_channel
    from audiopipe.tasks.infer_decode import decode_recording, loaded_decoder

    for state in states.values():
        pieces = pieces_by_channel(state.outputs)
        if state.reason is not None or not pieces:
            continue
        started = time.perf_counter()
        try:
            state.words = {ch: decode_recording(p, spec, loaded_decoder(spec, storage)) for ch, p in pieces.items()}
        except ValueError as exc:
            state.reason = f"processing failed: {exc}"
        state.outputs[0].timings["ctc_s"] += time.perf_counter() - started


def _absorb(states: dict[str, _State], outputs: list[InferOutput]) -> None:
    for out in outputs:
        state = states[out.source]
        state.pending -= 1
        state.info = state.info or out.info
        if out.reason is not None:
            state.reason = state.reason or out.reason
        else:
            state.outputs.append(out)
            state.audio_s += out.audio_s
        if state.pending == 0:
            if state.reason is None and not any(o.windows for o in state.outputs):
                state.reason = "empty: no audio samples"
            report(ProgressEvent(files=1, audio_s=state.audio_s if state.reason is None else 0.0,
                                 rejected=int(state.reason is not None)))


def _commit(plan: ShardPlan, states: dict[str, _State], spec: InferSpec, storage: StorageSpec, out_url: str,
            layout: ResultLayout, started: float) -> InferShardResult:
    fs, _ = open_fs(out_url, storage)
    result = InferShardResult(plan.shard_id, num_files=len(states))
    t0 = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    for url, state in states.items():
        for out in state.outputs:
            result.timings.update(out.timings)
        if state.reason is not None:
            continue
        try:
            counts[url] = _results_of(state, spec, fs, layout, rows)
        except ValueError as exc:  # e.g. a recording whose windows produced nothing usable
            state.reason = f"processing failed: {exc}"
    shard_rel = None
    with commit_intent(fs, layout, plan.shard_id) as published:  # other runs' reconcile keeps the parts
        for table, table_rows in rows.items():
            part = layout.part(table, plan.shard_id)
            write_table_atomic(fs, part, table_of(spec.task, table, table_rows))
            published.append(part)
            shard_rel = shard_rel or layout.relative(part)
            result.num_rows += len(table_rows) if table != "recordings" else 0
        manifest = [_manifest_row(s, spec, counts.get(url, 0), shard_rel) for url, s in states.items()]
        write_table_atomic(fs, layout.manifest_part(plan.shard_id), manifest_table(manifest))
    result.timings["write_s"] += time.perf_counter() - t0
    for state in states.values():
        if state.reason is None:
            result.num_ok += 1
            result.audio_s += state.audio_s
            result.gated_s += sum(g[3] for o in state.outputs for g in o.gated if not g[0])  # each second once
        else:
            result.rejected[reject_category(state.reason)] += 1
    result.wall_s = time.perf_counter() - started
    return result


def _results_of(state: _State, spec: InferSpec, fs, layout: ResultLayout, rows: dict[str, list[dict]]) -> int:
    """Add the recording's result rows to ``rows`` (and write its side files); returns its segment count."""
    url, tag, version = state.source.url, spec.model_tag, spec.model_version
    if spec.task == "transcribe":
        from audiopipe.tasks.infer_channels import transcript_results, words_by_channel
        from audiopipe.tasks.infer_gate import gated_spans

        words = state.words if state.words is not None else words_by_channel(state.outputs)
        gated = gated_spans([g for o in state.outputs for g in o.gated])
        transcripts, files = transcript_results(url, words, tag, version, gated)
        rel = relative_source(spec.in_url, url)
        for suffix, data in files.items():
            write_bytes_atomic(fs, layout.side_file("files", rel, suffix), data)
        rows.setdefault("transcripts", []).extend(transcripts)
        return len(transcripts)
    if spec.task == "classify":
        windows = sorted((w for o in state.outputs for w in o.classes), key=lambda w: w[0])
        segments, recording = class_rows(url, windows, spec.labels, tag, version)
        rows.setdefault("segments", []).extend(segments)
        rows.setdefault("recordings", []).append(recording)
        return len(segments)
    stems = {k: v for o in state.outputs for k, v in o.stems.items()}
    rate = int(spec.feature_config["sampling_rate"])
    rows.setdefault("stems", []).extend(stem_rows(url, stems, state.audio_s, rate, tag, version))
    return len(stems)


def _manifest_row(state: _State, spec: InferSpec, n_segments: int, shard: str | None) -> dict:
    from audiopipe.infra.version import audiopipe_version

    f, ok = state.source, state.reason is None
    return {
        "source": f.url, "size": f.size, "etag": f.etag,
        "mtime": None if f.mtime_us is None else us_to_datetime(f.mtime_us),
        "status": "ok" if ok else "rejected", "reason": state.reason,
        **header_columns(state.info, state.audio_s if ok else None),
        "n_segments": n_segments if ok else 0, "shard": shard if ok else None,
        "config_hash": spec.result_tag, "audiopipe_version": audiopipe_version(), "processed_at": now_utc(),
    }


# ---- Prefect wrapper ------------------------------------------------------------------------------------

@task(name="infer-shard", retries=4, retry_delay_seconds=exponential_backoff(2), retry_jitter_factor=0.5,
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def infer_shard(plan: ShardPlan, spec: InferSpec, storage: StorageSpec, out_url: str, layout: ResultLayout,
                settings: RunSettings, resources: dict | None = None) -> InferShardResult:
    """Prefect task: one shard of recordings, executed on the Dask client of the calling flow."""
    logger = get_run_logger()
    result = run_infer_shard(get_client(), plan, spec, storage, out_url, layout, resources)
    logger.info("shard %s: %d recordings (%d ok, %d rejected), %.1f min of audio, %d rows in %.1f s",
                plan.shard_id, result.num_files, result.num_ok, result.num_rejected, result.audio_s / 60,
                result.num_rows, result.wall_s)
    return result
