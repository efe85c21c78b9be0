"""Training stage: per-run checkpoints, saved after every epoch and checksum-verified before a resume.

In: a compiled Keras model, its epoch count and history. Out: the folder ``WORK_DIR/checkpoints/<run key>/``:

    epoch-NNNN.keras   the model after epoch NNNN, with its optimizer state (final-NNNN.keras once done)
    history.json       Keras's per-epoch logs
    state.json         the commit: {state_version, epoch, model_file, model_sha256, model_size[, done]}

``state.json`` is written last and atomically, and names the model file it vouches for, so a kill at any
instant leaves either the previous checkpoint or the new one, never a state that points at a half-written
or newer file. Before a resume the model file's sha256 and size are checked against the state, as the
registry checks ``model.keras`` against its card (``models.registry.verify_file``), and only a verified
file reaches ``keras.saving.load_model(..., safe_mode=True)``.

A checkpoint that fails any check (a damaged or altered file, a state that is not ours, a file Keras
refuses) is never loaded: the folder is moved aside to ``<run key>.rejected-<UTC time>``, a warning names
the file and the reason, and the run starts over from epoch 0. A checkpoint is a cache of work that the
same spec redoes from scratch, so starting over is always correct; stopping instead would leave a
scheduled retrain failing until someone deleted the folder, which is all the fix there would be. The
rejected folder stays for inspection (and is safe to delete). No Prefect or Dask here.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE, HISTORY_FILE = "state.json", "history.json"
STATE_VERSION = 1


@dataclass(frozen=True)
class CheckpointState:
    """What ``state.json`` vouches for: the model file after ``epoch`` epochs, by sha256 and size."""

    epoch: int
    model_file: str
    model_sha256: str
    model_size: int
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {"state_version": STATE_VERSION, **asdict(self)}
        if not self.done:
            del out["done"]
        return out


class CheckpointRejected(Exception):
    """A checkpoint that must not be resumed from; the message says which file and why."""


def read_state(ckpt_dir: Path) -> CheckpointState | None:
    """The committed state, or None when the folder holds none.

    Raises:
        CheckpointRejected: ``state.json`` is not valid JSON, lacks the checksum (written before audiopipe
            verified checkpoints), or names a file outside the folder.
    """
    path = ckpt_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        state = CheckpointState(epoch=int(doc["epoch"]), model_file=str(doc["model_file"]),
                                model_sha256=str(doc["model_sha256"]), model_size=int(doc["model_size"]),
                                done=bool(doc.get("done", False)))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointRejected(f"{path} is not a checkpoint state this version can verify ({exc!r}; "
                                 "written by an older audiopipe, or edited)") from exc
    if Path(state.model_file).name != state.model_file or not state.model_file.endswith(".keras"):
        raise CheckpointRejected(f"{path} names {state.model_file!r}, not a .keras file in its own folder")
    return state


def save_checkpoint(model, ckpt_dir: Path, *, epoch: int, history: dict, done: bool = False) -> CheckpointState:
    """Save ``model`` and ``history`` after ``epoch`` epochs, then commit them with ``state.json``.

    The model goes to a new file name, so the file the current state names is never overwritten; files
    the new state does not name are removed after the commit.
    """
    from audiopipe.models.registry import file_digest

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(ckpt_dir / HISTORY_FILE, json.dumps(history))
    name = f"{'final' if done else 'epoch'}-{epoch:04d}.keras"
    tmp = ckpt_dir / f".{name}.part.keras"  # Keras insists on the suffix
    model.save(tmp)
    os.replace(tmp, ckpt_dir / name)
    sha256, size = file_digest(ckpt_dir / name)
    state = CheckpointState(epoch, name, sha256, size, done)
    _write_atomic(ckpt_dir / STATE_FILE, json.dumps(state.to_dict()))
    for stale in ckpt_dir.glob("*.keras"):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return state


def load_checkpoint(ckpt_dir: Path) -> tuple[Any, CheckpointState] | None:
    """The verified checkpoint model and its state, or None to start from epoch 0.

    None when there is no checkpoint, and when there is one that fails verification: then the folder has
    been moved aside and a warning names the file and the reason (see the module docstring).
    """
    try:
        state = read_state(ckpt_dir)
        if state is None:
            return None
        return _verified_model(ckpt_dir, state), state
    except CheckpointRejected as exc:
        aside = set_aside(ckpt_dir)
        log.warning("not resuming from checkpoint: %s. It was not loaded; the folder was moved to %s and "
                    "this run starts over from epoch 0.", exc, aside)
        return None


def set_aside(ckpt_dir: Path) -> Path:
    """Rename a rejected checkpoint folder to ``<name>.rejected-<UTC time>``; returns the new path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = ckpt_dir.with_name(f"{ckpt_dir.name}.rejected-{stamp}")
    os.replace(ckpt_dir, aside)
    return aside


def _verified_model(ckpt_dir: Path, state: CheckpointState):
    import keras

    from audiopipe.models.registry import file_digest

    path = ckpt_dir / state.model_file
    if not path.is_file():
        raise CheckpointRejected(f"{path}, named by {STATE_FILE}, does not exist")
    sha256, size = file_digest(path)
    if (sha256, size) != (state.model_sha256, state.model_size):
        what = "is truncated or padded" if size != state.model_size else "was modified after it was saved"
        raise CheckpointRejected(f"{path} {what}: {STATE_FILE} expects sha256 {state.model_sha256} "
                                 f"({state.model_size} bytes), the file has sha256 {sha256} ({size} bytes)")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (ValueError, TypeError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointRejected(f"{path} passed its checksum but Keras refuses it in safe mode ({exc})") from exc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)
