"""Transcribe ``--channels split``: each input channel of a recording transcribed on its own.

Call recordings often carry the agent and the caller on separate channels; mixed down, their overlapping
speech becomes one garbled stream. With ``split`` the worker decodes the file once per channel
(``OneChannel``), featurizes and windows each channel exactly as mono audio, and keeps each channel's CTC
frames apart (``InferOutput.channel_frames``/``channel_words``). Here: those per-channel outputs gathered
into one recording's segments, rows (``channel`` column of TRANSCRIPTS_V2) and side files, where every
segment is labelled with its speaker (``[ch0]``/``[ch1]`` in ``.srt``/``.vtt``/``.txt``; ``channel`` and
``speaker`` fields in ``.jsonl``). Mixed-down results keep ``channel`` null and unlabelled files.
No Prefect or Dask imports here.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

MIX = None  # the channel key of mixed-down output


class OneChannel:
    """A decoder (``soundfile.SoundFile`` or ``audio_av.AvDecoder``) that reads only one of its channels, so
    the segments ``audio_io.iter_segments`` mixes down are that channel's samples."""

    def __init__(self, snd, channel: int) -> None:
        self._snd, self._channel = snd, channel

    def seek(self, frame: int):
        return self._snd.seek(frame)

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        block = self._snd.read(frames, dtype=dtype, always_2d=True)
        return np.ascontiguousarray(block[:, self._channel:self._channel + 1])

    def __getattr__(self, name: str):
        return getattr(self._snd, name)


def pieces_by_channel(outputs) -> dict[int | None, list]:
    """The CTC frame pieces of a chunked recording's outputs, per channel (``MIX`` when mixed down)."""
    found: dict[int | None, list] = {}
    for out in outputs:
        if out.frames:
            found.setdefault(MIX, []).extend(out.frames)
        for channel, pieces in out.channel_frames.items():
            found.setdefault(channel, []).extend(pieces)
    return found


def words_by_channel(outputs) -> dict[int | None, list]:
    """The decoded words of a whole recording's outputs, per channel (``MIX`` when mixed down)."""
    found: dict[int | None, list] = {}
    for out in outputs:
        if out.words is not None:
            found.setdefault(MIX, []).extend(out.words)
        for channel, words in out.channel_words.items():
            found.setdefault(channel, []).extend(words)
    return found


def speaker(channel: int) -> str:
    return f"channel {channel}"


def transcript_results(source: str, words: dict[int | None, list], model: str, version: int, gated=()
                       ) -> tuple[list[dict], dict[str, bytes]]:
    """One recording's TRANSCRIPTS_V2 rows and side files (by suffix) from its words per channel and its
    gated spans (``infer_gate.gated_spans``: ``(channel, start_s, end_s, class, p)``).

    Segments of all channels are numbered together in time order (``segment`` stays unique within the
    recording); a split recording's segments carry their channel, and its files label each segment. A gated
    span is a row with empty text, no words, ``gated_as`` its class and ``confidence`` the gate's mean
    probability of that class; in the files its text is the class in brackets (``[music]``).
    """
    from audiopipe.models.ctc_align import Segment, segments_from_words, to_jsonl
    from audiopipe.tasks.infer_layout import transcript_files, transcript_rows

    timed = [(s, ch, None) for ch, w in words.items() for s in segments_from_words(w)]
    timed += [(Segment(start, end, "", round(p, 4)), ch, label) for ch, start, end, label, p in gated]
    timed.sort(key=lambda t: (t[0].start_s, -1 if t[1] is None else t[1]))
    rows = transcript_rows(source, [s for s, _, _ in timed], model, version)
    for row, (_, channel, label) in zip(rows, timed):
        row["channel"], row["gated_as"] = channel, label
    split = any(ch is not MIX for _, ch, _ in timed)
    shown = [replace(s, text=(f"[ch{ch}] " if split else "") + (f"[{label}]" if label else s.text))
             for s, ch, label in timed]
    files = transcript_files(shown, source=source, model=model)
    if split or gated:
        files[".jsonl"] = "".join(
            to_jsonl([s], source=source, model=model,
                     **({"channel": ch, "speaker": speaker(ch)} if split else {}),
                     **({"gated_as": label} if label else {}))
            for s, ch, label in timed).encode()
    return rows, files

