"""Infra: the installed audiopipe version and the code's git SHA (when run from a checkout)."""

from __future__ import annotations

import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@cache
def audiopipe_version() -> str:
    """``<package version>`` plus ``+g<sha>`` when the code runs from a git checkout."""
    try:
        base = version("audiopipe")
    except PackageNotFoundError:
        base = "0+unknown"
    sha = git_sha()
    return f"{base}+g{sha}" if sha else base


@cache
def git_sha() -> str | None:
    """Short SHA of the checkout this code runs from, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
