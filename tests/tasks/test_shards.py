"""Shard planning, part writing/publishing, reconcile, and the schema validator — on real filesystems."""

from __future__ import annotations

import io
import json
import os
import random
import socket
from datetime import datetime, timedelta, timezone

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audiopipe.infra.errors import SchemaError, TransientStorageError
from audiopipe.infra.schemas import FEATURES_V1, MANIFEST_V1, validate_table
from audiopipe.infra.storage import write_bytes_atomic
from audiopipe.tasks.extract import SourceFile, feature_batch, features_to_numpy
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.shards import (
    FeaturePartWriter,
    OutputLayout,
    commit_intent,
    intent_path,
    live_intent,
    manifest_table,
    plan_shards,
    read_manifest,
    reconcile,
    write_config,
    write_table_atomic,
)

CFG = FeatureConfig(n_mels=8, n_mfcc=8)  # small payloads
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def _files(n: int) -> list[SourceFile]:
    return [SourceFile(f"s3://bucket/audio/{i:03d}.wav", 1000 + i, etag=f"e{i}") for i in range(n)]


def _batch(source: str, n_segments: int = 2, seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    rows = [(i, 30.0 * i, 30.0, rng.standard_normal((3 + i, CFG.num_bins)).astype(np.float32))
            for i in range(n_segments)]
    return feature_batch(source, rows, cfg=CFG)


def _manifest_row(source: str, shard: str, processed_at: datetime, status: str = "ok") -> dict:
    return {"source": source, "size": 10, "etag": None, "mtime": None, "status": status,
            "reason": None if status == "ok" else "empty: x", "sample_rate": 16000, "channels": 1,
            "duration_s": 60.0, "n_segments": 2, "shard": shard, "config_hash": CFG.config_hash,
            "audiopipe_version": "0.1.0", "processed_at": processed_at}


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path, mem):
    """(fs, OutputLayout) on a local directory or a memory:// prefix."""
    if request.param == "local":
        fs = fsspec.filesystem("file")
        root = str(tmp_path / "out")
    else:
        fs = mem.fs
        root = f"{mem.root}/out"
    return fs, OutputLayout(root, CFG.config_hash)


def _read(fs, path: str) -> pa.Table:
    return pq.read_table(io.BytesIO(fs.cat_file(path)))


def _all_files(fs, root: str) -> list[str]:
    return sorted(fs.find(root)) if fs.exists(root) else []


# ------------------------------------------------------------------ plan_shards


@pytest.mark.parametrize(
    ("n_files", "per_shard", "sizes"),
    [(0, 4, []), (1, 4, [1]), (4, 4, [4]), (5, 4, [4, 1]), (9, 3, [3, 3, 3]), (10, 3, [3, 3, 3, 1]),
     (7, 1, [1] * 7), (3, 100, [3])],
)
def test_plan_shards_sizes(n_files, per_shard, sizes):
    plans = plan_shards(_files(n_files), per_shard)
    assert [len(p.files) for p in plans] == sizes
    assert all(len(p.files) <= per_shard for p in plans)
    flat = [f for p in plans for f in p.files]
    assert flat == sorted(_files(n_files), key=lambda f: f.url)  # every file once, in path order
    assert all(len(p.shard_id) == 16 and int(p.shard_id, 16) >= 0 for p in plans)
    assert len({p.shard_id for p in plans}) == len(plans)


def test_plan_shards_independent_of_input_order():
    files = _files(23)
    expected = plan_shards(files, 5)
    for seed in range(5):
        shuffled = files[:]
        random.Random(seed).shuffle(shuffled)
        assert plan_shards(shuffled, 5) == expected


def test_plan_shards_ids_stable_and_follow_versions():
    files = _files(6)
    a = plan_shards(files, 3)
    assert [p.shard_id for p in plan_shards(list(files), 3)] == [p.shard_id for p in a]
    changed = files[:4] + [SourceFile(files[4].url, files[4].size, etag="changed")] + files[5:]
    b = plan_shards(changed, 3)
    assert b[0].shard_id == a[0].shard_id  # untouched shard keeps its id
    assert b[1].shard_id != a[1].shard_id  # a changed input gives a new shard id
    no_etag = [SourceFile(f.url, f.size, mtime=1.5) for f in files]
    later = [SourceFile(f.url, f.size, mtime=2.5) for f in files]
    assert plan_shards(no_etag, 3)[0].shard_id != plan_shards(later, 3)[0].shard_id
    assert a[0].num_bytes == 1000 + 1001 + 1002


