"""``transcribe --gate`` benchmark: compute saved and words lost on call-like recordings.

Run ``.venv/bin/python benchmarks/gate.py [--recordings 6] [--seconds 60]`` (about 2 minutes on 2 loaded cores).

Corpus: 16 kHz mono WAVs, each a shuffled concatenation of 6 s blocks, one third each of speech-like audio
(``tests/flows/infer_support.voiced``: harmonic bursts and pauses), hold music (two-note tones, a new note
every block) and near-silence (-80 dBFS noise). Models, registered in a local registry under
``benchmarks/.data/gate``:

- recogniser: ``build_ctc_asr(CtcAsrConfig(n_mels=40))`` (the project's architecture at its default size,
  conv2d front end, subsample 4, BiLSTMs; untrained weights, so its compute is a trained model's but its
  "words" are not the speech's: the words-lost figure compares two decodes of the same model);
- gate: the nearest-centroid classifier of ``tests/flows/test_infer_channels.py`` (speech / music /
  silence centroids of time-averaged log-mel frames measured on clips of other seeds and notes), a stand-in
  for a trained sound classifier: it is right on this corpus by construction, so "words lost" here measures
  what the 3 s windows and the decode split at gated windows cost, not a classifier's mistakes.

Both runs call ``tasks.infer.infer_item`` in this process on all recordings as one item (models warmed
first), as a worker does, with greedy decoding: (u) ungated, (g) with the gate. Reported: audio seconds /
wall seconds of each (best of two), the gate's own time, and the words whose middle lies in a speech block:
ungated vs gated (lost = the difference over the ungated count), plus the ungated words in music/silence
that the gate removes. No Prefect server and no Dask: the worker's compute only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ``tests.flows`` helpers import from the checkout

from audiopipe.infra.storage import StorageSpec  # noqa: E402
from audiopipe.tasks.extract import SourceFile  # noqa: E402

BLOCK_S = 6.0


def corpus(folder: Path, recordings: int, seconds: float) -> dict[str, list[tuple[float, float, str]]]:
    """Write the WAVs; returns per file URL its blocks ``(start_s, end_s, kind)``."""
    from tests.flows.infer_support import voiced, write_wav
    from tests.flows.test_infer_channels import _quiet, _tone

    rng = np.random.default_rng(0)
    blocks_per = int(seconds // BLOCK_S)
    truth = {}
    for i in range(recordings):
        kinds = (["speech", "music", "silence"] * blocks_per)[:blocks_per]
        rng.shuffle(kinds)
        audio, spans = [], []
        for b, kind in enumerate(kinds):
            seed = 1000 * i + b
            audio.append(voiced(BLOCK_S, seed=seed) if kind == "speech" else
                         _tone(BLOCK_S, float(rng.uniform(200, 800))) if kind == "music" else _quiet(BLOCK_S, seed))
            spans.append((b * BLOCK_S, (b + 1) * BLOCK_S, kind))
        path = write_wav(folder / f"call{i:02d}.wav", np.concatenate(audio))
        truth["file://" + str(path)] = spans
    return truth


def register(registry: Path) -> tuple[str, str, str]:
    import keras

    from audiopipe.models.asr_ctc import CtcAsrConfig, build_ctc_asr
    from audiopipe.models.registry import Registry, TrainingData
    from tests.flows.infer_support import FEATURES, VOCAB
    from tests.flows.test_infer_channels import register_gate

    keras.utils.set_random_seed(0)
    model = build_ctc_asr(CtcAsrConfig(n_mels=FEATURES.n_mels, vocab=VOCAB))
    ref = Registry(str(registry), StorageSpec()).register(
        "asr", model, family="asr", metrics={"cer": 1.0}, feature_config=FEATURES.to_dict(),
        training_data=TrainingData.of(["benchmark"]), vocabulary=tuple(VOCAB),
        params={"model_config": {"subsample": 4}})
    from tests.flows.infer_support import register_asr
    from tests.flows.test_infer import peaky_asr

    words_ref = register_asr(str(registry), model=peaky_asr(), name="peaky")
    return f"{registry}:{ref.name}@{ref.version}", words_ref, register_gate(str(registry))


def words_in(outputs, truth) -> dict[str, int]:
    counts = {"speech": 0, "music": 0, "silence": 0}
    for out in outputs:
        for w in out.words or ():
            middle = (w.start_s + w.end_s) / 2
            kind = next((k for s, e, k in truth[out.source] if s <= middle < e), "silence")
            counts[kind] += 1
    return counts


def timed_pass(sources, spec, storage) -> tuple[float, list, float]:
    from audiopipe.tasks.infer import InferItem, infer_item

    best, outputs = float("inf"), []
    for _ in range(2):
        t0 = time.perf_counter()
        outputs = infer_item(InferItem(tuple(sources)), spec, storage)
        best = min(best, time.perf_counter() - t0)
    gate_s = sum(o.timings.get("gate_s", 0.0) for o in outputs)
    return best, outputs, gate_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    from audiopipe.flows.infer import model_spec
    from audiopipe.tasks.infer import warm_model

    data = ROOT / "benchmarks" / ".data" / "gate"
    import shutil

    shutil.rmtree(data, ignore_errors=True)
    truth = corpus(data / "in", args.recordings, args.seconds)
    asr, peaky, gate = register(data / "registry")
    storage = StorageSpec()
    sources = [SourceFile(url, Path(url[7:]).stat().st_size) for url in sorted(truth)]
    common = dict(in_url=str(data / "in"), work_dir=data / "work", decoder={"beam_width": 1})
    plain = model_spec("transcribe", asr, storage, **common)
    gated = model_spec("transcribe", asr, storage, gate=gate, **common)
    p_plain = model_spec("transcribe", peaky, storage, **common)
    p_gated = model_spec("transcribe", peaky, storage, gate=gate, **common)
    for spec in (plain, gated, p_plain, p_gated):
        warm_model(spec, storage)
    audio_s = sum(e for spans in truth.values() for _, e, _ in spans[-1:])
    speech_s = sum(e - s for spans in truth.values() for s, e, k in spans if k == "speech")
    u_wall, u_out, _ = timed_pass(sources, plain, storage)
    g_wall, g_out, gate_s = timed_pass(sources, gated, storage)
    gated_s = sum(g[3] for o in g_out for g in o.gated)
    u_words, g_words = words_in(u_out, truth), words_in(g_out, truth)
    _, pu_out, _ = timed_pass(sources, p_plain, storage)
    _, pg_out, _ = timed_pass(sources, p_gated, storage)
    pu_words, pg_words = words_in(pu_out, truth), words_in(pg_out, truth)
    p_lost = (pu_words["speech"] - pg_words["speech"]) / max(pu_words["speech"], 1)
    lost = (u_words["speech"] - g_words["speech"]) / max(u_words["speech"], 1)
    print(f"{args.recordings} recordings, {audio_s:.0f} s of audio, {speech_s:.0f} s speech; gated out {gated_s:.0f} s")
    print("| run | wall s | x real time | gate s | words in speech | words in music/silence |")
    print("|---|---|---|---|---|---|")
    print(f"| (u) no gate | {u_wall:.1f} | {audio_s / u_wall:.1f} | - | {u_words['speech']} | "
          f"{u_words['music'] + u_words['silence']} |")
    print(f"| (g) --gate | {g_wall:.1f} | {audio_s / g_wall:.1f} | {gate_s:.1f} | {g_words['speech']} | "
          f"{g_words['music'] + g_words['silence']} |")
    print(f"| (u') peaky, no gate | | | - | {pu_words['speech']} | {pu_words['music'] + pu_words['silence']} |")
    print(f"| (g') peaky, --gate | | | | {pg_words['speech']} | {pg_words['music'] + pg_words['silence']} |")
    print(f"compute saved: {1 - g_wall / u_wall:.0%} of the wall time; words lost in speech: BiLSTM {lost:.1%}, "
          f"peaky {p_lost:.1%}")


if __name__ == "__main__":
    main()
