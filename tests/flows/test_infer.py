"""Bulk inference (transcribe, classify, separate) against real parts: SeaweedFS, Dask worker processes,
Prefect's harness, registered Keras models (untrained weights: see ``infer_support``).

Every recording must end with exactly one manifest row for the model version; reruns write nothing; long
recordings are windowed without losing or doubling output frames; a tampered model is never loaded.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from distributed import Client

from audiopipe.flows.infer import model_spec, run_inference
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, open_fs
from audiopipe.models.registry import IntegrityError, Registry
from audiopipe.tasks.extract import SourceFile
from audiopipe.tasks.infer import InferItem, infer_item, model_loads
from audiopipe.tasks.infer_layout import ResultLayout
from audiopipe.tasks.shards import read_manifest
from audiopipe.tasks.synth import write_messy_archive
from tests.flows.infer_support import (per_frame_asr, register_asr, register_classifier, register_separator,
                                       voiced, write_wav)

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy-infer")
    expected = write_messy_archive(root, seed=5, long_file_s=300.0)  # > 4 MiB: probed and cut into chunks
    return root, {rel: want for rel, want in expected.items() if want != "ignored"}  # non-audio names


def _frames(outputs) -> np.ndarray:
    pieces = sorted((p for o in outputs for p in o.frames), key=lambda p: p[0])
    for (a, ids, _), (b, _, _) in zip(pieces, pieces[1:]):
        assert a + len(ids) == b, "output frames lost or doubled between windows"
    return np.concatenate([p[1] for p in pieces])


@pytest.mark.parametrize("upsample", [1, 2])  # outputs every 40 ms, or every 20 ms from 40 ms steps
def test_windowed_long_recording_equals_one_pass(tmp_path, upsample):
    """Windows, and chunks of windows on different items, join into exactly the single-pass frame sequence."""
    wav = write_wav(tmp_path / "in" / "long.wav", voiced(95.0))
    ref = register_asr(str(tmp_path / "reg"), upsample=upsample)
    spec = model_spec("transcribe", ref, StorageSpec(), in_url=str(tmp_path / "in"), work_dir=tmp_path / "work")
    source = SourceFile("file://" + str(wav), wav.stat().st_size)
    windowed = infer_item(InferItem((source,)), spec, StorageSpec())
    one_pass = infer_item(InferItem((source,)), dataclasses.replace(spec, window_s=200.0), StorageSpec())
    chunked = [out for first in range(0, 10, 3)
               for out in infer_item(InferItem((source,), first, first + 3), spec, StorageSpec())]
    assert windowed[0].windows == 10 and one_pass[0].windows == 1
    expected = _frames(one_pass)
    assert len(expected) == int(np.ceil(95.0 / spec.frame_s))
    np.testing.assert_array_equal(_frames(windowed), expected)
    np.testing.assert_array_equal(_frames(chunked), expected)
    assert (expected != 0).any(), "the model emits characters, so the comparison means something"


def _outputs(out_url: str, task: str, name: str, version: int):
    fs, root = open_fs(out_url, StorageSpec())
    layout = ResultLayout(root, task, name, version)
    return fs, layout, read_manifest(fs, layout)


def _table(fs, layout: ResultLayout, table: str):
    import pyarrow as pa

    parts = [p for p in fs.find(f"{layout.base}/{table}") if p.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(p))) for p in parts]) if parts else None


def _snapshot(fs, root: str) -> dict[str, str]:
    return {p: str(info.get("ETag") or info.get("mtime")) for p, info in fs.find(root, detail=True).items()}


@pytest.mark.s3
def test_transcribe_messy_archive_on_s3(messy, s3fs_client, bucket, dask_cluster, prefect_api, tmp_path):
    root, expected = messy
    s3fs_client.put(str(root) + "/", f"{bucket}/in/", recursive=True)
    model = register_asr(f"s3://{bucket}/models")
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work",
                           files_per_shard=9)
    with Client(dask_cluster.scheduler_address) as client:  # loads counted per worker process from here
        before = client.run(model_loads)
        summary = run_inference("transcribe", f"s3://{bucket}/in", f"s3://{bucket}/out", model, settings=settings)
        after = client.run(model_loads)
    assert summary["recordings_listed"] == len(expected)
    for worker, loads in after.items():  # once per worker, not per recording
        assert loads.get("asr@1", 0) - before[worker].get("asr@1", 0) <= 1
    fs, layout, manifest = _outputs(f"s3://{bucket}/out", "transcribe", "asr", 1)
    rows = manifest.to_pylist()
    assert Counter(r["source"] for r in rows) == Counter(f"s3://{bucket}/in/{rel}" for rel in expected)
    status = {r["source"].split("/in/", 1)[1]: r["status"] for r in rows}
    assert status == {rel: ("ok" if want == "ok" else "rejected") for rel, want in expected.items()}
    assert all(r["reason"] for r in rows if r["status"] == "rejected")
    transcripts = _table(fs, layout, "transcripts")
    ok = [r for r in rows if r["status"] == "ok"]
    assert sum(r["n_segments"] for r in ok) == transcripts.num_rows > 0
    assert set(transcripts["model"].to_pylist()) == {"asr@1"}
    long_rows = [r for r in transcripts.to_pylist() if r["source"].endswith("long/long_16k.wav")]
    assert long_rows and max(r["end_s"] for r in long_rows) > 250  # the whole 300 s, stitched from chunks
    starts = [r["start_s"] for r in long_rows]
    assert starts == sorted(starts) and all(r["start_s"] < r["end_s"] for r in long_rows)
    for r in ok:  # one .jsonl and one .srt per recording, beside the tables
        rel = r["source"].split("/in/", 1)[1]
        lines = fs.cat_file(f"{layout.base}/files/{rel}.jsonl").decode().splitlines()
        assert len(lines) == r["n_segments"]
        assert all(json.loads(line)["source"] == r["source"] for line in lines)
        srt = fs.cat_file(f"{layout.base}/files/{rel}.srt").decode()
        assert srt.count(" --> ") == r["n_segments"]
    # nothing new: the rerun writes nothing
    before_rerun = _snapshot(fs, f"{bucket}/out")
    again = run_inference("transcribe", f"s3://{bucket}/in", f"s3://{bucket}/out", model, settings=settings)
    assert again["recordings_skipped"] == len(expected) and again["shards_written"] == 0
    assert _snapshot(fs, f"{bucket}/out") == before_rerun
    # --reprocess redoes every recording; still exactly one row per recording afterwards
    redo = run_inference("transcribe", f"s3://{bucket}/in", f"s3://{bucket}/out", model, settings=settings,
                         reprocess=True)
    assert redo["recordings_ok"] + redo["recordings_rejected"] == len(expected)
    _, _, manifest = _outputs(f"s3://{bucket}/out", "transcribe", "asr", 1)
    assert Counter(manifest["source"].to_pylist()) == Counter(r["source"] for r in rows)
    assert _table(fs, layout, "transcripts").num_rows == transcripts.num_rows
    # a new model version answers every recording again, in its own partition
    model2 = register_asr(f"s3://{bucket}/models", model=per_frame_asr(seed=1))
    assert model2.endswith("asr@2")
    fresh = run_inference("transcribe", f"s3://{bucket}/in", f"s3://{bucket}/out", model2, settings=settings)
    assert fresh["recordings_skipped"] == 0 and fresh["recordings_listed"] == len(expected)


def test_tampered_model_is_refused_before_any_work(tmp_path, prefect_api):
    wav = write_wav(tmp_path / "in" / "a.wav", voiced(3.0))
    ref = register_asr(str(tmp_path / "reg"))
    model_file = next((tmp_path / "reg").rglob("model.keras"))
    blob = bytearray(model_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    model_file.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="sha256|size"):
        run_inference("transcribe", str(wav.parent), str(tmp_path / "out"), ref,
                      settings=RunSettings(workers=1, work_dir=tmp_path / "work"))
    assert not (tmp_path / "out" / "transcribe").exists()


def test_classify_and_separate_write_their_results(tmp_path, dask_cluster, prefect_api):
    inputs = tmp_path / "in"
    write_wav(inputs / "a.wav", voiced(7.5, seed=1))
    write_wav(inputs / "sub" / "b.wav", voiced(2.0, seed=2))
    (inputs / "broken.wav").write_bytes(b"RIFF\x00\x00")
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work")
    classifier = register_classifier(str(tmp_path / "reg"))
    out = str(tmp_path / "out")
    summary = run_inference("classify", str(inputs), out, classifier, settings=settings)
    assert (summary["recordings_ok"], summary["recordings_rejected"]) == (2, 1)
    fs, layout, manifest = _outputs(out, "classify", "classify", 1)
    segments, recordings = _table(fs, layout, "segments"), _table(fs, layout, "recordings")
    assert recordings.num_rows == 2 and segments.num_rows == 3 + 1  # 7.5 s in 3 s segments, and 2 s
    for row in recordings.to_pylist() + segments.to_pylist():
        probs = {p["label"]: p["p"] for p in row["probabilities"]}
        assert set(probs) == {"noise", "tone"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert row["top_class"] == max(probs, key=probs.get)
    separator = register_separator(str(tmp_path / "reg"))
    summary = run_inference("separate", str(inputs), out, separator, settings=settings)
    assert (summary["recordings_ok"], summary["recordings_rejected"]) == (2, 1)
    fs, layout, manifest = _outputs(out, "separate", "separate", 1)
    stems = _table(fs, layout, "stems").to_pylist()
    assert sorted((Path(r["source"]).name, r["stem"]) for r in stems) == [
        ("a.wav", "background"), ("a.wav", "speech"), ("b.wav", "background"), ("b.wav", "speech")]
    mixture, _ = sf.read(inputs / "a.wav", dtype="float32")
    parts = {r["stem"]: sf.read(io.BytesIO(fs.cat_file(r["url"].removeprefix("file://"))), dtype="float32")[0]
             for r in stems if r["source"].endswith("/a.wav")}
    assert len(parts["speech"]) == len(mixture) == len(parts["background"])
    # the stems add back up to the mixture (16-bit FLAC rounding aside)
    np.testing.assert_allclose(parts["speech"] + parts["background"], mixture, atol=3e-4)


def test_wrong_family_is_refused(tmp_path, prefect_api):
    from audiopipe.infra.errors import ConfigError

    write_wav(tmp_path / "in" / "a.wav", voiced(1.0))
    classifier = register_classifier(str(tmp_path / "reg"))
    with pytest.raises(ConfigError, match="needs a 'asr' model"):
        run_inference("transcribe", str(tmp_path / "in"), str(tmp_path / "out"), classifier,
                      settings=RunSettings(workers=1, work_dir=tmp_path / "work"))
    assert Registry(str(tmp_path / "reg")).list_models() == ["classify"]