# ------------------------------------------------------------------ FeaturePartWriter / publish


def test_part_writer_publish_round_trip(out, tmp_path):
    fs, layout = out
    scratch = tmp_path / "scratch"
    batches = [_batch("memory://in/a.wav", 2, seed=1), _batch("memory://in/b.wav", 3, seed=2),
               _batch("memory://in/c.wav", 1, seed=3)]
    writer = FeaturePartWriter(str(scratch))
    for b in batches:
        writer.add(b)
    dest = layout.features_part("abc123")

    assert writer.publish(fs, dest) == 6

    table = _read(fs, dest)
    assert table.schema.equals(FEATURES_V1)
    assert table.schema.metadata[b"audiopipe.contract"] == b"features"
    validate_table(table, FEATURES_V1)
    assert table.equals(pa.Table.from_batches(batches).cast(FEATURES_V1))
    want = [f for b in batches for f in features_to_numpy(b.column("features"), CFG.num_bins)]
    for got, exp in zip(features_to_numpy(table.column("features"), CFG.num_bins), want, strict=True):
        np.testing.assert_array_equal(got, exp)
    assert os.listdir(scratch) == []  # local temp file removed
    assert [p for p in _all_files(fs, layout.root) if ".tmp" in p] == []
    assert [p.rsplit("/", 1)[-1] for p in _all_files(fs, layout.root)] == ["part-abc123.parquet"]


def test_part_writer_many_rows_flushes_row_groups(tmp_path):
    fs = fsspec.filesystem("file")
    writer = FeaturePartWriter(str(tmp_path / "scratch"))
    for i in range(6):
        writer.add(_batch(f"file:///in/{i}.wav", 200, seed=i))  # 1200 rows: flushes at >= 512
    dest = str(tmp_path / "out" / "part-x.parquet")
    assert writer.publish(fs, dest) == 1200
    table = pq.read_table(dest)
    assert table.num_rows == 1200
    assert table.column("source").to_pylist() == [f"file:///in/{i}.wav" for i in range(6) for _ in range(200)]
    assert table.column("segment").to_pylist() == list(range(200)) * 6


def test_publish_drop_sources_removes_rows(out, tmp_path):
    fs, layout = out
    writer = FeaturePartWriter(str(tmp_path / "scratch"))
    for name, n in (("a", 2), ("b", 3), ("c", 4)):
        writer.add(_batch(f"memory://in/{name}.wav", n))
    dest = layout.features_part("s1")

    assert writer.publish(fs, dest, drop_sources={"memory://in/b.wav", "memory://in/never.wav"}) == 6

    table = _read(fs, dest)
    assert table.schema.equals(FEATURES_V1)
    assert sorted(set(table.column("source").to_pylist())) == ["memory://in/a.wav", "memory://in/c.wav"]
    assert table.num_rows == 6
    assert os.listdir(tmp_path / "scratch") == []


@pytest.mark.parametrize("drop_all", [False, True])
def test_publish_empty_part(out, tmp_path, drop_all):
    """A shard whose every file was rejected still publishes a valid (empty) FEATURES_V1 part."""
    fs, layout = out
    writer = FeaturePartWriter(str(tmp_path / "scratch"))
    if drop_all:
        writer.add(_batch("memory://in/a.wav", 2))
    dest = layout.features_part("empty")
    assert writer.publish(fs, dest, drop_sources={"memory://in/a.wav"} if drop_all else frozenset()) == 0
    table = _read(fs, dest)
    assert table.num_rows == 0
    assert table.schema.equals(FEATURES_V1)
    assert os.listdir(tmp_path / "scratch") == []


def test_publish_replaces_existing_part(out, tmp_path):
    fs, layout = out
    dest = layout.features_part("s1")
    for name in ("first", "second"):
        writer = FeaturePartWriter(str(tmp_path / "scratch"))
        writer.add(_batch(f"memory://in/{name}.wav", 1))
        writer.publish(fs, dest)
    assert _read(fs, dest).column("source").to_pylist() == ["memory://in/second.wav"]
    assert [p for p in _all_files(fs, layout.root) if ".tmp" in p] == []


