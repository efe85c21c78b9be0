"""models/registry: real tiny Keras models registered to a local folder and to ``memory://``.

Checks the commit protocol, refs, cards, aliases (promote/rollback history), champion/challenger decisions
and that a tampered or truncated ``model.keras`` is refused before Keras ever sees it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from audiopipe.infra.errors import AudiopipeError, ConfigError
from audiopipe.models.cards import (IntegrityError, ModelCard, ModelRef, Normalization, RegistryError, TrainingData,
                                    decide, feature_config_hash, parse_model_ref, shards_hash_of)
from audiopipe.models.registry import Registry, open_model_ref
from audiopipe.tasks.features import FeatureConfig

FEATURES = FeatureConfig(n_mels=8).to_dict()
DATA = TrainingData.of(["memory://f/part-b.parquet", "memory://f/part-a.parquet"], manifest_hash="m" * 64)
X = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)


def tiny_model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> list[Path]:
    """Three saved .keras files with different weights (saving once keeps the tests fast)."""
    root = tmp_path_factory.mktemp("keras")
    paths = []
    for seed in range(3):
        path = root / f"m{seed}.keras"
        tiny_model(seed).save(path)
        paths.append(path)
    return paths


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path) -> Registry:
    url = str(tmp_path / "registry") if request.param == "local" else f"memory://reg-{uuid.uuid4().hex[:8]}"
    return Registry(url)


def register(reg: Registry, model, *, name: str = "clf", accuracy: float = 0.9, **kw) -> ModelRef:
    return reg.register(name, model, family="classify", metrics={"accuracy": accuracy, "loss": 0.3},
                        feature_config=FEATURES, training_data=DATA,
                        normalization=Normalization.of(np.zeros(8), np.ones(8)), classes=("speech", "music", "noise"),
                        params={"epochs": 2, "lr": np.float32(1e-3)}, history={"loss": [1.2, float("nan")]}, **kw)


def model_path(reg: Registry, ref: ModelRef) -> str:
    return f"{reg._root}/{ref.name}/versions/{ref.version:04d}/model.keras"


def test_round_trip_gives_equal_predictions_and_a_full_card(registry, tmp_path):
    model = tiny_model(7)
    ref = register(registry, model)
    loaded, card = registry.load(ref, tmp_path / "cache")
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0), rtol=1e-6)
    assert (card.name, card.version, card.model_family) == ("clf", 1, "classify")
    assert card.metrics == {"accuracy": 0.9, "loss": 0.3}
    assert card.feature_config_hash == FeatureConfig(n_mels=8).config_hash
    assert card.training_data.shards == ("memory://f/part-a.parquet", "memory://f/part-b.parquet")
    assert card.training_data.shards_hash == shards_hash_of(DATA.shards) and card.training_data.manifest_hash
    assert card.normalization.mean == (0.0,) * 8 and card.classes == ("speech", "music", "noise")
    assert card.history == {"loss": (1.2, None)} and card.params["lr"] == pytest.approx(1e-3)
    assert card.code_version and card.created_at.endswith("Z")
    blob = registry._fs.cat_file(model_path(registry, ref))
    assert card.model_sha256 == hashlib.sha256(blob).hexdigest() and card.model_size == len(blob)
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


def test_versions_increment_and_refs_resolve(registry, model_files):
    refs = [register(registry, p, accuracy=0.8 + i / 100) for i, p in enumerate(model_files)]
    assert [r.version for r in refs] == [1, 2, 3] and registry.list_versions("clf") == [1, 2, 3]
    assert registry.list_models() == ["clf"]
    assert registry.resolve("clf@latest").version == 3 and registry.resolve("clf@2").version == 2
    assert registry.resolve(str(refs[0])) == refs[0]  # REGISTRY_URL:NAME@N round-trips
    reg2, ref2 = open_model_ref(str(refs[1]))
    assert (reg2.url, ref2) == (registry.url, refs[1])
    assert pickle.loads(pickle.dumps(registry)).list_versions("clf") == [1, 2, 3]
    for bad, needle in [("clf@9", "not a committed version"), ("clf@champion", "no alias 'champion'"),
                        ("nope@1", "has no versions"), ("clf", "names no version"), ("Bad Name@1", "invalid")]:
        with pytest.raises(RegistryError, match=needle):
            registry.resolve(bad)


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket/reg:asr@champion", ("s3://bucket/reg", "asr", "champion")),
    ("file:///data/reg:classify@3", ("file:///data/reg", "classify", "3")),
    ("/data/reg:music@latest", ("/data/reg", "music", "latest")),
    ("memory://r:sep-1@challenger", ("memory://r", "sep-1", "challenger")),
    ("asr@2", (None, "asr", "2")),
])
def test_parse_model_ref(text, expected):
    parsed = parse_model_ref(text)
    assert (parsed.registry_url, parsed.name, parsed.selector) == expected


def test_bad_registrations_write_nothing(registry, model_files, tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not keras")
    (tmp_path / "fake.keras").write_bytes(b"not a zip")
    cases = [(dict(model=model_files[0], name="Clf"), "invalid model name"),
             (dict(model=model_files[0], accuracy=float("nan")), "not finite"),
             (dict(model=tmp_path / "x.h5"), "not a .keras file"),
             (dict(model=tmp_path / "fake.keras"), "not a .keras archive"),
             (dict(model=object()), "cannot register")]
    for kwargs, needle in cases:
        with pytest.raises(RegistryError, match=needle):
            register(registry, **kwargs)
    with pytest.raises(RegistryError, match="unknown model family"):
        registry.register("clf", model_files[0], family="vision", metrics={}, feature_config=FEATURES,
                          training_data=DATA)
    assert registry.list_models() == [] and registry.incomplete_versions("clf") == []


def test_card_contract_is_strict():
    card = {"card_version": 1, "name": "a", "version": 1}
    with pytest.raises(RegistryError, match="missing"):
        ModelCard.from_dict(card)
    with pytest.raises(RegistryError, match="unknown keys"):
        ModelCard.from_dict({**card, "surprise": 1})
    with pytest.raises(RegistryError, match="card version 2"):
        ModelCard.from_dict({**card, "card_version": 2})
    assert feature_config_hash(FeatureConfig(kind="mfcc").to_dict()) == FeatureConfig(kind="mfcc").config_hash


def test_incomplete_version_is_ignored_then_cleaned(registry, model_files):
    register(registry, model_files[0])
    stray = f"{registry._root}/clf/versions/0002/model.keras"  # a register that died before its card
    registry._fs.makedirs(stray.rsplit("/", 1)[0], exist_ok=True)
    registry._fs.pipe_file(stray, b"PK partial")
    assert registry.list_versions("clf") == [1] and registry.incomplete_versions("clf") == [2]
    assert registry.resolve("clf@latest").version == 1
    with pytest.raises(RegistryError, match="not a committed version"):
        registry.resolve("clf@2")
    assert register(registry, model_files[1]).version == 2  # the stray folder is removed, its number reused
    assert registry.incomplete_versions("clf") == [] and registry.get_card("clf@2").version == 2


def test_promote_and_rollback_keep_a_history(registry, model_files):
    for p in model_files:
        register(registry, p)
    for v in (1, 2, 3):
        registry.promote("clf", v, reason=f"r{v}", actor="tester")
    registry.promote("clf", 3)  # no-op: not recorded
    registry.promote("clf", "latest", alias="challenger")
    assert registry.aliases("clf") == {"champion": 3, "challenger": 3}
    assert registry.rollback("clf").version == 2 and registry.rollback("clf", reason="again").version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("clf")
    registry.promote("clf", 3)
    assert registry.rollback("clf").version == 1
    history = [(e["alias"], e["previous"], e["version"], e["action"]) for e in registry.alias_history("clf")]
    assert history == [("champion", None, 1, "promote"), ("champion", 1, 2, "promote"), ("champion", 2, 3, "promote"),
                       ("challenger", None, 3, "promote"), ("champion", 3, 2, "rollback"),
                       ("champion", 2, 1, "rollback"), ("champion", 1, 3, "promote"), ("champion", 3, 1, "rollback")]
    first = registry.alias_history("clf")[0]
    assert (first["reason"], first["actor"]) == ("r1", "tester") and first["at"].endswith("Z")
    assert registry.resolve("clf@champion").version == 1
    with pytest.raises(RegistryError, match="'latest' is computed"):
        registry.promote("clf", 1, alias="latest")


def test_compare_and_promote_records_every_decision(registry, model_files):
    for p, acc in zip(model_files, (0.90, 0.905, 0.95)):
        register(registry, p, accuracy=acc)
    first = registry.compare_and_promote("clf", 1, metric="accuracy", higher_is_better=True, margin=0.01)
    assert first.promoted and first.champion_version is None and registry.aliases("clf") == {"champion": 1}
    kept = registry.compare_and_promote("clf", 2, metric="accuracy", higher_is_better=True, margin=0.01,
                                        evaluation={"held_out": "memory://eval"})
    assert not kept.promoted and registry.aliases("clf") == {"champion": 1}
    won = registry.compare_and_promote("clf", 3, metric="accuracy", higher_is_better=True, margin=0.01)
    assert won.promoted and registry.aliases("clf") == {"champion": 3}
    recorded = registry.list_decisions("clf")
    assert [d.decision for d in recorded] == ["promote", "keep", "promote"]
    assert recorded[1] == kept and recorded[1].evaluation == {"held_out": "memory://eval"}
    assert recorded[1].champion_metrics["accuracy"] == 0.9 and recorded[1].challenger_metrics["accuracy"] == 0.905
    assert recorded[1].challenger_training_data["shards_hash"] == DATA.shards_hash
    assert "decision" in registry.alias_history("clf")[-1]["reason"]
    # lower is better, re-evaluated on one held-out set; a diverged (NaN) challenger is kept out and recorded
    nan = registry.compare_and_promote("clf", 2, metric="cer", higher_is_better=False, margin=0.0,
                                       champion_metrics={"cer": 0.1}, challenger_metrics={"cer": float("nan")})
    assert not nan.promoted and registry.list_decisions("clf")[-1].challenger_metrics == {"cer": None}
    with pytest.raises(RegistryError, match="no 'wer'"):
        registry.compare_and_promote("clf", 2, metric="wer", higher_is_better=False)
    with pytest.raises(RegistryError, match="already is"):
        registry.compare_and_promote("clf", 3, metric="accuracy", higher_is_better=True)


@pytest.mark.parametrize("champion, challenger, higher, margin, promote", [
    (None, 0.5, True, 0.1, True), (0.90, 0.91, True, 0.01, True), (0.90, 0.905, True, 0.01, False),
    (0.90, 0.90, True, 0.0, False), (0.20, 0.15, False, 0.05, True), (0.20, 0.25, False, 0.0, False),
    (0.20, float("inf"), False, 0.0, False), (float("nan"), 0.3, True, 0.0, True),
])
def test_decide(champion, challenger, higher, margin, promote):
    assert decide(champion, challenger, higher_is_better=higher, margin=margin)[0] is promote


def test_decide_rejects_a_negative_margin():
    with pytest.raises(ConfigError, match="margin"):
        decide(0.1, 0.2, higher_is_better=True, margin=-1)


def _never_load(monkeypatch):
    import keras

    def refuse(*args, **kwargs):
        raise AssertionError("keras.saving.load_model called on an unverified file")

    monkeypatch.setattr(keras.saving, "load_model", refuse)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_model_file_is_refused_and_never_loaded(registry, model_files, tmp_path, monkeypatch, damage):
    ref = register(registry, model_files[0])
    path = model_path(registry, ref)
    blob = bytearray(registry._fs.cat_file(path))
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = blob[: len(blob) - 100]
    registry._fs.pipe_file(path, bytes(blob))
    card = registry.get_card(ref)
    _never_load(monkeypatch)
    with pytest.raises(IntegrityError) as info:
        registry.load(ref, tmp_path / "cache")
    message = str(info.value)
    assert isinstance(info.value, AudiopipeError) and "model.keras" in message
    assert registry.url.split("://")[1] in message
    assert card.model_sha256 in message and hashlib.sha256(bytes(blob)).hexdigest() in message
    assert ("truncated" if damage == "truncate" else "modified") in message
    assert not list((tmp_path / "cache").rglob("*.keras")) and not list((tmp_path / "cache").rglob("*.part"))


def test_damaged_cache_copy_is_replaced(tmp_path, model_files):
    reg = Registry(str(tmp_path / "registry"))
    ref = register(reg, model_files[0])
    path, card = reg.fetch(ref, tmp_path / "cache")
    path.write_bytes(path.read_bytes()[:-1])  # the local copy, not the registry's, is damaged
    again, _ = reg.fetch(ref, tmp_path / "cache")
    assert again == path and hashlib.sha256(path.read_bytes()).hexdigest() == card.model_sha256


def test_memory_registry_is_visible_through_a_new_instance(model_files):
    url = f"memory://reg-{uuid.uuid4().hex[:8]}"
    register(Registry(url), model_files[0], name="asr-small")
    assert Registry(url).list_models() == ["asr-small"]
    assert fsspec.filesystem("memory").exists(f"/{url.split('://')[1]}/asr-small/versions/0001/card.json")


@pytest.mark.s3
def test_s3_registry_round_trip(s3_store, bucket, model_files, tmp_path):
    """The same protocol on a real S3 server (SeaweedFS): prefixes instead of folders, listing caches."""
    reg = Registry(f"s3://{bucket}/registry")
    register(reg, model_files[0])
    other = Registry(f"s3://{bucket}/registry")  # a second process's view: sees the commit at once
    register(other, model_files[1])
    assert reg.list_models() == ["clf"] and reg.list_versions("clf") == [1, 2]
    reg.compare_and_promote("clf", 2, metric="accuracy", higher_is_better=True)
    model, card = Registry(f"s3://{bucket}/registry").load("clf@champion", tmp_path / "cache")
    assert card.version == 2 and model.predict(X, verbose=0).shape == (3, 3)


@pytest.mark.s3
def test_lambda_layer_is_refused_on_load_and_its_code_never_runs(s3_store, bucket, tmp_path):
    """Write access to the registry is enough to register a model whose Lambda layer carries Python
    bytecode; its checksum is right, so only Keras's safe mode stands between that code and a worker."""
    import keras

    marker = str(tmp_path / "code-ran")  # a str: the lambda's closure is serialized with the model
    evil = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: (open(marker, "w").close(), x)[1]),
                             keras.layers.Dense(3, activation="softmax")])
    Path(marker).unlink()  # building the model ran the lambda once; from here only a load may run it
    reg = Registry(f"s3://{bucket}/registry")
    ref = register(reg, evil)
    with pytest.raises(RegistryError) as info:
        Registry(f"s3://{bucket}/registry").load("clf@latest", tmp_path / "cache")
    message = str(info.value)
    assert "clf@1 passed its checksum but Keras cannot load it in safe mode" in message
    assert "Lambda layers are refused" in message and "Python lambda" in message
    assert not Path(marker).exists()
    # The control: the same verified file, loaded without safe mode and called, runs the planted code.
    path, _ = reg.fetch(ref, tmp_path / "cache")
    keras.saving.load_model(path, safe_mode=False).predict(X, verbose=0)
    assert Path(marker).exists()


