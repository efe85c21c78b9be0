"""Infra: the Dask cluster a run executes on (a LocalCluster by default, or an existing scheduler).

Workers are processes with one thread each: the nanny pins OpenBLAS/OMP/MKL to one thread
(``distributed.nanny.pre-spawn-environ``), which measured ~1.9x faster than two oversubscribed
processes here. Each worker has a memory limit; the nanny restarts a worker that passes 95% of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from audiopipe.infra.errors import ConfigError
from audiopipe.infra.settings import RunSettings

log = logging.getLogger(__name__)

# One BLAS/OpenMP thread per single-threaded worker process (two oversubscribed processes gained nothing
# here; pinned, they ran ~1.9x one). Dask's default MALLOC_TRIM_THRESHOLD_=65536 makes glibc unmap and
# remap every large numpy temporary: the same feature loop ran ~35% slower with it, so the thresholds are
# raised (a worker may keep up to ~64 MB of freed memory for reuse).
WORKER_ENVIRON = {
    "OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1,
    "MALLOC_TRIM_THRESHOLD_": 64 * 1024 * 1024, "MALLOC_MMAP_THRESHOLD_": 32 * 1024 * 1024,
    "TF_CPP_MIN_LOG_LEVEL": 1,  # TensorFlow's C++ INFO banners, once per worker, drown the run's own logs
}


@contextmanager
def dask_client(settings: RunSettings) -> Iterator[Client]:
    """A connected ``Client``: to ``settings.dask_address`` if set, else to a new LocalCluster.

    ``allowed-failures`` bounds how many worker deaths one task may cause before Dask gives up on it
    (``KilledWorker``); the shard then quarantines that file as rejected.

    Raises:
        ConfigError: when the scheduler address cannot be reached.
    """
    logging.getLogger("distributed").setLevel(logging.WARNING)  # per-worker INFO chatter drowns the run's logs
    retries = {"distributed.scheduler.allowed-failures": settings.max_attempts_per_file - 1,
               "distributed.worker.memory.terminate": 0.95,
               "distributed.nanny.pre-spawn-environ": WORKER_ENVIRON}
    if settings.dask_address:
        try:
            client = Client(settings.dask_address, timeout="15s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {settings.dask_address} ({exc}). "
                              "Check --dask-address, or leave it out to use a local cluster.") from None
        try:
            yield client
        finally:
            client.close()
        return
    local_dir = Path(settings.work_dir) / "dask"
    local_dir.mkdir(parents=True, exist_ok=True)
    with dask.config.set(retries):
        cluster = LocalCluster(
            n_workers=settings.workers, threads_per_worker=1, processes=True,
            memory_limit=settings.worker_memory_limit, local_directory=str(local_dir),
            dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def num_workers(client: Client) -> int:
    """Workers currently connected (at least 1, so rates never divide by zero)."""
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))


def gpu_workers(client: Client) -> list[str]:
    """Addresses of workers that advertise the ``GPU`` resource (``dask worker --resources GPU=1``)."""
    info = client.scheduler_info(n_workers=-1).get("workers", {})
    return [addr for addr, w in info.items() if w.get("resources", {}).get("GPU", 0) >= 1]