def test_part_writer_rejects_wrong_schema_and_discard_cleans(tmp_path):
    writer = FeaturePartWriter(str(tmp_path / "scratch"))
    good = _batch("x", 1)
    bad = pa.RecordBatch.from_arrays(good.columns[:-1], names=good.schema.names[:-1])  # no config_hash
    with pytest.raises(SchemaError, match="columns"):
        writer.add(bad)
    assert writer.num_rows == 0
    writer.discard()
    assert os.listdir(tmp_path / "scratch") == []


def test_write_config_and_layout(out):
    fs, layout = out
    write_config(fs, layout, CFG)
    write_config(fs, layout, CFG)  # idempotent
    body = json.loads(fs.cat_file(f"{layout.features_dir}/_config.json"))
    assert body["config_hash"] == CFG.config_hash
    assert FeatureConfig.from_dict(body["feature_config"]) == CFG
    assert layout.features_dir.endswith(f"features/config={CFG.config_hash}")
    assert layout.manifest_part("q") == f"{layout.root}/manifest/config={CFG.config_hash}/part-q.parquet"
    assert layout.relative(layout.features_part("q")) == f"features/config={CFG.config_hash}/part-q.parquet"
    assert [p for p in _all_files(fs, layout.root) if ".tmp" in p] == []


# ------------------------------------------------------------------ reconcile


def _commit(fs, layout, shard, feature_sources, manifest_rows):
    """Publish a features part, then (unless None) its manifest part, like a finished shard."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_batches([_batch(s, 2, seed=i) for i, s in enumerate(feature_sources)]), buf)
    fs.makedirs(layout.features_dir, exist_ok=True)
    fs.pipe_file(layout.features_part(shard), buf.getvalue())
    if manifest_rows is not None:
        write_table_atomic(fs, layout.manifest_part(shard), manifest_table(manifest_rows))


def _snapshot(fs, root):
    return {p: fs.cat_file(p) for p in _all_files(fs, root)}


def test_reconcile_deletes_orphan_features_part(out):
    fs, layout = out
    _commit(fs, layout, "good", ["u://a"], [_manifest_row("u://a", "good", T0)])
    _commit(fs, layout, "orphan", ["u://b"], None)  # killed before its manifest part

    counts = reconcile(fs, layout)

    assert counts == {"orphans_deleted": 1, "rows_superseded": 0}
    assert not fs.exists(layout.features_part("orphan"))
    assert fs.exists(layout.features_part("good")) and fs.exists(layout.manifest_part("good"))
    assert _read(fs, layout.features_part("good")).column("source").to_pylist() == ["u://a", "u://a"]


@pytest.mark.parametrize("older_shard_sorts_first", [True, False])
def test_reconcile_removes_superseded_rows(out, older_shard_sorts_first):
    fs, layout = out
    old, new = ("aaaa", "zzzz") if older_shard_sorts_first else ("zzzz", "aaaa")
    # old shard: x and y processed at T0; new shard: x redone (it changed) one hour later
    _commit(fs, layout, old, ["u://x", "u://y"],
            [_manifest_row("u://x", old, T0), _manifest_row("u://y", old, T0)])
    _commit(fs, layout, new, ["u://x"], [_manifest_row("u://x", new, T0 + timedelta(hours=1))])
    new_features = fs.cat_file(layout.features_part(new))
    new_manifest = fs.cat_file(layout.manifest_part(new))

    counts = reconcile(fs, layout)

    assert counts == {"orphans_deleted": 0, "rows_superseded": 1}
    old_manifest = _read(fs, layout.manifest_part(old))
    assert old_manifest.column("source").to_pylist() == ["u://y"]
    validate_table(old_manifest, MANIFEST_V1)
    old_features = _read(fs, layout.features_part(old))
    assert old_features.column("source").to_pylist() == ["u://y", "u://y"]
    assert old_features.schema.equals(FEATURES_V1)
    assert fs.cat_file(layout.features_part(new)) == new_features  # the newest shard is untouched
    assert fs.cat_file(layout.manifest_part(new)) == new_manifest
    manifest = read_manifest(fs, layout)
    assert sorted(zip(manifest.column("source").to_pylist(), manifest.column("shard").to_pylist())) == [
        ("u://x", new), ("u://y", old)]
    assert [p for p in _all_files(fs, layout.root) if ".tmp" in p] == []


def test_reconcile_keeps_newest_of_three(out):
    fs, layout = out
    for shard in ("s2", "s0", "s1"):
        _commit(fs, layout, shard, ["u://x"], [_manifest_row("u://x", shard, T0 + timedelta(minutes=int(shard[1])))])
    assert reconcile(fs, layout) == {"orphans_deleted": 0, "rows_superseded": 2}
    manifest = read_manifest(fs, layout)
    assert manifest.column("shard").to_pylist() == ["s2"]
    assert not fs.exists(layout.features_part("s0")) and not fs.exists(layout.manifest_part("s0"))
    assert not fs.exists(layout.features_part("s1")) and not fs.exists(layout.manifest_part("s1"))
    assert _read(fs, layout.features_part("s2")).num_rows == 2


def test_reconcile_twice_is_idempotent(out):
    fs, layout = out
    _commit(fs, layout, "old", ["u://x", "u://y"], [_manifest_row("u://x", "old", T0),
                                                    _manifest_row("u://y", "old", T0, status="rejected")])
    _commit(fs, layout, "new", ["u://x"], [_manifest_row("u://x", "new", T0 + timedelta(seconds=1))])
    _commit(fs, layout, "orphan", ["u://z"], None)

    first = reconcile(fs, layout)
    after_first = _snapshot(fs, layout.root)
    second = reconcile(fs, layout)

    assert first == {"orphans_deleted": 1, "rows_superseded": 1}
    assert second == {"orphans_deleted": 0, "rows_superseded": 0}
    assert _snapshot(fs, layout.root) == after_first


def test_reconcile_keeps_a_part_another_run_is_committing(out):
    """Run A published its features part and holds its intent; run B's reconcile must not delete the part."""
    fs, layout = out
    with commit_intent(fs, layout, "live") as published:
        _commit(fs, layout, "live", ["u://a"], None)  # between A's two writes
        published.append(layout.features_part("live"))
        assert live_intent(fs, layout, "live").startswith(f"{socket.gethostname()}:{os.getpid()}")
        assert reconcile(fs, layout) == {"orphans_deleted": 0, "rows_superseded": 0}  # run B starts here
        assert fs.exists(layout.features_part("live"))
        write_table_atomic(fs, layout.manifest_part("live"), manifest_table([_manifest_row("u://a", "live", T0)]))
    assert not fs.exists(intent_path(layout, "live"))  # released after the commit
    assert reconcile(fs, layout) == {"orphans_deleted": 0, "rows_superseded": 0}
    assert _read(fs, layout.features_part("live")).column("source").to_pylist() == ["u://a", "u://a"]


