"""Infra: refuse, at deploy time, a Prefect deployment file that would store a credential.

In: a ``prefect.yaml`` (and, when run as its build step, the ``prefect deploy`` command line). Out: nothing,
or a ``ConfigError`` naming each offending key path (never a value). Prefect keeps a deployment's
parameters, schedule parameters and job variables in its database and copies them into every flow run,
so a credential there is stored in plain text; the flows' own checks would run only after that.
``LocalServe.deploy`` (``audiopipe serve``) calls this first; ``infra/prefect.yaml`` names it as its build
step, so ``prefect deploy`` by hand is refused too.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from audiopipe.infra.credentials import credential_paths, is_credential_name
from audiopipe.infra.errors import ConfigError

# `{{ $AWS_SECRET_ACCESS_KEY }}` and `{{ prefect.blocks.secret.x }}` are filled in by `prefect deploy`, which then
# stores the value with the deployment.
_ENV_TEMPLATE = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")
_BLOCK_TEMPLATE = re.compile(r"\{\{\s*prefect\.blocks\.")


def refuse_credentials_in_deployments(prefect_file: str | Path | None = None) -> dict:
    """Refuse, at deploy time, a deployment file that would make Prefect store a credential.

    Runs first in ``LocalServe.deploy`` and as the build step of ``infra/prefect.yaml``, so a hand-run
    ``prefect deploy`` is refused too: there it reads ``--prefect-file`` (default ``prefect.yaml``) and the
    ``--param``/``--params``/``--job-variable`` overrides from the command line of the process it runs in.
    Every deployment's parameters, schedule parameters, job variables and triggers are searched at any depth
    (``infra.credentials``), as are templates that fill in a credential variable or a block.

    Returns:
        ``{}`` (a Prefect step's outputs).

    Raises:
        ConfigError: naming each offending key path (never a value).
    """
    overrides: dict = {}
    if prefect_file is None:
        prefect_file, overrides = _deploy_command_line(sys.argv[1:])
    path = Path(prefect_file)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {type(exc).__name__}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}.") from None
    found = [f"command line: {p}" for p in credential_paths(overrides)]
    for i, item in enumerate(data.get("deployments") or []):
        item = {k: v for k, v in (item or {}).items() if k not in ("name", "description", "entrypoint")}
        name = (data["deployments"][i] or {}).get("name") or f"#{i}"
        found += [f"deployments[{name}].{p}" for p in sorted(set(credential_paths(item)) | set(_templates(item)))]
    if found:
        raise ConfigError(f"{path} would store credentials in Prefect's database, at {', '.join(found)}. Flow "
                          "runs take credentials from the worker's environment (AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY) or an instance role; see docs/operations.md.")
    return {}


def _templates(value: object, path: str = "") -> list[str]:
    if isinstance(value, str):
        names = _ENV_TEMPLATE.findall(value)
        return [path] if any(is_credential_name(n) for n in names) or _BLOCK_TEMPLATE.search(value) else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    out: list[str] = []
    for k, v in items:
        out += _templates(v, f"{path}[{k}]" if isinstance(k, int) else (f"{path}.{k}" if path else str(k)))
    return out


def _deploy_command_line(args: list[str]) -> tuple[str, dict]:
    """``prefect deploy``'s ``--prefect-file`` and its parameter and job-variable overrides, from ``args``."""
    prefect_file, overrides = "prefect.yaml", {"parameters": {}, "job_variables": {}}
    pairs = [(a.split("=", 1)[0], a.split("=", 1)[1]) if a.startswith("--") and "=" in a else
             (a, args[i + 1] if i + 1 < len(args) else "") for i, a in enumerate(args) if a.startswith("--")]
    for flag, value in pairs:
        if flag == "--prefect-file":
            prefect_file = value
        elif flag == "--params":
            overrides["parameters"]["--params"] = _json_or_text(value)
        elif flag in ("--param", "--job-variable") and "=" in value:
            key, text = value.split("=", 1)
            section = "parameters" if flag == "--param" else "job_variables"
            overrides[section][key] = _json_or_text(text)
    return prefect_file, overrides


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text
