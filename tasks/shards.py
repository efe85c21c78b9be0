"""Stage 3 of featurize: plan shards, write and publish them, and keep the manifest consistent.

Layout under the output URL (contract: ``docs/data-contracts.md``)::

    features/config=<hash>/_config.json              the feature config of this partition
    features/config=<hash>/part-<shard>.parquet      FEATURES_V1 rows
    manifest/config=<hash>/part-<shard>.parquet      MANIFEST_V1 rows: the commit record of a shard

    manifest/config=<hash>/_inflight/<shard>.json   a commit intent: this shard's parts are being published

A shard is committed when its manifest part exists. A run first writes a commit intent (holder, expiry),
then publishes the features part (atomically), then the manifest part, then removes the intent. A features
part without a manifest part is an orphan of a killed run and is deleted by ``reconcile`` -- unless a live
intent says another run is between its two writes (several runs may share one output: a nightly schedule
and a manual rerun). An intent past its expiry belongs to a dead run. A source with several manifest rows
(it changed and was redone) keeps only its newest row, and the older parts are rewritten without it.
Nothing here imports Prefect or Dask.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audiopipe.infra.errors import TransientStorageError
from audiopipe.infra.schemas import CONTRACT_VERSION, FEATURES_V1, MANIFEST_V1, validate_table
from audiopipe.infra.storage import join, put_file_atomic, write_bytes_atomic
from audiopipe.tasks.extract import SourceFile
from audiopipe.tasks.features import FeatureConfig

log = logging.getLogger(__name__)

# Flush to a row group at this much buffered payload: keeps the driver flat however long the file
# (one 30 s log-mel row is ~1 MB) while row groups stay big enough for readers.
FEATURE_ROW_GROUP_BYTES = 32 * 1024 * 1024
# float32 features barely compress: snappy took 2.5x the time of no compression to save ~2%; LZ4 (raw)
# runs as fast as none and DuckDB, Polars and pyarrow all read it.
FEATURE_COMPRESSION = "lz4"
_META_COLUMNS = ["source", "segment", "start_s", "duration_s", "n_frames", "config_hash"]
# How long a commit intent protects a published-but-uncommitted part. Publishing one part and writing one
# small manifest part takes seconds; an intent this old belongs to a run that died between the two writes.
COMMIT_INTENT_TTL_S = 30 * 60


@dataclass(frozen=True)
class ShardPlan:
    """The files of one shard and where its parts go. ``shard_id`` is a hash of its inputs' versions."""

    shard_id: str
    files: tuple[SourceFile, ...]

    @property
    def num_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class OutputLayout:
    """Paths of one feature config's partition under the output root (fsspec paths, no protocol)."""

    root: str
    config_hash: str

    @property
    def features_dir(self) -> str:
        return join(self.root, "features", f"config={self.config_hash}")

    @property
    def manifest_dir(self) -> str:
        return join(self.root, "manifest", f"config={self.config_hash}")

    @property
    def data_dirs(self) -> tuple[str, ...]:
        """Folders whose parts a manifest part commits (``reconcile`` keeps them consistent)."""
        return (self.features_dir,)

    def features_part(self, shard_id: str) -> str:
        return join(self.features_dir, f"part-{shard_id}.parquet")

    def manifest_part(self, shard_id: str) -> str:
        return join(self.manifest_dir, f"part-{shard_id}.parquet")

    def relative(self, path: str) -> str:
        return path[len(self.root):].lstrip("/")


def plan_shards(pending: list[SourceFile], files_per_shard: int, *, by_size: bool = False) -> list[ShardPlan]:
    """Group pending files into shards of at most ``files_per_shard``, in path order (or size order).

    Dask balances the per-file work across workers, so shards only need to be small enough to retry
    cheaply and large enough that one Prefect task (~0.1 s) is noise beside its files. ``by_size`` puts
    files of similar length together, so inference batches them with little padding.
    """
    ordered = sorted(pending, key=(lambda f: (f.size, f.url)) if by_size else (lambda f: f.url))
    plans = []
    for start in range(0, len(ordered), files_per_shard):
        files = tuple(ordered[start:start + files_per_shard])
        digest = hashlib.sha256("\n".join(f"{f.url}\t{f.version}" for f in files).encode()).hexdigest()
        plans.append(ShardPlan(digest[:16], files))
    return plans


def write_config(fs, layout: OutputLayout, cfg: FeatureConfig) -> None:
    """Record the partition's feature config beside its parts (idempotent)."""
    path = join(layout.features_dir, "_config.json")
    if fs.exists(path):  # same hash, same content: a rerun writes nothing
        return
    body = json.dumps({"contract_version": CONTRACT_VERSION, "config_hash": layout.config_hash,
                       "feature_config": cfg.to_dict()}, indent=2, sort_keys=True).encode()
    write_bytes_atomic(fs, path, body)


