"""Constants and helpers shared by tests (imported as ``tests.support``; conftest holds the fixtures)."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

# Made once per test session: tests search every output for the secret.
TEST_KEY = "audiopipe-test"
TEST_SECRET = "s3cr3t-" + secrets.token_hex(12)


def cli_env(tmp_path: Path, prefect_api: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: this interpreter's venv first, Prefect pointed at the harness."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", AUDIOPIPE_WORK_DIR=str(tmp_path / "work"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    env.update(extra)
    return env
