"""Flow: ``audiopipe synth KIND OUT_URL`` — make a labelled corpus and publish it to any fsspec URL.

In: a corpus kind (``speech``, ``sounds``, ``music``, ``mixtures``), an output URL, a count and a seed.
Out: the files under ``OUT_URL/audio/...`` (and ``OUT_URL/midi/...`` for music) and
``OUT_URL/labels/labels.parquet`` (LABELS_V1, ``docs/data-contracts.md``), whose ``source`` column holds
the uploaded files' URLs in the same form as the featurize manifest.

Speech runs on Dask workers (``--workers``, or any scheduler via ``--dask-address``), like everything else:
the items are cut into ranges of at most ``chunk_items``, each worker writes its range to a local
temporary directory (the synthesizers write local files) and uploads it, and the labels table is published
last, so a labels file never names a file that is not there yet. The other kinds, at most ``chunk_items``
utterances (a cluster's start-up would cost more than it saves), and ``memory://`` outputs (a store no
worker process can see) run in this process. A plain function, not a Prefect flow:
nothing to retry per shard that Dask does not already retry.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, merged_storage_spec, split_protocol
from audiopipe.tasks.corpora import CORPUS_WRITERS, LabelRow, labels_table, save_labels, write_and_upload
from audiopipe.tasks.corpora_real import REAL_PACKAGES, RealPool, fetch_package, load_pool, package_by_name

logger = logging.getLogger(__name__)

MAX_ITEMS = 1_000_000
CHUNK_ITEMS = 100  # utterances per Dask task: ~5 minutes of audio, one festival process, ~10 s of work
PARALLEL_KINDS = frozenset({"speech"})
# Mean seconds of audio per item, measured on seed-0 corpora (speech: 1,286 utterances, 1.025 h, after the
# five text sources and speed perturbation; 1,200 clips: 0.7 h; 800 scores: 2.1 h; 1,500 mixtures: 1.4 h).
# ``--hours`` converts with these.
MEAN_ITEM_SECONDS = {"speech": 2.9, "sounds": 2.1, "music": 9.5, "mixtures": 3.4}


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


def real_cache_dir(cache: str | None = None) -> Path:
    """Where fetched Debian packages are kept: ``cache``, else ``$AUDIOPIPE_CACHE/debian-audio``, else
    ``~/.cache/audiopipe/debian-audio``. Outside the repository, so nothing fetched lands in git."""
    if cache:
        return Path(cache).expanduser()
    root = os.environ.get("AUDIOPIPE_CACHE") or Path.home() / ".cache" / "audiopipe"
    return Path(root).expanduser() / "debian-audio"


def prepare_real(cache: str | None = None, packages: tuple[str, ...] = ()) -> RealPool:
    """Fetch the real-audio packages not yet in the cache (``apt-get download``, once; a set-up step, never
    run by a pipeline) and index them. ``packages`` limits the set (default: every ``REAL_PACKAGES``).

    Raises:
        ConfigError: apt unavailable or failing, or an unknown or asterisk-* package name.
    """
    chosen = tuple(package_by_name(p) for p in packages) if packages else REAL_PACKAGES
    cache_dir = real_cache_dir(cache)
    for pkg in chosen:
        fetch_package(pkg, cache_dir)
    return load_pool(cache_dir, chosen)


def synth(kind: str, out_url: str, n: int, seed: int, storage_options: dict[str, Any] | None = None, *,
          workers: int = 2, dask_address: str | None = None, chunk_items: int = CHUNK_ITEMS,
          real: bool = False, real_cache: str | None = None) -> dict:
    """Synthesize ``n`` items of corpus ``kind`` and publish them with their labels under ``out_url``.

    One kind per ``out_url``: a second run on the same URL replaces ``labels/labels.parquet``. Same
    arguments and same installed synthesizers give the same files (Piper's samples excepted).

    Args:
        kind: One of ``CORPUS_WRITERS`` (``speech``, ``sounds``, ``music``, ``mixtures``).
        out_url: Any fsspec URL or local path (``s3://bucket/corpora/speech``, ``memory://x``, ``/tmp/x``).
        n: Number of items (utterances, clips, scores or mixtures), 1 .. 1,000,000.
        seed: Non-negative seed; every random choice derives from it.
        storage_options: fsspec/s3fs options for ``out_url`` (endpoint, keys), as ``--storage-options``.
        workers: Dask worker processes of the local cluster (speech).
        dask_address: An existing Dask scheduler instead of a local cluster.
        chunk_items: At most this many utterances per Dask task (fewer when that leaves a worker idle).
        real: sounds only: add real recordings from Debian packages (``prepare_real``, ``corpora_real``).
        real_cache: Where ``real`` keeps the fetched packages (``real_cache_dir``).

    Returns:
        ``{"kind", "labels_url", "num_rows", "num_files", "audio_hours", "seconds", "splits": {split: rows},
        "classes": {label: rows}, "engines": {engine: rows}, "augment": {degradation: rows}, "tasks"}``.

    Raises:
        ConfigError: for an unknown kind, or ``n`` / ``seed`` / ``workers`` / ``chunk_items`` out of range
            (before any work).
        StorageError: when the store cannot be written.
    """
    if kind not in CORPUS_WRITERS:
        raise ConfigError(f"unknown corpus kind {kind!r}; use one of {', '.join(CORPUS_WRITERS)}")
    if not 1 <= n <= MAX_ITEMS:
        raise ConfigError(f"--n must be between 1 and {MAX_ITEMS:,}, got {n}")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    if workers < 1 or chunk_items < 1:
        raise ConfigError(f"--workers and chunk_items must be at least 1, got {workers} and {chunk_items}")
    if real and kind != "sounds":
        raise ConfigError(f"--real adds real recordings to the sounds corpus only, not to {kind}")
    storage = merged_storage_spec(storage_options)
    started = time.monotonic()
    options = {"real": prepare_real(real_cache)} if real else {}
    # at most chunk_items per task, and at least two tasks per worker, so a small corpus still keeps every
    # worker busy to the end (120 utterances: 4 x 30, not 100 + 20)
    size = max(1, min(chunk_items, -(-n // (2 * workers))))
    ranges = [(a, min(a + size, n)) for a in range(0, n, size)]
    if kind in PARALLEL_KINDS and n > chunk_items and split_protocol(out_url) != "memory":
        rows, num_files = _on_dask(kind, out_url, storage, ranges, seed, workers, dask_address)
    else:
        rows, num_files = write_and_upload(kind, out_url, storage, start=0, stop=n, seed=seed, options=options)
        ranges = [(0, n)]
    table = labels_table(rows)
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
        "tasks": len(ranges),
        "splits": dict(sorted(Counter(r.split for r in rows).items())),
        "classes": dict(sorted(Counter(r.label for r in rows if r.label is not None).items())),
        "engines": dict(sorted(Counter(r.engine for r in rows).items())),
        "augment": dict(sorted(Counter(a for r in rows for a in r.augment).items())),
    }


def _on_dask(kind: str, out_url: str, storage: StorageSpec, ranges: list[tuple[int, int]], seed: int,
             workers: int, dask_address: str | None) -> tuple[list[LabelRow], int]:
    """Each range on a Dask worker (``write_and_upload``); rows back in item order."""
    from distributed import as_completed

    from audiopipe.infra.runners import dask_client

    settings = RunSettings(workers=workers, dask_address=dask_address)
    by_start: dict[int, list[LabelRow]] = {}
    num_files = 0
    with dask_client(settings) as client:
        starts = {client.submit(write_and_upload, kind, out_url, storage, start=a, stop=b, seed=seed,
                                key=f"synth-{kind}-{seed}-{a}-{b}", retries=1): a for a, b in ranges}
        for future in as_completed(list(starts)):
            by_start[starts[future]], files = future.result()
            num_files += files
    return [row for start in sorted(by_start) for row in by_start[start]], num_files


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for corpus_kind in CORPUS_WRITERS:
        logger.info("%s", synth(corpus_kind, f"/tmp/audiopipe-synth-demo/{corpus_kind}", n=10, seed=0))
