"""Infra: read a TOML or YAML options file (``--config job.toml``) without ever quoting what it holds.

In: a path and the option names it may use. Out: a dict of option name -> value (dashes become
underscores). A config file may hold storage options, credentials among them, so an error names the file,
the line and column and the kind of error, and never shows the file's text: PyYAML's messages quote the
offending line and PyYAML/tomllib quote the token they stopped at, which can be a secret.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from audiopipe.infra.errors import ConfigError

_QUOTED = re.compile(r"'[^']{5,}'|\"[^\"]{5,}\"")  # longer than one (escaped) character: could be a value
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$|\s*\(at end of document\)\s*$")


def read_config_file(path: Path, known: Collection[str]) -> dict[str, Any]:
    """The options in a TOML (``.toml``) or YAML (anything else) file, keys normalised to underscores.

    Raises:
        ConfigError: the file cannot be read or parsed (file, line, column and kind of error only), is not a
            mapping, or uses option names outside ``known``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"cannot read config file {path}: {reason}.") from None
    is_toml = path.suffix.lower() == ".toml"
    try:
        data = tomllib.loads(text) if is_toml else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {_toml_error(exc)}.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_error(exc)}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping of option names to values.")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys {sorted(unknown)}; known: {sorted(known)}.")
    return data


def _redact(kind: str) -> str:
    return _QUOTED.sub("'…'", " ".join(kind.split()))


def _toml_error(exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    found = _TOML_POSITION.search(message)
    kind = _redact(message[:found.start()] if found else message)
    if found and found.group(1):
        return f"{kind} at line {found.group(1)}, column {found.group(2)}"
    return f"{kind} at the end of the file" if found else kind


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if isinstance(exc, yaml.reader.ReaderError):  # undecodable or control character
        return f"character {exc.character!r} that YAML does not allow at byte {exc.position}"
    kind = _redact(f"{getattr(exc, 'context', None) or ''}: {problem}".strip(": ")) if problem else type(exc).__name__
    if mark is None:
        return kind
    return f"{kind} at line {mark.line + 1}, column {mark.column + 1}"
