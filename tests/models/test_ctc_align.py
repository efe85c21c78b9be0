"""Timed words, segments and the transcript files people read (models/ctc_align.py, tasks/infer_layout.py).

Inputs are CTC outputs built from a known text: each character held for a few frames, blanks between,
long blank runs as pauses, noise on every frame. Greedy and beam decoding must both give back the text,
with word times that only move forward and sit inside their segment; the .srt and .vtt files are read back
with real parsers (``srt``, ``webvtt-py``) and must say exactly the transcript, at the segments' times.
"""

from __future__ import annotations

import html
import io

import numpy as np
import pytest
import srt
import webvtt

from audiopipe.models.ctc_align import MAX_SEGMENT_S, MIN_PAUSE_S, decode_words, segments_from_words
from audiopipe.models.ctc_decode import DEFAULT_VOCAB, BeamDecoder, CharNgramLM, log_softmax
from audiopipe.tasks.infer_layout import to_text, to_vtt, transcript_files

FRAME_S = 0.04
TEXTS = [
    "hello world",
    "the cat sat on the mat|and then it slept",            # | marks a pause long enough to cut a segment
    "a|b|c",
    "moon see book all|keep off the grass|it's odd isn't it",  # doubled letters need a blank between them
    " ".join(["speech without any pause goes on"] * 6),      # longer than MAX_SEGMENT_S: cut by length
]


def spoken(text: str, rng: np.random.Generator) -> np.ndarray:
    """Log-probabilities ``(frames, classes)`` that say ``text`` ('|' = a space and ~1 s of silence), noisy."""
    ids: list[int] = [0] * int(rng.integers(2, 6))
    for ch in text:
        if ch == "|":  # the space a model emits between words, then a second of silence
            ids += [DEFAULT_VOCAB.index(" ") + 1] + [0] * int(round(1.0 / FRAME_S))
            continue
        ids += [DEFAULT_VOCAB.index(ch) + 1] * int(rng.integers(1, 4))
        ids += [0] * int(rng.integers(1, 4))  # blanks between characters (and between doubled letters)
    logits = rng.normal(0.0, 1.0, size=(len(ids), len(DEFAULT_VOCAB) + 1))
    logits[np.arange(len(ids)), ids] += 9.0
    return log_softmax(logits)


def transcript_of(segments) -> str:
    return " ".join(s.text for s in segments)


DECODERS = {"greedy": None,
            "beam": BeamDecoder(beam_width=8, lm=CharNgramLM.fit([t.replace("|", " ") for t in TEXTS], order=4),
                                lm_weight=0.3, insertion_bonus=1.5)}


@pytest.mark.parametrize("decoder", DECODERS, ids=list(DECODERS))
@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_word_timings_move_forward_and_sit_inside_their_segment(index, decoder):
    rng = np.random.default_rng(index)
    text = TEXTS[index]
    offset_s = 12.5  # words of a recording's later chunk carry its offset
    log_probs = spoken(text, rng)
    words = decode_words(log_probs, frame_s=FRAME_S, vocab=DEFAULT_VOCAB, offset_s=offset_s,
                         decoder=DECODERS[decoder])
    assert " ".join(w.text for w in words) == text.replace("|", " ")
    end_of_audio = offset_s + len(log_probs) * FRAME_S
    for before, word in zip([None, *words], words):
        assert offset_s <= word.start_s < word.end_s <= end_of_audio + 1e-9, word
        assert 0 < word.confidence <= 1
        if before is not None:
            assert word.start_s >= before.end_s, (before, word)  # monotonic, never overlapping
    segments = segments_from_words(words)
    assert transcript_of(segments) == text.replace("|", " ")
    assert len(segments) >= text.count("|") + 1  # every pause cuts
    for before, seg in zip([None, *segments], segments):
        assert seg.words and seg.text == " ".join(w.text for w in seg.words)
        assert seg.start_s == seg.words[0].start_s and seg.end_s == seg.words[-1].end_s
        assert all(seg.start_s <= w.start_s < w.end_s <= seg.end_s for w in seg.words)
        assert seg.end_s - seg.start_s <= MAX_SEGMENT_S
        assert seg.confidence == pytest.approx(np.mean([w.confidence for w in seg.words]), abs=1e-4)
        if before is not None:
            assert seg.start_s >= before.end_s
            pause = seg.start_s - before.end_s
            assert pause >= MIN_PAUSE_S or before.end_s - before.start_s + (seg.words[0].end_s - before.end_s) \
                > MAX_SEGMENT_S - 1e-9  # a cut is a pause, or the length limit


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_srt_vtt_and_text_files_read_back_as_the_transcript(index):
    rng = np.random.default_rng(100 + index)
    words = decode_words(spoken(TEXTS[index], rng), frame_s=FRAME_S, vocab=DEFAULT_VOCAB, offset_s=3661.0)
    segments = segments_from_words(words)
    files = transcript_files(segments, source="s3://b/in/a.wav", model="asr@3")
    assert set(files) == {".jsonl", ".srt", ".vtt", ".txt"}

    subtitles = list(srt.parse(files[".srt"].decode("utf-8")))
    assert [s.content for s in subtitles] == [seg.text for seg in segments]
    assert " ".join(s.content for s in subtitles) == transcript_of(segments)
    assert [s.index for s in subtitles] == list(range(1, len(segments) + 1))
    for sub, seg in zip(subtitles, segments):  # past one hour: the hour field is right too
        assert sub.start.total_seconds() == pytest.approx(seg.start_s, abs=1e-3)
        assert sub.end.total_seconds() == pytest.approx(seg.end_s, abs=1e-3)

    captions = webvtt.from_buffer(io.StringIO(files[".vtt"].decode("utf-8")))
    assert [c.text for c in captions] == [seg.text for seg in segments]
    for cap, seg in zip(captions, segments):
        assert cap.start_in_seconds + cap.start_time.milliseconds / 1000 == pytest.approx(seg.start_s, abs=1e-3)
        assert cap.end_in_seconds + cap.end_time.milliseconds / 1000 == pytest.approx(seg.end_s, abs=1e-3)

    assert files[".txt"].decode("utf-8").splitlines() == [seg.text for seg in segments]
    import json

    lines = [json.loads(x) for x in files[".jsonl"].decode("utf-8").splitlines()]
    assert [x["text"] for x in lines] == [seg.text for seg in segments]
    assert all(x["source"] == "s3://b/in/a.wav" and x["model"] == "asr@3" for x in lines)
    assert [[w["text"] for w in x["words"]] for x in lines] == [[w.text for w in seg.words] for seg in segments]


def test_vtt_escapes_markup_characters():
    """Cue text is markup in WebVTT: a transcript with '<' or '&' must read back as itself."""
    from audiopipe.models.ctc_align import Segment, Word

    seg = Segment(0.0, 1.0, "a<b & c>d", 0.9, (Word("a<b", 0.0, 0.3, 0.9), Word("&", 0.4, 0.5, 0.9),
                                               Word("c>d", 0.6, 1.0, 0.9)))
    captions = webvtt.from_buffer(io.StringIO(to_vtt([seg])))
    assert [html.unescape(c.text) for c in captions] == ["a<b & c>d"]  # webvtt-py keeps the entities
    assert to_text([seg]) == "a<b & c>d\n"
    assert to_vtt([]).startswith("WEBVTT") and list(webvtt.from_buffer(io.StringIO(to_vtt([])))) == []
