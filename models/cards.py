"""Models: what the registry stores about a model — refs, cards, decisions — as plain, versioned data.

``ModelRef``/``parse_model_ref`` name a version (``REGISTRY_URL:NAME@VERSION|ALIAS``); a ``ModelCard`` is a
version's ``card.json`` (metrics, feature config, training data, normalisation, vocabulary/classes, params,
history); a ``Decision`` is one champion/challenger comparison. Contracts: ``docs/registry.md``. The
``Registry`` that reads and writes them lives in ``models/registry.py``; nothing here touches storage.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from audiopipe.infra.errors import AudiopipeError, ConfigError

REGISTRY_CONTRACT_VERSION = 1
ACCEPTED_CARD_VERSIONS = (1,)
MODEL_FAMILIES = ("asr", "classify", "music", "separate")
MODEL_FILE, CARD_FILE, ALIASES_FILE = "model.keras", "card.json", "aliases.json"
LATEST = "latest"
CHAMPION = "champion"
# Floating-point slack when an improvement equals the margin exactly (0.93 - 0.92 is not exactly 0.01).
MARGIN_EPS = 1e-12
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_REF_FORMS = "NAME@N (a version number), NAME@ALIAS (e.g. NAME@champion) or NAME@latest"
# A ref may end in a pin, ``#sha256=<64 hex>``: the version it resolves to must hold exactly that model.keras.
PIN_PREFIX = "#sha256="
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class RegistryError(AudiopipeError):
    """A model ref, name, alias or version is not usable as asked, or the registry's files are inconsistent."""


class IntegrityError(RegistryError):
    """A model file does not match the size and sha256 on its card; it is never loaded."""


# ---------------------------------------------------------------- refs