def test_pinned_ref_loads_only_the_pinned_file(registry, model_files, tmp_path):
    first, second = register(registry, model_files[0]), register(registry, model_files[1])
    registry.promote("clf", 1)
    sha1 = registry.get_card(first).model_sha256
    pinned = f"{registry.url}:clf@champion#sha256={sha1.upper()}"  # hex case does not matter
    reg, ref = open_model_ref(pinned)
    assert (ref.version, ref.sha256) == (1, sha1) and str(ref) == f"{registry.url}:clf@1#sha256={sha1}"
    assert reg.load(ref, tmp_path / "cache")[1].version == 1
    registry.promote("clf", 2)  # champion moves on: the pin no longer matches what it resolves to
    sha2 = registry.get_card(second).model_sha256
    for attempt in (lambda: open_model_ref(pinned), lambda: registry.load(pinned, tmp_path / "cache"),
                    lambda: registry.fetch(ref.__class__(registry.url, "clf", 2, sha1), tmp_path / "cache")):
        with pytest.raises(RegistryError) as info:
            attempt()
        message = str(info.value)
        assert f"pinned to sha256 {sha1}" in message and f"version 2, whose model.keras has sha256 {sha2}" in message
        assert "Nothing was loaded" in message and "models show" in message
    # A version rewritten in place by someone who can write both files: the card matches the new file,
    # so only a pin notices.
    vdir = f"{registry._root}/clf/versions/0001"
    card = json.loads(registry._fs.cat_file(f"{vdir}/card.json"))
    registry._fs.pipe_file(f"{vdir}/model.keras", registry._fs.cat_file(model_path(registry, second)))
    registry._fs.pipe_file(f"{vdir}/card.json", json.dumps({**card, "model_sha256": sha2}).encode())
    assert registry.load("clf@1", tmp_path / "cache2")[1].model_sha256 == sha2
    with pytest.raises(RegistryError, match=f"clf@1 is pinned to sha256 {sha1}"):
        registry.load(f"clf@1#sha256={sha1}", tmp_path / "cache2")