def read_config(fs, layout: OutputLayout) -> FeatureConfig:
    """The feature config a partition was written with (its ``_config.json``).

    Raises:
        ConfigError: the partition has no ``_config.json`` (nothing was featurized with this config).
    """
    from audiopipe.infra.errors import ConfigError

    path = join(layout.features_dir, "_config.json")
    if not fs.exists(path):
        raise ConfigError(f"no feature partition config={layout.config_hash} under {layout.root} "
                          "(its _config.json is missing); run `audiopipe featurize` with that config first.")
    return FeatureConfig.from_dict(json.loads(fs.cat_file(path))["feature_config"])


class FeaturePartWriter:
    """Streams FEATURES_V1 batches into a local temporary Parquet file, then publishes it in one piece.

    Float payloads skip dictionary encoding and statistics: measured here, pyarrow's defaults on the
    feature column doubled the whole pipeline's time and grew files by 40%.
    """

    def __init__(self, scratch_dir: str) -> None:
        os.makedirs(scratch_dir, exist_ok=True)
        fd, self.local_path = tempfile.mkstemp(prefix="part-", suffix=".parquet.tmp", dir=scratch_dir)
        os.close(fd)
        self._writer = pq.ParquetWriter(
            self.local_path, FEATURES_V1, compression=FEATURE_COMPRESSION,
            use_dictionary=["source", "config_hash"], write_statistics=_META_COLUMNS,
        )
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        self.num_rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        validate_table(batch, FEATURES_V1)
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        self.num_rows += batch.num_rows
        if self._pending_bytes >= FEATURE_ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending), row_group_size=1 << 20)
            self._pending, self._pending_bytes = [], 0

    def publish(self, fs, dest: str, drop_sources: set[str] = frozenset()) -> int:
        """Close, drop rows of ``drop_sources`` (files rejected after some rows were written), publish.

        Returns the number of rows published.
        """
        self._flush()
        self._writer.close()
        try:
            if drop_sources:
                table = pq.read_table(self.local_path)
                table = table.filter(pc.invert(pc.is_in(table["source"], pa.array(sorted(drop_sources)))))
                pq.write_table(table, self.local_path, compression=FEATURE_COMPRESSION,
                               use_dictionary=["source", "config_hash"], write_statistics=_META_COLUMNS)
                self.num_rows = table.num_rows
            put_file_atomic(fs, self.local_path, dest)
        finally:
            if os.path.exists(self.local_path):
                os.unlink(self.local_path)
        return self.num_rows

    def discard(self) -> None:
        self._writer.close()
        if os.path.exists(self.local_path):
            os.unlink(self.local_path)


def manifest_table(rows: list[dict]) -> pa.Table:
    """MANIFEST_V1 table from row dicts (missing optional fields become null)."""
    table = pa.Table.from_pylist(rows, schema=MANIFEST_V1)
    validate_table(table, MANIFEST_V1)
    return table


def write_table_atomic(fs, path: str, table: pa.Table) -> None:
    """Publish a small table (a manifest part) in one atomic write."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(fs, path, buf.getvalue())


def _part_ids(fs, directory: str) -> dict[str, str]:
    """``{shard_id: path}`` of the published parts in ``directory`` (temporary files ignored)."""
    if not fs.exists(directory):
        return {}
    found = {}
    for path in fs.find(directory):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet"):
            found[name[len("part-"):-len(".parquet")]] = path
    return found


def read_manifest(fs, layout: OutputLayout, columns: list[str] | None = None) -> pa.Table:
    """All committed manifest rows of this config (empty table with the schema if none)."""
    parts = sorted(_part_ids(fs, layout.manifest_dir).values())
    schema = MANIFEST_V1 if columns is None else pa.schema([MANIFEST_V1.field(c) for c in columns])
    if not parts:
        return schema.empty_table()
    tables = [pq.read_table(io.BytesIO(blob), columns=columns) for blob in fs.cat(parts).values()]
    return pa.concat_tables(tables).cast(schema)


def reconcile(fs, layout: OutputLayout) -> dict[str, int]:
    """Repair what a killed run or a changed input left: orphan data parts, superseded manifest rows.

    Idempotent; safe to call at the start and end of every run, also while other runs write the same
    output: a data part is deleted only when no live commit intent covers it and its manifest part is
    still absent after that check (the order matters: a run writes its intent before the data part and
    removes it after the manifest part, so "part seen, no intent, no manifest" means nobody commits it).
    Returns counts: ``orphans_deleted``, ``rows_superseded``.
    """
    manifest_ids = _part_ids(fs, layout.manifest_dir)
    candidates = [(sid, p) for folder in layout.data_dirs for sid, p in _part_ids(fs, folder).items()
                  if sid not in manifest_ids]
    deleted = 0
    for shard_id, path in candidates:
        holder = live_intent(fs, layout, shard_id)
        if holder is not None:
            log.info("keeping uncommitted part %s: %s is committing it", path, holder)
            continue
        if fs.exists(layout.manifest_part(shard_id)):  # committed since the listing above
            continue
        log.warning("deleting orphan part %s (no manifest part and no live commit intent: a run was killed)", path)
        _rm_if_exists(fs, path)
        deleted += 1
    manifest = read_manifest(fs, layout, ["source", "shard", "processed_at"])
    superseded = _superseded(manifest)
    if superseded:
        for shard_id, path in manifest_ids.items():
            _drop_superseded(fs, layout, shard_id, path, superseded)
    return {"orphans_deleted": deleted, "rows_superseded": len(superseded)}


def intent_path(layout, shard_id: str) -> str:
    """Where a run announces that it is publishing ``shard_id``'s parts (a ``_`` folder: readers skip it)."""
    return join(layout.manifest_dir, "_inflight", f"{shard_id}.json")


