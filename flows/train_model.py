"""Flow ``train-model`` (``audiopipe train FAMILY``): feature shards + labels -> a registered model.

The training step runs on a Dask worker: one with the ``GPU`` resource when ``--gpu`` is asked (and the
run fails loudly if no worker advertises one, or if TensorFlow on that worker sees no GPU), otherwise any
worker on CPU. The flow logs which, the per-epoch metrics, and publishes the test metrics as an artifact.
"""

from __future__ import annotations

import queue
import time
from dataclasses import asdict

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from audiopipe.flows.safe_flow import safe_flow
from audiopipe.infra.credentials import refuse_credentials
from audiopipe.infra.errors import ConfigError
from audiopipe.infra.runners import dask_client, gpu_workers
from audiopipe.infra.settings import RunSettings
from audiopipe.infra.storage import StorageSpec, merged_storage_spec, open_fs
from audiopipe.tasks.training import EPOCH_TOPIC, TrainSpec, train_model


def detect_config_hash(features_url: str, storage: StorageSpec) -> str:
    """The only feature partition under ``features_url`` (``features/config=<hash>``).

    Raises:
        ConfigError: none, or several (then ``--config-hash`` must choose).
    """
    fs, root = open_fs(features_url, storage)
    found = sorted(p.rsplit("config=", 1)[1] for p in fs.ls(f"{root}/features", detail=False)
                   if "config=" in p) if fs.exists(f"{root}/features") else []
    if len(found) != 1:
        raise ConfigError(f"{features_url} holds feature partitions {found or 'none'}; "
                          "pass --config-hash to choose one (or featurize first).")
    return found[0]


@safe_flow(name="train-model", validate_parameters=False)
def train_model_flow(spec: TrainSpec, settings: RunSettings | None = None,
                     storage_options: dict | None = None) -> dict:
    """Train ``spec.family`` on one Dask worker and register the result; returns the ``TrainResult`` dict."""
    refuse_credentials(storage_options)  # a deployment's run: its parameters were stored before it started
    logger = get_run_logger()
    settings = settings or RunSettings(workers=1)
    storage = merged_storage_spec(storage_options)
    with dask_client(settings) as client:
        gpus = gpu_workers(client)
        if spec.require_gpu and not gpus:
            raise ConfigError("--gpu was asked but no Dask worker advertises the GPU resource "
                              "(start GPU workers with `dask worker ... --resources GPU=1`).")
        resources = {"GPU": 1} if spec.require_gpu else None
        logger.info("training %s on %s", spec.family, f"a GPU worker ({len(gpus)} available)" if resources
                    else "a CPU worker (no --gpu)")
        epochs: queue.Queue = queue.Queue()  # filled from the client's event loop, drained here
        client.subscribe_topic(EPOCH_TOPIC, lambda event: epochs.put(event[1]))
        future = client.submit(train_model, spec, storage, resources=resources, pure=False,
                               key=f"train-{spec.family}-{spec.run_key}")
        while not future.done():
            _log_epochs(epochs, spec, logger)
            time.sleep(0.5)
        result = future.result()
        time.sleep(0.2)  # the last epoch's event may trail the result by a moment
        _log_epochs(epochs, spec, logger)
        client.unsubscribe_topic(EPOCH_TOPIC)
    history_note = f"resumed after epoch {result.resumed_from_epoch}, " if result.resumed_from_epoch else ""
    logger.info("trained on %s: %s%d epochs; test metrics %s; registered %s", result.device, history_note,
                result.epochs_run, {k: round(v, 4) for k, v in result.metrics.items()}, result.model_ref)
    table = "\n".join(f"| {k} | {v:.4g} |" for k, v in result.metrics.items())
    create_markdown_artifact(key=f"train-{spec.family}", markdown=f"# {result.model_ref}\n\n| metric | value |\n"
                             f"|---|---|\n{table}\n", description=f"train {spec.family}")
    return asdict(result)


def _log_epochs(epochs: queue.Queue, spec: TrainSpec, logger) -> None:
    """Relay the epochs the worker reported (``publish_epoch``) to this flow run's log, as they finish."""
    while True:
        try:
            event = epochs.get_nowait()
        except queue.Empty:
            return
        if event.get("run") != spec.run_key:  # another training on the same scheduler
            continue
        shown = ", ".join(f"{k} {v:.4g}" for k, v in event["metrics"].items() if k != "learning_rate")
        logger.info("epoch %d/%d: %s", event["epoch"], event["epochs"], shown)
