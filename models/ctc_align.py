"""Models: CTC frame outputs -> timed words and segments, and the files people read (JSON lines, SRT).

In: per output frame of a recording, the best class id and its probability (``frame_outputs``), on a
uniform time grid (``frame_s`` seconds a frame: hop x subsampling). Out: ``Segment`` objects with text,
start/end seconds and a confidence, split at pauses. Greedy CTC: a character is emitted at the first frame
of each run of one non-blank id; its time is that frame's. Pure numpy: nothing here imports Keras.
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
    words: list[Word] = []
    chars: list[str] = []
    first = last = 0
    confs: list[float] = []
    for frame in at:
        ch = vocab[int(ids[frame]) - 1]
        if ch == " ":
            if chars:
                words.append(_word(chars, first, last, confs, frame_s, offset_s))
                chars, confs = [], []
            continue
        if not chars:
            first = frame
        chars.append(ch)
        confs.append(float(probs[frame]))
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
