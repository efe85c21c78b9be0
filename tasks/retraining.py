"""Retraining stage: which label tables are new, the merged training table, the state and the decision report.

In: the LABELS_V1 tables under a prefix and the state the last successful run left
(``REG/NAME/retrain/state.json``). Out: what changed, the merged labels, the challenger's ``TrainSpec``, the
new state and the decision as markdown. The flow ``flows/retrain.py`` composes these; nothing here imports
Prefect or Dask. Contract: ``docs/registry.md`` ("Retraining").
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from audiopipe.infra.errors import ConfigError, SchemaError
from audiopipe.infra.schemas import LABELS_SPLITS, LABELS_V1, validate_table
from audiopipe.infra.credentials import refuse_credentials
from audiopipe.infra.storage import StorageSpec, describe_storage_error, open_fs, to_url, write_bytes_atomic
from audiopipe.models.registry import CHAMPION, ModelCard, parse_model_ref
from audiopipe.tasks.extract import source_version
from audiopipe.tasks.training import TrainSpec

STATE_VERSION = 1
RETRAIN_DIR, STATE_FILE = "retrain", "state.json"
DEFAULT_METRIC = {"classify": "accuracy", "asr": "cer"}
# Metrics whose direction is known; anything else needs ``higher_is_better``.
HIGHER_IS_BETTER = {"accuracy": True, "cer": False, "wer": False}
# TrainSpec fields a retrain keeps from the champion (and ``train_params`` may override); the data fields
# (features, labels, registry, config hash, name, work dir) are always the run's own.
TUNABLE = ("epochs", "batch_size", "learning_rate", "patience", "seed", "require_gpu", "model_overrides",
           "cache_examples")


@dataclass(frozen=True)
class RetrainRequest:
    """The checked parameters of one run."""

    registry_url: str
    name: str
    margin: float
    metric: str | None
    higher_is_better: bool | None
    holdout_split: str
    train_params: Mapping


def check_request(model: str, *, margin: float = 0.0, metric: str | None = None,
                  higher_is_better: bool | None = None, holdout_split: str = "test", epochs: int | None = None,
                  train_params: Mapping | None = None, storage_options: Mapping | None = None) -> RetrainRequest:
    """Check everything that needs no storage (the CLI calls this before Prefect starts).

    Raises:
        ConfigError: a bad model ref, margin, split, epochs or train parameter, or secrets in storage options.
    """
    parsed = parse_model_ref(model, require_selector=False)
    if not parsed.registry_url or parsed.selector:
        raise ConfigError(f"model {model!r}: write REGISTRY_URL:NAME (no @version; retraining always "
                          f"competes for the {CHAMPION!r} alias).")
    if not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin must be a finite number >= 0 (got {margin}).")
    if holdout_split not in LABELS_SPLITS:
        raise ConfigError(f"holdout split {holdout_split!r} is not one of {LABELS_SPLITS}.")
    unknown = set(train_params or {}) - set(TUNABLE)
    if unknown:
        raise ConfigError(f"train_params has keys {sorted(unknown)}; allowed: {', '.join(TUNABLE)}.")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"epochs must be >= 1 (got {epochs}).")
    refuse_credentials(storage_options)
    params = {**(train_params or {}), **({"epochs": epochs} if epochs is not None else {})}
    return RetrainRequest(parsed.registry_url, parsed.name, float(margin), metric, higher_is_better,
                          holdout_split, params)


def metric_rule(family: str, metric: str | None, higher_is_better: bool | None) -> tuple[str, bool]:
    """The metric to judge by (default: accuracy for classify, cer for asr) and whether higher is better."""
    if family not in DEFAULT_METRIC:
        raise ConfigError(f"retraining evaluates classify and asr models, not {family!r}.")
    metric = metric or DEFAULT_METRIC[family]
    known = HIGHER_IS_BETTER.get(metric, True if metric.startswith(("precision_", "recall_")) else None)
    if higher_is_better is None and known is None:
        raise ConfigError(f"metric {metric!r} has no known direction: pass higher_is_better.")
    return metric, known if higher_is_better is None else bool(higher_is_better)


def diff_tables(before: Mapping[str, str], now: Mapping[str, str]) -> dict[str, list[str]]:
    """Label tables ``added``, ``changed`` (another version) and ``removed`` since ``before`` (URL -> version)."""
    return {"added": sorted(set(now) - set(before)),
            "changed": sorted(u for u in set(now) & set(before) if now[u] != before[u]),
            "removed": sorted(set(before) - set(now))}


def merge_labels(tables: Sequence[pa.Table]) -> tuple[pa.Table, int]:
    """One LABELS_V1 table sorted by ``source``; a source labelled twice keeps its row from the later table.

    Returns:
        The merged table and how many rows were overridden by a later table.
    """
    whole = pa.concat_tables([t.select(LABELS_V1.names).cast(LABELS_V1) for t in tables])
    sources = whole["source"].to_pylist()
    last = {s: i for i, s in enumerate(sources)}
    merged = whole.take(sorted(last.values())).sort_by("source")
    return merged, len(sources) - len(last)


def inputs_key(tables: Mapping[str, str]) -> str:
    """16 hex chars naming a set of label table versions (the merged table's file name)."""
    return hashlib.sha256(json.dumps(sorted(tables.items())).encode()).hexdigest()[:16]


def list_label_tables(labels_url: str, storage: StorageSpec) -> dict[str, str]:
    """Every ``*.parquet`` under ``labels_url`` (or that one file) -> its version (ETag, else mtime:size).

    Raises:
        ConfigError: no table there. StorageError: the store cannot be read.
    """
    fs, root = open_fs(labels_url, storage)
    try:
        fs.invalidate_cache(root)  # a long-lived process must see tables that landed since the last listing
        entries = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)} if fs.exists(root) else {}
    except Exception as exc:  # noqa: BLE001 - translated into a message that says what to fix
        raise describe_storage_error(labels_url, exc) from exc
    found = {to_url(fs, path): _version(info) for path, info in entries.items()
             if info.get("type", "file") == "file" and path.lower().endswith(".parquet")
             and not path.rsplit("/", 1)[-1].startswith(("_", "."))}
    if not found:
        raise ConfigError(f"no label tables (*.parquet) under {labels_url}.")
    return dict(sorted(found.items()))


