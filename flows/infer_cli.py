"""``audiopipe transcribe|classify|separate``: the bulk inference flows from the command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from audiopipe.flows.outcome_cli import JSON_HELP, run_command
from audiopipe.infra.settings import apply_prefect_defaults, run_settings

MODEL_HELP = ("REGISTRY_URL:NAME@ALIAS|VERSION of the model, e.g. s3://models:asr@champion; append "
              "#sha256=HEX to run only that exact model file (docs/registry.md, Pinning).")
# Options shared by the three commands.
In = Annotated[str, typer.Argument(help="Recordings: s3://bucket/prefix, file:///path or a path.")]
Out = Annotated[str, typer.Argument(help="Results root (any fsspec URL); results go under <task>/model=<name>/version=<v>/.")]
Model = Annotated[str, typer.Option(help=MODEL_HELP)]
Reprocess = Annotated[bool, typer.Option(help="Redo recordings this model version already answered.")]
Workers = Annotated[int | None, typer.Option(help="Worker processes of the local Dask cluster. (default: 2)")]
Address = Annotated[str | None, typer.Option(help="Use this Dask scheduler (tcp://host:8786) instead of a local cluster.")]
PerShard = Annotated[int | None, typer.Option(help="Recordings per shard (one Prefect task each). (default: 64)")]
Options = Annotated[str | None, typer.Option(help="fsspec/s3fs options as JSON; AWS_* variables are read too.")]
Gpu = Annotated[bool, typer.Option(help="Run on Dask workers that advertise GPU=1 (fails if none).")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]
Json = Annotated[bool, typer.Option("--json", help=JSON_HELP)]



def run(task_name: str, in_url: str, out_url: str, model: str, *, reprocess: bool, workers: int | None,
        dask_address: str | None, files_per_shard: int | None, storage_options: str | None, progress: bool,
        **kwargs) -> dict:
    """Check the inputs, run the flow in-process (with a progress bar), return its summary."""
    from audiopipe.flows.cli import cli_storage_options, console

    options = cli_storage_options(storage_options)
    given = {"workers": workers, "dask_address": dask_address, "files_per_shard": files_per_shard}
    settings = run_settings({k: v for k, v in given.items() if v is not None})
    apply_prefect_defaults(settings.work_dir)
    from audiopipe.flows.infer import run_inference
    from audiopipe.infra.storage import merged_storage_spec
    from audiopipe.models.registry import open_model_ref
    from audiopipe.tasks.discover import check_output_writable, list_audio_sources

    storage = merged_storage_spec(options)
    open_model_ref(model, storage)  # user errors surface here, before Prefect starts
    check_output_writable(out_url, storage)
    list_audio_sources(in_url, storage)
    call = dict(settings=settings, reprocess=reprocess, storage_options=options, **kwargs)
    if not progress:
        return run_inference(task_name, in_url, out_url, model, **call)
    from audiopipe.flows.progress_view import progress_bar

    with progress_bar(console, label=task_name):
        return run_inference(task_name, in_url, out_url, model, **call)


def print_summary(summary: dict) -> None:
    from audiopipe.flows.infer import InferSummary

    fields = {k: v for k, v in summary.items() if k in InferSummary.__dataclass_fields__}
    table = Table(title=f"{summary['task']} summary", show_header=False)
    for label, value in InferSummary(**fields).rows():
        table.add_row(label, value)
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add the three inference commands to ``app``."""
    from audiopipe.flows.cli import exit_promptly_on_interrupt

    def _run(task_name: str, in_url: str, out_url: str, model: str, common: dict, as_json: bool, **kwargs) -> None:
        exit_promptly_on_interrupt()
        run_command(lambda: run(task_name, in_url, out_url, model, **common, **kwargs), print_summary,
                    as_json=as_json)

    @app.command()
    def transcribe(in_url: In, out_url: Out, model: Model, reprocess: Reprocess = False, workers: Workers = None,
                   dask_address: Address = None, files_per_shard: PerShard = None, storage_options: Options = None,
                   window_s: Annotated[float | None, typer.Option(help="Window length for long recordings, s (plus 1 s of context each side). (default: 10)")] = None,
                   batch_size: Annotated[int, typer.Option(help="Windows per model call.")] = 32,
                   beam_width: Annotated[int | None, typer.Option(help="CTC prefix beam search width; 1 = greedy. (default: the model card's, 8 with the character LM stored with the model; greedy for a model stored without one)")] = None,
                   lm_weight: Annotated[float | None, typer.Option(help="Weight of the character LM's log-probability. (default: the card's, chosen on validation at training)")] = None,
                   insertion_bonus: Annotated[float | None, typer.Option(help="Score bonus per character, offsets the LM's pull to short output. (default: the card's)")] = None,
                   channels: Annotated[str, typer.Option(help="mix: channels mixed down to one transcript; split: each channel (e.g. agent and caller of a call) transcribed on its own, rows get a channel and files a [chN] label. (default: mix)")] = "mix",
                   gate: Annotated[str | None, typer.Option(help="REGISTRY_URL:NAME@ALIAS of a classify model: each window is classified first and only speech is transcribed; hold music, silence... become rows marked by class. (default: no gate)")] = None,
                   gate_classes: Annotated[str, typer.Option(help="Comma-separated classes of the gate model that count as speech and are transcribed.")] = "speech",
                   gpu: Gpu = False, progress: Progress = True, as_json: Json = False) -> None:
        """Transcribe every recording under IN_URL that this model version has not transcribed yet.

        Writes a Parquet table of timed segments and, per recording, .jsonl, .srt, .vtt and .txt files. Decodes with CTC
        prefix beam search and the character LM stored with the model (--beam-width 1: greedy). Incremental
        and exactly-once per model version: rerun at any time; --reprocess redoes everything.
        """
        _run("transcribe", in_url, out_url, model, dict(reprocess=reprocess, workers=workers, dask_address=dask_address,
             files_per_shard=files_per_shard, storage_options=storage_options, progress=progress), as_json,
             window_s=window_s, batch_size=batch_size, gpu=gpu, beam_width=beam_width, lm_weight=lm_weight,
             insertion_bonus=insertion_bonus, channels=channels, gate=gate,
             gate_classes=[c.strip() for c in gate_classes.split(",") if c.strip()])

    @app.command()
    def classify(in_url: In, out_url: Out, model: Model, reprocess: Reprocess = False, workers: Workers = None,
                 dask_address: Address = None, files_per_shard: PerShard = None, storage_options: Options = None,
                 batch_size: Annotated[int, typer.Option(help="Segments per model call.")] = 32,
                 gpu: Gpu = False, progress: Progress = True, as_json: Json = False) -> None:
        """Class probabilities per segment and per recording, for every recording not yet classified."""
        _run("classify", in_url, out_url, model, dict(reprocess=reprocess, workers=workers, dask_address=dask_address,
             files_per_shard=files_per_shard, storage_options=storage_options, progress=progress), as_json,
             batch_size=batch_size, gpu=gpu)

    @app.command()
    def separate(in_url: In, out_url: Out, model: Model, reprocess: Reprocess = False, workers: Workers = None,
                 dask_address: Address = None, files_per_shard: PerShard = None, storage_options: Options = None,
                 window_s: Annotated[float | None, typer.Option(help="Window length, s (plus 0.5 s of context each side). (default: 20)")] = None,
                 gpu: Gpu = False, progress: Progress = True, as_json: Json = False) -> None:
        """Speech and background stems (FLAC) for every recording not yet separated by this model version."""
        _run("separate", in_url, out_url, model, dict(reprocess=reprocess, workers=workers, dask_address=dask_address,
             files_per_shard=files_per_shard, storage_options=storage_options, progress=progress), as_json,
             window_s=window_s, gpu=gpu)
