"""Transcribe ``--gate``: hold music and silence never become text.

Each window of a recording (the gate classifier's own segment length as its core, the recogniser's context
around it) is first classified by a registered ``classify`` model; only windows whose top class is one of
``InferSpec.gate_classes`` (default ``speech``) go through the recogniser. The rest come back as
``InferOutput.gated`` entries ``(channel, index, start_s, duration_s, class, probability)`` and become
transcript rows with empty text and ``gated_as`` set (``transcript_gated_rows``). The recogniser's frames
then have gaps where windows were gated: ``infer_decode.decode_recording`` decodes each run of consecutive
speech windows on its own. Both models are loaded once per worker process (``infer.loaded_model``).
No Prefect or Dask imports here.
"""

from __future__ import annotations

import time

import numpy as np

from audiopipe.tasks.features import compute_features, padded_batch


def gate_windows(windows: list, outputs: list, spec, storage) -> list:
    """Classify the core of every ``(slot, Window, features)`` and return the ones to transcribe; the others
    are recorded on their output (``gated``)."""
    from audiopipe.tasks.infer import loaded_model, nonfinite_reason

    gate = spec.gate
    loaded = loaded_model(gate, storage)
    cfg = gate.features
    kept, order = [], []
    feats = []
    for entry in windows:
        slot, window, _ = entry
        t0 = time.perf_counter()
        head = int(round((window.core_start_s - window.start_s) * cfg.sample_rate))
        core = window.samples[head:head + int(round(window.core_s * cfg.sample_rate))]
        feats.append(compute_features(core, cfg=cfg))
        outputs[slot].timings["gate_s"] += time.perf_counter() - t0
        order.append(entry)
    for start in range(0, len(order), gate.batch_size):
        batch, f = order[start:start + gate.batch_size], feats[start:start + gate.batch_size]
        t0 = time.perf_counter()
        x, lengths = padded_batch(f)
        probs = loaded.predict(x, lengths).numpy()
        elapsed = time.perf_counter() - t0
        for row, entry in enumerate(batch):
            slot, window, _ = entry
            out = outputs[slot]
            out.timings["gate_s"] += elapsed / len(batch)
            if out.reason is not None:
                continue
            out.reason = nonfinite_reason(probs[row], window.core_start_s, "gate class probabilities")
            if out.reason is not None:
                continue
            top = int(np.argmax(probs[row]))
            if gate.labels[top] in spec.gate_classes:
                kept.append(entry)
            else:
                out.gated.append((window.channel, window.index, window.core_start_s, window.core_s,
                                  gate.labels[top], float(probs[row][top])))
    return kept


def gated_spans(gated: list) -> list[tuple]:
    """Consecutive gated windows of one channel and class merged: ``(channel, start_s, end_s, class, p)``
    with ``p`` the windows' mean probability of that class, in time order."""
    spans: list[list] = []
    for channel, index, start, duration, label, p in sorted(gated, key=lambda g: (-1 if g[0] is None else g[0],
                                                                                  g[1])):
        last = spans[-1] if spans else None
        if last and last[0] == channel and last[3] == label and last[5] == index - 1:
            last[2], last[5] = start + duration, index
            last[4].append(p)
        else:
            spans.append([channel, start, start + duration, label, [p], index])
    return sorted(((c, s, e, label, float(np.mean(ps))) for c, s, e, label, ps, _ in spans),
                  key=lambda sp: sp[1])