def _version(info: Mapping) -> str:
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, datetime):
        mtime = mtime.timestamp()
    return source_version(etag.strip('"') if etag else None, round(float(mtime) * 1e6) if mtime else None,
                          int(info.get("size") or 0))


def load_labels(url: str, storage: StorageSpec) -> tuple[pa.Table, str]:
    """A LABELS_V1 table and the sha256 of its bytes. Raises SchemaError naming the URL."""
    blob = read_bytes(url, storage)
    if blob is None:
        raise ConfigError(f"labels table {url} does not exist.")
    table = pq.read_table(io.BytesIO(blob))
    try:
        validate_table(table, LABELS_V1)
    except SchemaError as exc:
        raise SchemaError(f"{url}: {exc}") from None
    return table, hashlib.sha256(blob).hexdigest()


def read_state(url: str, storage: StorageSpec) -> dict:
    """The retrain state at ``url`` (``{}`` when none yet)."""
    blob = read_bytes(url, storage)
    state = json.loads(blob) if blob is not None else {"state_version": STATE_VERSION}
    if state.get("state_version") != STATE_VERSION:
        raise ConfigError(f"{url} has state_version {state.get('state_version')!r}; this audiopipe reads "
                          f"{STATE_VERSION}.")
    return state


def read_bytes(url: str, storage: StorageSpec) -> bytes | None:
    """The object at ``url``, or None when there is none. Raises StorageError saying what to fix."""
    fs, path = open_fs(url, storage)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - translated into a message that says what to fix
        raise describe_storage_error(url, exc) from exc


