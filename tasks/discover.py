"""Stage 0 of featurize: find the audio objects under an input URL and check the output is writable.

In: input and output URLs and a ``StorageSpec``. Out: ``SourceFile`` records (URL, size, ETag or mtime),
sorted, audio extensions matched case-insensitively, other files ignored. Storage failures become
``StorageError`` messages that say what to fix.
"""

from __future__ import annotations

from datetime import datetime

from fsspec.implementations.local import LocalFileSystem

from audiopipe.infra.errors import StorageError
from audiopipe.infra.storage import StorageSpec, describe_storage_error, join, open_fs, to_url
from audiopipe.tasks.audio_io import AUDIO_EXTENSIONS
from audiopipe.tasks.extract import SourceFile


def is_audio_name(name: str) -> bool:
    """True when the file name ends in a known audio extension (any case)."""
    base = name.rsplit("/", 1)[-1]
    return "." in base and "." + base.rsplit(".", 1)[-1].lower() in AUDIO_EXTENSIONS


def list_audio_sources(in_url: str, storage: StorageSpec) -> list[SourceFile]:
    """Every audio object under ``in_url``, recursively, sorted by URL.

    Raises:
        StorageError: unreachable store, refused credentials, missing bucket/prefix, or no audio found.
    """
    fs, root = open_fs(in_url, storage)
    try:
        if not fs.exists(root):
            raise StorageError(f"input {in_url} does not exist. Check the bucket and prefix (or the path).")
        entries = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated into a message that says what to fix
        raise describe_storage_error(in_url, exc) from None
    sources = [_source(fs, path, info) for path, info in entries.items()
               if info.get("type", "file") == "file" and is_audio_name(path)]
    if not sources:
        raise StorageError(f"no audio files under {in_url} (looked for {', '.join(sorted(AUDIO_EXTENSIONS))}, "
                           "any case). Check the input URL.")
    return sorted(sources, key=lambda s: s.url)


def _source(fs, path: str, info: dict) -> SourceFile:
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, datetime):
        mtime = mtime.timestamp()
    return SourceFile(url=to_url(fs, path), size=int(info.get("size") or 0),
                      etag=etag.strip('"') if etag else None, mtime=float(mtime) if mtime else None)


def check_output_writable(out_url: str, storage: StorageSpec) -> None:
    """Write and delete a probe object under ``out_url`` so a bad output fails before any work.

    Raises:
        StorageError: the store refuses the write, or the bucket does not exist.
    """
    fs, root = open_fs(out_url, storage)
    probe = join(root, "_audiopipe_write_probe")
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(root, exist_ok=True)  # on S3 this would create buckets: never there
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - translated into a message that says what to fix
        raise describe_storage_error(out_url, exc) from None
