"""Models: CTC frame outputs -> timed words and segments, and the files people read (JSON lines, SRT).

In: per output frame of a recording, its log-probabilities (or, for greedy decoding, the best class id and
its probability, ``frame_outputs``), on a uniform time grid (``frame_s`` seconds a frame: hop x
subsampling). Out: ``Word``s and ``Segment`` objects with text, start/end seconds and a confidence, split
at pauses. ``decode_words`` picks the labels (greedy best path, or a ``ctc_decode.BeamDecoder``) and aligns
them: greedy emits a character at the first frame of each run of one non-blank id; beam search's
characters sit at their label's most probable frame between the previous and the next character
(``refine_emissions``). A character's confidence is its probability there. Pure numpy: no Keras here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

BLANK = 0
# A silence (blank or space frames) this long between two words starts a new segment.
MIN_PAUSE_S = 0.6
# ... and no segment grows longer than this (subtitles and downstream readers want short lines).
MAX_SEGMENT_S = 12.0


@dataclass(frozen=True)
class Word:
    text: str
    start_s: float
    end_s: float
    confidence: float


@dataclass(frozen=True)
class Segment:
    """One stretch of speech: words between pauses. ``confidence`` is the mean of its characters'."""

    start_s: float
    end_s: float
    text: str
    confidence: float
    words: tuple[Word, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def frame_outputs(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(frames, classes)`` unnormalised logits -> best id (uint8) and its softmax probability (float16)."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    ids = probs.argmax(axis=-1)
    return ids.astype(np.uint8), np.take_along_axis(probs, ids[..., None], axis=-1)[..., 0].astype(np.float16)


def emissions(ids: np.ndarray) -> np.ndarray:
    """Indices of the frames where greedy CTC emits a character (first frame of each non-blank run)."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.ones(ids.shape, dtype=bool)
    starts[1:] = ids[1:] != ids[:-1]
    return np.flatnonzero(starts & (ids != BLANK))


def words_from_frames(ids: np.ndarray, probs: np.ndarray, *, frame_s: float, vocab: Sequence[str],
                      offset_s: float = 0.0) -> list[Word]:
    """Greedy CTC over frame ids -> words with times (seconds from ``offset_s``) and confidences.

    A word ends one frame after its last character; characters outside ``vocab`` cannot occur (ids are
    ``1..len(vocab)``). Spaces separate words and are not part of them.
    """
    at = emissions(ids)
    ids = np.asarray(ids)
    return words_from_emissions(ids[at], at, np.asarray(probs)[at], frame_s=frame_s, vocab=vocab,
                                offset_s=offset_s)


def refine_emissions(log_probs: np.ndarray, labels: np.ndarray, frames: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each label's most probable frame in ``[its frame, the next label's frame)`` and its probability there.

    Args:
        log_probs: float ``(frames, classes)``.
        labels: int ``(n,)`` label ids; ``frames``: int ``(n,)`` strictly increasing (``ctc_decode.beam_search``).

    Returns:
        int64 frames ``(n,)`` and float32 probabilities ``(n,)``.
    """
    labels, frames = np.asarray(labels, np.int64), np.asarray(frames, np.int64)
    stops = np.append(frames[1:], len(log_probs))
    peaks = np.array([f + int(np.argmax(log_probs[f:max(f + 1, s), c])) for f, s, c in zip(frames, stops, labels)],
                     dtype=np.int64)
    return peaks, np.exp(log_probs[peaks, labels]).astype(np.float32) if len(peaks) else np.zeros(0, np.float32)


def decode_words(log_probs: np.ndarray, *, frame_s: float, vocab: Sequence[str], offset_s: float = 0.0,
                 decoder=None) -> list[Word]:
    """Log-probabilities ``(frames, classes)`` of one recording -> timed words.

    ``decoder``: a ``ctc_decode.BeamDecoder`` (its ``search`` picks the labels), or None for greedy.
    """
    log_probs = np.asarray(log_probs, dtype=np.float32)
    if decoder is None:
        ids = log_probs.argmax(axis=-1) if len(log_probs) else np.zeros(0, np.int64)
        at = emissions(ids)
        return words_from_emissions(ids[at], at, np.exp(log_probs[at, ids[at]]), frame_s=frame_s, vocab=vocab,
                                    offset_s=offset_s)
    labels, frames = decoder.search(log_probs)
    frames, confidences = refine_emissions(log_probs, labels, frames)
    return words_from_emissions(labels, frames, confidences, frame_s=frame_s, vocab=vocab, offset_s=offset_s)


def words_from_emissions(labels: np.ndarray, frames: np.ndarray, confidences: np.ndarray, *, frame_s: float,
                         vocab: Sequence[str], offset_s: float = 0.0) -> list[Word]:
    """Emitted labels (ids ``1..len(vocab)``) at their frames -> words; spaces separate words."""
    words: list[Word] = []
    chars: list[str] = []
    first = last = 0
    confs: list[float] = []
    for label, frame, conf in zip(np.asarray(labels).tolist(), np.asarray(frames).tolist(),
                                  np.asarray(confidences, np.float64).tolist()):
        ch = vocab[int(label) - 1]
        if ch == " ":
            if chars:
                words.append(_word(chars, first, last, confs, frame_s, offset_s))
                chars, confs = [], []
            continue
        if not chars:
            first = frame
        chars.append(ch)
        confs.append(conf)
        last = frame
    if chars:
        words.append(_word(chars, first, last, confs, frame_s, offset_s))
    return words


def _word(chars, first, last, confs, frame_s, offset_s) -> Word:
    return Word("".join(chars), round(offset_s + first * frame_s, 3), round(offset_s + (last + 1) * frame_s, 3),
                round(float(np.mean(confs)), 4))


def segments_from_words(words: Sequence[Word], *, min_pause_s: float = MIN_PAUSE_S,
                        max_segment_s: float = MAX_SEGMENT_S) -> list[Segment]:
    """Group consecutive words into segments, cutting at pauses and before a segment passes the maximum."""
    groups: list[list[Word]] = []
    for word in words:
        current = groups[-1] if groups else None
        if (current is None or word.start_s - current[-1].end_s >= min_pause_s
                or word.end_s - current[0].start_s > max_segment_s):
            groups.append([word])
        else:
            current.append(word)
    return [Segment(g[0].start_s, g[-1].end_s, " ".join(w.text for w in g),
                    round(float(np.mean([w.confidence for w in g])), 4), tuple(g)) for g in groups]


def to_jsonl(segments: Sequence[Segment], **extra) -> str:
    """One JSON object per segment (``extra`` fields, e.g. source and model, added to each)."""
    return "".join(json.dumps({**extra, **s.to_dict()}, ensure_ascii=False) + "\n" for s in segments)


def _srt_time(seconds: float) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def to_srt(segments: Sequence[Segment]) -> str:
    """SubRip subtitles: one numbered cue per segment."""
    cues = [f"{i}\n{_srt_time(s.start_s)} --> {_srt_time(s.end_s)}\n{s.text}\n"
            for i, s in enumerate(segments, start=1)]
    return "\n".join(cues)
