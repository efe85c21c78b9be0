"""The ``audiopipe`` command line (typer + rich). Thin: parse, check, call a flow, show the result.

User errors (``AudiopipeError``) print one paragraph that says what to fix and exit 2, with no traceback; a
run with failed shards exits 1 and an unreachable store 75 (``flows/outcome_cli.py``). Bulk commands and
``train``/``evaluate`` take ``--json``: their summary as one JSON object on stdout. Prefect is imported only
after its environment defaults are set (telemetry off, a local home).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from audiopipe.flows.models_cli import models_app
from audiopipe.flows.outcome_cli import (EXIT_USER_ERROR, JSON_HELP, AudiopipeTyper, exit_code_for, run_command,
                                        show_error)
from audiopipe.infra.errors import AudiopipeError, ConfigError
from audiopipe.infra.settings import RunSettings, apply_prefect_defaults, run_settings

app = AudiopipeTyper(help="audiopipe: audio archives in object storage -> features -> LSTM models -> results.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
store_app = typer.Typer(help="Run a local SeaweedFS S3 server (for the demo, tests and local clusters).",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(models_app, name="models")
console = Console(stderr=True)

# Option name in the CLI/config file -> (section, field). Config files use the same keys as the options.
_FEATURE_KEYS = {"kind", "sample_rate", "n_fft", "hop_length", "n_mels", "n_mfcc", "segment_seconds"}
_RUN_KEYS = {"files_per_shard", "workers", "dask_address", "worker_memory_limit", "shard_concurrency"}
_OTHER_KEYS = {"storage_options", "report", "retry_rejected"}


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print an error as one paragraph and exit with ``code`` (a user error by default)."""
    show_error(message, code)
    raise typer.Exit(code)


INTERRUPT_GRACE_S = 20.0


def exit_promptly_on_interrupt(grace_s: float = INTERRUPT_GRACE_S) -> None:
    """Make Ctrl-C stop a run within ``grace_s`` seconds, however its threads are stuck.

    The first SIGINT raises KeyboardInterrupt as usual, so the flow unwinds and reports; it also starts a
    timer that ends the process with status 130 if the unwinding is not done after ``grace_s`` (seen in
    CI: shard threads left waiting on a closed Dask client kept a Ctrl-C'd run alive). A second Ctrl-C
    exits at once. Nothing is lost by a hard exit: a shard only counts once its manifest part is
    committed, so the next run redoes exactly the uncommitted shards, as after a SIGKILL.
    """
    import signal
    import threading

    def hard_exit() -> None:
        sys.stderr.write("\ninterrupted: exiting without waiting for the run to wind down\n")
        sys.stderr.flush()
        os._exit(130)

    def on_sigint(signum, frame) -> None:
        timer = threading.Timer(grace_s, hard_exit)
        timer.daemon = True
        timer.start()
        signal.signal(signal.SIGINT, lambda *_: hard_exit())
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGINT, on_sigint)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or YAML file whose keys are the featurize options (dashes or underscores).

    Its errors give the file, line, column and kind of error, never the file's text (it may hold secrets).
    """
    from audiopipe.infra.config_file import read_config_file

    return read_config_file(path, _FEATURE_KEYS | _RUN_KEYS | _OTHER_KEYS)


def cli_storage_options(options_json: str | None) -> dict[str, Any]:
    """``--storage-options`` JSON as a dict, with any credentials moved into the environment."""
    from audiopipe.infra.storage import storage_spec_from_env

    return split_secrets(dict(storage_spec_from_env(options_json, env={}).options))


def json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """A JSON-object option (``--model-config``, ``--train-params``...) as a dict; None when not given."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON ({exc.msg} at char {exc.pos}).") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object.")
    return value


def split_secrets(options: dict[str, Any]) -> dict[str, Any]:
    """Move credentials out of storage options into this process's environment, or refuse them.

    Flow parameters are stored by Prefect, so a credential must never be one, at any depth. Those with a
    standard AWS variable (``key``/``secret``/``token``, their ``aws_*`` and ``username``/``password`` names,
    also under ``client_kwargs``) are moved there: botocore reads them and workers of a LocalCluster
    inherit them; remote workers use their own (instance roles, env). Any other credential (``password``
    under ``config_kwargs``, an ``account_key``, a proxy URL with a password...) is a ``ConfigError`` that
    names its key path. Call before Prefect is imported.
    """
    from audiopipe.infra.credentials import move_credentials

    kept, env = move_credentials(options)
    os.environ.update(env)
    return kept