def test_expired_intent_of_a_killed_run_does_not_protect_its_orphan(out):
    fs, layout = out
    write_bytes_atomic(fs, intent_path(layout, "dead"), json.dumps(
        {"holder": "gone:1", "started_at": T0.isoformat(), "expires_at": T0.isoformat()}).encode())
    _commit(fs, layout, "dead", ["u://a"], None)

    assert live_intent(fs, layout, "dead") is None
    assert reconcile(fs, layout)["orphans_deleted"] == 1
    assert not fs.exists(layout.features_part("dead"))


def test_intent_of_a_dead_process_on_this_host_does_not_protect_its_orphan(out):
    """A run killed on this machine (SIGKILL: no cleanup) is recognised at once, not after the expiry."""
    import subprocess
    import sys

    fs, layout = out
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    write_bytes_atomic(fs, intent_path(layout, "killed"), json.dumps(
        {"holder": f"{socket.gethostname()}:{pid}", "host": socket.gethostname(), "pid": pid, "pid_started": 1.0,
         "started_at": T0.isoformat(), "expires_at": (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()}
    ).encode())
    _commit(fs, layout, "killed", ["u://a"], None)

    assert live_intent(fs, layout, "killed") is None
    assert reconcile(fs, layout)["orphans_deleted"] == 1


def test_intent_is_released_when_the_commit_fails(out):
    fs, layout = out
    with pytest.raises(RuntimeError), commit_intent(fs, layout, "boom"):
        raise RuntimeError("store went away")
    assert not fs.exists(intent_path(layout, "boom"))


def test_commit_whose_part_vanished_is_withdrawn_and_retried(out):
    """A reconcile that ignores intents (an older audiopipe) deletes the part: the commit must not stand."""
    fs, layout = out
    with pytest.raises(TransientStorageError, match="vanished"), \
            commit_intent(fs, layout, "raced") as published:
        _commit(fs, layout, "raced", ["u://a"], None)
        published.append(layout.features_part("raced"))
        fs.rm_file(layout.features_part("raced"))  # the other run's delete lands here
        write_table_atomic(fs, layout.manifest_part("raced"), manifest_table([_manifest_row("u://a", "raced", T0)]))
    assert not fs.exists(layout.manifest_part("raced"))  # no ok row points at a missing part
    assert read_manifest(fs, layout).num_rows == 0


def test_reconcile_on_empty_output(out):
    fs, layout = out
    assert reconcile(fs, layout) == {"orphans_deleted": 0, "rows_superseded": 0}
    assert read_manifest(fs, layout).schema.equals(MANIFEST_V1)
    assert read_manifest(fs, layout).num_rows == 0


# ------------------------------------------------------------------ validate_table


def _good_manifest() -> pa.Table:
    return manifest_table([_manifest_row("u://a", "s", T0), _manifest_row("u://b", "s", T0, status="rejected")])


def _replace_column(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, array.type, nullable=table.schema.field(name).nullable), array)


