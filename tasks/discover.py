"""Stage 0 of featurize: find the audio objects under an input URL and check the output is writable.

In: input and output URLs and a ``StorageSpec``. Out: ``SourceFile`` records (URL, size, ETag or mtime),
sorted, audio extensions matched case-insensitively, other files ignored. Storage failures become
``StorageError`` messages that say what to fix.

Local trees: a symlink with an audio name that leads to a regular file is an input like any other (its
URL is the link's, its size and mtime the target's). Directory symlinks are not followed (they can loop, or
list a tree twice under two names). A link that is dangling, loops or leads to anything but a regular
file, a symlink to a directory (whatever its name), and a FIFO, socket or device with an audio name become
a ``SourceFile`` with ``rejected`` set, so the manifest gets a row saying why. A sub-folder that cannot be
listed is logged as a warning.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import replace
from datetime import datetime

from fsspec.implementations.local import LocalFileSystem

from audiopipe.infra.errors import StorageError
from audiopipe.infra.storage import StorageSpec, describe_storage_error, join, open_fs, to_url
from audiopipe.tasks.audio_io import AUDIO_EXTENSIONS
from audiopipe.tasks.extract import SourceFile

log = logging.getLogger(__name__)


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
        if isinstance(fs, LocalFileSystem) and os.path.islink(root) and not os.path.exists(root):
            raise StorageError(f"input {in_url} cannot be read: {_local_source(fs, root).rejected}.")
        if not fs.exists(root):
            raise StorageError(f"input {in_url} does not exist. Check the bucket and prefix (or the path).")
        if isinstance(fs, LocalFileSystem):
            sources = _local_sources(fs, root, in_url)
        else:
            entries = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
            sources = [_source(fs, path, info) for path, info in entries.items()
                       if info.get("type", "file") == "file" and is_audio_name(path)]
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated into a message that says what to fix
        raise describe_storage_error(in_url, exc) from None
    if not sources:
        raise StorageError(f"no audio files under {in_url} (looked for {', '.join(sorted(AUDIO_EXTENSIONS))}, "
                           "any case). Check the input URL.")
    return sorted(sources, key=lambda s: s.url)


def _local_sources(fs, root: str, in_url: str) -> list[SourceFile]:
    """A local tree, walked without following directory links (fsspec's walk would drop every symlink and,
    below the top folder, every folder it cannot list, without a word)."""
    if not os.path.isdir(root):
        return [s for s in [_local_source(fs, root)] if s]

    def unlisted(exc: OSError) -> None:
        log.warning("cannot list %s under %s (%s): audio in it is not included; fix its permissions and rerun",
                    exc.filename, in_url, exc.strerror or type(exc).__name__)

    paths = []
    for folder, dirs, files in os.walk(root, onerror=unlisted):
        paths += [os.path.join(folder, name) for name in files if is_audio_name(name)]
        # a directory link, whatever its name, is not walked into (os.walk never follows it): it gets a row
        paths += [os.path.join(folder, name) for name in dirs if os.path.islink(os.path.join(folder, name))]
    return [source for source in (_local_source(fs, path) for path in paths) if source]


def _source(fs, path: str, info: dict) -> SourceFile:
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, datetime):
        mtime = mtime.timestamp()
    return SourceFile(url=to_url(fs, path), size=int(info.get("size") or 0),
                      etag=etag.strip('"') if etag else None, mtime=float(mtime) if mtime else None)


def _local_source(fs, path: str) -> SourceFile | None:
    """A local entry: a regular file, a symlink (followed to a regular file, else rejected), or another
    kind of entry (rejected: reading a FIFO would block a worker). None when it vanished since listing."""
    url = to_url(fs, path)
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(lst.st_mode):
        return SourceFile(url=url, size=lst.st_size, mtime=lst.st_mtime)
    as_link = SourceFile(url=url, size=lst.st_size, mtime=lst.st_mtime)  # versioned by the entry itself
    if not stat.S_ISLNK(lst.st_mode):
        return _with_reason(as_link, f"not a regular file: {_kind(lst.st_mode)}")
    try:
        st = os.stat(path)
    except FileNotFoundError:  # the end of the chain of links is missing
        return _with_reason(as_link, f"dangling symlink: target {os.path.realpath(path)} does not exist")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _with_reason(as_link, f"symlink loop: it points to {_link_target(path)}, which leads back "
                                         "to a link on its own path (too many levels of symbolic links)")
        return _with_reason(as_link, f"unreadable symlink: cannot reach target {_link_target(path)}: "
                                     f"{exc.strerror}")
    target = os.path.realpath(path)
    if stat.S_ISREG(st.st_mode):
        return SourceFile(url=url, size=st.st_size, mtime=st.st_mtime)  # the target's version
    if stat.S_ISDIR(st.st_mode):
        return _with_reason(as_link, f"symlink to a directory: {target} is not followed (directory links can "
                                     "loop or list files twice); give it as its own input to process it")
    return _with_reason(as_link, f"symlink to something that is not a regular file: {target} is "
                                 f"{_kind(st.st_mode)}")


def _with_reason(source: SourceFile, reason: str) -> SourceFile:
    log.info("%s is rejected: %s", source.url, reason)
    return replace(source, rejected=reason)


def _link_target(path: str) -> str:
    """Where the link points (one hop), as an absolute path (a relative target is taken from the link's
    folder)."""
    target = os.readlink(path)
    return os.path.normpath(os.path.join(os.path.dirname(path), target))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return f"a special file (mode {mode:o})"


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