@pytest.mark.parametrize("text, needle", [
    ("reg:asr@champion#sha256=abc123", "64 hex digits"),
    ("reg:asr@champion#sha256=" + "g" * 64, "64 hex digits"),
    ("reg:asr#sha256=" + "a" * 64, "names no version"),
])
def test_bad_pins_are_refused_with_the_form_to_use(text, needle):
    with pytest.raises(RegistryError, match=needle):
        parse_model_ref(text, require_selector=False)


def test_cli_refuses_a_stale_pin_before_any_work_and_shows_the_pin(tmp_path, model_files):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from audiopipe.flows.models_cli import models_app
    from tests.support import cli_env

    registry = Registry(str(tmp_path / "registry"))
    first = register(registry, model_files[0])
    register(registry, model_files[1])
    registry.promote("clf", 2)
    sha1 = registry.get_card(first).model_sha256
    (tmp_path / "in").mkdir()
    cmd = [sys.executable, "-m", "audiopipe.flows.cli", "classify", str(tmp_path / "in"), str(tmp_path / "out"),
           "--model", f"{registry.url}:clf@champion#sha256={sha1}", "--no-progress"]
    result = subprocess.run(cmd, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and f"pinned to sha256 {sha1}" in text, text
    assert not (tmp_path / "out").exists() and not (tmp_path / "work" / "models").exists()  # nothing started
    shown = CliRunner().invoke(models_app, ["show", f"{registry.url}:clf@1"], env={"COLUMNS": "400"})
    assert f"{registry.url}:clf@1#sha256={sha1}" in "".join(shown.output.split()), shown.output
