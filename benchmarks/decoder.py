"""CTC decoder speed: greedy vs the vectorised prefix beam search vs the one-prefix-at-a-time search.

Run ``.venv/bin/python benchmarks/decoder.py [--profile]`` (about 30 s, one process, one thread). On three
kinds of model output, each about 40 s of audio at 40 ms per frame (1,000 frames, 29 classes):

- ``flat``: near-uniform, like the untrained model of ``benchmarks/inference.py`` (the search's worst
  case: no blank-dominated frame, every frame offers its top-8 characters);
- ``peaky``: a 110-character sentence spelled with one confident frame per letter (0.5-0.95, the rest on
  three other letters) and 1-2 blank frames between letters whose blank probability is 0.95-0.9995;
- ``trained-like``: the same, with blank frames at 0.9999 as a trained CTC model gives between letters.

Beam width 8 and a char 6-gram LM fitted on the sentence and two others (weight 0.3, bonus 1.5), as
``transcribe`` decodes by default. Prints x real time per decoder and, with ``--profile``, cProfile's top
functions for the vectorised search on ``flat``. Times are CPU seconds of this process, best of 3.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import numpy as np

from audiopipe.models import ctc_decode as dec

FRAME_S = 0.04
TEXT = "the quick brown fox jumps over the lazy dog and then it runs away to the river where it sleeps"


def posteriors(rng: np.random.Generator, text: str, blank_leak: tuple[float, float]) -> np.ndarray:
    """Log-probabilities ``(frames, 29)``: a confident frame per letter, 1-2 blank frames after each."""
    rows = []
    for ch in text:
        c = dec.DEFAULT_VOCAB.index(ch) + 1
        p = np.full(29, 1e-4)
        p[c] = rng.uniform(0.5, 0.95)
        p[rng.choice(29, 3, replace=False)] += (1 - p[c]) * rng.dirichlet([1, 1, 1])
        rows.append(p / p.sum())
        for _ in range(int(rng.integers(1, 3))):
            q = np.full(29, 1e-6)
            q[c] = rng.uniform(*blank_leak)
            q[0] = 1.0 - q[c] - 28e-6
            rows.append(q)
    return np.log(np.array(rows))


def timed(fn, reps: int = 3) -> float:
    """Best of ``reps`` CPU times (process time: other processes on a shared machine do not count)."""
    best = np.inf
    for _ in range(reps):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="cProfile the vectorised search on flat outputs")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    text = (TEXT + " ") * 4
    lm = dec.CharNgramLM.fit([text.strip(), "a cat sat on the mat", "the dog runs"], order=6)
    cases = {"flat": dec.log_softmax(rng.normal(0, 0.1, size=(1000, 29))),
             "peaky": posteriors(rng, text, (0.0005, 0.05))[:1000],
             "trained-like": posteriors(rng, text, (1e-5, 1e-4))[:1000]}
    beam = dec.BeamDecoder(beam_width=8, lm=lm, lm_weight=0.3, insertion_bonus=1.5)
    print(f"{'output':<14}{'frames':>7}{'skip':>6}{'greedy':>12}{'beam':>12}{'reference':>12}   x real time")
    for name, lp in cases.items():
        audio_s = len(lp) * FRAME_S
        greedy = timed(lambda: dec.greedy_decode(lp[None], [len(lp)]))
        fast = timed(lambda: beam.search(lp))
        reference = timed(lambda: dec._reference_search(lp, beam_width=8, vocab=dec.DEFAULT_VOCAB, lm=lm,
                                                        lm_weight=0.3, bonus=1.5, lexicon=None), reps=1)
        skip = float((lp[:, 0] >= np.log(dec.BLANK_SKIP)).mean())
        print(f"{name:<14}{len(lp):>7}{skip:>6.0%}{audio_s / greedy:>12,.0f}{audio_s / fast:>12,.0f}"
              f"{audio_s / reference:>12,.0f}   ({fast / len(lp) * 1e6:.0f} us/frame beam)")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(beam.search, cases["flat"])
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(8)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