def write_bytes(url: str, storage: StorageSpec, data: bytes) -> None:
    """Publish ``data`` at ``url`` whole (``write_bytes_atomic``). Raises StorageError saying what to fix."""
    fs, path = open_fs(url, storage)
    try:
        write_bytes_atomic(fs, path, data)
    except Exception as exc:  # noqa: BLE001 - translated into a message that says what to fix
        raise describe_storage_error(url, exc) from exc


def check_holdout(holdout: pa.Table, merged: pa.Table, split: str, classes: Sequence[str] | None) -> int:
    """Rows of ``split`` in the held-out table; it must not share sources with the training labels.

    Raises:
        ConfigError: no rows of ``split``, overlap with training, or (classify) classes ``classes`` lacks.
    """
    rows = holdout.filter(pa.compute.equal(holdout["split"], split))
    if rows.num_rows == 0:
        raise ConfigError(f"the held-out table has no {split!r} rows; pass the split that holds them.")
    leaked = set(rows["source"].to_pylist()) & set(merged["source"].to_pylist())
    if leaked:
        raise ConfigError(f"{len(leaked)} held-out sources are also in the training labels (e.g. "
                          f"{sorted(leaked)[0]}); the held-out set must be disjoint from training.")
    missing = {c for c in rows["label"].to_pylist() if c} - set(classes) if classes is not None else set()
    if missing:
        raise ConfigError(f"held-out classes {sorted(missing)} are not all known to the champion and the new "
                          "training labels; every model must be able to score the held-out set.")
    return rows.num_rows


def challenger_spec(card: ModelCard | None, family: str, params: Mapping, **data: str) -> TrainSpec:
    """The champion's training settings (``card.params["spec"]``), ``params`` over them, the run's data."""
    base = dict((card.params.get("spec") or {}) if card else {})
    kept = {k: base[k] for k in TUNABLE if k in base}
    return TrainSpec(family, **data, **{**kept, **params})


def write_state(url: str, storage: StorageSpec, labels_url: str, tables: Mapping[str, str], merged_url: str,
                decision: Mapping, flow_run_id: str | None = None) -> None:
    """Record what this run trained on; written only after its decision, so a failed run is retried."""
    state = {"state_version": STATE_VERSION, "at": datetime.now(timezone.utc).isoformat(),
             "labels_url": labels_url, "tables": dict(tables), "merged_labels_url": merged_url,
             "trained_version": decision["challenger_version"], "champion_version": decision["champion_version"],
             "decision": decision["decision"], "flow_run_id": flow_run_id}
    write_bytes(url, storage, json.dumps(state, indent=2, sort_keys=True).encode())


def decision_markdown(result: Mapping, labels_url: str) -> str:
    """The artifact: label tables and, when a challenger was trained, the decision table."""
    marks = {u: k for k, urls in result["changes"].items() for u in urls}
    lines = [f"# retrain {result['model']}: {result['status']}", "", f"Label tables under `{labels_url}`:", "",
             "| table | version | change |", "|---|---|---|"]
    lines += [f"| `{u}` | `{v}` | {marks.get(u, '-')} |" for u, v in result["tables"].items()]
    lines += [f"| `{u}` | - | removed |" for u in result["changes"]["removed"]]
    d = result["decision"]
    if d is None:
        return "\n".join([*lines, "", "Nothing new: no model was trained."]) + "\n"
    champ = f"v{d['champion_version']}" if d["champion_version"] is not None else "none"
    lines += ["", f"Held-out set `{d['evaluation']['labels_url']}` (split `{d['evaluation']['split']}`, "
              f"{d['evaluation']['num_rows']} rows):", "", f"| metric | champion {champ} | challenger "
              f"v{d['challenger_version']} |", "|---|---|---|"]
    for key in sorted(d["challenger_metrics"], key=lambda k: (k != d["metric"], k)):
        lines.append(f"| {'**' + key + '**' if key == d['metric'] else key} | "
                     f"{_fmt(d['champion_metrics'].get(key))} | {_fmt(d['challenger_metrics'][key])} |")
    lines += ["", f"**{d['decision']}** (margin {d['margin']:g}): {d['reason']}"]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"

