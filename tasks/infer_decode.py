"""Bulk inference, transcribe: CTC outputs of a recording -> timed words, with the model version's decoder.

In: an ``InferSpec`` (its decoder settings: beam width, the LM file of the registry version, LM weight and
insertion bonus) and per recording the windows' log-probabilities. Out: ``ctc_align.Word`` lists. Runs on
the worker for whole recordings and in the shard's process for long recordings decoded from their chunks;
both load the decoder once per process (``loaded_decoder``). No Prefect or Dask imports here.
"""

from __future__ import annotations

import threading

import numpy as np

from audiopipe.infra.storage import StorageSpec
from audiopipe.tasks.infer import InferSpec

_DECODERS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def loaded_decoder(spec: InferSpec, storage: StorageSpec):
    """This process's decoder for the spec: None (greedy), or a ``BeamDecoder`` with the model version's
    character LM, fetched from the registry and checked against the sha256 on the card (once per process).

    Raises:
        IntegrityError / RegistryError: the LM file is missing or does not match the card.
    """
    if spec.beam_width == 1:
        return None
    key = (spec.registry_url, spec.model_name, spec.model_version, spec.model_sha256, spec.lm_file,
           spec.beam_width, spec.lm_weight, spec.insertion_bonus)
    with _LOCK:
        if key not in _DECODERS:
            from audiopipe.models.ctc_decode import BeamDecoder, CharNgramLM
            from audiopipe.models.registry import ModelRef, Registry

            lm = None
            if spec.lm_file:
                path = Registry(spec.registry_url, storage).fetch_file(
                    ModelRef(spec.registry_url, spec.model_name, spec.model_version), spec.lm_file, spec.cache_dir)
                lm = CharNgramLM.from_bytes(path.read_bytes())
            _DECODERS[key] = BeamDecoder(beam_width=spec.beam_width, lm=lm, lm_weight=spec.lm_weight,
                                         insertion_bonus=spec.insertion_bonus, vocab="".join(spec.labels))
        return _DECODERS[key]


def decode_recording(pieces: list[tuple[int, np.ndarray]], spec: InferSpec, decoder) -> list:
    """Windows' log-probabilities (first global frame, ``(frames, classes)``), in any order, joined into one
    sequence and decoded -> ``ctc_align.Word`` list with times from the recording's start. With a gate,
    frames missing between runs of windows (gated ones) split the sequence: each run is decoded on its own.

    Raises:
        ValueError: the pieces leave a gap or overlap (frames lost or doubled).
    """
    from audiopipe.models.ctc_align import decode_words

    pieces = sorted(pieces, key=lambda p: p[0])
    for at, ((a, lp), (b, _)) in enumerate(zip(pieces, pieces[1:])):
        if a + len(lp) < b and spec.gate is not None:  # gated windows between: decode each run on its own
            return (decode_recording(pieces[:at + 1], spec, decoder)
                    + decode_recording(pieces[at + 1:], spec, decoder))
        if a + len(lp) != b:
            raise ValueError(f"output frames {a + len(lp)}..{b} lost or doubled between windows")
    if not pieces:
        return []
    log_probs = np.concatenate([p[1] for p in pieces]).astype(np.float32)
    return decode_words(log_probs, frame_s=spec.frame_s, vocab=spec.labels, offset_s=pieces[0][0] * spec.frame_s,
                        decoder=decoder)



def decoder_fields(card, *, beam_width: int | None = None, lm_weight: float | None = None,
                   insertion_bonus: float | None = None) -> tuple[dict, str | None]:
    """``InferSpec`` decoder fields for an asr model card, and a note to log when the card has no LM.

    Defaults come from the card's ``extra["decoder"]`` (written at training, ``tasks.train_lm``): beam
    search with its LM, weight and bonus. A model registered before LMs were stored has none: it decodes
    greedily unless ``beam_width`` asks for beam search, which then runs without an LM (and without an
    insertion bonus unless one is given, since the bonus only offsets the LM's pull to short output).

    Raises:
        ConfigError: ``beam_width`` < 1.
    """
    from audiopipe.infra.errors import ConfigError

    if beam_width is not None and beam_width < 1:
        raise ConfigError(f"--beam-width must be >= 1 (1 = greedy), got {beam_width}.")
    stored = dict(card.extra.get("decoder") or {})
    lm_file = stored.get("lm_file", "") if stored.get("lm_file") in card.extra.get("files", {}) else ""
    width = beam_width or (int(stored.get("beam_width", 8)) if lm_file else 1)
    tag = f"{card.name}@{card.version}"
    note = None
    if not lm_file:
        note = (f"{tag} has no character LM stored with it (registered before audiopipe stored one; retrain to get "
                f"one): {'greedy decoding' if width == 1 else 'beam search without an LM'}")
    if width == 1:
        return {"beam_width": 1, "lm_file": "", "lm_weight": 0.0, "insertion_bonus": 0.0}, note
    if not lm_file:
        return {"beam_width": width, "lm_file": "", "lm_weight": 0.0,
                "insertion_bonus": float(insertion_bonus or 0.0)}, note
    return {"beam_width": width, "lm_file": lm_file,
            "lm_weight": float(stored["lm_weight"] if lm_weight is None else lm_weight),
            "insertion_bonus": float(stored["insertion_bonus"] if insertion_bonus is None else insertion_bonus)}, note
