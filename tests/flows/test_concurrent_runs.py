"""Two runs on one output lose nothing: the race between one run's commit and another run's reconcile.

A run publishes a shard's data part, then its manifest part. Another run that starts (or ends) in between
calls ``reconcile``, which deletes data parts that have no manifest part. Without the commit intent it
deleted the live run's part, the live run then committed ``ok`` rows pointing at nothing, and every later
run skipped those files for good. The window is widened deterministically: the hook below runs the other
run's ``reconcile`` exactly inside it (between the data part and the manifest part of every shard), on a
real store with real Dask workers and Prefect's harness.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from audiopipe.flows.extract_features import featurize
from audiopipe.flows.infer import run_inference
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, open_fs
from audiopipe.tasks import execute, infer_run
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.infer_layout import ResultLayout
from audiopipe.tasks.shards import OutputLayout, read_manifest, reconcile
from audiopipe.tasks.synth import tone
from tests.flows.infer_support import register_asr, voiced, write_wav

pytestmark = [pytest.mark.slow]


def _other_run_reconciles_mid_commit(monkeypatch, module, layout_of):
    """Patch ``module.write_table_atomic`` so that, just before each manifest part is written, a second
    run's ``reconcile`` runs on the same output. Returns the list of counts it reported."""
    real_write = module.write_table_atomic
    seen = []

    def write(fs, path, table):
        if "/manifest/" in path:
            seen.append(reconcile(fs, layout_of(fs, path)))
        real_write(fs, path, table)

    monkeypatch.setattr(module, "write_table_atomic", write)
    return seen


def _every_ok_row_points_at_rows(fs, manifest, root: str) -> None:
    ok = [r for r in manifest.to_pylist() if r["status"] == "ok"]
    assert ok, "nothing was committed"
    for row in ok:
        part = f"{root}/{row['shard']}"
        assert fs.exists(part), f"{row['source']} is ok but its part {row['shard']} is gone"
        assert row["source"] in pq.read_table(io.BytesIO(fs.cat_file(part)), columns=["source"])["source"].to_pylist()


def test_featurize_commit_survives_another_runs_reconcile(tmp_path, dask_cluster, prefect_api, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        sf.write(src / f"tone_{i}.wav", tone(300 + 100 * i, 1.0, 16000), 16000)
    cfg, out = FeatureConfig(), str(tmp_path / "out")
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work",
                           files_per_shard=2)
    seen = _other_run_reconciles_mid_commit(monkeypatch, execute,
                                            lambda fs, path: OutputLayout(out, cfg.config_hash))

    first = featurize(str(src), out, feature_config=cfg, settings=settings)

    assert len(seen) == 3 and all(c["orphans_deleted"] == 0 for c in seen)  # 3 shards, each raced
    assert first["files_ok"] == 5
    monkeypatch.undo()
    second = featurize(str(src), out, feature_config=cfg, settings=settings)  # the other run, staggered
    assert (second["files_skipped"], second["files_ok"]) == (5, 0)
    fs, root = open_fs(out, StorageSpec())
    manifest = read_manifest(fs, OutputLayout(root, cfg.config_hash))
    assert sorted(manifest["source"].to_pylist()) == sorted(f"file://{src}/tone_{i}.wav" for i in range(5))
    _every_ok_row_points_at_rows(fs, manifest, root)


def test_transcribe_commit_survives_another_runs_reconcile(tmp_path, dask_cluster, prefect_api, monkeypatch):
    inputs = tmp_path / "in"
    for i in range(3):
        write_wav(inputs / f"call_{i}.wav", voiced(2.0, seed=i))
    model = register_asr(str(tmp_path / "reg"))
    out = str(tmp_path / "out")
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work",
                           files_per_shard=2)
    seen = _other_run_reconciles_mid_commit(monkeypatch, infer_run,
                                            lambda fs, path: ResultLayout(out, "transcribe", "asr", 1))

    first = run_inference("transcribe", str(inputs), out, model, settings=settings)

    assert len(seen) == 2 and all(c["orphans_deleted"] == 0 for c in seen)
    assert first["recordings_ok"] == 3
    monkeypatch.undo()
    again = run_inference("transcribe", str(inputs), out, model, settings=settings)
    assert again["recordings_ok"] == 0  # nothing redone: every recording exactly once
    fs, root = open_fs(out, StorageSpec())
    manifest = read_manifest(fs, ResultLayout(root, "transcribe", "asr", 1))
    assert manifest.num_rows == 3
    _every_ok_row_points_at_rows(fs, manifest, root)
