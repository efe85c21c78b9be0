"""Models: the model registry — trained ``.keras`` files with their cards, aliases and promotion decisions.

In: a Keras model (or a saved ``.keras`` file) plus its provenance (metrics, feature config, training data,
normalisation statistics, vocabulary/classes, params and history). Out: ``ModelRef``s, checksum-verified
local copies and loaded models. The registry lives at any fsspec URL (``s3://``, ``file://``, a path,
``memory://``); its layout and JSON contracts are in ``docs/registry.md`` (``REGISTRY_CONTRACT_VERSION``).

One writer per model name at a time (the training or retraining flow); any number of readers. A version
is committed when its ``card.json`` lands, after ``model.keras``; a version folder without a card is
invisible and is removed by the next ``register``. No Prefect or Dask here, and Keras is imported only to
save a model object or load one. The records themselves (refs, cards, decisions) are in ``models/cards.py``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from audiopipe.infra.storage import (StorageSpec, describe_storage_error, join, open_fs, to_url,
                                     write_bytes_atomic)
from audiopipe.infra.version import audiopipe_version
from audiopipe.models.cards import (ALIASES_FILE, CARD_FILE, CHAMPION, check_name, decide, Decision, _dumps,
                                    feature_config_hash, IntegrityError, LATEST, MODEL_FAMILIES, MODEL_FILE,
                                    ModelCard, ModelRef, _NAME_RE, Normalization, parse_model_ref, ParsedRef,
                                    _REF_FORMS, REGISTRY_CONTRACT_VERSION, RegistryError, TrainingData)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the registry


class Registry:
    """A model registry rooted at ``url``; see ``docs/registry.md`` for the layout.

    Pickles as its URL and ``StorageSpec`` (Dask workers reopen the filesystem).
    """

    def __init__(self, url: str, storage: StorageSpec | None = None) -> None:
        self.storage = storage or StorageSpec()
        self._fs, self._root = open_fs(url, self.storage)
        self.url = to_url(self._fs, self._root)

    def __reduce__(self):
        return (Registry, (self.url, self.storage))

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    # -- paths and listing
    def _path(self, name: str, *parts: str) -> str:
        return join(self._root, name, *parts)

    def _vdir(self, name: str, version: int) -> str:
        return self._path(name, "versions", f"{version:04d}")

    def _numbered_dirs(self, name: str) -> list[int]:
        base = self._path(name, "versions")
        with self._storage(base):
            self._fs.invalidate_cache(base)
            if not self._fs.isdir(base):
                return []
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(base, detail=False)]
        return sorted(int(n) for n in names if n.isdigit())

    def list_models(self) -> list[str]:
        """Names of models with at least one committed version, sorted."""
        with self._storage(self.url):
            self._fs.invalidate_cache(self._root)
            if not self._fs.isdir(self._root):
                return []
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self._root, detail=False)]
        return sorted(n for n in names if _NAME_RE.match(n) and self.list_versions(n))

    def list_versions(self, name: str) -> list[int]:
        """Committed versions (those with a ``card.json``), ascending."""
        check_name(name, what="model name")
        with self._storage(self._path(name)):
            self._fs.invalidate_cache(self._path(name))
            cards = self._fs.glob(self._path(name, "versions", "*", CARD_FILE))
        numbers = (c.rstrip("/").rsplit("/", 2)[-2] for c in cards)
        return sorted(int(n) for n in numbers if n.isdigit())

    def incomplete_versions(self, name: str) -> list[int]:
        """Version folders without a card: a register that died before its commit."""
        done = set(self.list_versions(name))
        return [v for v in self._numbered_dirs(name) if v not in done]

    def clean_incomplete(self, name: str) -> list[int]:
        """Remove uncommitted version folders (safe only with one writer per model name, the contract)."""
        removed = self.incomplete_versions(name)
        for v in removed:
            log.warning("removing uncommitted version folder %s", to_url(self._fs, self._vdir(name, v)))
            with self._storage(self._vdir(name, v)):
                self._fs.rm(self._vdir(name, v), recursive=True)
        return removed

    # -- refs
    def resolve(self, ref: str | ModelRef | ParsedRef) -> ModelRef:
        """``NAME@N``, ``NAME@ALIAS``, ``NAME@latest`` (optionally ``URL:``-prefixed) -> a committed version.

        A pin (``#sha256=HEX``) is carried on the returned ref and checked by ``get_card``, ``fetch`` and
        ``load``, each on the card they read.
        """
        parsed = _parsed(ref)
        if parsed.registry_url and Registry(parsed.registry_url, self.storage).url != self.url:
            raise RegistryError(f"ref {parsed.registry_url}:{parsed.name} points at another registry than {self.url}.")
        versions = self.list_versions(parsed.name)
        selector = parsed.selector or LATEST
        if not versions:
            raise RegistryError(f"model {parsed.name!r} has no versions in {self.url}.")
        if selector == LATEST:
            version = versions[-1]
        elif selector.isdigit():
            version = int(selector)
        else:
            aliases = self.aliases(parsed.name)
            if selector not in aliases:
                raise RegistryError(f"model {parsed.name!r} has no alias {selector!r} in {self.url}; aliases: "
                                    f"{_listing(aliases) or 'none'}. Use {_REF_FORMS}.")
            version = aliases[selector]
        if version not in versions:
            raise RegistryError(f"{parsed.name}@{version} is not a committed version in {self.url}; "
                                f"versions: {', '.join(map(str, versions))}.")
        return ModelRef(self.url, parsed.name, version, parsed.sha256)

    def get_card(self, ref: str | ModelRef | ParsedRef) -> ModelCard:
        """The card of the version ``ref`` resolves to.

        Raises:
            RegistryError: no such version, a card that is not this version's, or a pinned ref
                (``#sha256=HEX``) whose version now holds another model file.
        """
        parsed = _parsed(ref)
        ref = self.resolve(parsed)
        path = join(self._vdir(ref.name, ref.version), CARD_FILE)
        card = ModelCard.from_dict(self._read_json(path, required=True))
        if (card.name, card.version) != (ref.name, ref.version):
            raise RegistryError(f"{to_url(self._fs, path)} describes {card.name}@{card.version}, not {ref.short}.")
        if ref.sha256 and card.model_sha256 != ref.sha256:
            raise RegistryError(
                f"{self.url}:{ref.name}@{parsed.selector} is pinned to sha256 {ref.sha256}, but it resolves to "
                f"version {ref.version}, whose model.keras has sha256 {card.model_sha256}. Nothing was loaded. "
                f"The alias was moved or the version rewritten since the pin was taken: check "
                f"`audiopipe models show {self.url}:{ref.name}` (alias history) and change the pin only if "
                "the new model is intended.")
        return card

    # -- writing versions
    def register(self, name: str, model: Any, *, family: str, metrics: Mapping[str, float],
                 feature_config: Mapping[str, Any], training_data: TrainingData,
                 normalization: Normalization | None = None, vocabulary: Sequence[str] = (),
                 classes: Sequence[str] = (), params: Mapping[str, Any] | None = None,
                 history: Mapping[str, Sequence[float]] | None = None, extra: Mapping[str, Any] | None = None,
                 config_hash: str | None = None, files: Mapping[str, bytes] | None = None) -> ModelRef:
        """Store ``model`` (a ``keras.Model`` or a ``.keras`` file path/URL) as the next version of ``name``.

        ``files`` are artifacts that belong to this version (e.g. an ASR model's character LM): each is
        stored beside ``model.keras`` and its sha256 and size go on the card (``extra["files"]``), so
        ``fetch_file`` verifies it like the model. ``model.keras`` and the files are written first,
        ``card.json`` last (the commit). Returns the new ``ModelRef``.
        Raises:
            RegistryError: bad name/family, non-finite metrics, a file that is not a ``.keras`` archive,
                or another writer committing the same version concurrently.
        """
        check_name(name, what="model name")
        if family not in MODEL_FAMILIES:
            raise RegistryError(f"unknown model family {family!r}; choose one of {', '.join(MODEL_FAMILIES)}.")
        blob = self._model_bytes(model)
        artifacts = {_check_file_name(n): bytes(b) for n, b in (files or {}).items()}
        if artifacts:
            extra = {**(extra or {}), "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                                                for n, b in artifacts.items()}}
        self.clean_incomplete(name)
        version = max(self.list_versions(name), default=0) + 1
        card = ModelCard(
            name=name, version=version, created_at=_now(), model_family=family,
            model_sha256=hashlib.sha256(blob).hexdigest(), model_size=len(blob), metrics=_finite(metrics),
            feature_config=dict(feature_config), feature_config_hash=config_hash or feature_config_hash(feature_config),
            training_data=training_data, normalization=normalization, vocabulary=tuple(vocabulary),
            classes=tuple(classes), code_version=audiopipe_version(), params=dict(params or {}),
            history={str(k): tuple(_none_if_nan(x) for x in v) for k, v in (history or {}).items()},
            extra=dict(extra or {}))
        card_bytes = _dumps(card.to_dict())  # fails on unserialisable fields before anything is written
        vdir = self._vdir(name, version)
        with self._storage(to_url(self._fs, vdir)):
            write_bytes_atomic(self._fs, join(vdir, MODEL_FILE), blob)
            for file_name, data in artifacts.items():
                write_bytes_atomic(self._fs, join(vdir, file_name), data)
            if self._fs.exists(join(vdir, CARD_FILE)):
                raise RegistryError(f"{name}@{version} was committed by another writer meanwhile; "
                                    "run one writer per model name at a time.")
            write_bytes_atomic(self._fs, join(vdir, CARD_FILE), card_bytes)
        log.info("registered %s:%s@%d (%d bytes)", self.url, name, version, len(blob))
        return ModelRef(self.url, name, version)

    def _model_bytes(self, model: Any) -> bytes:
        if isinstance(model, (str, os.PathLike)):
            src = str(model)
            if not src.endswith(".keras"):
                raise RegistryError(f"{src} is not a .keras file; save the model with model.save('x.keras').")
            fs, path = open_fs(src, self.storage)
            with self._storage(src):
                blob = fs.cat_file(path)
        elif hasattr(model, "save") and hasattr(model, "get_config"):
            with tempfile.TemporaryDirectory(prefix="audiopipe-register-") as tmp:
                model.save(Path(tmp) / MODEL_FILE)
                blob = (Path(tmp) / MODEL_FILE).read_bytes()
        else:
            raise RegistryError(f"cannot register a {type(model).__name__}: pass a keras.Model or a .keras path.")
        if not blob.startswith(b"PK"):
            raise RegistryError(f"{model} is not a .keras archive (a zip file); refusing to register it.")
        return blob

    # -- fetching and loading
    def fetch(self, ref: str | ModelRef, cache_dir: str | Path) -> tuple[Path, ModelCard]:
        """Download ``model.keras`` into ``cache_dir`` and verify its size and sha256 against the card.

        A verified copy already in the cache is reused (checked again); a damaged one is replaced.
        Raises:
            IntegrityError: the stored file does not match its card (it is deleted locally, never loaded).
        """
        ref = self.resolve(ref)
        card = self.get_card(ref)
        target = Path(cache_dir) / ref.name / f"{ref.version:04d}-{card.model_sha256[:12]}" / MODEL_FILE
        if target.exists():
            try:
                verify_file(target, sha256=card.model_sha256, size=card.model_size)
                return target, card
            except IntegrityError as exc:
                log.warning("cached copy damaged, fetching again: %s", exc)
                target.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        remote = join(self._vdir(ref.name, ref.version), MODEL_FILE)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".download-", suffix=".part")
        os.close(fd)
        try:
            with self._storage(to_url(self._fs, remote)):
                self._fs.get_file(remote, tmp)
            verify_file(Path(tmp), sha256=card.model_sha256, size=card.model_size, label=to_url(self._fs, remote))
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return target, card

    def fetch_file(self, ref: str | ModelRef, file_name: str, cache_dir: str | Path) -> Path:
        """Download one of the version's ``files`` (see ``register``) into ``cache_dir``, verified like ``fetch``.

        Raises:
            RegistryError: the card lists no such file.
            IntegrityError: the stored file does not match the card (it is never returned).
        """
        ref = self.resolve(ref)
        card = self.get_card(ref)
        meta = card.extra.get("files", {}).get(file_name)
        if meta is None:
            raise RegistryError(f"{ref.short} has no file {file_name!r}; its card lists "
                                f"{sorted(card.extra.get('files', {})) or 'none'}.")
        target = Path(cache_dir) / ref.name / f"{ref.version:04d}-{card.model_sha256[:12]}" / file_name
        if target.exists():
            try:
                verify_file(target, sha256=meta["sha256"], size=meta["size"])
                return target
            except IntegrityError:
                target.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        remote = join(self._vdir(ref.name, ref.version), file_name)
        with self._storage(to_url(self._fs, remote)):
            data = self._fs.cat_file(remote)
        tmp = target.with_name(f".{file_name}.part")
        tmp.write_bytes(data)
        try:
            verify_file(tmp, sha256=meta["sha256"], size=meta["size"], label=to_url(self._fs, remote))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def load(self, ref: str | ModelRef, local_cache_dir: str | Path, *, compile: bool = False,
             custom_objects: Mapping[str, Any] | None = None) -> tuple[Any, ModelCard]:
        """Fetch and verify (``fetch``), then ``keras.saving.load_model(path, safe_mode=True)``.

        ``compile=False`` by default: inference needs no optimizer, and training code recompiles.
        Raises:
            IntegrityError: checksum or size mismatch (nothing is loaded).
            RegistryError: Keras refuses the verified file (e.g. a Lambda layer under safe mode).
        """
        path, card = self.fetch(ref, local_cache_dir)
        import keras

        import audiopipe.models.asr_ctc  # noqa: F401 - registers audiopipe's custom layers and losses
        import audiopipe.models.separation  # noqa: F401

        try:
            model = keras.saving.load_model(path, custom_objects=dict(custom_objects or {}), compile=compile,
                                            safe_mode=True)
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"{card.name}@{card.version} passed its checksum but Keras cannot load it in safe "
                                f"mode: {exc}. Custom layers must be registered with "
                                "keras.saving.register_keras_serializable (Lambda layers are refused).") from exc
        return model, card

    # -- aliases
    def _alias_doc(self, name: str) -> dict[str, Any]:
        doc = self._read_json(self._path(name, ALIASES_FILE), required=False) or {}
        return {"aliases_version": REGISTRY_CONTRACT_VERSION, "aliases": {}, "history": [], **doc}

    def aliases(self, name: str) -> dict[str, int]:
        return {k: int(v) for k, v in self._alias_doc(check_name(name, what="model name"))["aliases"].items()}

    def alias_history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move, oldest first: ``{alias, version, previous, at, reason, actor, action}``."""
        return list(self._alias_doc(check_name(name, what="model name"))["history"])

    def promote(self, name: str, version: int | str, *, alias: str = CHAMPION, reason: str = "",
                actor: str | None = None) -> ModelRef:
        """Point ``alias`` at ``version`` (a number, alias or ``latest``); a no-op if it already points there."""
        check_name(alias, what="alias")
        if alias == LATEST:
            raise RegistryError("'latest' is computed, not an alias that can be moved.")
        ref = self.resolve(ParsedRef(None, name, str(version)))
        current = self.aliases(name).get(alias)
        if current != ref.version:
            self._move_alias(name, alias, ref.version, current, reason, actor, "promote")
        return ref

    def rollback(self, name: str, *, alias: str = CHAMPION, reason: str = "", actor: str | None = None) -> ModelRef:
        """Move ``alias`` back to the version it held before its current one (repeatable, like an undo stack).

        Raises:
            RegistryError: the alias has no earlier version.
        """
        current = self.aliases(name).get(alias)
        stack = _alias_stack(self.alias_history(name), alias)
        if current is None or len(stack) < 2:
            raise RegistryError(f"{name}@{alias} has no earlier version to roll back to "
                                f"(current: {current if current is not None else 'unset'}).")
        target = self.resolve(ParsedRef(None, name, str(stack[-2])))
        self._move_alias(name, alias, target.version, current, reason or "rollback", actor, "rollback")
        return target

    def _move_alias(self, name: str, alias: str, version: int, previous: int | None, reason: str,
                    actor: str | None, action: str) -> None:
        doc = self._alias_doc(name)
        doc["aliases"] = {**doc["aliases"], alias: version}
        doc["history"] = [*doc["history"], {"alias": alias, "version": version, "previous": previous, "at": _now(),
                                            "reason": reason, "actor": actor or default_actor(), "action": action}]
        with self._storage(self._path(name, ALIASES_FILE)):
            write_bytes_atomic(self._fs, self._path(name, ALIASES_FILE), _dumps(doc))
        log.info("%s: %s %s -> %d (%s)", name, alias, previous, version, action)

    # -- decisions
    def record_decision(self, decision: Decision) -> str:
        """Write ``decisions/<at>-v<challenger>.json``; returns its URL."""
        stamp = decision.at.replace("-", "").replace(":", "")
        path = self._path(decision.name, "decisions", f"{stamp}-v{decision.challenger_version:04d}.json")
        with self._storage(to_url(self._fs, path)):
            write_bytes_atomic(self._fs, path, _dumps(decision.to_dict()))
        return to_url(self._fs, path)

    def list_decisions(self, name: str) -> list[Decision]:
        """Recorded decisions for ``name``, oldest first."""
        with self._storage(self._path(name)):
            paths = sorted(self._fs.glob(self._path(check_name(name, what="model name"), "decisions", "*.json")))
        return [Decision.from_dict(self._read_json(p, required=True)) for p in paths]

    def compare_and_promote(self, name: str, challenger_version: int | str, *, metric: str, higher_is_better: bool,
                            margin: float = 0.0, alias: str = CHAMPION,
                            champion_metrics: Mapping[str, float] | None = None,
                            challenger_metrics: Mapping[str, float] | None = None,
                            evaluation: Mapping[str, Any] | None = None, actor: str | None = None) -> Decision:
        """Promote the challenger to ``alias`` only if better by ``margin``; record the decision either way.

        Pass both metric sets when they were recomputed on one fixed held-out set (``evaluation`` says which);
        otherwise each card's test-split metrics are used. The decision is written before the alias moves.
        """
        challenger = self.resolve(ParsedRef(None, name, str(challenger_version)))
        champion_version = self.aliases(name).get(alias)
        if champion_version == challenger.version:
            raise RegistryError(f"{challenger.short} already is {name}@{alias}; nothing to compare.")
        ch_card = self.get_card(challenger)
        ch_metrics = {str(k): float(v) for k, v in (challenger_metrics or ch_card.metrics).items()}
        champ_metrics: dict[str, float] = {}
        if champion_version is not None:
            given = champion_metrics or self.get_card(ModelRef(self.url, name, champion_version)).metrics
            champ_metrics = {str(k): float(v) for k, v in given.items()}
        for label, m in (("challenger", ch_metrics), ("champion", champ_metrics)):
            if metric not in m and (label == "challenger" or champion_version is not None):
                raise RegistryError(f"{label} metrics have no {metric!r}; they have {', '.join(sorted(m)) or 'none'}.")
        promote, why = decide(champ_metrics.get(metric), ch_metrics[metric], higher_is_better=higher_is_better,
                              margin=margin)
        decision = Decision(name=name, at=_now(), alias=alias, metric=metric, higher_is_better=higher_is_better,
                            margin=float(margin), champion_version=champion_version,
                            challenger_version=challenger.version, champion_metrics=_nulls(champ_metrics),
                            challenger_metrics=_nulls(ch_metrics), decision="promote" if promote else "keep",
                            reason=why, actor=actor or default_actor(),
                            challenger_training_data=json.loads(_dumps(asdict(ch_card.training_data))),
                            evaluation=dict(evaluation or {}))
        url = self.record_decision(decision)
        if promote:
            self.promote(name, challenger.version, alias=alias, reason=f"{why}; decision {url}", actor=decision.actor)
        return decision

    # -- storage helpers
    def _read_json(self, path: str, *, required: bool) -> Any:
        with self._storage(to_url(self._fs, path)):
            try:
                raw = self._fs.cat_file(path)
            except FileNotFoundError:
                if required:
                    raise RegistryError(f"{to_url(self._fs, path)} does not exist.") from None
                return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{to_url(self._fs, path)} is not valid JSON ({exc}).") from exc

    @contextmanager
    def _storage(self, url: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise describe_storage_error(url, exc) from exc


def open_model_ref(text: str, storage: StorageSpec | None = None, *,
                   default_registry: str | None = None) -> tuple[Registry, ModelRef]:
    """``REGISTRY_URL:NAME@SELECTOR`` (or ``NAME@SELECTOR`` with ``default_registry``) -> registry and version."""
    parsed = parse_model_ref(text)
    url = parsed.registry_url or default_registry
    if not url:
        raise RegistryError(f"model ref {text!r} names no registry: write REGISTRY_URL:{parsed.name}@... "
                            "or give the registry URL separately.")
    registry = Registry(url, storage)
    local = ParsedRef(None, parsed.name, parsed.selector, parsed.sha256)
    if parsed.sha256:
        registry.get_card(local)  # a pin that no longer matches fails here, before any work starts
    return registry, registry.resolve(local)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a local file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def verify_file(path: Path, *, sha256: str, size: int, label: str | None = None) -> None:
    """Raise ``IntegrityError`` unless ``path`` has exactly ``size`` bytes and the given sha256."""
    actual, actual_size = file_digest(path)
    if actual_size != size or actual != sha256:
        what = "is truncated or padded" if actual_size != size else "was modified after registration"
        raise IntegrityError(f"{label or path} {what}: expected sha256 {sha256} ({size} bytes), got sha256 {actual} "
                             f"({actual_size} bytes). It was not loaded; restore the file or register the model again.")


def default_actor() -> str:
    """``user@host`` of this process, recorded with every alias move and decision."""
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return f"unknown@{socket.gethostname()}"


def _alias_stack(history: Sequence[Mapping[str, Any]], alias: str) -> list[int]:
    """Replay promotions (push) and rollbacks (pop) of one alias; the top is its current version."""
    stack: list[int] = []
    for entry in history:
        if entry["alias"] != alias:
            continue
        version = int(entry["version"])
        if entry.get("action") == "rollback":
            stack = stack[:-1]
            if not stack or stack[-1] != version:  # tolerate a hand-edited history
                stack = [*stack, version]
        else:
            stack = [*stack, version]
    return stack


def _check_file_name(name: str) -> str:
    if not _NAME_RE.match(name.replace(".", "-")) or name in (MODEL_FILE, CARD_FILE) or "/" in name:
        raise RegistryError(f"invalid version file name {name!r}: use [a-z0-9._-] (not {MODEL_FILE} or {CARD_FILE}).")
    return name


def _parsed(ref: str | ModelRef | ParsedRef) -> ParsedRef:
    if isinstance(ref, ModelRef):
        return ParsedRef(ref.registry_url, ref.name, str(ref.version), ref.sha256)
    return parse_model_ref(ref) if isinstance(ref, str) else ref


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {str(k): float(v) for k, v in metrics.items()}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise RegistryError(f"metrics {bad} are not finite; a model with NaN/inf metrics cannot be registered.")
    return out


def _nulls(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Non-finite values become null: JSON has no NaN, and a diverged challenger is still recorded."""
    return {k: _none_if_nan(v) for k, v in metrics.items()}


def _none_if_nan(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _listing(aliases: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(aliases.items()))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
