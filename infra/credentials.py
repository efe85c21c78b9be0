"""Infra: which options are credentials, so that none is ever stored by Prefect or printed.

In: fsspec/s3fs storage options at any depth (``client_kwargs``, ``config_kwargs``, ``s3_additional_kwargs``...),
a flow's parameters, or a deployment's. Out: the *key paths* of the credentials found, such as
``client_kwargs.aws_secret_access_key``, never their values; or, for the CLI, the options with the
credentials that have a standard AWS variable taken out, ready to be put in the process environment.

Why here and so early: Prefect writes every flow parameter into its database (and the database's WAL) when
it creates the flow run, before a flow's own code runs, so a check inside a flow comes too late. The CLI
moves or refuses credentials before Prefect is imported, ``flows/safe_flow.py`` refuses them in any direct
call of a flow, and ``infra/serve.py`` refuses them in deployment files at deploy time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from audiopipe.infra.errors import ConfigError

# Names are compared lowercased with everything but letters and digits removed (``Access-Key`` -> accesskey).
_CREDENTIAL_NAMES = frozenset({
    "key", "secret", "token", "password", "passwd", "username", "auth", "authorization", "cookie", "credential",
    "credentials", "sastoken", "accountkey", "connectionstring", "clientsecret", "privatekey", "apikey",
})
_CREDENTIAL_PARTS = ("secret", "password", "passwd", "token", "credential", "connectionstring", "privatekey",
                     "apikey", "accountkey", "accesskey", "sessionkey", "sastoken")
# Settings that name where credentials live, not credentials themselves (``profile`` reads ~/.aws).
_NOT_CREDENTIALS = frozenset({"profile", "awsprofile", "awsregion", "awsdefaultregion", "awsendpointurl",
                              "awsendpointurls3"})
# ``scheme://user:password@host``: a URL that carries a password (an endpoint or a proxy).
# Only web/proxy schemes: ``s3://models:asr@champion`` is a model reference, not a password.
_URL_WITH_PASSWORD = re.compile(r"^(https?|socks[45]h?|ftps?)://[^/@\s:]*:[^/@\s]*@", re.IGNORECASE)

# Credentials with a standard variable that botocore reads: storage option path -> variable. s3fs takes
# ``username``/``password`` as aliases of ``key``/``secret``; ``client_kwargs`` go to botocore's client.
AWS_VARIABLES: dict[str, str] = {}
for _var, _names in (("AWS_ACCESS_KEY_ID", ("key", "username", "aws_access_key_id")),
                     ("AWS_SECRET_ACCESS_KEY", ("secret", "password", "aws_secret_access_key")),
                     ("AWS_SESSION_TOKEN", ("token", "aws_session_token"))):
    for _name in _names:
        AWS_VARIABLES[_name] = _var
    AWS_VARIABLES[f"client_kwargs.aws_{_var.lower().removeprefix('aws_')}"] = _var


def is_credential_name(name: object) -> bool:
    """True when an option or parameter called ``name`` holds a credential (key, secret, token, aws_*...)."""
    norm = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if norm in _NOT_CREDENTIALS:
        return False
    return (norm in _CREDENTIAL_NAMES or norm.startswith("aws") or norm.endswith("key")
            or any(part in norm for part in _CREDENTIAL_PARTS))


def credential_paths(value: Any, prefix: str = "") -> list[str]:
    """Key paths of every credential inside ``value`` (mappings, lists, dataclasses, pydantic models).

    A path is dotted (``client_kwargs.aws_secret_access_key``) with list positions in brackets
    (``config_kwargs.proxies[0]``); a credential is an entry whose name says so (``is_credential_name``) or a
    string that is a URL with a password in it. Values are never returned.
    """
    return sorted(set(_walk(value, prefix)))


def _walk(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, str):
        if _URL_WITH_PASSWORD.match(value.strip()):
            yield path or "(value)"
        return
    for name, item in _entries(value):
        child = f"{path}[{name}]" if isinstance(name, int) else (f"{path}.{name}" if path else str(name))
        if not isinstance(name, int) and is_credential_name(name) and item not in (None, "", {}):
            yield child
        else:
            yield from _walk(item, child)


def _entries(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(enumerate(value))
    if is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in fields(value)]
    dump = getattr(value, "model_dump", None)  # a pydantic model (RunSettings)
    if callable(dump) and not isinstance(value, type):
        return list(dump().items())
    options = getattr(value, "options", None)  # a StorageSpec
    return list(options.items()) if isinstance(options, Mapping) else []


def refuse_credentials(value: Any, where: str = "storage_options") -> None:
    """Raise ``ConfigError`` naming the key path of every credential in ``value``; never quotes a value.

    Raises:
        ConfigError: ``value`` holds a credential at any depth.
    """
    paths = credential_paths(value)
    if paths:
        raise ConfigError(
            f"{where} hold credentials at {', '.join(paths)}. Anything passed to a flow is stored in Prefect's "
            "database, so credentials never go there: set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and "
            "AWS_SESSION_TOKEN) in the environment of the process that runs the flow (a deployment's worker), "
            "use an AWS profile (`profile` may stay in storage options) or an instance role."
        )


def refuse_credential_parameters(parameters: Mapping[str, Any], flow_name: str) -> None:
    """``refuse_credentials`` over every parameter of a flow run, before Prefect stores any of them."""
    refuse_credentials(dict(parameters), where=f"the parameters of flow {flow_name!r}")


def move_credentials(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split storage options into ``(options without credentials, AWS variables to set)`` (what the CLI does).

    ``key``/``secret``/``token`` (and ``username``/``password``, ``aws_access_key_id``...) at the top level or
    under ``client_kwargs`` go to AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; botocore
    reads those, and a LocalCluster's workers inherit them.

    Raises:
        ConfigError: a credential has no standard variable (named by its key path), or two entries give
            different values for one variable.
    """
    kept = {k: (dict(v) if k == "client_kwargs" and isinstance(v, Mapping) else v) for k, v in options.items()}
    env: dict[str, str] = {}
    source: dict[str, str] = {}
    for path, var in AWS_VARIABLES.items():
        holder, name = (kept.get("client_kwargs"), path.split(".", 1)[1]) if "." in path else (kept, path)
        if not isinstance(holder, dict) or name not in holder:
            continue
        value = holder.pop(name)
        if value is None or value == "":
            continue
        if var in env and env[var] != str(value):
            raise ConfigError(f"storage options {source[var]} and {path} both give {var}, with different "
                              "values; give it once.")
        env[var], source[var] = str(value), path
    if kept.get("client_kwargs") == {}:
        kept.pop("client_kwargs")
    refuse_credentials(kept, where="storage options")
    return kept, env

