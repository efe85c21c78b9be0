"""Infra: every location is an fsspec URL (``s3://``, ``file://`` or a plain path, ``memory://``).

``StorageSpec`` carries the connection options for S3 (from ``--storage-options`` and the standard AWS
variables). It pickles to Dask workers, and its ``repr`` never shows a secret. Error messages built here
name the URL and what to fix, never a key.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from audiopipe.infra.credentials import credential_paths, is_credential_name
from audiopipe.infra.errors import ConfigError, StorageError, TransientStorageError


@dataclass(frozen=True)
class StorageSpec:
    """Connection options for one protocol family, applied to every URL of a run.

    Attributes:
        options: fsspec/s3fs keyword options (``key``, ``secret``, ``endpoint_url``, ``client_kwargs``...).
    """

    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never print secrets (at any depth), even in tracebacks and Prefect parameters
        return f"StorageSpec({_redacted(self.options)})"

    __str__ = __repr__

    def for_protocol(self, protocol: str) -> dict[str, Any]:
        """Options to pass to ``fsspec.filesystem(protocol, ...)``; only S3 takes connection options."""
        if protocol in ("s3", "s3a"):
            # No listings cache: s3fs instances are shared per process, and a cached listing hides objects
            # written since (a new model version, tonight's recordings) from every later run in the process.
            return {"use_listings_cache": False, **self.options}
        return {}


def _redacted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: ("***" if is_credential_name(k) else _redacted(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    return "***" if isinstance(value, str) and credential_paths(value) else value


def storage_spec_from_env(options_json: str | None = None, env: Mapping[str, str] | None = None) -> StorageSpec:
    """Build a ``StorageSpec`` from ``--storage-options`` JSON plus the standard AWS variables.

    Explicit JSON options win over the environment. ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` become
    ``endpoint_url`` and ``client_kwargs.region_name``; keys stay for botocore to read from the
    environment unless given in the JSON.

    Raises:
        ConfigError: when the JSON does not parse or is not an object.
    """
    env = os.environ if env is None else env
    options: dict[str, Any] = {}
    if env.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = env["AWS_ENDPOINT_URL"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    if options_json:
        try:
            given = json.loads(options_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"--storage-options is not valid JSON ({exc.msg} at char {exc.pos}); "
                'pass an object such as \'{"endpoint_url": "http://127.0.0.1:8333"}\'.'
            ) from None
        if not isinstance(given, dict):
            raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": false}'.")
        options.update(given)
    return StorageSpec(options)


def merged_storage_spec(options: Mapping[str, Any] | None = None) -> StorageSpec:
    """The environment's options (``AWS_ENDPOINT_URL``, ``AWS_REGION``) with ``options`` laid over them."""
    return StorageSpec({**storage_spec_from_env(None).options, **(options or {})})


def open_fs(url: str, storage: StorageSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``url`` to ``(filesystem, path)``; plain paths are local.

    Raises:
        ConfigError: for a protocol fsspec does not know.
    """
    protocol = split_protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage.for_protocol(protocol))
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"cannot open {url!r}: {exc}. Use s3://bucket/prefix, file:///path or a path.") from None
    return fs, path.rstrip("/") or path


def split_protocol(url: str) -> str:
    """The protocol of ``url`` (``file`` for plain paths)."""
    return url.split("://", 1)[0] if "://" in url else "file"


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The canonical URL for ``path`` on ``fs``, used as the ``source`` key in every table."""
    if isinstance(fs, LocalFileSystem):
        return "file://" + path
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path}"


def join(path: str, *parts: str) -> str:
    """Join path parts with ``/`` (fsspec paths are always posix)."""
    return posixpath.join(path, *parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` so that no reader ever sees a partial object.

    An S3 PUT (and multipart completion) is atomic and a ``memory://`` write lands on close, so those are
    written in place; a local file is written beside its target and renamed over it.
    """
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def put_file_atomic(fs: fsspec.AbstractFileSystem, local_path: str, dest: str) -> None:
    """Upload a local file to ``dest`` so that no reader ever sees a partial object (as ``write_bytes_atomic``)."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        tmp = f"{dest}.tmp-{os.getpid()}"
        fs.put_file(local_path, tmp)
        os.replace(tmp, dest)  # atomic on one filesystem: readers see the old file or the new one
    else:
        fs.put_file(local_path, dest)  # one PUT / multipart completion: atomic on S3


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: connection problems and server-side errors, not missing files."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    name = type(exc).__name__
    transient_names = ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                       "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                       "ClientOSError", "ResponseStreamingError", "IncompleteRead", "TimeoutError")
    return isinstance(exc, (ConnectionError, TimeoutError)) or name in transient_names or (
        isinstance(exc, OSError) and "connect" in str(exc).lower()
    )


def describe_storage_error(url: str, exc: BaseException) -> StorageError:
    """Turn a raw fsspec/botocore failure into a ``StorageError`` that says what to fix."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if is_transient(exc) or "could not connect" in low or "connection refused" in low:
        return TransientStorageError(
            f"cannot reach the store for {url} ({_short(text)}). Check that the S3 endpoint "
            "(AWS_ENDPOINT_URL or --storage-options endpoint_url) is running and reachable."
        )
    if isinstance(exc, PermissionError) or any(s in low for s in ("accessdenied", "invalidaccesskeyid",
                                                                  "signaturedoesnotmatch", "forbidden")):
        return StorageError(
            f"the store refused access to {url} ({_short(text)}). Check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or key/secret in --storage-options)."
        )
    if isinstance(exc, FileNotFoundError) or "nosuchbucket" in low:
        return StorageError(f"{url} does not exist ({_short(text)}). Check the bucket and prefix.")
    return StorageError(f"storage error on {url}: {_short(text)}")


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
