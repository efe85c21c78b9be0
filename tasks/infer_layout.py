"""Bulk inference results: where they go under the output URL, and the tables built from worker outputs.

Layout (contract: ``docs/data-contracts.md``, "Inference results")::

    <task>/model=<name>/version=<v>/_model.json               the model version's card summary
    <task>/model=<name>/version=<v>/<table>/part-<shard>.parquet   result rows (TRANSCRIPTS_V2, ...)
    <task>/model=<name>/version=<v>/manifest/part-<shard>.parquet  MANIFEST_V1 rows: the commit record
    transcribe/.../files/<recording path>.{jsonl,srt,vtt,txt}     per recording, written before the commit
    separate/.../audio/<recording path>/{speech,background}.flac  stems, written before the commit

The commit protocol is featurize's: side files and data parts first, the manifest part last; ``reconcile``
(``tasks.shards``) deletes data parts without a manifest part and rows superseded by a newer run. Side
files sit at deterministic paths, so a rerun overwrites what a killed run left. Nothing here imports
Prefect or Dask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audiopipe.infra.schemas import (CLASS_RECORDINGS_V1, CLASS_SEGMENTS_V1, CONTRACT_VERSION, STEMS_V1,
                                     TRANSCRIPTS_V2, validate_table)
from audiopipe.infra.storage import StorageSpec, join, open_fs, write_bytes_atomic

TABLES = {"transcribe": {"transcripts": TRANSCRIPTS_V2},
          "classify": {"segments": CLASS_SEGMENTS_V1, "recordings": CLASS_RECORDINGS_V1},
          "separate": {"stems": STEMS_V1}}


@dataclass(frozen=True)
class ResultLayout:
    """Paths of one model version's results for one task (fsspec paths without the protocol)."""

    root: str
    task: str
    model_name: str
    model_version: int

    @property
    def base(self) -> str:
        return join(self.root, self.task, f"model={self.model_name}", f"version={self.model_version}")

    @property
    def manifest_dir(self) -> str:
        return join(self.base, "manifest")

    @property
    def data_dirs(self) -> tuple[str, ...]:
        return tuple(join(self.base, table) for table in TABLES[self.task])

    def part(self, table: str, shard_id: str) -> str:
        return join(self.base, table, f"part-{shard_id}.parquet")

    def manifest_part(self, shard_id: str) -> str:
        return join(self.manifest_dir, f"part-{shard_id}.parquet")

    def side_file(self, folder: str, rel: str, suffix: str) -> str:
        return join(self.base, folder, rel + suffix)

    def relative(self, path: str) -> str:
        return path[len(self.root):].lstrip("/")


def relative_source(in_url: str, source_url: str) -> str:
    """The recording's path below the input URL (its file name when the input is the file itself)."""
    in_path, src_path = _strip(in_url).rstrip("/"), _strip(source_url)
    if src_path.startswith(in_path + "/"):
        return src_path[len(in_path) + 1:]
    return src_path.rsplit("/", 1)[-1]


def _strip(url: str) -> str:
    """``url`` as a path on its filesystem (local paths made absolute), without connecting to anything."""
    import fsspec

    from audiopipe.infra.storage import split_protocol

    return fsspec.get_filesystem_class(split_protocol(url))._strip_protocol(url)


def write_model_info(out_url: str, storage: StorageSpec, layout: ResultLayout, info: dict) -> None:
    """Record which model version produced this partition (idempotent)."""
    fs, _ = open_fs(out_url, storage)
    path = join(layout.base, "_model.json")
    if not fs.exists(path):
        body = {"contract_version": CONTRACT_VERSION, **info}
        write_bytes_atomic(fs, path, json.dumps(body, indent=2, sort_keys=True).encode())


# ---- per-recording transcript files ---------------------------------------------------------------------

def _vtt_time(seconds: float) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    return f"{h:02d}:{m:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def to_vtt(segments) -> str:
    """WebVTT captions: a header, then one numbered cue per segment (``&``, ``<`` and ``>`` escaped, as
    cue text is markup)."""
    cues = []
    for i, s in enumerate(segments, start=1):
        text = s.text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        cues.append(f"{i}\n{_vtt_time(s.start_s)} --> {_vtt_time(s.end_s)}\n{text}\n")
    return "\n".join(["WEBVTT\n", *cues])


def to_text(segments) -> str:
    """The plain transcript: one line per segment, no times."""
    return "".join(s.text + "\n" for s in segments)


def transcript_files(segments, *, source: str, model: str) -> dict[str, bytes]:
    """The files written beside a recording's transcript rows, by suffix: ``.jsonl`` (segments with words,
    times and confidences), ``.srt`` and ``.vtt`` (subtitles), ``.txt`` (the text alone). UTF-8."""
    from audiopipe.models.ctc_align import to_jsonl, to_srt

    return {".jsonl": to_jsonl(segments, source=source, model=model).encode(), ".srt": to_srt(segments).encode(),
            ".vtt": to_vtt(segments).encode(), ".txt": to_text(segments).encode()}


# ---- tables -------------------------------------------------------------------------------------------

def transcript_rows(source: str, segments, model: str, version: int) -> list[dict]:
    return [{"source": source, "segment": i, "start_s": s.start_s, "end_s": s.end_s, "text": s.text,
             "confidence": s.confidence,
             "words": [{"word": w.text, "start_s": w.start_s, "end_s": w.end_s, "confidence": w.confidence}
                       for w in s.words],
             "model": model, "model_version": version} for i, s in enumerate(segments)]


def _probabilities(labels, probs: np.ndarray) -> tuple[str, float, list[dict]]:
    top = int(np.argmax(probs))
    return labels[top], float(probs[top]), [{"label": c, "p": float(p)} for c, p in zip(labels, probs)]


def class_rows(source: str, windows, labels, model: str, version: int) -> tuple[list[dict], dict]:
    """Per-window rows and the recording's row (duration-weighted mean of the windows' probabilities)."""
    segments = []
    for index, start, duration, probs in windows:
        top, top_p, listing = _probabilities(labels, probs)
        segments.append({"source": source, "segment": int(index), "start_s": float(start),
                         "end_s": float(start + duration), "top_class": top, "top_p": top_p,
                         "probabilities": listing, "model": model, "model_version": version})
    durations = np.array([w[2] for w in windows], np.float64)
    mean = (np.stack([w[3] for w in windows]) * durations[:, None]).sum(axis=0) / max(durations.sum(), 1e-9)
    top, top_p, listing = _probabilities(labels, mean)
    recording = {"source": source, "duration_s": float(durations.sum()), "top_class": top, "top_p": top_p,
                 "probabilities": listing, "model": model, "model_version": version}
    return segments, recording


def stem_rows(source: str, stems: dict[str, str], duration_s: float, rate: int, model: str, version: int
              ) -> list[dict]:
    return [{"source": source, "stem": stem, "url": url, "duration_s": duration_s, "sample_rate": rate,
             "model": model, "model_version": version} for stem, url in sorted(stems.items())]


def table_of(task: str, table: str, rows: list[dict]) -> pa.Table:
    schema = TABLES[task][table]
    out = pa.Table.from_pylist(rows, schema=schema)
    validate_table(out, schema)
    return out