@dataclass(frozen=True)
class ModelRef:
    """One committed version of one model in one registry; ``str()`` gives ``REGISTRY_URL:NAME@VERSION``.

    ``sha256`` is set when the ref was pinned (``...#sha256=HEX``): the registry then refuses a card whose
    ``model_sha256`` differs, and ``str()`` keeps the pin.
    """

    registry_url: str
    name: str
    version: int
    sha256: str | None = None

    def __str__(self) -> str:
        return f"{self.registry_url}:{self.short}" + (f"{PIN_PREFIX}{self.sha256}" if self.sha256 else "")

    @property
    def short(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ParsedRef:
    """A ref as written: ``[REGISTRY_URL:]NAME[@SELECTOR][#sha256=HEX]``; selector is a version number, an
    alias or ``latest``; ``sha256`` the pinned checksum of the model file, if any."""

    registry_url: str | None
    name: str
    selector: str | None
    sha256: str | None = None


def parse_model_ref(text: str, *, require_selector: bool = True) -> ParsedRef:
    """Split ``s3://bucket/reg:asr@champion``, ``/data/reg:asr@3`` or ``asr@latest`` into its parts.

    The registry URL is everything before the last ``:`` whose tail holds no ``/``, so URLs with a scheme
    work unchanged. A trailing ``#sha256=HEX`` (the full 64 hex digits) pins the model file. Raises:
        RegistryError: for an empty or malformed ref or pin, naming the accepted forms.
    """
    text = text.strip()
    text, pinned, pin = text.partition(PIN_PREFIX)
    pin = pin.lower()
    if pinned and not _SHA256_RE.match(pin):
        raise RegistryError(f"the pin in model ref {text + pinned + pin!r} must be the full sha256 of model.keras, "
                            "64 hex digits (`audiopipe models show REF` prints it).")
    url, sep, tail = text.rpartition(":")
    if not sep or "/" in tail:
        url, tail = "", text
    elif not url:
        raise RegistryError(f"model ref {text!r} has an empty registry URL before ':'.")
    name, at, selector = tail.partition("@")
    check_name(name, what="model name")
    if at and not selector or (require_selector and not at):
        raise RegistryError(f"model ref {text!r} names no version: write {_REF_FORMS}, optionally prefixed "
                            "with REGISTRY_URL: (e.g. s3://bucket/registry:asr@champion).")
    if selector and not selector.isdigit():
        check_name(selector, what="alias")
    if pinned and not selector:
        raise RegistryError(f"model ref {text + pinned + pin!r} pins a checksum but names no version: write "
                            f"NAME@VERSION{PIN_PREFIX}HEX or NAME@ALIAS{PIN_PREFIX}HEX.")
    return ParsedRef(url or None, name, selector or None, pin or None)


def check_name(name: str, *, what: str) -> str:
    """Model and alias names are lower-kebab: ``[a-z0-9][a-z0-9_-]*``, at most 64 characters."""
    if not _NAME_RE.match(name):
        raise RegistryError(f"invalid {what} {name!r}: use lowercase letters, digits, '-' and '_' "
                            "(starting with a letter or digit, at most 64 characters).")
    return name


# ---------------------------------------------------------------- the card


@dataclass(frozen=True)
class TrainingData:
    """The exact training data: feature shard URLs (content-named by featurize), a hash over them, the manifest's."""

    shards: tuple[str, ...]
    shards_hash: str
    manifest_hash: str | None = None

    @classmethod
    def of(cls, shards: Sequence[str], manifest_hash: str | None = None) -> TrainingData:
        """Sorted, de-duplicated shard URLs and their hash (``shards_hash_of``)."""
        unique = tuple(sorted(set(shards)))
        return cls(unique, shards_hash_of(unique), manifest_hash)


def shards_hash_of(shards: Sequence[str]) -> str:
    """sha256 hex over the sorted shard URLs joined by newlines."""
    return hashlib.sha256("\n".join(sorted(set(shards))).encode()).hexdigest()


@dataclass(frozen=True)
class Normalization:
    """Per-feature statistics applied as ``(x - mean) / std``; one value per feature bin."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, mean: Any, std: Any) -> Normalization:
        m, s = (np.asarray(a, dtype=np.float64).ravel() for a in (mean, std))
        if m.shape != s.shape or not np.isfinite(m).all() or not np.isfinite(s).all():
            raise RegistryError(f"normalisation stats must be finite and of equal length (mean {m.shape}, "
                                f"std {s.shape}).")
        return cls(tuple(m.tolist()), tuple(s.tolist()))


def feature_config_hash(config: Mapping[str, Any]) -> str:
    """12 hex chars of sha256 over the config as canonical JSON, ``n_mfcc`` left out for ``kind=logmel``.

    The same rule as ``tasks.features.FeatureConfig.config_hash``, so a card's hash names the feature
    partition (``features/config=<hash>``) the model was trained on.
    """
    data = dict(config)
    if data.get("kind") == "logmel":
        data.pop("n_mfcc", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to trust, reproduce and use one registered model (``card.json``).

    ``metrics`` are on the test split; ``history`` maps a Keras metric name to one value per epoch
    (non-finite epochs stored as null); ``model_sha256``/``model_size`` are those of ``model.keras``.
    """

    name: str
    version: int
    created_at: str
    model_family: str
    model_sha256: str
    model_size: int
    metrics: Mapping[str, float]
    feature_config: Mapping[str, Any]
    feature_config_hash: str
    training_data: TrainingData
    normalization: Normalization | None = None
    vocabulary: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    code_version: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    history: Mapping[str, tuple[float | None, ...]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    card_version: int = REGISTRY_CONTRACT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return json.loads(_dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Raises RegistryError for an unknown card version, unknown or missing keys."""
        version = data.get("card_version")
        if version not in ACCEPTED_CARD_VERSIONS:
            raise RegistryError(f"card version {version!r} is not one this audiopipe reads "
                                f"({ACCEPTED_CARD_VERSIONS}); upgrade audiopipe.")
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise RegistryError(f"card has unknown keys {sorted(set(data) - known)}.")
        d = dict(data)
        try:
            d["training_data"] = TrainingData(**{**d["training_data"], "shards": tuple(d["training_data"]["shards"])})
            if d.get("normalization") is not None:
                d["normalization"] = Normalization(tuple(d["normalization"]["mean"]), tuple(d["normalization"]["std"]))
            d["vocabulary"], d["classes"] = tuple(d.get("vocabulary", ())), tuple(d.get("classes", ()))
            d["history"] = {k: tuple(v) for k, v in d.get("history", {}).items()}
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise RegistryError(f"card is missing or mistypes a field: {exc}") from exc


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """One champion/challenger comparison (``decisions/<at>-v<challenger>.json``), recorded whatever its outcome."""

    name: str
    at: str
    alias: str
    metric: str
    higher_is_better: bool
    margin: float
    champion_version: int | None
    challenger_version: int
    champion_metrics: Mapping[str, float]
    challenger_metrics: Mapping[str, float]
    decision: str  # "promote" or "keep"
    reason: str
    actor: str
    challenger_training_data: Mapping[str, Any] = field(default_factory=dict)
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    decision_version: int = REGISTRY_CONTRACT_VERSION

    @property
    def promoted(self) -> bool:
        return self.decision == "promote"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(_dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        if data.get("decision_version") not in ACCEPTED_CARD_VERSIONS:
            raise RegistryError(f"decision record version {data.get('decision_version')!r} is not one this "
                                f"audiopipe reads ({ACCEPTED_CARD_VERSIONS}).")
        try:
            return cls(**data)
        except TypeError as exc:
            raise RegistryError(f"decision record does not match the contract: {exc}") from exc


def decide(champion: float | None, challenger: float, *, higher_is_better: bool, margin: float) -> tuple[bool, str]:
    """Promote iff the challenger beats the champion by at least ``margin`` (absolute, in metric units).

    Returns ``(promote, reason)``. No champion, or a non-finite one, means promote; a non-finite challenger
    means keep; equal values never promote, even with ``margin=0``.
    """
    if not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin must be a finite number >= 0 (got {margin}).")
    if not math.isfinite(challenger):
        return False, f"challenger value {challenger} is not finite"
    if champion is None or not math.isfinite(champion):
        return True, "no usable champion" if champion is None else f"champion value {champion} is not finite"
    gain = challenger - champion if higher_is_better else champion - challenger
    verdict = gain > 0 and gain + MARGIN_EPS >= margin
    word = "beats" if verdict else "does not beat"
    return verdict, f"challenger {challenger:.6g} {word} champion {champion:.6g} by margin {margin:g} (gain {gain:.6g})"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if isinstance(obj, (Path, set, frozenset)):
        return str(obj) if isinstance(obj, Path) else sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default).encode()
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"cannot write registry record: {exc} (params/extra must be JSON values, "
                            "metrics finite).") from exc
