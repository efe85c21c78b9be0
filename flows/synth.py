"""Flow: ``audiopipe synth KIND OUT_URL`` — make a labelled corpus and publish it to any fsspec URL.

In: a corpus kind (``speech``, ``sounds``, ``music``, ``mixtures``), an output URL, a count and a seed.
Out: the files under ``OUT_URL/audio/...`` (and ``OUT_URL/midi/...`` for music) and
``OUT_URL/labels/labels.parquet`` (LABELS_V1, ``docs/data-contracts.md``), whose ``source`` column holds
the uploaded files' URLs in the same form as the featurize manifest.

The corpus is written to a local temporary directory first (the synthesizers write local files), uploaded,
and the labels table is published last, so a labels file never names a file that is not there yet.
A plain function: no Prefect run is needed for a job that takes seconds to minutes on one core.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.storage import merged_storage_spec
from audiopipe.tasks.corpora import CORPUS_WRITERS, labels_table, save_labels, upload_corpus

logger = logging.getLogger(__name__)

MAX_ITEMS = 1_000_000
# Mean seconds of audio per item, measured on the seed-0 corpora of benchmarks/quality.py (6,000 utterances:
# 4.7 h; 1,200 clips: 0.7 h; 800 scores: 2.1 h; 1,500 mixtures: 1.4 h). ``--hours`` converts with these.
MEAN_ITEM_SECONDS = {"speech": 2.8, "sounds": 2.1, "music": 9.5, "mixtures": 3.4}


def items_for_hours(kind: str, hours: float) -> int:
    """About how many items of ``kind`` make ``hours`` of audio (at least 1).

    Raises:
        ConfigError: for an unknown kind or hours that are not positive.
    """
    if kind not in MEAN_ITEM_SECONDS:
        raise ConfigError(f"unknown corpus kind {kind!r}; use one of {', '.join(MEAN_ITEM_SECONDS)}")
    if not hours > 0:
        raise ConfigError(f"--hours must be positive, got {hours}")
    return max(1, round(hours * 3600 / MEAN_ITEM_SECONDS[kind]))


def synth(kind: str, out_url: str, n: int, seed: int, storage_options: dict[str, Any] | None = None) -> dict:
    """Synthesize ``n`` items of corpus ``kind`` and publish them with their labels under ``out_url``.

    One kind per ``out_url``: a second run on the same URL replaces ``labels/labels.parquet``. Same
    arguments and same installed synthesizers give the same files.

    Args:
        kind: One of ``CORPUS_WRITERS`` (``speech``, ``sounds``, ``music``, ``mixtures``).
        out_url: Any fsspec URL or local path (``s3://bucket/corpora/speech``, ``memory://x``, ``/tmp/x``).
        n: Number of items (utterances, clips, scores or mixtures), 1 .. 1,000,000.
        seed: Non-negative seed; every random choice derives from it.
        storage_options: fsspec/s3fs options for ``out_url`` (endpoint, keys), as ``--storage-options``.

    Returns:
        ``{"kind", "labels_url", "num_rows", "num_files", "audio_hours", "seconds", "splits": {split: rows},
        "classes": {label: rows}, "engines": {engine: rows}}``.

    Raises:
        ConfigError: for an unknown kind, or ``n`` / ``seed`` out of range (before any work).
        StorageError: when the store cannot be written.
    """
    writer = CORPUS_WRITERS.get(kind)
    if writer is None:
        raise ConfigError(f"unknown corpus kind {kind!r}; use one of {', '.join(CORPUS_WRITERS)}")
    if not 1 <= n <= MAX_ITEMS:
        raise ConfigError(f"--n must be between 1 and {MAX_ITEMS:,}, got {n}")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    storage = merged_storage_spec(storage_options)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"audiopipe-synth-{kind}-") as tmp:
        rows = writer(Path(tmp), n=n, seed=seed)
        num_files = sum(1 for p in Path(tmp).rglob("*") if p.is_file())
        prefix = upload_corpus(Path(tmp), out_url, storage)
    table = labels_table([row.with_prefix(prefix) for row in rows])
    labels_url = save_labels(table, out_url, storage)
    seconds = round(time.monotonic() - started, 3)
    logger.info("synth %s: %d rows, %d files in %.1f s -> %s", kind, len(rows), num_files, seconds, labels_url)
    return {
        "kind": kind,
        "labels_url": labels_url,
        "num_rows": len(rows),
        "num_files": num_files,
        "audio_hours": round(sum(r.duration_s or 0.0 for r in rows) / 3600, 3),
        "seconds": seconds,
        "splits": dict(sorted(Counter(r.split for r in rows).items())),
        "classes": dict(sorted(Counter(r.label for r in rows if r.label is not None).items())),
        "engines": dict(sorted(Counter(r.engine for r in rows).items())),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for corpus_kind in CORPUS_WRITERS:
        logger.info("%s", synth(corpus_kind, f"/tmp/audiopipe-synth-demo/{corpus_kind}", n=10, seed=0))