@contextmanager
def commit_intent(fs, layout, shard_id: str, ttl_s: float = COMMIT_INTENT_TTL_S) -> Iterator[list[str]]:
    """Hold a commit intent for ``shard_id`` while its data parts and manifest part are written.

    Yields a list for the caller to append each data part it publishes. On a clean exit, checks that
    those parts still exist (a ``reconcile`` that raced past the intent, e.g. an older audiopipe's, could
    have removed one); if not, withdraws the manifest part and raises ``TransientStorageError``, so the
    shard is redone instead of committing rows that point nowhere. The intent is removed whatever
    happens; one left by a killed run expires after ``ttl_s``.
    """
    path = intent_path(layout, shard_id)
    now = now_utc()
    body = {"shard": shard_id, "holder": f"{socket.gethostname()}:{os.getpid()}", "host": socket.gethostname(),
            "pid": os.getpid(), "pid_started": _process_started(os.getpid()),
            "started_at": now.isoformat(), "expires_at": (now + timedelta(seconds=ttl_s)).isoformat()}
    write_bytes_atomic(fs, path, json.dumps(body).encode())
    published: list[str] = []
    try:
        yield published
        missing = [p for p in published if not fs.exists(p)]
        if missing:
            _rm_if_exists(fs, layout.manifest_part(shard_id))
            raise TransientStorageError(f"part {missing[0]} vanished before its commit "
                                        "(removed by another run); the shard is redone")
    finally:
        _rm_if_exists(fs, path)


def live_intent(fs, layout, shard_id: str) -> str | None:
    """The holder of a live commit intent for ``shard_id``, or None.

    An intent is dead when it has expired, or when its holder ran on this host and that process is gone
    (a killed run on the same machine is cleaned up at once instead of after the expiry).
    """
    try:
        body = json.loads(fs.cat_file(intent_path(layout, shard_id)))
        expires = datetime.fromisoformat(body["expires_at"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable commit intent %s", intent_path(layout, shard_id))
        return None
    if expires <= now_utc():
        return None
    if body.get("host") == socket.gethostname() and body.get("pid") is not None \
            and _process_started(int(body["pid"])) != body.get("pid_started"):
        return None  # its process died (or the pid now belongs to another process)
    return f"{body.get('holder', 'another run')} (since {body.get('started_at')})"


def _process_started(pid: int) -> float | None:
    """The start time of process ``pid`` (None when there is none): a pid plus this names one process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _rm_if_exists(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _drop_superseded(fs, layout: OutputLayout, shard_id: str, path: str, superseded: set[str]) -> None:
    """Rewrite one shard without its superseded rows: data parts first, then the manifest (the commit).

    A shard left with no rows is deleted whole, data parts first.
    """
    table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    keys = pc.binary_join_element_wise(table["source"], pc.cast(table["processed_at"], pa.string()), "\t")
    stale = pc.is_in(keys, pa.array(sorted(superseded)))
    if not pc.any(stale).as_py():
        return
    kept = table.filter(pc.invert(stale))
    data_parts = [join(folder, f"part-{shard_id}.parquet") for folder in layout.data_dirs]
    if kept.num_rows == 0:
        for part in data_parts:
            if fs.exists(part):
                fs.rm_file(part)
        fs.rm_file(path)
        return
    for part in data_parts:
        _rewrite_features_without(fs, part, set(table.filter(stale)["source"].to_pylist()))
    write_table_atomic(fs, path, kept)


def _superseded(manifest: pa.Table) -> set[str]:
    """``source\\tprocessed_at`` keys of every manifest row that a newer row of the same source replaces."""
    counts = Counter(manifest["source"].to_pylist())
    if not counts or max(counts.values()) == 1:
        return set()
    newest: dict[str, object] = {}
    rows = zip(manifest["source"].to_pylist(), manifest["processed_at"].cast(pa.string()).to_pylist())
    keys = []
    for source, when in rows:
        if counts[source] > 1:
            keys.append((source, when))
            newest[source] = max(newest.get(source, when), when)
    return {f"{s}\t{w}" for s, w in keys if w != newest[s]}


def _rewrite_features_without(fs, path: str, sources: set[str]) -> None:
    if not fs.exists(path):
        return
    table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    kept = table.filter(pc.invert(pc.is_in(table["source"], pa.array(sorted(sources)))))
    if kept.num_rows == table.num_rows:
        return
    buf = io.BytesIO()
    pq.write_table(kept, buf, compression=FEATURE_COMPRESSION, use_dictionary=["source", "config_hash"],
                   write_statistics=_META_COLUMNS)
    write_bytes_atomic(fs, path, buf.getvalue())


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
