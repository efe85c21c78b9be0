"""The extract-features flow against real parts: SeaweedFS S3, Dask worker processes, Prefect's harness.

Every input must appear exactly once in the manifest, rejected ones with a reason; reruns write nothing;
changed files are redone without duplicates; other configs get their own partition.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from audiopipe.flows.extract_features import featurize
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, open_fs
from audiopipe.tasks.audio_encode import write_encoded
from audiopipe.tasks.audio_io import WHOLE_READ_MAX_BYTES
from audiopipe.tasks.execute import PROBE_MIN_BYTES
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.shards import OutputLayout, read_manifest
from audiopipe.tasks.synth import tone, write_messy_archive

pytestmark = [pytest.mark.s3, pytest.mark.slow]
LONG_FILE_S = 1_100.0  # > WHOLE_READ_MAX_BYTES as 16-bit 16 kHz WAV: exercises streamed, chunked reads
LONG_M4A_S = 360.0  # > PROBE_MIN_BYTES at 128 kbit/s: cut into chunks of segments
ENCODED = ("m4a", "aac", "mp4", "opus", "webm", "wma")


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    expected = write_messy_archive(root, seed=3, long_file_s=LONG_FILE_S)
    assert (root / "long/long_16k.wav").stat().st_size > WHOLE_READ_MAX_BYTES
    # a long AAC file: probed and cut into chunks like the WAV, each chunk seeking inside the MP4
    rng = np.random.default_rng(3)  # noise keeps the encoder at its bit rate
    blocks = ((tone(300.0 + 100 * k, 60.0, 24000) + 0.05 * rng.standard_normal(60 * 24000))[:, None]
              for k in range(int(LONG_M4A_S // 60)))
    write_encoded(root / "long/long_24k.m4a", blocks, 24000, "m4a", bit_rate=128_000)
    assert (root / "long/long_24k.m4a").stat().st_size > PROBE_MIN_BYTES
    return root, expected | {"long/long_24k.m4a": "ok"}


def settings_for(cluster, tmp_path: Path, **kw) -> RunSettings:
    return RunSettings(dask_address=cluster.scheduler_address, work_dir=tmp_path / "work", **kw)


def load_outputs(out_url: str, cfg: FeatureConfig):
    fs, root = open_fs(out_url, StorageSpec())
    layout = OutputLayout(root, cfg.config_hash)
    manifest = read_manifest(fs, layout)
    parts = [p for p in fs.find(layout.features_dir) if p.endswith(".parquet")]
    meta = [pq.read_table(io.BytesIO(fs.cat_file(p)), columns=["source", "segment", "n_frames"]) for p in parts]
    rows = [r for t in meta for r in t.to_pylist()]
    return manifest, rows, fs, layout


def snapshot(fs, root: str) -> dict[str, str]:
    return {p: str(info.get("ETag") or info.get("mtime")) for p, info in fs.find(root, detail=True).items()}


def test_messy_archive_on_s3_is_fully_accounted(messy, s3fs_client, bucket, dask_cluster, prefect_api, tmp_path):
    root, expected = messy
    s3fs_client.put(str(root) + "/", f"{bucket}/in/", recursive=True)
    cfg = FeatureConfig(segment_seconds=30.0)
    summary = featurize(f"s3://{bucket}/in", f"s3://{bucket}/out", feature_config=cfg,
                        settings=settings_for(dask_cluster, tmp_path, files_per_shard=7))
    manifest, rows, _, _ = load_outputs(f"s3://{bucket}/out", cfg)
    by_name = {r["source"].split(f"{bucket}/in/", 1)[1]: r for r in manifest.to_pylist()}
    audio = {k: v for k, v in expected.items() if v != "ignored"}
    assert Counter(r["source"] for r in manifest.to_pylist()).most_common(1)[0][1] == 1  # nothing doubled
    assert set(by_name) == set(audio)  # nothing lost, non-audio ignored
    for name, want in audio.items():
        row = by_name[name]
        assert row["status"] == want, (name, row["reason"])
        assert (row["reason"] is None) == (want == "ok"), name
    assert summary["files_ok"] == sum(v == "ok" for v in audio.values())
    assert summary["files_rejected"] == sum(v == "rejected" for v in audio.values())
    # one feature row per segment of every ok file, none for rejected files, each with its manifest shard
    per_source = Counter(r["source"] for r in rows)
    for row in manifest.to_pylist():
        assert per_source.get(row["source"], 0) == row["n_segments"], row["source"]
        if row["status"] == "ok":
            assert s3fs_client.exists(f"{bucket}/out/{row['shard']}")
    long_row = by_name["long/long_16k.wav"]
    assert long_row["n_segments"] == int(np.ceil(LONG_FILE_S / 30.0))
    assert long_row["duration_s"] == pytest.approx(LONG_FILE_S, abs=1e-3)
    segs = sorted(r["segment"] for r in rows if r["source"] == long_row["source"])
    assert segs == list(range(long_row["n_segments"]))
    stereo = by_name["formats/stereo_44k.wav"]
    assert (stereo["sample_rate"], stereo["channels"]) == (44100, 2)
    reasons = {name: by_name[name]["reason"] for name, want in audio.items() if want == "rejected"}
    assert reasons["bad/empty.wav"].startswith("empty")
    assert reasons["bad/truncated.wav"].startswith("truncated")
    assert reasons["bad/header_only.wav"].startswith("no audio")
    assert reasons["bad/not_audio.flac"].startswith("undecodable")
    assert reasons["bad/nan.wav"].startswith("invalid samples")
    for fmt in ENCODED:  # each format libsndfile lacks (and Ogg Opus): cut in half, decoded, read at its rate
        assert reasons[f"bad/truncated.{fmt}"].startswith("truncated: the "), reasons[f"bad/truncated.{fmt}"]
        row = next(by_name[n] for n in by_name if n.startswith("formats/") and n.endswith(f".{fmt}"))
        assert row["status"] == "ok" and row["n_segments"] == 1 and row["duration_s"] >= 1.0, row
    assert reasons["bad/random.m4a"].startswith("undecodable")
    assert reasons["bad/empty.webm"].startswith("empty")
    m4a = by_name["formats/aac_44k_stereo.m4a"]
    assert (m4a["sample_rate"], m4a["channels"], m4a["duration_s"]) == (44100, 2, 1.0)
    long_m4a = by_name["long/long_24k.m4a"]
    assert long_m4a["duration_s"] == pytest.approx(LONG_M4A_S, abs=0.1)
    assert long_m4a["n_segments"] == int(np.ceil(long_m4a["duration_s"] / 30.0)) >= 12
    segments = sorted(r["segment"] for r in rows if r["source"] == long_m4a["source"])
    assert segments == list(range(long_m4a["n_segments"]))


def test_rerun_writes_nothing_then_picks_up_new_and_changed(s3fs_client, bucket, dask_cluster, prefect_api,
                                                            tmp_path):
    import soundfile as sf

    from audiopipe.tasks.synth import tone

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        sf.write(src / f"tone_{i}.wav", tone(300 + 100 * i, 1.0 + i * 0.5, 16000), 16000)
    s3fs_client.put(str(src) + "/", f"{bucket}/in/", recursive=True)
    cfg, out = FeatureConfig(), f"s3://{bucket}/out"
    settings = settings_for(dask_cluster, tmp_path, files_per_shard=2)
    first = featurize(f"s3://{bucket}/in", out, feature_config=cfg, settings=settings)
    assert first["files_ok"] == 5
    before = snapshot(s3fs_client, f"{bucket}/out")

    again = featurize(f"s3://{bucket}/in", out, feature_config=cfg, settings=settings)
    assert (again["files_skipped"], again["files_ok"], again["shards_written"]) == (5, 0, 0)
    assert snapshot(s3fs_client, f"{bucket}/out") == before  # not one object written or rewritten

    buf = io.BytesIO()
    sf.write(buf, tone(1000, 4.0, 16000), 16000, format="WAV")
    s3fs_client.pipe(f"{bucket}/in/tone_0.wav", buf.getvalue())  # changed: 1 s -> 4 s
    s3fs_client.pipe(f"{bucket}/in/new/tone_new.wav", buf.getvalue())
    third = featurize(f"s3://{bucket}/in", out, feature_config=cfg, settings=settings)
    assert (third["files_skipped"], third["files_ok"]) == (4, 2)
    manifest, rows, _, _ = load_outputs(out, cfg)
    sources = manifest["source"].to_pylist()
    assert len(sources) == len(set(sources)) == 6
    changed = [r for r in rows if r["source"].endswith("/in/tone_0.wav")]
    assert len(changed) == 1 and changed[0]["n_frames"] == 1 + 4 * 16000 // 160  # the new version only


def test_other_feature_config_gets_its_own_partition(s3fs_client, bucket, dask_cluster, prefect_api, tmp_path):
    import soundfile as sf

    from audiopipe.tasks.synth import tone

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        sf.write(src / f"t{i}.flac", tone(440, 2.0, 22050), 22050)
    s3fs_client.put(str(src) + "/", f"{bucket}/in/", recursive=True)
    out, settings = f"s3://{bucket}/out", settings_for(dask_cluster, tmp_path)
    logmel, mfcc = FeatureConfig(), FeatureConfig(kind="mfcc", n_mfcc=20)
    featurize(f"s3://{bucket}/in", out, feature_config=logmel, settings=settings)
    summary = featurize(f"s3://{bucket}/in", out, feature_config=mfcc, settings=settings)
    assert summary["files_ok"] == 3 and summary["files_skipped"] == 0
    for cfg, bins in ((logmel, 80), (mfcc, 20)):
        manifest, rows, fs, layout = load_outputs(out, cfg)
        assert manifest.num_rows == 3 and set(manifest["config_hash"].to_pylist()) == {cfg.config_hash}
        table = pq.read_table(io.BytesIO(fs.cat_file(f"{bucket}/out/" + manifest["shard"][0].as_py())))
        assert set(table["config_hash"].to_pylist()) == {cfg.config_hash}
        assert len(table["features"][0].as_py()[0]) == bins
    assert logmel.config_hash != mfcc.config_hash


def test_credentials_as_flow_parameters_are_refused(tmp_path, prefect_api):
    from audiopipe.infra.errors import ConfigError

    with pytest.raises(ConfigError, match="credentials"):
        featurize(str(tmp_path), str(tmp_path / "out"), feature_config=FeatureConfig(),
                  settings=RunSettings(work_dir=tmp_path / "work"),
                  storage_options={"endpoint_url": "http://127.0.0.1:1", "secret": "do-not-store"})


def _wav_header(channels: int, sample_rate: int, frames: int) -> bytes:
    """A PCM_16 WAV whose header declares ``channels`` at ``sample_rate`` (zero samples follow)."""
    import struct

    data = bytes(frames * channels * 2)
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _hostile_local_archive(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str | None]]]:
    """A local input of symlinks (as git-annex/DVC lay them out), special files and files that lie about
    themselves. Returns the input and ``{relative name: (status, reason prefix)}``."""
    import os

    import soundfile as sf

    from audiopipe.tasks.synth import tone

    annex, root = tmp_path / "annex", tmp_path / "in"
    annex.mkdir()
    (root / "sub").mkdir(parents=True)
    sf.write(annex / "SHA256E-s64044--obj.wav", tone(440.0, 2.0, 16000), 16000, subtype="PCM_16")
    sf.write(root / "plain.wav", tone(330.0, 1.0, 16000), 16000, subtype="PCM_16")
    (root / "link.wav").symlink_to(annex / "SHA256E-s64044--obj.wav")
    (root / "sub" / "rel.wav").symlink_to(Path("..") / ".." / "annex" / "SHA256E-s64044--obj.wav")
    (root / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (root / "loop.wav").symlink_to("loop.wav")
    (root / "mounted").symlink_to(annex)
    os.mkfifo(root / "pipe.wav")  # opening it would block a worker for ever
    buf = io.BytesIO()
    sf.write(buf, tone(550.0, 1.5, 22050), 22050, format="WAV", subtype="PCM_16")
    (root / "mislabelled.m4a").write_bytes(buf.getvalue())  # a WAV: read by its content
    (root / "real.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(range(256)) * 8)
    (root / "array.wav").write_bytes(_wav_header(1000, 48000, 4))
    (root / "truncated.wav").write_bytes(buf.getvalue()[:44 + 2000])
    loud = tone(440.0, 1.0, 16000)
    loud = loud / np.abs(loud).max() * np.float32(1e18)  # finite samples, peak 1e18: the power spectrum overflows
    sf.write(root / "loud.wav", loud, 16000, subtype="FLOAT")
    return root, {
        "plain.wav": ("ok", None), "link.wav": ("ok", None), "sub/rel.wav": ("ok", None),
        "mislabelled.m4a": ("ok", None),
        "dangling.wav": ("rejected", f"dangling symlink: target {tmp_path}/gone.wav does not exist"),
        "loop.wav": ("rejected", "symlink loop: "), "mounted": ("rejected", "symlink to a directory: "),
        "pipe.wav": ("rejected", "not a regular file: a FIFO"),
        "real.m4a": ("rejected", "bad header: the MP4 box at byte 32 is not a valid box"),
        "array.wav": ("rejected", "too many channels: the header declares 1000"),
        "truncated.wav": ("rejected", "truncated: "),
        "loud.wav": ("rejected", "samples far outside [-1, 1]: peak 1e+18"),
    }


def test_local_archive_of_symlinks_and_lying_files_is_fully_accounted(dask_cluster, prefect_api, tmp_path):
    root, expected = _hostile_local_archive(tmp_path)
    cfg, out = FeatureConfig(), str(tmp_path / "out")
    settings = settings_for(dask_cluster, tmp_path, files_per_shard=4)

    summary = featurize(str(root), out, feature_config=cfg, settings=settings)

    manifest, rows, fs, layout = load_outputs(out, cfg)
    by_name = {r["source"].removeprefix(f"file://{root}/"): r for r in manifest.to_pylist()}
    assert manifest.num_rows == len(by_name) == len(expected)  # every entry exactly once
    for name, (status, reason) in expected.items():
        row = by_name[name]
        assert row["status"] == status, (name, row["reason"])
        assert (row["reason"] or "").startswith(reason or ""), (name, row["reason"])
    assert (summary["files_ok"], summary["files_rejected"]) == (4, 8)
    for name in ("link.wav", "sub/rel.wav"):  # the target's audio, under the link's name
        assert (by_name[name]["duration_s"], by_name[name]["size"]) == (2.0, 64044)
    assert (by_name["mislabelled.m4a"]["sample_rate"], by_name["mislabelled.m4a"]["duration_s"]) == (22050, 1.5)
    # a header that was read fills the columns of its rejected row
    assert (by_name["array.wav"]["sample_rate"], by_name["array.wav"]["channels"]) == (48000, 1000)
    truncated = by_name["truncated.wav"]
    assert (truncated["sample_rate"], truncated["channels"], truncated["duration_s"]) == (22050, 1, 1000 / 22050)
    assert (by_name["loud.wav"]["sample_rate"], by_name["loud.wav"]["duration_s"]) == (16000, 1.0)
    # feature rows: only for ok files, all finite
    assert Counter(r["source"] for r in rows) == {f"file://{root}/{n}": by_name[n]["n_segments"]
                                                  for n, (status, _) in expected.items() if status == "ok"}
    for part in {r["shard"] for r in manifest.to_pylist() if r["shard"]}:
        table = pq.read_table(io.BytesIO(fs.cat_file(f"{out}/{part}")))
        values = table["features"].combine_chunks().flatten().flatten().to_numpy()
        assert values.size and np.isfinite(values).all()

    again = featurize(str(root), out, feature_config=cfg, settings=settings)
    assert (again["files_skipped"], again["files_ok"], again["files_rejected"]) == (12, 0, 0)
    import soundfile as sf

    from audiopipe.tasks.synth import tone

    sf.write(tmp_path / "gone.wav", tone(880.0, 0.5, 16000), 16000, subtype="PCM_16")  # the link's target lands
    third = featurize(str(root), out, feature_config=cfg, settings=settings)
    assert (third["files_skipped"], third["files_ok"]) == (11, 1)
    manifest, _, _, _ = load_outputs(out, cfg)
    rows = [r for r in manifest.to_pylist() if r["source"] == f"file://{root}/dangling.wav"]
    assert [(r["status"], r["duration_s"]) for r in rows] == [("ok", 0.5)]
