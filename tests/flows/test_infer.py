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
import srt
import webvtt
from distributed import Client, get_task_stream

from audiopipe.flows.infer import model_spec, run_inference
from audiopipe.infra.errors import ConfigError
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
    """The chunks' CTC log-probabilities joined in time order (each must start where the last ended)."""
    pieces = sorted((p for o in outputs for p in o.frames), key=lambda p: p[0])
    for (a, lp), (b, _) in zip(pieces, pieces[1:]):
        assert a + len(lp) == b, "output frames lost or doubled between windows"
    return np.concatenate([p[1] for p in pieces])


def peaky_asr(seed: int = 0, upsample: int = 1, scale: float = 0.5, blank_bias: float = 14.0,
              space_bias: float = 5.0):
    """``per_frame_asr`` made to answer more like a trained model: letters, spaces and blanks all win some
    frames (raw log-mel inputs otherwise give every frame the same few letters)."""
    from audiopipe.tasks.features import compute_features
    from tests.flows.infer_support import FEATURES

    model = per_frame_asr(seed=seed, upsample=upsample)
    layer = model.get_layer("classifier")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * scale, bias * 0])
    probe = compute_features(voiced(10.0, seed=99), cfg=FEATURES)
    out = model({"features": probe[None], "lengths": np.array([len(probe)], np.int32)}).numpy()[0]
    out = out[:len(out) // upsample * upsample]
    centred = -out.reshape(-1, upsample, out.shape[-1]).mean(axis=0)  # each of a step's output frames apart
    centred[:, 0] += blank_bias
    centred[:, 1] += space_bias
    layer.set_weights([kernel * scale, centred.reshape(-1)])
    return model


def register_asr_with_lm(registry_url: str, *, model=None, storage: StorageSpec = StorageSpec(), upsample: int = 1,
                         sentences=("the cat sat on the mat", "a dog ran", "hello there")) -> str:
    """An asr version registered as training registers one: with its character LM file and decoder setting."""
    from audiopipe.models.ctc_decode import CharNgramLM
    from audiopipe.models.registry import TrainingData
    from audiopipe.tasks.train_lm import LM_FILE
    from tests.flows.infer_support import FEATURES, VOCAB

    lm = CharNgramLM.fit(list(sentences), order=4, vocab=VOCAB)
    ref = Registry(registry_url, storage).register(
        "asr", model or peaky_asr(upsample=upsample), family="asr", metrics={"cer": 0.5},
        feature_config=FEATURES.to_dict(), training_data=TrainingData.of(["made-in-test"]), vocabulary=tuple(VOCAB),
        params={"model_config": {"subsample": 4 // upsample, "upsample": upsample}},
        files={LM_FILE: lm.to_bytes()},
        extra={"decoder": {"beam_width": 8, "lm_file": LM_FILE, "lm_weight": 0.5, "insertion_bonus": 1.0}})
    return f"{registry_url}:{ref.name}@{ref.version}"


@pytest.mark.parametrize("upsample", [1, 2])  # outputs every 40 ms, or every 20 ms from 40 ms steps
def test_windowed_long_recording_equals_one_pass(tmp_path, upsample):
    """Windows, and chunks of windows on different items, join into exactly the single-pass frame sequence,
    and beam search with the model's LM over it finds the same timed words as over one window."""
    from audiopipe.tasks.infer_decode import decode_recording, loaded_decoder

    wav = write_wav(tmp_path / "in" / "long.wav", voiced(95.0))
    ref = register_asr_with_lm(str(tmp_path / "reg"), upsample=upsample)
    spec = model_spec("transcribe", ref, StorageSpec(), in_url=str(tmp_path / "in"), work_dir=tmp_path / "work")
    assert (spec.beam_width, spec.lm_file) == (8, "char_lm.json.gz")  # the card's decoder by default
    source = SourceFile("file://" + str(wav), wav.stat().st_size)
    whole = dataclasses.replace(spec, window_s=200.0)
    windowed = infer_item(InferItem((source,)), spec, StorageSpec())  # 10 windows, decoded on the worker
    one_pass = infer_item(InferItem((source,)), whole, StorageSpec())
    one_pass_frames = infer_item(InferItem((source,), 0, 1), whole, StorageSpec())  # a chunk: frames come back
    chunked = [out for first in range(0, 10, 3)
               for out in infer_item(InferItem((source,), first, first + 3), spec, StorageSpec())]
    assert windowed[0].windows == 10 and one_pass[0].windows == 1
    assert not windowed[0].frames and all(o.words is None for o in chunked)
    expected = _frames(one_pass_frames)
    assert len(expected) == int(np.ceil(95.0 / spec.frame_s))
    np.testing.assert_array_equal(_frames(chunked).argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(_frames(chunked).astype(np.float32), expected.astype(np.float32), atol=0.02)
    stitched = decode_recording([p for o in chunked for p in o.frames], spec, loaded_decoder(spec, StorageSpec()))

    def timed(words):
        return [(w.text, w.start_s, w.end_s) for w in words]

    assert sum(len(w.text) for w in stitched) > 100, "the model emits text, so the comparison means something"
    assert timed(stitched) == timed(windowed[0].words) == timed(one_pass[0].words)
    assert all(0 < w.confidence <= 1 for w in stitched)


def bilstm_asr(seed: int = 0):
    """The project's recogniser (``build_ctc_asr``: frame stack, two BiLSTMs, CTC classifier), small and
    untrained, normalised with the statistics of speech-like features as training would set them."""
    import keras

    from audiopipe.models.asr_ctc import CtcAsrConfig, build_ctc_asr
    from audiopipe.models.layers import set_feature_stats
    from audiopipe.tasks.features import compute_features
    from tests.flows.infer_support import FEATURES, VOCAB

    keras.utils.set_random_seed(seed)
    model = build_ctc_asr(CtcAsrConfig(n_mels=FEATURES.n_mels, vocab=VOCAB, frontend="stack", subsample=4,
                                       lstm_units=16, lstm_layers=2, dropout=0.0, spec_augment=None))
    probe = compute_features(voiced(20.0, seed=98), cfg=FEATURES)
    set_feature_stats(model, probe.mean(axis=0), probe.std(axis=0))
    return model


def reach_in_frames(model, features: np.ndarray, *, eps: float, at: int = 1200) -> int:
    """How many output frames away a change of the input (4 input frames = one output step at ``at``) still
    moves some log-probability by more than ``eps``: the model's effective receptive field, both ways."""
    from audiopipe.models.ctc_decode import log_softmax

    def log_probs(x):
        return log_softmax(model({"features": x[None], "lengths": np.array([len(x)], np.int32)}).numpy()[0])

    changed = features.copy()
    changed[at:at + 4] += 3 * features.std(axis=0) * np.random.default_rng(0).standard_normal((4, features.shape[1]))
    moved = np.flatnonzero(np.abs(log_probs(changed) - log_probs(features)).max(axis=1) > eps)
    return int(np.abs(moved - at // 4).max())


def test_windowed_bilstm_equals_one_pass_on_core_frames(tmp_path):
    """With a BiLSTM every output depends on the whole window, so windows are not bit-identical to one pass.
    The claim is that the context each side covers the recurrent layers' effective receptive field: then the
    stitched core frames equal one pass to within that field's threshold, and so do the best paths and the
    transcripts. Without context the same comparison must fail, or it would prove nothing."""
    from audiopipe.models.ctc_align import decode_words
    from audiopipe.tasks.features import compute_features
    from tests.flows.infer_support import FEATURES, VOCAB

    model = bilstm_asr()
    audio = voiced(40.0, seed=4)
    eps = 0.02  # nats: float16 frames (about 0.01 nats, see tasks.infer._core_frames) plus the field's tail
    wav = write_wav(tmp_path / "in" / "long.wav", audio)
    ref = register_asr(str(tmp_path / "reg"), model=model)
    spec = model_spec("transcribe", ref, StorageSpec(), in_url=str(tmp_path / "in"), work_dir=tmp_path / "work")
    reach = reach_in_frames(model, compute_features(audio, cfg=FEATURES), eps=eps / 2)
    assert 2 <= reach < spec.context_s / spec.frame_s, (reach, spec.context_s / spec.frame_s)  # context covers it
    source = SourceFile("file://" + str(wav), wav.stat().st_size)

    def stitched(spec_) -> np.ndarray:  # 4 windows of 10 s, in two chunks (two items), joined
        return _frames([o for first in (0, 2) for o in infer_item(InferItem((source,), first, first + 2), spec_,
                                                                   StorageSpec())]).astype(np.float32)

    one_pass = _frames(infer_item(InferItem((source,), 0, 1), dataclasses.replace(spec, window_s=200.0),
                                  StorageSpec())).astype(np.float32)
    windowed = stitched(spec)
    assert windowed.shape == one_pass.shape == (int(np.ceil(40.0 / spec.frame_s)), len(VOCAB) + 1)
    np.testing.assert_allclose(windowed, one_pass, atol=eps, rtol=0)
    top2 = np.sort(one_pass, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * eps  # frames whose best class no error within eps can flip
    assert clear.mean() > 0.5  # an untrained model has many near ties; those frames are left out
    np.testing.assert_array_equal(windowed.argmax(axis=1)[clear], one_pass.argmax(axis=1)[clear])

    def words(lp):
        return [w.text for w in decode_words(lp, frame_s=spec.frame_s, vocab=VOCAB)]

    assert words(windowed) == words(one_pass) and sum(map(len, words(one_pass))) > 50  # the greedy transcripts
    no_context = stitched(dataclasses.replace(spec, context_s=0.0))
    assert np.abs(no_context - one_pass).max() > 5 * eps, "the seams must show without context"


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
    model = register_asr_with_lm(f"s3://{bucket}/models", model=per_frame_asr())  # beam + LM fetched from S3
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work",
                           files_per_shard=9)
    with Client(dask_cluster.scheduler_address) as client:  # loads counted per worker process from here
        before = client.run(model_loads)
        with get_task_stream(client) as stream:  # which worker ran which item (every client's tasks)
            summary = run_inference("transcribe", f"s3://{bucket}/in", f"s3://{bucket}/out", model,
                                    settings=settings)
        after = client.run(model_loads)
    assert summary["recordings_listed"] == len(expected)
    ran_items = Counter(t["worker"] for t in stream.data if str(t["key"]).startswith("transcribe-"))
    assert ran_items and sum(ran_items.values()) > len(ran_items), "workers ran several items each"
    for worker in ran_items:  # exactly once per worker that ran items, not once per item or recording
        assert after[worker].get(model, 0) - before[worker].get(model, 0) == 1, (worker, after[worker])
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
    by_source = {}
    for row in transcripts.to_pylist():
        by_source.setdefault(row["source"], []).append(row)
    for r in ok:  # .jsonl, .srt, .vtt and .txt per recording, beside the tables, saying what the table says
        rel = r["source"].split("/in/", 1)[1]
        texts = [row["text"] for row in sorted(by_source.get(r["source"], []), key=lambda row: row["segment"])]
        assert len(texts) == r["n_segments"]
        lines = fs.cat_file(f"{layout.base}/files/{rel}.jsonl").decode().splitlines()
        assert [json.loads(line)["text"] for line in lines] == texts
        assert all(json.loads(line)["source"] == r["source"] for line in lines)
        assert [s.content for s in srt.parse(fs.cat_file(f"{layout.base}/files/{rel}.srt").decode())] == texts
        vtt = webvtt.from_buffer(io.StringIO(fs.cat_file(f"{layout.base}/files/{rel}.vtt").decode()))
        assert [c.text for c in vtt] == texts
        assert fs.cat_file(f"{layout.base}/files/{rel}.txt").decode().splitlines() == texts
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

    write_wav(tmp_path / "in" / "a.wav", voiced(1.0))
    classifier = register_classifier(str(tmp_path / "reg"))
    with pytest.raises(ConfigError, match="needs a 'asr' model"):
        run_inference("transcribe", str(tmp_path / "in"), str(tmp_path / "out"), classifier,
                      settings=RunSettings(workers=1, work_dir=tmp_path / "work"))
    assert Registry(str(tmp_path / "reg")).list_models() == ["classify"]


def test_transcribe_decodes_with_the_models_lm_by_default_and_greedily_on_request(tmp_path, dask_cluster,
                                                                                  prefect_api):
    inputs = tmp_path / "in"
    write_wav(inputs / "call.wav", voiced(6.0, seed=1))
    write_wav(inputs / "long.wav", voiced(150.0, seed=2))  # > 4 MiB: two chunks, decoded in the shard's process
    ref = register_asr_with_lm(str(tmp_path / "reg"))
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work")
    beam = run_inference("transcribe", str(inputs), str(tmp_path / "beam"), ref, settings=settings)
    greedy = run_inference("transcribe", str(inputs), str(tmp_path / "greedy"), ref, settings=settings, beam_width=1)
    assert beam["recordings_ok"] == greedy["recordings_ok"] == 2
    decoders = {}
    for name in ("beam", "greedy"):
        fs, layout, manifest = _outputs(str(tmp_path / name), "transcribe", "asr", 1)
        decoders[name] = json.loads(fs.cat_file(f"{layout.base}/_model.json"))["decoder"]
        rows = _table(fs, layout, "transcripts").to_pylist()
        long_rows = [r for r in rows if r["source"].endswith("long.wav")]
        assert max(r["end_s"] for r in long_rows) > 130  # past the first chunk (120 s)
        assert all(r["words"] and 0 < r["confidence"] <= 1 for r in rows)
    assert decoders == {"beam": "CTC prefix beam search, width 8, char_lm.json.gz x0.5, insertion bonus 1",
                        "greedy": "greedy (best path)"}
    with pytest.raises(ConfigError, match="beam-width"):
        run_inference("transcribe", str(inputs), str(tmp_path / "bad"), ref, settings=settings, beam_width=0)


def test_a_model_stored_without_an_lm_decodes_greedily_or_beam_without_lm(tmp_path, caplog):
    ref = register_asr(str(tmp_path / "reg"))  # registered as before LMs were stored: no files on the card
    with caplog.at_level("WARNING", logger="audiopipe.flows.infer"):
        spec = model_spec("transcribe", ref, StorageSpec(), in_url=str(tmp_path), work_dir=tmp_path / "work")
    assert "asr@1 has no character LM stored with it" in caplog.text and "greedy decoding" in caplog.text
    assert (spec.beam_width, spec.lm_file) == (1, "") and spec.describe_decoder() == "greedy (best path)"
    caplog.clear()
    with_lm = register_asr_with_lm(str(tmp_path / "reg2"))
    with caplog.at_level("WARNING", logger="audiopipe.flows.infer"):
        greedy = model_spec("transcribe", with_lm, StorageSpec(), in_url=str(tmp_path), work_dir=tmp_path / "work",
                            decoder={"beam_width": 1})
    assert greedy.beam_width == 1 and not caplog.text  # greedy on request is no warning
    beam = model_spec("transcribe", ref, StorageSpec(), in_url=str(tmp_path), work_dir=tmp_path / "work",
                      decoder={"beam_width": 4})
    assert (beam.beam_width, beam.lm_file, beam.lm_weight, beam.insertion_bonus) == (4, "", 0.0, 0.0)
    assert beam.describe_decoder() == "CTC prefix beam search, width 4, no LM, insertion bonus 0"


def test_tampered_lm_is_refused_before_any_work(tmp_path, prefect_api):
    write_wav(tmp_path / "in" / "a.wav", voiced(3.0))
    ref = register_asr_with_lm(str(tmp_path / "reg"))
    lm_file = next((tmp_path / "reg").rglob("char_lm.json.gz"))
    lm_file.write_bytes(lm_file.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match="sha256|size"):
        run_inference("transcribe", str(tmp_path / "in"), str(tmp_path / "out"), ref,
                      settings=RunSettings(workers=1, work_dir=tmp_path / "work"))
    assert not (tmp_path / "out" / "transcribe").exists()


def test_non_finite_model_output_rejects_the_recording(tmp_path, dask_cluster, prefect_api):
    """A model whose weights went NaN answers NaN for everything: every recording is rejected with that
    reason, none is written as ok (issue 12: outputs are finite only)."""
    from audiopipe.models.classifier import ClassifierConfig, build_classifier
    from audiopipe.models.registry import TrainingData
    from tests.flows.infer_support import FEATURES

    inputs = tmp_path / "in"
    write_wav(inputs / "a.wav", voiced(4.0, seed=1))
    write_wav(inputs / "b.wav", voiced(2.0, seed=2))
    asr_model = per_frame_asr()
    kernel, bias = asr_model.get_layer("classifier").get_weights()
    asr_model.get_layer("classifier").set_weights([np.full_like(kernel, np.nan), bias])
    classifier = build_classifier(ClassifierConfig(n_mels=FEATURES.n_mels, n_classes=2, conv_channels=(8,),
                                                   lstm_units=8))
    dense = classifier.layers[-1]
    dense.set_weights([np.full_like(w, np.inf) for w in dense.get_weights()])
    registry = str(tmp_path / "reg")
    models = {"transcribe": register_asr(registry, model=asr_model),
              "classify": f"{registry}:classify@" + str(Registry(registry).register(
                  "classify", classifier, family="classify", metrics={"accuracy": 0.5},
                  feature_config=FEATURES.to_dict(), training_data=TrainingData.of(["made-in-test"]),
                  classes=("noise", "tone"), params={"model_config": {}}).version)}
    settings = RunSettings(dask_address=dask_cluster.scheduler_address, work_dir=tmp_path / "work")
    for task, ref in models.items():
        summary = run_inference(task, str(inputs), str(tmp_path / "out"), ref, settings=settings)
        assert (summary["recordings_ok"], summary["recordings_rejected"]) == (0, 2)
        assert summary["rejected_by_reason"] == {"non-finite model output": 2}
        fs, layout, manifest = _outputs(str(tmp_path / "out"), task, ref.rsplit(":", 1)[1].split("@")[0], 1)
        assert set(manifest["status"].to_pylist()) == {"rejected"}
        assert all("NaN or Inf" in r for r in manifest["reason"].to_pylist())
        assert all(_table(fs, layout, t) is None for t in ("transcripts", "segments", "recordings"))
