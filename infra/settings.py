"""Infra: run settings, read once from the environment (``AUDIOPIPE_*``) and passed down explicitly.

Nothing below this module reads the environment for configuration; flows receive a ``RunSettings``.
Feature parameters are not here: they live in ``tasks.features.FeatureConfig`` because they define the
data (and its hash), while these settings only say how a run executes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from audiopipe.infra.errors import ConfigError


class RunSettings(BaseSettings):
    """How a run executes: cluster, sharding, limits. Every field can be set as ``AUDIOPIPE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="AUDIOPIPE_", frozen=True, extra="forbid")

    workers: int = Field(2, ge=1, le=512, description="Dask worker processes for a LocalCluster.")
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler (tcp://host:8786); a LocalCluster when unset."
    )
    files_per_shard: int = Field(
        64, ge=1, le=100_000, description="Input files per output shard (one Prefect task per shard)."
    )
    worker_memory_limit: str = Field(
        "3GiB", description="Per-worker memory limit of a LocalCluster; the nanny restarts a worker past 95% of it."
    )
    shard_concurrency: int = Field(
        0, ge=0, le=256, description="Shards in flight at once; 0 means 2 x the number of workers."
    )
    max_attempts_per_file: int = Field(
        3, ge=1, le=10, description="Worker deaths tolerated on one file before it is quarantined as rejected."
    )
    work_dir: Path = Field(
        Path(".audiopipe"), description="Local scratch: Dask spill directory, Prefect home for embedded runs."
    )

    def shards_in_flight(self, cluster_workers: int) -> int:
        """Shards a run keeps in flight: ``shard_concurrency``, or 2 per worker of the cluster it got.

        The flows call this at run start, so a deployed run honours the ``AUDIOPIPE_*`` of the worker that
        started it (or its ``settings`` parameter); ``cluster_workers`` is what the Dask client found, which
        for a scheduler at ``dask_address`` need not be ``workers``.
        """
        return self.shard_concurrency or 2 * max(1, cluster_workers)


def apply_prefect_defaults(work_dir: Path) -> None:
    """Set Prefect's environment defaults for embedded runs, before Prefect is imported.

    Telemetry is off (it fails offline and locks the SQLite file); an explicit value in the
    environment always wins, so a user pointing at Prefect Cloud or a server keeps that.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    home = (work_dir / "prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)  # Prefect creates its home but not the parents
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
    # A fresh home runs the SQLite migrations on first start: ~20 s on 2 busy cores, Prefect's default limit.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def run_settings(fields: Mapping[str, Any]) -> RunSettings:
    """``RunSettings(**fields)`` with a ``ConfigError`` that names each bad field and why, never its value.

    Raises:
        ConfigError: a field is unknown or out of its bounds.
    """
    try:
        return RunSettings(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
                             for err in exc.errors(include_input=False, include_url=False))
        raise ConfigError(f"invalid run settings ({problems}).") from None
