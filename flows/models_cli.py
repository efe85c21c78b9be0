"""Flows/CLI: ``audiopipe models list|show|promote|rollback`` — read and steer the model registry.

Thin: parse the ref, open the ``Registry`` (``models/registry.py``), print rich tables to stdout. The
registry URL comes from the ref (``REGISTRY_URL:NAME@VERSION``), ``--registry`` or ``$AUDIOPIPE_REGISTRY``.
User errors (``AudiopipeError``) print one paragraph saying what to fix and exit 2 (75 when the store is
unreachable), as the main CLI does.
Nothing here imports Keras, so these commands start fast.
"""

from __future__ import annotations

import json
from typing import Annotated, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from audiopipe.flows.outcome_cli import exit_code_for
from audiopipe.infra.errors import AudiopipeError, ConfigError
from audiopipe.infra.storage import storage_spec_from_env
from audiopipe.models.cards import PIN_PREFIX
from audiopipe.models.registry import CHAMPION, ModelCard, ParsedRef, Registry, parse_model_ref

REGISTRY_ENV = "AUDIOPIPE_REGISTRY"

models_app = typer.Typer(help="Inspect and steer the model registry: versions, cards, aliases, rollbacks.",
                         no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
out = Console()
err = Console(stderr=True)

RegistryOption = Annotated[str | None, typer.Option(
    "--registry", envvar=REGISTRY_ENV, show_envvar=True,
    help="Registry URL (s3://bucket/prefix, file:///path, a path); a ref's own URL: prefix wins.")]
StorageOption = Annotated[str | None, typer.Option(
    help='fsspec/s3fs options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:8333"}\'. '
         "AWS_* variables are read too.")]
AliasOption = Annotated[str, typer.Option(help="Alias to move.")]
ReasonOption = Annotated[str, typer.Option(help="Why; recorded in the alias history.")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error as one paragraph and exit with ``code`` (2, a user error; 75, an unreachable store:
    ``flows/outcome_cli.py``), in the same panel as ``flows/cli.py``."""
    err.print(Panel(Text(message), title="audiopipe: error", border_style="red", expand=False))
    raise typer.Exit(code)


def open_registry(ref: str, registry: str | None, storage_options: str | None, *,
                  require_selector: bool) -> tuple[Registry, ParsedRef]:
    """The registry a ref points at: its ``URL:`` prefix, else ``--registry``/``$AUDIOPIPE_REGISTRY``."""
    parsed = parse_model_ref(ref, require_selector=require_selector)
    url = parsed.registry_url or registry
    if not url:
        raise ConfigError(f"no registry for {ref!r}: write REGISTRY_URL:{parsed.name}@..., pass --registry URL "
                          f"or set {REGISTRY_ENV}.")
    return (Registry(url, storage_spec_from_env(storage_options)),
            ParsedRef(None, parsed.name, parsed.selector, parsed.sha256))


@models_app.command("list")
def list_models(
    registry_url: Annotated[str | None, typer.Argument(envvar=REGISTRY_ENV, show_envvar=True,
                                                       help="Registry URL.")] = None,
    storage_options: StorageOption = None,
) -> None:
    """List every committed version of every model, with its aliases and test metrics."""
    try:
        if not registry_url:
            raise ConfigError(f"no registry given: pass REGISTRY_URL or set {REGISTRY_ENV}.")
        reg = Registry(registry_url, storage_spec_from_env(storage_options))
        table = _list_table(reg)
    except AudiopipeError as exc:
        fail(str(exc), exit_code_for(exc))
    out.print(table if table.row_count else f"No models in {escape(reg.url)}.")


@models_app.command()
def show(
    ref: Annotated[str, typer.Argument(help="[REGISTRY_URL:]NAME@VERSION|ALIAS|latest[#sha256=HEX] for one card, "
                                            "or [REGISTRY_URL:]NAME for the model's versions and history.")],
    registry: RegistryOption = None,
    storage_options: StorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON (one version only).")] = False,
) -> None:
    """Show a model version's card (metrics, data, provenance), or a model's versions, alias history and decisions."""
    try:
        reg, parsed = open_registry(ref, registry, storage_options, require_selector=False)
        if parsed.selector is None and not as_json:
            _show_model(reg, parsed.name)
            return
        card = reg.get_card(parsed if parsed.selector else ParsedRef(None, parsed.name, "latest"))
        aliases = _aliases_by_version(reg.aliases(parsed.name)).get(card.version, "")
    except AudiopipeError as exc:
        fail(str(exc), exit_code_for(exc))
    if as_json:
        typer.echo(json.dumps(card.to_dict(), indent=2, sort_keys=True))
        return
    _show_card(reg, card, aliases)


@models_app.command()
def promote(
    ref: Annotated[str, typer.Argument(help="[REGISTRY_URL:]NAME@VERSION (or @ALIAS, @latest) to promote.")],
    alias: AliasOption = CHAMPION,
    reason: ReasonOption = "promoted from the CLI",
    registry: RegistryOption = None,
    storage_options: StorageOption = None,
) -> None:
    """Point an alias (default: champion) at a version; recorded in the model's alias history.

    A pinned REF (NAME@VERSION#sha256=HEX) is promoted only if that version still holds that exact file.
    """
    try:
        reg, parsed = open_registry(ref, registry, storage_options, require_selector=True)
        if parsed.sha256:
            reg.get_card(parsed)  # refuses a version whose model file is not the pinned one
        before = reg.aliases(parsed.name).get(alias)
        target = reg.promote(parsed.name, parsed.selector, alias=alias, reason=reason)
    except AudiopipeError as exc:
        fail(str(exc), exit_code_for(exc))
    if before == target.version:
        out.print(f"{escape(parsed.name)}@{escape(alias)} already is version {target.version}; nothing changed.")
    else:
        out.print(f"{escape(parsed.name)}@{escape(alias)}: {before if before is not None else 'unset'} -> "
                  f"{target.version}  ({escape(str(target))})")


@models_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="[REGISTRY_URL:]NAME of the model.")],
    alias: AliasOption = CHAMPION,
    reason: ReasonOption = "rolled back from the CLI",
    registry: RegistryOption = None,
    storage_options: StorageOption = None,
) -> None:
    """Move an alias (default: champion) back to the version it held before; repeatable like undo."""
    try:
        reg, parsed = open_registry(name, registry, storage_options, require_selector=False)
        if parsed.selector:
            raise ConfigError(f"rollback takes a model name, not a version ({name!r}); it restores the alias's "
                              "previous version from the history.")
        before = reg.aliases(parsed.name).get(alias)
        target = reg.rollback(parsed.name, alias=alias, reason=reason)
    except AudiopipeError as exc:
        fail(str(exc), exit_code_for(exc))
    out.print(f"{escape(parsed.name)}@{escape(alias)}: {before} -> {target.version} (rolled back)  "
              f"({escape(str(target))})")


def _list_table(reg: Registry) -> Table:
    """Every version, laid out for an 80-column terminal: ``NAME@VERSION``, the date only (``show`` has
    the time), one metric per line, 8 hex digits of the checksum; long names and aliases wrap (``fold``)
    rather than being cut, so no cell ever ends in an ellipsis."""
    table = Table(title=f"models in {escape(reg.url)}", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("model", "family", "created", "aliases", "test metrics", "sha256"):
        table.add_column(col, overflow="fold", no_wrap=col in ("created", "sha256"))
    for name in reg.list_models():
        by_version = _aliases_by_version(reg.aliases(name))
        for version in reg.list_versions(name):
            card = reg.get_card(f"{name}@{version}")
            table.add_row(escape(f"{name}@{version}"), card.model_family, card.created_at[:10],
                          escape(by_version.get(version, "").replace(", ", "\n")),
                          escape(_metrics(card.metrics, sep="\n")), card.model_sha256[:8])
    return table


def _show_model(reg: Registry, name: str) -> None:
    by_version = _aliases_by_version(reg.aliases(name))
    versions = Table(title=f"{escape(name)} in {escape(reg.url)}")
    for col in ("version", "created", "aliases", "test metrics", "code", "sha256"):
        versions.add_column(col)
    for version in reg.list_versions(name):
        card = reg.get_card(f"{name}@{version}")
        versions.add_row(str(version), card.created_at[:19], escape(by_version.get(version, "")),
                         escape(_metrics(card.metrics)), escape(card.code_version), card.model_sha256[:12])
    if not versions.row_count:
        raise ConfigError(f"model {name!r} has no versions in {reg.url}.")
    out.print(versions)
    history = Table(title="alias history")
    for col in ("at", "alias", "change", "action", "actor", "reason"):
        history.add_column(col)
    for e in reg.alias_history(name):
        history.add_row(e["at"][:19], escape(e["alias"]), f"{e['previous']} -> {e['version']}", e.get("action", ""),
                        escape(e.get("actor", "")), escape(e.get("reason", "")))
    out.print(history if history.row_count else "No aliases set.")
    decisions = Table(title="promotion decisions")
    for col in ("at", "metric", "champion", "challenger", "margin", "decision", "reason"):
        decisions.add_column(col)
    for d in reg.list_decisions(name):
        champ = f"v{d.champion_version} {d.champion_metrics.get(d.metric)}" if d.champion_version else "none"
        decisions.add_row(d.at[:19], escape(d.metric), champ,
                          f"v{d.challenger_version} {d.challenger_metrics.get(d.metric)}", f"{d.margin:g}",
                          d.decision, escape(d.reason))
    if decisions.row_count:
        out.print(decisions)


def _show_card(reg: Registry, card: ModelCard, aliases: str) -> None:
    table = Table(title=f"{escape(card.name)}@{card.version}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    data = card.training_data
    rows = [
        ("registry", reg.url), ("family", card.model_family), ("created", card.created_at),
        ("aliases", aliases or "-"), ("model.keras", f"{card.model_size} bytes, sha256 {card.model_sha256}"),
        ("pinned ref", f"{reg.url}:{card.name}@{card.version}{PIN_PREFIX}{card.model_sha256}"),
        ("code version", card.code_version), ("feature config", f"{card.feature_config_hash} "
                                              f"{json.dumps(dict(card.feature_config), sort_keys=True)}"),
        ("training data", f"{len(data.shards)} shards, shards hash {data.shards_hash[:16]}, "
                          f"manifest hash {data.manifest_hash or '-'}"),
        ("normalisation", f"{len(card.normalization.mean)} features" if card.normalization else "-"),
        ("vocabulary", _preview(card.vocabulary)), ("classes", _preview(card.classes)),
        ("params", json.dumps(dict(card.params), sort_keys=True)),
        ("epochs", _epochs(card.history)), ("extra", json.dumps(dict(card.extra), sort_keys=True)),
    ]
    for label, value in rows:
        table.add_row(label, escape(str(value)))
    out.print(table)
    metrics = Table(title="test metrics")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for key, value in sorted(card.metrics.items()):
        metrics.add_row(escape(key), f"{value:.6g}")
    out.print(metrics)


def _aliases_by_version(aliases: dict[str, int]) -> dict[int, str]:
    by_version: dict[int, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    return {v: ", ".join(a) for v, a in by_version.items()}


# The metric each family is judged by, shown first in listings; `show` prints them all.
HEADLINE_METRICS = ("accuracy", "cer", "wer", "nll_per_note", "nll_vs_bigram", "si_sdri_db", "fraction_of_oracle")


def _metrics(metrics: dict | object, limit: int = 3, sep: str = ", ") -> str:
    items = dict(metrics)
    keys = [k for k in HEADLINE_METRICS if k in items] or sorted(items)
    more = len(items) - len(keys[:limit])
    text = sep.join(f"{k}={items[k]:.4g}" for k in keys[:limit])
    return text + (f"{sep if sep != ', ' else ' '}(+{more} more)" if more > 0 else "")


def _preview(values: tuple[str, ...], limit: int = 12) -> str:
    if not values:
        return "-"
    shown = " ".join(repr(v) for v in values[:limit])
    return f"{len(values)}: {shown}" + (" …" if len(values) > limit else "")


def _epochs(history: dict | object) -> str:
    history = dict(history)
    loss = history.get("loss") or next(iter(history.values()), ())
    return f"{len(loss)} (final loss {loss[-1]})" if loss else "-"
