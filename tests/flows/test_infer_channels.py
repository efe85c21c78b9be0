"""``transcribe --channels split`` against real parts: stereo WAVs on disk, real Dask worker processes,
Prefect's harness, a registered Keras model (``peaky_asr``: untrained weights made to emit letters, spaces and
blanks; ``per_frame_asr`` keeps each output frame a function of its own 4 input frames).

What this proves: each channel of a stereo recording is transcribed exactly as that channel alone, saved as a
mono file and transcribed with the default ``--channels mix``, would be (same words at the same times), for a
short recording decoded on its worker and for a long one cut into chunks and decoded in the shard; rows carry
their channel and the side files label the speaker. It does not prove that an agent/caller split helps a
trained recogniser: the model is untrained, so the words are the model's, not the speech's.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import srt
import webvtt

from audiopipe.flows.infer import run_inference
from audiopipe.infra.errors import ConfigError, SchemaError
from audiopipe.infra.schemas import TRANSCRIPTS_V1, TRANSCRIPTS_V2, transcripts_as_v2
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, open_fs
from audiopipe.tasks.infer_layout import ResultLayout
from audiopipe.tasks.shards import read_manifest
from tests.flows.infer_support import register_asr, voiced, write_wav
from tests.flows.test_infer import peaky_asr

pytestmark = [pytest.mark.slow]


def _results(out: str):
    fs, root = open_fs(out, StorageSpec())
    layout = ResultLayout(root, "transcribe", "asr", 1)
    parts = [p for p in fs.find(f"{layout.base}/transcripts") if p.endswith(".parquet")]
    table = pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(p))) for p in parts])
    return fs, layout, read_manifest(fs, layout), table


def _timed(rows) -> list[tuple]:
    return [(r["text"], round(r["start_s"], 3), round(r["end_s"], 3)) for r in sorted(rows, key=lambda r: r["segment"])]


def test_split_transcribes_each_channel_as_that_channel_alone(tmp_path, dask_cluster, prefect_api):
    inputs, alone = tmp_path / "in", tmp_path / "alone"
    short = [voiced(8.0, seed=1), voiced(8.0, seed=2)[::-1].copy()]  # agent and caller say different things
    long = [voiced(80.0, seed=3), voiced(80.0, seed=4)]  # stereo 16-bit: 5 MiB > 4 MiB, cut into chunks
    write_wav(inputs / "call.wav", np.stack(short, axis=1))
    write_wav(inputs / "long" / "call.wav", np.stack(long, axis=1))
    write_wav(inputs / "mono.wav", voiced(5.0, seed=5))
    for ch in (0, 1):  # the reference: each channel saved alone, transcribed mixed (mono)
        write_wav(alone / f"short{ch}.wav", short[ch])
        write_wav(alone / f"long{ch}.wav", long[ch])
    ref = register_asr(str(tmp_path / "reg"), model=peaky_asr())
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work")
    out = str(tmp_path / "out")

    summary = run_inference("transcribe", str(inputs), out, ref, settings=settings, channels="split")
    run_inference("transcribe", str(alone), str(tmp_path / "ref"), ref, settings=settings)
    assert summary["recordings_ok"] == 3
    assert summary["audio_hours"] * 3600 == pytest.approx(8.0 + 80.0 + 5.0, abs=0.01)  # each recording once

    fs, layout, manifest, table = _results(out)
    assert table.schema.equals(TRANSCRIPTS_V2, check_metadata=False)
    rows = table.to_pylist()
    assert set(manifest["config_hash"].to_pylist()) == {"asr@1 channels=split"}
    _, _, _, reference = _results(str(tmp_path / "ref"))
    expected = {}
    for r in reference.to_pylist():
        expected.setdefault(r["source"].rsplit("/", 1)[-1], []).append(r)
    assert all(r["channel"] is None for r in reference.to_pylist())  # mix: no channel
    for rel, name in (("call.wav", "short"), ("long/call.wav", "long")):
        mine = [r for r in rows if r["source"].endswith(f"/in/{rel}")]
        for ch in (0, 1):
            heard = [r for r in mine if r["channel"] == ch]
            assert heard and _timed(heard) == _timed(expected[f"{name}{ch}.wav"]), (rel, ch)
        assert sorted(r["segment"] for r in mine) == list(range(len(mine)))  # one numbering, in time order
        starts = [r["start_s"] for r in sorted(mine, key=lambda r: r["segment"])]
        assert starts == sorted(starts)
        assert _timed([r for r in mine if r["channel"] == 0]) != _timed([r for r in mine if r["channel"] == 1])
        # the side files label each segment with its channel, in the table's order
        by_segment = sorted(mine, key=lambda r: r["segment"])
        labelled = [f"[ch{r['channel']}] {r['text']}" for r in by_segment]
        files = f"{layout.base}/files/{rel}"
        assert [c.content for c in srt.parse(fs.cat_file(f"{files}.srt").decode())] == labelled
        assert [c.text for c in webvtt.from_buffer(io.StringIO(fs.cat_file(f"{files}.vtt").decode()))] == labelled
        assert fs.cat_file(f"{files}.txt").decode().splitlines() == labelled
        lines = [json.loads(line) for line in fs.cat_file(f"{files}.jsonl").decode().splitlines()]
        assert [(d["channel"], d["speaker"], d["text"]) for d in lines] == [
            (r["channel"], f"channel {r['channel']}", r["text"]) for r in by_segment]
    mono = [r for r in rows if r["source"].endswith("/in/mono.wav")]
    assert mono and {r["channel"] for r in mono} == {0}  # mono with split: one channel, 0

    # exactly once per recording, model version and channel mode
    again = run_inference("transcribe", str(inputs), out, ref, settings=settings, channels="split")
    assert again["recordings_skipped"] == 3 and again["shards_written"] == 0
    with pytest.raises(ConfigError, match=r"already answered here as 'asr@1 channels=split'.*--reprocess"):
        run_inference("transcribe", str(inputs), out, ref, settings=settings)  # mix over split: refused
    redo = run_inference("transcribe", str(inputs), out, ref, settings=settings, reprocess=True)
    assert redo["recordings_ok"] == 3
    _, _, manifest, table = _results(out)
    assert sorted(manifest["source"].to_pylist()) == sorted({r["source"] for r in rows})
    assert set(manifest["config_hash"].to_pylist()) == {"asr@1"}
    assert set(table["channel"].to_pylist()) == {None}  # the split rows were replaced, not kept beside


def test_channels_must_be_mix_or_split(tmp_path, prefect_api):
    write_wav(tmp_path / "in" / "a.wav", voiced(2.0))
    ref = register_asr(str(tmp_path / "reg"))
    with pytest.raises(ConfigError, match="--channels must be one of mix, split"):
        run_inference("transcribe", str(tmp_path / "in"), str(tmp_path / "out"), ref,
                      settings=RunSettings(workers=1, work_dir=tmp_path / "work"), channels="left")
    assert not (tmp_path / "out" / "transcribe").exists()


def test_transcript_readers_accept_v1_and_v2():
    v1 = pa.Table.from_pylist([{"source": "s", "segment": 0, "start_s": 0.0, "end_s": 1.0, "text": "hi",
                                "confidence": 0.5, "words": [], "model": "asr@1", "model_version": 1}],
                              schema=TRANSCRIPTS_V1)
    as_v2 = transcripts_as_v2(v1)
    assert as_v2.schema.equals(TRANSCRIPTS_V2, check_metadata=True)
    assert as_v2.column("channel").to_pylist() == [None] and as_v2.column("text").to_pylist() == ["hi"]
    assert transcripts_as_v2(as_v2).equals(as_v2)
    with pytest.raises(SchemaError, match="accepted version"):
        transcripts_as_v2(v1.drop_columns(["words"]))


# ---- --gate -------------------------------------------------------------------------------------------

GATE_CLASSES = ("speech", "music", "silence")


def _tone(seconds: float, freq: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.2 * np.sin(2 * np.pi * 1.5 * freq * t)).astype(np.float32)


def _quiet(seconds: float, seed: int, rate: int = 16_000) -> np.ndarray:
    return (1e-4 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def nearest_centroid_gate():
    """A classify model whose decision the test controls: the time-averaged log-mel frame of a window goes to
    the nearest of three centroids (speech-like ``voiced``, steady two-note tones, near-silence), measured on
    clips of other seeds and notes than the test recording's. Written as one Dense layer (score_c =
    2 m_c.x - |m_c|^2), so it is a real registered Keras model run by the same code as any classifier."""
    import keras

    from audiopipe.models.layers import LengthMask
    from audiopipe.tasks.features import compute_features
    from tests.flows.infer_support import FEATURES

    clips = {"speech": [voiced(3.0, seed=s) for s in range(40, 46)],
             "music": [_tone(3.0, f) for f in (220.0, 330.0, 523.0, 700.0)],
             "silence": [_quiet(3.0, s) for s in range(3)]}
    centroids = np.stack([np.mean([compute_features(c, cfg=FEATURES).mean(axis=0) for c in clips[k]], axis=0)
                          for k in GATE_CLASSES])
    features = keras.Input((None, FEATURES.n_mels), name="features")
    lengths = keras.Input((), dtype="int32", name="lengths")
    x = LengthMask(1, name="input_zero")([features, lengths])
    x = keras.layers.GlobalAveragePooling1D(name="mean")(x)
    out = keras.layers.Dense(len(GATE_CLASSES), activation="softmax", name="nearest")(x)
    model = keras.Model({"features": features, "lengths": lengths}, out, name="gate")
    model.get_layer("nearest").set_weights([2 * centroids.T, -(centroids ** 2).sum(axis=1)])
    return model


def register_gate(registry_url: str) -> str:
    from audiopipe.models.registry import Registry, TrainingData
    from tests.flows.infer_support import FEATURES

    ref = Registry(registry_url, StorageSpec()).register(
        "gate", nearest_centroid_gate(), family="classify", metrics={"accuracy": 1.0},
        feature_config=FEATURES.to_dict(), training_data=TrainingData.of(["made-in-test"]),
        classes=GATE_CLASSES, params={"model_config": {}})
    return f"{registry_url}:{ref.name}@{ref.version}"


def test_gate_transcribes_only_speech_windows_and_marks_the_rest(tmp_path, dask_cluster, prefect_api):
    """A 24 s call: speech, silence, speech, hold music, 6 s each (3 s gate windows, so no window straddles
    two parts). What this proves: the registered gate's classes decide which windows reach the recogniser
    (rows of text lie only in the speech parts; the silence and music parts are rows with ``gated_as``,
    "[silence]"/"[music]" cues and 12 s reported gated), and both models load once per worker. The gate is a
    nearest-centroid model on synthetic sounds, not a trained speech detector; the recogniser is untrained
    and emits letters on any audio (which is why its text in the silence and music without the gate shows
    what the gate removes), so the words are the model's, not the speech's."""
    from distributed import Client

    from audiopipe.tasks.infer import model_loads

    parts = [voiced(6.0, seed=11), _quiet(6.0, 7), voiced(6.0, seed=12), _tone(6.0, 440.0)]
    write_wav(tmp_path / "in" / "call.wav", np.concatenate(parts))
    asr = register_asr(str(tmp_path / "reg"))  # untrained per_frame_asr: letters on any audio, silence too
    gate = register_gate(str(tmp_path / "reg"))
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work")
    out = str(tmp_path / "out")
    with Client(dask_cluster.scheduler_address) as client:
        before = client.run(model_loads)
        summary = run_inference("transcribe", str(tmp_path / "in"), out, asr, settings=settings, gate=gate)
        after = client.run(model_loads)
    assert summary["recordings_ok"] == 1
    assert summary["gated_hours"] * 3600 == pytest.approx(12.0, abs=0.01)
    for worker, loads in after.items():  # the recogniser and the gate: once each on every worker that ran
        grown = {k: n - before[worker].get(k, 0) for k, n in loads.items() if str(tmp_path / "reg") in k}
        assert set(grown.values()) <= {1} and len(grown) in (0, 2), (worker, grown)

    fs, layout, manifest, table = _results(out)
    rows = sorted(table.to_pylist(), key=lambda r: r["segment"])
    gated = [(r["gated_as"], r["start_s"], r["end_s"], r["text"], r["words"]) for r in rows if r["gated_as"]]
    assert gated == [("silence", 6.0, 12.0, "", []), ("music", 18.0, 24.0, "", [])]
    spoken = [r for r in rows if not r["gated_as"]]
    assert spoken and all(r["text"] for r in spoken)
    for r in spoken:  # every word heard inside a speech part
        assert all((0 <= w["start_s"] and w["end_s"] <= 6.0) or (12.0 <= w["start_s"] and w["end_s"] <= 18.0)
                   for w in r["words"]), r
    assert manifest["config_hash"].to_pylist() == ["asr@1 gate=gate@1:speech"]
    cues = [c.content for c in srt.parse(fs.cat_file(f"{layout.base}/files/call.wav.srt").decode())]
    assert cues == [("[" + r["gated_as"] + "]") if r["gated_as"] else r["text"] for r in rows]
    lines = [json.loads(line) for line in fs.cat_file(f"{layout.base}/files/call.wav.jsonl").decode().splitlines()]
    assert [d.get("gated_as") for d in lines] == [r["gated_as"] for r in rows]

    # without the gate the same recording yields text in the non-speech parts too: the gate removed it
    plain = run_inference("transcribe", str(tmp_path / "in"), str(tmp_path / "plain"), asr, settings=settings)
    assert plain["gated_hours"] == 0
    _, _, _, ungated = _results(str(tmp_path / "plain"))
    assert any(w["start_s"] >= 6.0 and w["end_s"] <= 12.0 or w["start_s"] >= 18.0
               for r in ungated.to_pylist() for w in r["words"])
    with pytest.raises(ConfigError, match="--gate-classes talk not among gate@1's classes"):
        run_inference("transcribe", str(tmp_path / "in"), str(tmp_path / "bad"), asr, settings=settings, gate=gate,
                      gate_classes=["talk"])


def test_gate_decides_per_channel_for_whole_recordings_and_chunks(tmp_path):
    """In-process (no Dask): with --channels split and a gate, each channel's windows are classified on their
    own: a stereo call with speech on channel 0 and hold music on channel 1 sends only channel 0 to the
    recogniser, whole and as a chunk of windows, and channel 1's windows merge into one music span."""
    from audiopipe.flows.infer import model_spec
    from audiopipe.tasks.extract import SourceFile
    from audiopipe.tasks.infer import InferItem, infer_item
    from audiopipe.tasks.infer_gate import gated_spans

    wav = write_wav(tmp_path / "in" / "call.wav", np.stack([voiced(30.0, seed=21), _tone(30.0, 392.0)], axis=1))
    asr = register_asr(str(tmp_path / "reg"))
    spec = model_spec("transcribe", asr, StorageSpec(), in_url=str(tmp_path / "in"), work_dir=tmp_path / "work",
                      channels="split", gate=register_gate(str(tmp_path / "reg")))
    assert (spec.window_s, spec.gate.model_tag) == (3.0, "gate@1")
    source = SourceFile("file://" + str(wav), wav.stat().st_size)
    whole, = infer_item(InferItem((source,)), spec, StorageSpec())
    assert whole.ok and set(whole.channel_words) == {0} and whole.channel_words[0]
    assert [(g[1], g[4]) for g in whole.gated if g[0] == 1] == [(i, "music") for i in range(10)]
    heard = [g for g in whole.gated if g[0] == 0]  # the gate may call a pause of the speech "silence"
    assert {g[4] for g in heard} <= {"silence"} and len(heard) < 5
    music = [sp for sp in gated_spans(whole.gated) if sp[0] == 1]
    assert [sp[:4] for sp in music] == [(1, 0.0, 30.0, "music")]
    chunk, = infer_item(InferItem((source,), 2, 5), spec, StorageSpec())
    assert [g[1] for g in chunk.gated if g[0] == 1] == [2, 3, 4]
    kept = 3 - len([g for g in chunk.gated if g[0] == 0])
    assert set(chunk.channel_frames) == {0} and kept
    assert sum(len(lp) for _, lp in chunk.channel_frames[0]) == round(kept * 3.0 / spec.frame_s)
