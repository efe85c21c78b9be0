"""Flows/CLI: ``audiopipe retrain LABELS_URL ...`` — the ``retrain-on-new-labels`` flow from the command line.

Thin: check the options (before Prefect starts), run the flow in-process, print the outcome as a rich table
on stdout (``--json``: one JSON object). Errors print one paragraph and exit with the CLI's codes
(``flows/outcome_cli.py``: 2 for a user error, 75 for an unreachable store...).
``flows/cli.py`` calls ``register(app)``; Prefect and the flow are imported only when the command runs.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from audiopipe.flows.outcome_cli import JSON_HELP, run_command


def register(app: typer.Typer) -> None:
    """Add ``retrain`` to ``app``."""
    app.command("retrain")(retrain)


def retrain(
    labels_url: Annotated[str, typer.Argument(help="Prefix holding LABELS_V1 tables (*.parquet); new ones land there over time.")],
    audio: Annotated[str, typer.Option(help="Audio archive the labels point into (held-out audio included).")],
    features: Annotated[str, typer.Option(help="Featurize output root (only new audio is featurized).")],
    model: Annotated[str, typer.Option(help="REGISTRY_URL:NAME; its champion alias is the model to beat.")],
    holdout: Annotated[str, typer.Option(help="Fixed held-out LABELS_V1 table, disjoint from training; both models are scored on it.")],
    margin: Annotated[float, typer.Option(help="Promote only if the challenger is better by at least this (metric units).")] = 0.0,
    metric: Annotated[str | None, typer.Option(help="Decision metric. (default: accuracy for classify, cer for asr)")] = None,
    higher_is_better: Annotated[bool | None, typer.Option("--higher-is-better/--lower-is-better", help="Direction of a metric other than accuracy, precision_*, recall_*, cer or wer.")] = None,
    holdout_split: Annotated[str, typer.Option(help="Rows of the held-out table to score.")] = "test",
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs. (default: the champion's)")] = None,
    warm_start: Annotated[bool, typer.Option(help="Fine-tune the champion's weights instead of training from scratch (same classes and architecture).")] = False,
    family: Annotated[str | None, typer.Option(help="classify or asr: needed only for the first model.")] = None,
    feature_config: Annotated[str | None, typer.Option(help='First model only: feature config as JSON, e.g. \'{"n_mels": 40}\'.')] = None,
    train_params: Annotated[str | None, typer.Option(help='Training settings over the champion\'s, as JSON, e.g. \'{"batch_size": 8}\'.')] = None,
    workers: Annotated[int | None, typer.Option(help="Featurize workers of the local Dask cluster (training uses one).")] = None,
    dask_address: Annotated[str | None, typer.Option(help="Use this Dask scheduler instead of a local cluster.")] = None,
    storage_options: Annotated[str | None, typer.Option(help="fsspec/s3fs options as JSON.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Retrain a model when new or changed label tables appear; promote the challenger only if it is better.

    Nothing is trained when no table is new since the last successful run. Otherwise the new audio is
    featurized, a challenger is trained on all tables with the champion's settings, both are scored on the
    held-out table and the decision is recorded in the registry (`audiopipe models show NAME`).
    """
    from audiopipe.flows.cli import cli_storage_options, exit_promptly_on_interrupt, json_object
    from audiopipe.infra.settings import apply_prefect_defaults, run_settings

    exit_promptly_on_interrupt()
    run = {k: v for k, v in (("workers", workers), ("dask_address", dask_address)) if v is not None}

    def body() -> dict:
        from audiopipe.flows.extras import require_extra

        require_extra("train", "retrain")
        settings = run_settings(run)
        options = cli_storage_options(storage_options)
        apply_prefect_defaults(settings.work_dir)
        from audiopipe.flows.retrain import retrain_on_new_labels
        from audiopipe.tasks.retraining import check_request

        parsed = {"feature_config": json_object(feature_config, "--feature-config"),
                  "train_params": json_object(train_params, "--train-params")}
        check_request(model, margin=margin, metric=metric, higher_is_better=higher_is_better,
                      holdout_split=holdout_split, epochs=epochs, train_params=parsed["train_params"],
                      storage_options=options)
        return retrain_on_new_labels(labels_url, audio, features, model, holdout, margin=margin, metric=metric,
                                     higher_is_better=higher_is_better, holdout_split=holdout_split,
                                     epochs=epochs, warm_start=warm_start, family=family, storage_options=options,
                                     settings={**run, "work_dir": str(settings.work_dir)}, **parsed)

    run_command(body, lambda result: Console().print(_result_table(result)), as_json=as_json)


def _result_table(result: dict) -> Table:
    table = Table(title=f"retrain {escape(result['model'])}: {result['status']}", show_header=False)
    changes = result["changes"]
    table.add_row("label tables", f"{len(result['tables'])} ({len(changes['added'])} added, "
                                  f"{len(changes['changed'])} changed, {len(changes['removed'])} removed)")
    decision = result["decision"]
    if decision is None:
        table.add_row("trained", "nothing: no new or changed label tables")
        table.add_row("champion", f"v{result['champion_version']}")
        return table
    champ = decision["champion_version"]
    metric = decision["metric"]
    table.add_row("champion", f"v{champ} {metric}={decision['champion_metrics'].get(metric)}" if champ else "none")
    table.add_row("challenger", f"v{decision['challenger_version']} {metric}="
                                f"{decision['challenger_metrics'].get(metric)}")
    table.add_row("decision", f"{decision['decision']}: {escape(decision['reason'])}")
    table.add_row("held-out set", escape(f"{decision['evaluation']['labels_url']} "
                                         f"({decision['evaluation']['num_rows']} rows)"))
    table.add_row("files featurized", str(result["files_featurized"]))
    table.add_row("merged labels", escape(result["merged_labels_url"]))
    return table