@app.command()
def featurize(
    in_url: Annotated[str, typer.Argument(help="Input archive: s3://bucket/prefix, file:///path or a path.")],
    out_url: Annotated[str, typer.Argument(help="Output root for features/ and manifest/ (any fsspec URL).")],
    kind: Annotated[str | None, typer.Option(help="Features: logmel or mfcc. (default: logmel)")] = None,
    sample_rate: Annotated[int | None, typer.Option(help="Resample every input to this rate, Hz. (default: 16000)")] = None,
    n_fft: Annotated[int | None, typer.Option(help="FFT window in samples. (default: 400)")] = None,
    hop_length: Annotated[int | None, typer.Option(help="Hop between frames in samples. (default: 160)")] = None,
    n_mels: Annotated[int | None, typer.Option(help="Mel bands. (default: 80)")] = None,
    n_mfcc: Annotated[int | None, typer.Option(help="MFCC coefficients (kind=mfcc). (default: 40)")] = None,
    segment_seconds: Annotated[float | None, typer.Option(help="Cut long recordings into segments this long. (default: 30)")] = None,
    files_per_shard: Annotated[int | None, typer.Option(help="Input files per output shard. (default: 64)")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes of the local Dask cluster. (default: 2)")] = None,
    dask_address: Annotated[str | None, typer.Option(help="Use this Dask scheduler (tcp://host:8786) instead of a local cluster.")] = None,
    worker_memory_limit: Annotated[str | None, typer.Option(help="Memory limit per local worker; past it the worker is restarted. (default: 3GiB)")] = None,
    storage_options: Annotated[str | None, typer.Option(help='fsspec/s3fs options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:8333"}\'. AWS_* variables are read too.')] = None,
    config: Annotated[Path | None, typer.Option(help="TOML or YAML file with any of these options (the command line wins).")] = None,
    report: Annotated[Path | None, typer.Option(help="Write an HTML report with example spectrograms to this folder.")] = None,
    retry_rejected: Annotated[bool, typer.Option(help="Process previously rejected files again.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Extract log-mel or MFCC features from every audio file under IN_URL into Parquet shards under OUT_URL.

    Incremental: files already done with this feature config are skipped; a killed run resumes when the
    same command runs again. Every input is accounted for in OUT_URL/manifest (ok or rejected, with why).
    """
    given = {k: v for k, v in locals().items() if v is not None and k in _FEATURE_KEYS | _RUN_KEYS | _OTHER_KEYS}
    exit_promptly_on_interrupt()
    run_command(lambda: _featurize(in_url, out_url, given, config, progress), _print_summary, as_json=as_json)


def _featurize(in_url: str, out_url: str, given: dict[str, Any], config: Path | None, progress: bool) -> dict:
    from audiopipe.tasks.features import FeatureConfig

    merged = {**(load_config_file(config) if config else {}), **given}
    if not merged.get("retry_rejected"):
        merged.pop("retry_rejected", None)
    cfg = FeatureConfig.from_dict({k: v for k, v in merged.items() if k in _FEATURE_KEYS})
    settings = run_settings({k: v for k, v in merged.items() if k in _RUN_KEYS})
    options = merged.get("storage_options") or {}
    if isinstance(options, str):
        from audiopipe.infra.storage import storage_spec_from_env

        options = dict(storage_spec_from_env(options, env={}).options)
    elif not isinstance(options, dict):
        raise ConfigError("storage_options in the config file must be a table/mapping (or a JSON object string).")
    options = split_secrets(options)
    apply_prefect_defaults(settings.work_dir)
    from audiopipe.flows.extract_features import featurize as run_flow
    from audiopipe.infra.storage import merged_storage_spec
    from audiopipe.tasks.discover import check_output_writable, list_audio_sources

    storage = merged_storage_spec(options)
    check_output_writable(out_url, storage)  # user errors surface here, before Prefect starts
    list_audio_sources(in_url, storage)
    report_dir = str(merged["report"]) if merged.get("report") else None
    kwargs = dict(feature_config=cfg, settings=settings, storage_options=options, report_dir=report_dir,
                  retry_rejected=bool(merged.get("retry_rejected")))
    if not progress:
        return run_flow(in_url, out_url, **kwargs)
    from audiopipe.flows.progress_view import progress_bar

    with progress_bar(console):
        return run_flow(in_url, out_url, **kwargs)


def _print_summary(summary: dict) -> None:
    from audiopipe.tasks.report import RunSummary

    fields = {k: v for k, v in summary.items() if k in RunSummary.__dataclass_fields__}
    table = Table(title="featurize summary", show_header=False)
    for label, value in RunSummary(**fields).rows():
        table.add_row(label, value)
    Console().print(table)


@app.command()
def synth(
    kind: Annotated[str, typer.Argument(help="Corpus: speech, sounds, music or mixtures.")],
    out_url: Annotated[str, typer.Argument(help="Where the audio and labels/labels.parquet go (any fsspec URL).")],
    n: Annotated[int | None, typer.Option(help="Items to make (utterances, clips, scores or mixtures) [default: 200].")] = None,
    hours: Annotated[float | None, typer.Option(help="Instead of --n: about this many hours of audio (items from each kind's mean length).")] = None,
    seed: Annotated[int, typer.Option(help="Seed: the same seed makes the same corpus.")] = 0,
    storage_options: Annotated[str | None, typer.Option(help="fsspec/s3fs options as JSON.")] = None,
    real: Annotated[bool, typer.Option(help="sounds: add real music and sounds from Debian game/media packages "
                                            "(fetched once with apt-get download; see docs/corpora.md).")] = False,
    real_cache: Annotated[str | None, typer.Option(help="Where --real keeps the fetched packages "
                                                        "[default: $AUDIOPIPE_CACHE/debian-audio or ~/.cache/audiopipe/debian-audio].")] = None,
    workers: Annotated[int, typer.Option(help="speech: Dask worker processes synthesizing in parallel.")] = 2,
    dask_address: Annotated[str | None, typer.Option(help="speech: an existing Dask scheduler instead of a local cluster.")] = None,
) -> None:
    """Synthesize a labelled corpus (speech with transcripts, sound classes, Bach chorales, mixtures with stems)."""
    from audiopipe.flows.extras import require_extra
    from audiopipe.flows.synth import items_for_hours
    from audiopipe.flows.synth import synth as run_synth

    try:
        require_extra("train", "synth")
        if n is not None and hours is not None:
            raise ConfigError("give --n or --hours, not both.")
        count = items_for_hours(kind, hours) if hours is not None else (200 if n is None else n)
        options = cli_storage_options(storage_options)
        result = run_synth(kind, out_url, count, seed, options, real=real, real_cache=real_cache,
                           workers=workers, dask_address=dask_address)
    except AudiopipeError as exc:
        fail(str(exc), exit_code_for(exc))
    table = Table(title=f"synth {kind}", show_header=False)
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    Console().print(table)


@app.command()
def train(
    family: Annotated[str, typer.Argument(help="Model family: classify, asr, music or separate.")],
    labels: Annotated[str, typer.Option(help="LABELS_V1 table (e.g. OUT/labels/labels.parquet from synth).")],
    registry: Annotated[str, typer.Option(help="Model registry URL.")],
    features: Annotated[str | None, typer.Option(help="Featurize output root (classify, asr); music trains on the labels' notes, separate on the mixtures' audio.")] = None,
    config_hash: Annotated[str | None, typer.Option(help="Feature partition to train on (auto when only one).")] = None,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping may end sooner).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Examples per batch.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate (peak rate under --lr-schedule cosine).")] = 1e-3,
    lr_schedule: Annotated[str, typer.Option(help="plateau: halve the rate when validation loss stalls; cosine: "
                                             "decay it over --epochs (best for a fixed budget).")] = "plateau",
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and dropout.")] = 0,
    init_from: Annotated[str | None, typer.Option(help="Warm start (classify, asr): REGISTRY:NAME@VERSION whose weights and normalisation to start from.")] = None,
    model_config: Annotated[str | None, typer.Option(help='Architecture overrides as JSON, e.g. \'{"lstm_units": 256, "upsample": 2}\' (fields of the family\'s config: docs/flows/training.md).')] = None,
    gpu: Annotated[bool, typer.Option(help="Require a GPU worker (fails if none); mixed precision there.")] = False,
    name: Annotated[str | None, typer.Option(help="Registry model name (default: the family).")] = None,
    dask_address: Annotated[str | None, typer.Option(help="Existing Dask scheduler; a 1-worker local cluster otherwise.")] = None,
    storage_options: Annotated[str | None, typer.Option(help="fsspec/s3fs options as JSON.")] = None,
    lm_text: Annotated[str | None, typer.Option(help="asr: text file (a sentence per line) to fit the character LM that ships with the model on (default: the training transcripts).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Train an LSTM model on feature shards and labels, on a Dask worker, and register it with its metrics.

    Rerunning the same command resumes from the last epoch checkpoint of a killed run.
    """
    exit_promptly_on_interrupt()

    def body() -> dict:
        nonlocal config_hash
        from audiopipe.flows.extras import require_extra
        from audiopipe.infra.storage import merged_storage_spec

        require_extra("train", "train")

        options = cli_storage_options(storage_options)
        address = {"dask_address": dask_address} if dask_address else {}  # else AUDIOPIPE_DASK_ADDRESS applies
        settings = RunSettings(workers=1, worker_memory_limit="8GiB", **address)
        apply_prefect_defaults(settings.work_dir)
        from audiopipe.flows.train_model import detect_config_hash, train_model_flow
        from audiopipe.tasks.training import TrainSpec

        storage = merged_storage_spec(options)
        if family in ("classify", "asr") and not features:
            raise ConfigError(f"`train {family}` needs --features: the featurize output to train on.")
        if features and not config_hash:
            config_hash = detect_config_hash(features, storage)
        if lm_text:  # read it now: a bad file should not wait for the end of training to fail
            from audiopipe.models.asr_ctc import DEFAULT_VOCAB
            from audiopipe.tasks.train_lm import read_lm_sentences

            if family != "asr":
                raise ConfigError("--lm-text applies to `train asr` (the LM shipped with a recogniser).")
            read_lm_sentences(lm_text, storage, DEFAULT_VOCAB)
        spec = TrainSpec(family, features or "", labels, registry, config_hash or "", lm_text_url=lm_text,
                         epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                         lr_schedule=lr_schedule, init_from=init_from, require_gpu=gpu, model_name=name,
                         model_overrides=json_object(model_config, "--model-config") or {}, work_dir=str(settings.work_dir))
        return train_model_flow(spec, settings, options)

    run_command(body, _print_trained, as_json=as_json)


def _print_trained(result: dict) -> None:
    table = Table(title=f"trained {result['model_ref']} on {result['device']}", show_header=False)
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4g}")
    table.add_row("report", result["report_dir"] + "/index.html")
    Console().print(table)


@app.command()
def evaluate(
    model_ref: Annotated[str, typer.Argument(help="REGISTRY_URL:NAME@ALIAS|VERSION[#sha256=HEX], e.g. s3://reg:classify@champion.")],
    labels: Annotated[str, typer.Option(help="LABELS_V1 table of the labelled set.")],
    data: Annotated[str | None, typer.Option(help="classify/asr (required): featurize output root of the labelled "
                                                  "set (same feature config). Not used by music and separate.")] = None,
    split: Annotated[str, typer.Option(help="Which split of the labels to score.")] = "test",
    show: Annotated[int, typer.Option(help="ASR: print this many reference/hypothesis transcripts.")] = 0,
    beam_width: Annotated[int, typer.Option(help="ASR: CTC prefix beam search of this width (0: greedy).")] = 0,
    lm_text: Annotated[str | None, typer.Option(help="ASR beam search: text file (a sentence per line) to fit a character LM on.")] = None,
    lm_order: Annotated[int, typer.Option(help="ASR beam search: n of the character n-gram LM.")] = 6,
    lm_weight: Annotated[float, typer.Option(help="ASR beam search: weight of the LM's log-probability.")] = 0.3,
    insertion_bonus: Annotated[float, typer.Option(help="ASR beam search: bonus per character (offsets the LM's pull to short output).")] = 1.5,
    lexicon: Annotated[str | None, typer.Option(help="ASR beam search: word list (words per line); output words must be in it.")] = None,
    storage_options: Annotated[str | None, typer.Option(help="fsspec/s3fs options as JSON.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Recompute a registered model's metrics on any labelled set.

    classify and asr models read the featurized set (--data) with its --labels; music and separate models
    evaluate from --labels alone (the scores, or the mixtures and their stems that the table names).
    """
    from audiopipe.infra.storage import merged_storage_spec
    from audiopipe.tasks.evaluation import beam_decoder, evaluate_registered

    def body() -> dict:
        from audiopipe.flows.extras import require_extra

        require_extra("train", "evaluate")
        options = cli_storage_options(storage_options)
        storage = merged_storage_spec(options)
        if beam_width < 0 or ((lm_text or lexicon) and not beam_width):
            raise ConfigError("--lm-text and --lexicon need --beam-width N (N >= 1); --beam-width 0 is greedy.")
        decoder = beam_decoder(storage, beam_width=beam_width, lm_text_url=lm_text, lm_order=lm_order,
                               lm_weight=lm_weight, insertion_bonus=insertion_bonus,
                               lexicon_url=lexicon) if beam_width else None
        result = evaluate_registered(model_ref, data, labels, storage, split=split, decoder=decoder)
        return {**result, "split": split, "decoder": decoder.describe() if decoder else None}

    def print_scores(result: dict) -> None:
        title = f"{result['model']} on {split}" + (f" ({result['decoder']})" if result["decoder"] else "")
        table = Table(title=title, show_header=False)
        for key, value in result["metrics"].items():
            table.add_row(key, f"{value:.4g}")
        Console().print(table)
        for ref, hyp in result["transcripts"][:show]:
            Console().print(f"[dim]ref[/dim] {ref}\n[{'green' if ref == hyp else 'yellow'}]hyp[/] {hyp}", markup=True)

    run_command(body, print_scores, as_json=as_json)


generate_app = typer.Typer(help="Generate content with a registered model.", no_args_is_help=True)
app.add_typer(generate_app, name="generate")


# --- and anywhere below `fail`/`split_secrets` ---
@generate_app.command("music")
def generate_music_cmd(
    model_ref: Annotated[str, typer.Argument(help="REGISTRY_URL:NAME@VERSION|ALIAS|latest of a music model.")],
    out_url: Annotated[str, typer.Argument(help="Folder for <name>-v<version>-seed<seed>.mid and .wav (any fsspec URL).")],
    length: Annotated[int, typer.Option(help="Notes to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0; < 1 safer, > 1 wilder).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same melody.")] = 0,
    registry: Annotated[str | None, typer.Option(help="Registry URL when MODEL_REF names none.")] = None,
    storage_options: Annotated[str | None, typer.Option(help="fsspec/s3fs options as JSON.")] = None,
) -> None:
    """Sample a melody from a music model; write MIDI and, when fluidsynth is installed, a WAV rendering."""
    from audiopipe.flows.extras import require_extra
    from audiopipe.flows.generate import generate_music

    try:
        require_extra("train", "generate music")
        options = cli_storage_options(storage_options)
        result = generate_music(model_ref, out_url, length=length, temperature=temperature, seed=seed,
                                registry_url=registry, storage_options=options)
    except AudiopipeError as exc:
        fail(str(exc), exit_code_for(exc))
    table = Table(title=f"generated {result['num_notes']} notes from {result['model_ref']}", show_header=False)
    table.add_row("midi", result["midi_url"])
    table.add_row("wav", result["wav_url"] or "not rendered (fluidsynth or FluidR3_GM missing)")
    table.add_row("seconds", str(result["seconds"]))
    Console().print(table)


@store_app.command("up")
def store_up(
    root: Annotated[Path, typer.Option(help="Folder for the server's data, logs and PID file.")] = Path(".audiopipe/store"),
    port: Annotated[int, typer.Option(help="S3 port on 127.0.0.1.")] = 8333,
) -> None:
    """Start SeaweedFS with credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; wait until S3 answers."""
    from audiopipe.infra.store import SeaweedStore

    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        fail("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY first: the server accepts only those credentials.")
    try:
        pid = SeaweedStore(root, port).up(access_key=key, secret_key=secret)
    except AudiopipeError as exc:
        fail(str(exc), exit_code_for(exc))
    console.print(f"SeaweedFS S3 is up at http://127.0.0.1:{port} (pid {pid}, data in {root}).\n"
                  f"Use it with: export AWS_ENDPOINT_URL=http://127.0.0.1:{port}")


@store_app.command("down")
def store_down(root: Annotated[Path, typer.Option(help="Folder given to `store up`.")] = Path(".audiopipe/store")) -> None:
    """Stop the SeaweedFS server started from ROOT (SIGTERM, by its recorded PID)."""
    from audiopipe.infra.store import SeaweedStore

    stopped = SeaweedStore(root).down()
    console.print("SeaweedFS stopped." if stopped else "No SeaweedFS server was running from that folder.")


# Commands that live beside their flows: each module's ``register(app)`` adds its commands.
from audiopipe.flows.serve_cli import register as _register_serve  # noqa: E402
_register_serve(app)
from audiopipe.flows.retrain_cli import register as _register_retrain  # noqa: E402
_register_retrain(app)
from audiopipe.flows.infer_cli import register as _register_infer  # noqa: E402
_register_infer(app)


def main() -> None:  # pragma: no cover - console entry for `python -m audiopipe.flows.cli`
    app()


if __name__ == "__main__":
    sys.exit(main())