MANIFEST_BREAKAGES = {
    "wrong_type_size_int32": (lambda t: _replace_column(t, "size", pa.array([10, 10], pa.int32())), "'size'"),
    "wrong_type_processed_at_naive": (
        lambda t: _replace_column(t, "processed_at", pa.array([T0.replace(tzinfo=None)] * 2, pa.timestamp("us"))),
        "'processed_at'"),
    "wrong_type_shard_large_string": (lambda t: _replace_column(t, "shard", pa.array(["s", "s"], pa.large_string())),
                                      "'shard'"),
    "missing_column": (lambda t: t.drop_columns(["reason"]), "columns"),
    "extra_column": (lambda t: t.append_column("extra", pa.array([1, 2])), "columns"),
    "reordered_columns": (lambda t: t.select(["size", "source"] + t.schema.names[2:]), "columns"),
    "null_in_non_null": (lambda t: _replace_column(t, "source", pa.array(["u://a", None], pa.string())),
                         "'source' has nulls"),
    "null_config_hash": (lambda t: _replace_column(t, "config_hash", pa.array([None, None], pa.string())),
                         "'config_hash' has nulls"),
    "bad_status": (lambda t: _replace_column(t, "status", pa.array(["ok", "failed"])), "status"),
    "bad_status_case": (lambda t: _replace_column(t, "status", pa.array(["OK", "ok"])), "status"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_BREAKAGES))
def test_validate_table_rejects_broken_manifest(case):
    breaker, message = MANIFEST_BREAKAGES[case]
    with pytest.raises(SchemaError, match=message):
        validate_table(breaker(_good_manifest()), MANIFEST_V1)


def test_validate_table_accepts_good_tables():
    validate_table(_good_manifest(), MANIFEST_V1)
    validate_table(_batch("u://a", 3), FEATURES_V1)
    validate_table(pa.Table.from_batches([_batch("u://a", 3)]), FEATURES_V1)


FEATURE_BREAKAGES = {
    "features_float64": (lambda b: _replace_column(
        pa.Table.from_batches([b]), "features",
        pa.array([[[1.0]]] * b.num_rows, pa.list_(pa.list_(pa.float64())))), "'features'"),
    "segment_int64": (lambda b: _replace_column(
        pa.Table.from_batches([b]), "segment", pa.array(range(b.num_rows), pa.int64())), "'segment'"),
    "n_frames_null": (lambda b: _replace_column(
        pa.Table.from_batches([b]), "n_frames", pa.array([None] * b.num_rows, pa.int32())), "'n_frames' has nulls"),
    "missing_features": (lambda b: pa.Table.from_batches([b]).drop_columns(["features"]), "columns"),
}


@pytest.mark.parametrize("case", sorted(FEATURE_BREAKAGES))
def test_validate_table_rejects_broken_features(case):
    breaker, message = FEATURE_BREAKAGES[case]
    with pytest.raises(SchemaError, match=message) as err:
        validate_table(breaker(_batch("u://a", 2)), FEATURES_V1)
    assert str(err.value).startswith("features ")


def test_manifest_table_validates():
    with pytest.raises(SchemaError, match="status"):
        manifest_table([_manifest_row("u://a", "s", T0, status="maybe")])
    with pytest.raises((SchemaError, pa.ArrowInvalid, pa.ArrowTypeError)):
        manifest_table([{**_manifest_row("u://a", "s", T0), "source": None}])
