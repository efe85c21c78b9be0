"""Stage 4 of featurize: run one shard's files on Dask and commit the shard; thin Prefect task wrappers.

In: a ``ShardPlan``. Out: a small ``ShardResult`` (counts and timings, never arrays). Prefect sees one
task per shard; the files inside go to Dask as plain functions (one task per file, or per 10-minute
chunk of a long file), consumed in order through a bounded window so the driver's memory stays flat.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from distributed import Client, Future, KilledWorker, as_completed, get_client
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from audiopipe.infra.errors import TransientStorageError
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, is_transient, open_fs
from audiopipe.tasks.audio_io import AudioInfo, num_segments
from audiopipe.tasks.extract import (ItemResult, Rejection, SourceFile, WorkItem, featurize_item, probe_item,
                                     us_to_datetime)
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.progress import ProgressEvent, report
from audiopipe.tasks.shards import (FeaturePartWriter, OutputLayout, ShardPlan, commit_intent, manifest_table,
                                   now_utc, write_table_atomic)

log = logging.getLogger(__name__)

CHUNK_SECONDS = 120.0  # files above PROBE_MIN_BYTES are split into Dask tasks of ~2 minutes of audio
PROBE_MIN_BYTES = 4 * 1024 * 1024  # ~2 min of 16 kHz 16-bit WAV; smaller files are one task each
WINDOW_PER_SHARD = 4   # items in flight per shard
CRASH_CATEGORY = "worker crash"
# Items whose worker died are retried one at a time across all shards of this process, so a file that
# only shared a worker with a crashing file is never quarantined with it.
_SUSPECT_LOCK = threading.Lock()


@dataclass
class ShardResult:
    """What one committed shard reports back to the flow."""

    shard_id: str
    num_files: int = 0
    num_ok: int = 0
    num_rows: int = 0
    audio_s: float = 0.0
    busy_s: float = 0.0
    wall_s: float = 0.0
    rejected: Counter = field(default_factory=Counter)  # reason category -> count

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())


@dataclass
class _FileState:
    source: SourceFile
    info: AudioInfo | None = None
    reason: str | None = None
    segments: int = 0
    audio_s: float = 0.0
    busy_s: float = 0.0
    pending_items: int = 0


def item_key(item: WorkItem) -> str:
    """Stable Dask key prefix of an item: ``featurize-<sha1(url, version, first segment)>``.

    Submissions append a per-attempt token: Dask would otherwise hand a retried shard the cached error
    of its failed attempt while anything (a Prefect state's traceback) still holds the old future.
    """
    blob = f"{item.source.url}\t{item.source.version}\t{item.first}".encode()
    return "featurize-" + hashlib.sha1(blob).hexdigest()[:24]


def reject_category(reason: str) -> str:
    """The category of a rejection reason: the words before the first colon."""
    return reason.split(":", 1)[0].strip()


def _plan_items(client: Client, files: tuple[SourceFile, ...], cfg: FeatureConfig, storage: StorageSpec,
                states: dict[str, _FileState]) -> list[WorkItem]:
    """One item per small file; larger files are probed (on a worker) and cut into chunks of segments,
    so items are of similar size and both workers stay busy to the end. Files rejected at discovery or by
    their probe get their reason (and header) in ``states`` and no item."""
    large = [f for f in files if f.size > PROBE_MIN_BYTES and not f.rejected]
    probes = probe_files(client, large, storage, lambda f: item_key(WorkItem(f)))
    per_chunk = max(1, int(CHUNK_SECONDS // cfg.segment_seconds))
    items: list[WorkItem] = []
    for f in files:
        probed = Rejection(f.rejected) if f.rejected else probes.get(f.url)
        if isinstance(probed, Rejection):
            states[f.url].reason, states[f.url].info = probed.reason, probed.info
            continue
        if probed is None:
            items.append(WorkItem(f))
            continue
        total = num_segments(probed, cfg.segment_seconds)
        items.extend(WorkItem(f, first, min(first + per_chunk, total)) for first in range(0, total, per_chunk))
    return items


def in_completion_order(items: list, submit: Callable[[object], Future],
                        window: int) -> Iterator[tuple[object, Future]]:
    """Keep ``window`` items in flight (``submit(item)`` starts one); yield ``(item, future)`` as each finishes.

    Completion order, not submission order: a long item never holds back the short ones behind it.
    """
    todo = iter(items)
    submitted: dict[str, object] = {}
    running = as_completed()

    def submit_next() -> None:
        item = next(todo, None)
        if item is not None:
            future = submit(item)
            submitted[future.key] = item
            running.add(future)

    for _ in range(window):
        submit_next()
    try:
        for future in running:
            item = submitted.pop(future.key)
            submit_next()
            yield item, future
    finally:
        for future in list(running.futures):
            future.cancel()


def _results(client: Client, items: list[WorkItem], cfg: FeatureConfig, storage: StorageSpec,
             window: int) -> Iterator[tuple[WorkItem, ItemResult]]:
    """Featurize ``items`` on Dask, ``window`` at a time; yield each result as it completes."""
    attempt = uuid.uuid4().hex[:8]

    def submit(item: WorkItem) -> Future:
        return client.submit(featurize_item, item, cfg, storage, key=f"{item_key(item)}-{attempt}", retries=0)

    for item, future in in_completion_order(items, submit, window):
        yield item, _resolve(item, future)


def probe_files(client: Client, files: list[SourceFile], storage: StorageSpec,
                key_of: Callable[[SourceFile], str]) -> dict[str, AudioInfo | Rejection]:
    """``probe_item`` of each file, run on the workers: url -> its header, or why it is rejected.

    A file whose probe kills its worker every time (``KilledWorker``) is rejected as a worker crash, like a
    file that crashes featurizing, instead of failing the whole shard.
    """
    attempt = uuid.uuid4().hex[:8]  # fresh keys: Dask would hand back a cached error for a retried shard
    futures = {f.url: client.submit(probe_item, f, storage, key=f"probe-{key_of(f)}-{attempt}") for f in files}
    probes: dict[str, AudioInfo | Rejection] = {}
    for url, future in futures.items():
        try:
            probes[url] = future.result()
        except Exception as exc:
            probes[url] = Rejection(failure_reason(future, exc, url, doing="probed"))
    return probes


def failure_reason(future: Future, exc: Exception, url: str, *, doing: str = "processed") -> str:
    """The rejection reason for a file whose work ``future`` raised ``exc`` on a worker.

    Raises:
        TransientStorageError: the store failed, not the file (the shard is retried).
        Exception: ``exc`` itself when it is not the file's failure: the client cancelled the task or is
            closing (Ctrl-C, the flow stopping). Re-raised so the shard does not commit, since a rejection
            is never retried.
    """
    if isinstance(exc, KilledWorker):
        future.release()
        return (f"{CRASH_CATEGORY}: the worker process died every time it {doing} this file "
                "(crash or out of memory); quarantined")
    if future.status != "error":  # not the item's own failure: cancelled, or the client shutting down
        raise exc
    future.release()
    if is_transient(exc):
        raise TransientStorageError(f"storage failed while reading {url}: {exc}") from exc
    log.error("unexpected error processing %s", url, exc_info=exc)
    return f"processing failed: {type(exc).__name__}: {exc}"


def _resolve(item: WorkItem, future: Future) -> ItemResult:
    """The item's result, or its rejection when it failed on a worker (see ``failure_reason``)."""
    try:
        return future.result()
    except Exception as exc:
        return ItemResult(item.source.url, reason=failure_reason(future, exc, item.source.url))


def run_shard(client: Client, plan: ShardPlan, cfg: FeatureConfig, storage: StorageSpec, out_url: str,
              scratch_dir: str) -> ShardResult:
    """Featurize every file of ``plan`` on Dask, publish its features part, then commit its manifest part.

    Raises:
        TransientStorageError: when the store failed; nothing of this shard is committed, so a retry redoes it.
    """
    started = time.perf_counter()
    fs, root = open_fs(out_url, storage)
    layout = OutputLayout(root, cfg.config_hash)
    states = {f.url: _FileState(f) for f in plan.files}
    items = _plan_items(client, plan.files, cfg, storage, states)
    for item in items:
        states[item.source.url].pending_items += 1
    for state in states.values():
        if state.reason is not None:  # rejected by the probe: no item will run for it
            report(ProgressEvent(files=1, rejected=1))
    writer = FeaturePartWriter(scratch_dir)
    try:
        suspects = []
        for item, result in _results(client, items, cfg, storage, WINDOW_PER_SHARD):
            if result.reason and result.reason.startswith(CRASH_CATEGORY):
                suspects.append(item)  # maybe only a bystander of the file that crashed the worker
                continue
            _absorb_and_report(states[item.source.url], result, writer)
        # One suspect at a time in the whole run: a bystander succeeds, the real poison crashes again.
        for suspect in suspects:
            with _SUSPECT_LOCK:
                for item, result in _results(client, [suspect], cfg, storage, window=1):
                    _absorb_and_report(states[item.source.url], result, writer)
        drop = {url for url, s in states.items() if s.reason is not None}
        part = layout.features_part(plan.shard_id)
        with commit_intent(fs, layout, plan.shard_id) as published:  # other runs' reconcile keeps the part
            num_rows = 0
            if any(s.reason is None for s in states.values()):
                num_rows = writer.publish(fs, part, drop)
                published.append(part)
            else:
                writer.discard()
            rows = [_manifest_row(s, cfg, layout.relative(part) if num_rows else None) for s in states.values()]
            write_table_atomic(fs, layout.manifest_part(plan.shard_id), manifest_table(rows))
    except BaseException:
        writer.discard()
        raise
    return _shard_result(plan, states, num_rows, time.perf_counter() - started)


def _absorb_and_report(state: _FileState, result: ItemResult, writer: FeaturePartWriter) -> None:
    _absorb(state, result, writer)
    if state.pending_items == 0:
        report(ProgressEvent(files=1, audio_s=state.audio_s if state.reason is None else 0.0,
                             rejected=int(state.reason is not None)))


def _absorb(state: _FileState, result: ItemResult, writer: FeaturePartWriter) -> None:
    state.pending_items -= 1
    state.busy_s += result.busy_s
    state.info = state.info or result.info
    if result.reason is not None:
        state.reason = state.reason or result.reason
        return
    if state.reason is None and result.batch is not None:
        writer.add(result.batch)
    state.segments += result.num_segments
    state.audio_s += result.audio_s


def _manifest_row(state: _FileState, cfg: FeatureConfig, shard: str | None) -> dict:
    from audiopipe.infra.version import audiopipe_version

    f, ok = state.source, state.reason is None
    return {
        "source": f.url, "size": f.size, "etag": f.etag,
        "mtime": None if f.mtime_us is None else us_to_datetime(f.mtime_us),
        "status": "ok" if ok else "rejected", "reason": state.reason,
        **header_columns(state.info, state.audio_s if ok else None),
        "n_segments": state.segments if ok else 0, "shard": shard if ok else None,
        "config_hash": cfg.config_hash, "audiopipe_version": audiopipe_version(), "processed_at": now_utc(),
    }


def header_columns(info: AudioInfo | None, decoded_s: float | None) -> dict:
    """The manifest's ``sample_rate``, ``channels`` and ``duration_s``: from the header whenever it was read,
    rejected files included; ``duration_s`` is the decoded length of an ok file, else the header's (null
    when its sample rate cannot give one)."""
    if info is None:
        return {"sample_rate": None, "channels": None, "duration_s": None}
    declared = info.duration_s if info.sample_rate > 0 else None
    return {"sample_rate": info.sample_rate, "channels": info.channels,
            "duration_s": decoded_s if decoded_s is not None else declared}


def _shard_result(plan: ShardPlan, states: dict[str, _FileState], num_rows: int, wall_s: float) -> ShardResult:
    result = ShardResult(plan.shard_id, num_files=len(states), num_rows=num_rows, wall_s=wall_s)
    for s in states.values():
        result.busy_s += s.busy_s
        if s.reason is None:
            result.num_ok += 1
            result.audio_s += s.audio_s
        else:
            result.rejected[reject_category(s.reason)] += 1
    return result


# ---- Prefect wrappers -------------------------------------------------------------------------------

def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only storage hiccups, fail everything else at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state's own exception, classified
        return is_transient(exc)
    return False


@task(name="extract-shard", retries=4, retry_delay_seconds=exponential_backoff(2), retry_jitter_factor=0.5,
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def extract_shard(plan: ShardPlan, cfg: FeatureConfig, storage: StorageSpec, out_url: str,
                  settings: RunSettings) -> ShardResult:
    """Prefect task: one shard, executed on the Dask client of the calling flow."""
    logger = get_run_logger()
    scratch = str(settings.work_dir / "scratch")
    result = run_shard(get_client(), plan, cfg, storage, out_url, scratch)
    logger.info("shard %s: %d files (%d ok, %d rejected), %.1f min of audio, %d rows in %.1f s",
                plan.shard_id, result.num_files, result.num_ok, result.num_rejected, result.audio_s / 60,
                result.num_rows, result.wall_s)
    return result

