"""``audiopipe models list|show|promote|rollback`` through typer's CliRunner on a real registry folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from audiopipe.flows.models_cli import models_app
from audiopipe.models.registry import Registry, TrainingData

ENV = {"COLUMNS": "250", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    import keras

    path = tmp_path_factory.mktemp("keras") / "m.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    return path


@pytest.fixture()
def registry(tmp_path, keras_file) -> Registry:
    reg = Registry(str(tmp_path / "registry"))
    for cer in (0.30, 0.20, 0.10):
        reg.register("asr", keras_file, family="asr", metrics={"cer": cer}, feature_config={"kind": "logmel"},
                     training_data=TrainingData.of(["file:///f/part-1.parquet"]), vocabulary=("_", "a", "b"),
                     history={"loss": [3.0, 2.0]})
    reg.promote("asr", 1)
    reg.promote("asr", 2)
    return reg


def invoke(args: list[str], **env: str):
    return CliRunner().invoke(models_app, args, env={**ENV, **env})


def test_list_from_argument_and_from_env(registry):
    for result in (invoke(["list", registry.url]), invoke(["list"], AUDIOPIPE_REGISTRY=registry.url)):
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stdout.splitlines() if " asr " in line]
        assert len(lines) == 3 and "champion" in lines[1] and "cer=0.2" in lines[1]


def test_list_fits_an_80_column_terminal_without_cutting_a_cell(registry, keras_file):
    """Every column used to be cut with an ellipsis at 80 columns; now long cells wrap instead."""
    registry.register("classify-sounds-nightly", keras_file, family="classify", feature_config={"kind": "logmel"},
                      metrics={"accuracy": 0.8123, "precision_macro": 0.71, "recall_macro": 0.7, "f1": 0.61},
                      training_data=TrainingData.of(["file:///f/part-1.parquet"]), classes=("a", "b"))
    registry.promote("asr", 3, alias="challenger")
    result = invoke(["list", registry.url], COLUMNS="80")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "…" not in result.stdout and max(len(line) for line in lines) <= 80, result.stdout
    header = next(line for line in lines if "model" in line and "sha256" in line)
    first_column = "".join(line[:header.index("family")].strip() for line in lines[lines.index(header) + 1:])
    for name in ("asr@1", "asr@2", "asr@3", "classify-sounds-nightly@1"):
        assert name in first_column, first_column
    text = " ".join(result.stdout.split())
    for cell in ("champion", "challenger", "cer=0.1", "accuracy=0.81", registry.get_card("asr@1").model_sha256[:8],
                 registry.get_card("asr@1").created_at[:10]):
        assert cell in text, cell


def test_show_card_overview_and_json(registry):
    card = invoke(["show", f"{registry.url}:asr@champion"])
    assert card.exit_code == 0, card.output
    for text in ("asr@2", "champion", "cer", "0.2", registry.get_card("asr@2").model_sha256, "3: '_' 'a' 'b'"):
        assert text in card.stdout
    overview = invoke(["show", "asr", "--registry", registry.url])
    assert overview.exit_code == 0 and "alias history" in overview.stdout and "1 -> 2" in overview.stdout
    as_json = invoke(["show", "asr@latest", "--json"], AUDIOPIPE_REGISTRY=registry.url)
    assert json.loads(as_json.stdout)["version"] == 3


def test_promote_then_rollback(registry):
    promoted = invoke(["promote", "asr@3", "--registry", registry.url, "--reason", "better cer"])
    assert promoted.exit_code == 0, promoted.output
    assert "2 -> 3" in promoted.stdout
    assert registry.aliases("asr") == {"champion": 3}
    assert registry.alias_history("asr")[-1]["reason"] == "better cer"
    rolled = invoke(["rollback", f"{registry.url}:asr"])
    assert rolled.exit_code == 0, rolled.output
    assert "3 -> 2" in rolled.stdout and registry.aliases("asr") == {"champion": 2}
    assert invoke(["rollback", "asr", "--registry", registry.url]).exit_code == 0
    assert registry.aliases("asr") == {"champion": 1}


@pytest.mark.parametrize("args, needle", [
    (["promote", "asr@9"], "not a committed version"),
    (["promote", "asr"], "names no version"),
    (["show", "asr@nightly"], "no alias 'nightly'"),
    (["rollback", "asr", "--alias", "challenger"], "no earlier version"),
    (["rollback", "asr@2"], "takes a model name"),
])
def test_user_errors_exit_2_with_one_paragraph(registry, args, needle):
    result = invoke(args, AUDIOPIPE_REGISTRY=registry.url)
    assert result.exit_code == 2 and needle in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_no_registry_given_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("AUDIOPIPE_REGISTRY", raising=False)
    result = invoke(["show", "asr@1"])
    assert result.exit_code == 2 and "AUDIOPIPE_REGISTRY" in result.stderr
