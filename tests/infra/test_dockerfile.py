"""The worker image (infra/docker/Dockerfile) as far as it can be checked without building it.

Docker cannot run here, so these read the Dockerfile against the repository: every COPY source is in the
build context, the dependencies are installed against the lock that is copied in, every package folder of
pyproject.toml is copied, and what the image runs imports in this environment (the CLI of its CMD, Prefect's
flow-run engine, Dask's worker, and every deployment entrypoint of infra/prefect.yaml).
"""

from __future__ import annotations

import importlib
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    out = []
    for item in joined:
        word, _, rest = item.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def copy_sources(args: str) -> list[str] | None:
    """The sources of a COPY/ADD (None for ``--from=`` copies, whose sources are in another stage)."""
    words = shlex.split(args)
    if any(w.startswith("--from") for w in words):
        return None
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def pip_installs(dockerfile: list[tuple[str, str]]) -> list[list[str]]:
    """Every ``pip install`` command of every RUN, as words (commands split at ``;``, ``&&`` and ``||``)."""
    found = []
    for word, args in dockerfile:
        if word != "RUN":
            continue
        words = shlex.split(args.replace(";", " ; "))
        command: list[str] = []
        for w in [*words, ";"]:
            if w in (";", "&&", "||", "then", "else", "fi", "do", "done"):
                if "pip" in command and "install" in command:
                    found.append(command[command.index("install") + 1:])
                command = []
            else:
                command.append(w)
    return found


def lock_files(install: list[str]) -> list[str]:
    """Files named by ``-c``/``-r``/``--constraint``/``--requirement`` in one pip install."""
    return [value for flag, value in zip(install, install[1:])
            if flag in ("-c", "-r", "--constraint", "--requirement")]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def test_every_copy_source_is_in_the_build_context(dockerfile):
    copies = [copy_sources(args) for word, args in dockerfile if word in ("COPY", "ADD")]
    sources = [s for srcs in copies if srcs for s in srcs]
    assert sources, "no COPY found"
    missing = [s for s in sources if not list(ROOT.glob(s.rstrip("/")))]
    assert missing == [], f"COPY sources missing from the build context (repository root): {missing}"


def test_dependencies_install_against_the_copied_lock(dockerfile):
    """Each pip install is pinned by the lock (``-c``/``-r``) or installs nothing else (``--no-deps``)."""
    copied = {s.rstrip("/") for word, args in dockerfile if word == "COPY" for s in (copy_sources(args) or [])}
    installs = [i for i in pip_installs(dockerfile) if i[-2:] != ["--upgrade", "pip"]]
    assert any(w.startswith(".[") for i in installs for w in i), f"audiopipe[...] is never installed: {installs}"
    for install in installs:
        locks = lock_files(install)
        assert locks or "--no-deps" in install, f"an install outside the lock: pip install {' '.join(install)}"
        for lock in locks:
            assert lock in copied, f"{lock} is read by pip but never copied into the image"
            assert (ROOT / lock).is_file() and "==" in (ROOT / lock).read_text(), f"{lock} holds no pins"


def test_every_package_folder_is_copied(dockerfile):
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {s.rstrip("/") for word, args in dockerfile if word == "COPY" for s in (copy_sources(args) or [])}
    assert set(package_dirs.values()) <= copied, sorted(set(package_dirs.values()) - copied)


def test_what_the_image_runs_imports(dockerfile):
    """CMD's console script, Prefect's engine (flow runs) and Dask's worker (cluster pods) import."""
    cmd = [args for word, args in dockerfile if word == "CMD"][-1]
    program = yaml.safe_load(cmd)[0]  # exec form: a JSON list
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts, f"CMD runs {program!r}, which is not a console script of the package"
    module, attr = scripts[program].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    for module in ("prefect.engine", "prefect.workers.process", "distributed.cli.dask_worker",
                   "distributed.cli.dask_scheduler"):
        importlib.import_module(module)


def test_every_deployment_entrypoint_imports_from_the_installed_package():
    """Module-path entrypoints with no pull step: a worker needs only the package, never a checkout."""
    from prefect.flows import Flow, load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    assert spec.get("pull") == [], "a pull step would make flow runs depend on a path on the worker"
    for item in spec["deployments"]:
        entrypoint = item["entrypoint"]
        assert entrypoint.startswith("audiopipe.") and ":" not in entrypoint and ".py" not in entrypoint, entrypoint
        assert "pull" not in item, item["name"]
        flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
        assert isinstance(flow, Flow), entrypoint
