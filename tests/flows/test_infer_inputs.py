"""Bulk inference lists its inputs as featurize does: symlinks, special files and refused headers each get
their manifest row (real flow, Dask worker processes, Prefect's harness, a registered classifier)."""

from __future__ import annotations

import os
import struct

import pytest

from audiopipe.flows.infer import run_inference
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, open_fs
from audiopipe.tasks.infer_layout import ResultLayout
from audiopipe.tasks.shards import read_manifest
from tests.flows.infer_support import register_classifier, voiced, write_wav

pytestmark = [pytest.mark.slow]


def _wav_header(channels: int, sample_rate: int, frames: int) -> bytes:
    data = bytes(frames * channels * 2)
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_symlinked_and_unreadable_recordings_each_get_their_row(tmp_path, dask_cluster, prefect_api):
    annex, inputs = tmp_path / "annex", tmp_path / "in"
    target = write_wav(annex / "SHA256E-s1--obj.wav", voiced(2.0, seed=3))
    write_wav(inputs / "plain.wav", voiced(1.0, seed=4))
    (inputs / "link.wav").symlink_to(target)
    (inputs / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (inputs / "loop.wav").symlink_to("loop.wav")
    os.mkfifo(inputs / "pipe.wav")
    (inputs / "array.wav").write_bytes(_wav_header(1000, 48000, 4))
    classifier = register_classifier(str(tmp_path / "reg"))
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work")
    out = str(tmp_path / "out")

    summary = run_inference("classify", str(inputs), out, classifier, settings=settings)

    fs, root = open_fs(out, StorageSpec())
    manifest = read_manifest(fs, ResultLayout(root, "classify", "classify", 1)).to_pylist()
    by_name = {r["source"].removeprefix(f"file://{inputs}/"): r for r in manifest}
    assert len(manifest) == len(by_name) == 6
    assert (summary["recordings_ok"], summary["recordings_rejected"]) == (2, 4)
    assert by_name["link.wav"]["status"] == "ok" and by_name["link.wav"]["duration_s"] == pytest.approx(2.0)
    assert by_name["link.wav"]["size"] == target.stat().st_size
    reasons = {name: row["reason"] for name, row in by_name.items() if row["status"] == "rejected"}
    assert reasons["dangling.wav"] == f"dangling symlink: target {tmp_path}/gone.wav does not exist"
    assert reasons["loop.wav"].startswith("symlink loop: ")
    assert reasons["pipe.wav"] == "not a regular file: a FIFO (named pipe)"
    assert reasons["array.wav"].startswith("too many channels: the header declares 1000")
    assert (by_name["array.wav"]["sample_rate"], by_name["array.wav"]["channels"]) == (48000, 1000)
