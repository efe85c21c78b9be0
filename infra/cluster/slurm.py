"""Deployment: a Dask cluster on Slurm for audiopipe, started with dask-jobqueue from a login node.

In: where and how big (partition, account, number of jobs, CPU or ``--gpu``). Out: the scheduler address
to pass as ``--dask-address`` (or ``AUDIOPIPE_DASK_ADDRESS``); the cluster lives until Ctrl-C, which
cancels its jobs.

The scheduler runs in this process; each Slurm job runs Dask workers with the Python that runs this
script, so the environment (with audiopipe installed) must sit on a filesystem the compute nodes share.
GPU jobs ask Slurm for one GPU each (``--gres=gpu:1``) and advertise the ``GPU`` resource, which
``audiopipe train --gpu`` requires. S3 credentials reach the workers through the job's environment:
sbatch passes on the submitting environment by default, or source a private file with ``--prologue``.
Like the other files beside it, this script imports nothing from audiopipe. docs/deploy.md has examples.

Usage:
    python infra/cluster/slurm.py --queue cpu --account myproj --jobs 8
    python infra/cluster/slurm.py --gpu --queue gpu --jobs 2 --prologue 'module load cuda'
    python infra/cluster/slurm.py --gpu --print-job-script     # show the sbatch script, submit nothing
"""

from __future__ import annotations

import argparse
import sys
import time

# The same Dask settings as the LocalCluster of infra/runners.py: one BLAS thread per single-threaded
# worker and raised glibc trim/mmap thresholds (the default trim threshold cost ~35% in the feature
# loop); a file is quarantined after 3 worker deaths (RunSettings.max_attempts_per_file).
WORKER_ENVIRON = ('{"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1, '
                  '"MALLOC_TRIM_THRESHOLD_": 67108864, "MALLOC_MMAP_THRESHOLD_": 33554432}')
ALLOWED_FAILURES = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the job shape defaults depend on ``--gpu``."""
    p = argparse.ArgumentParser(description="Start a Dask cluster on Slurm for audiopipe and print its address.")
    p.add_argument("--gpu", action="store_true",
                   help="GPU workers: one GPU per job (--gres=gpu:1), advertising the GPU resource.")
    p.add_argument("--jobs", type=int, default=2, help="Slurm jobs to submit (default: 2).")
    p.add_argument("--queue", help="Partition (#SBATCH -p).")
    p.add_argument("--account", help="Account to charge (#SBATCH -A).")
    p.add_argument("--walltime", default="04:00:00", help="Time limit of each job (default: 04:00:00).")
    p.add_argument("--cores", type=int,
                   help="Worker threads per job (default: 4 CPU; 1 GPU). CPU jobs run one single-threaded "
                        "worker process per core, as the local cluster does.")
    p.add_argument("--job-cpu", type=int,
                   help="CPUs to book per job when they differ from --cores (default: 4 for a GPU job, "
                        "for TensorFlow's own threads and the input pipeline).")
    p.add_argument("--memory", help="Memory per job, shared by its workers (default: 12GiB CPU; 16GiB GPU).")
    p.add_argument("--interface", help="Network interface of the workers and scheduler, e.g. ib0.")
    p.add_argument("--port", type=int, default=8786, help="Scheduler port (0: any free port; default: 8786).")
    p.add_argument("--local-directory", help="Worker spill directory on node-local disk, e.g. /scratch/$USER.")
    p.add_argument("--log-directory", help="Where Slurm writes the jobs' stdout/stderr.")
    p.add_argument("--prologue", action="append", default=[],
                   help="Shell line run before the worker starts (repeatable): 'module load cuda', "
                        "'source ~/.config/audiopipe/s3.env'. Never put a secret itself here: the line "
                        "is written into the job script.")
    p.add_argument("--print-job-script", action="store_true", help="Print the job script and exit.")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.cores is None:
        args.cores = 1 if args.gpu else 4
    if args.job_cpu is None and args.gpu:
        args.job_cpu = 4
    if args.memory is None:
        args.memory = "16GiB" if args.gpu else "12GiB"
    return args


def cluster_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` (its 0.9 names)."""
    kwargs = dict(
        queue=args.queue, account=args.account, walltime=args.walltime,
        cores=args.cores, processes=1 if args.gpu else args.cores, memory=args.memory, job_cpu=args.job_cpu,
        interface=args.interface, local_directory=args.local_directory, log_directory=args.log_directory,
        scheduler_options={"port": args.port},
        job_script_prologue=[f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{WORKER_ENVIRON}'",
                             *args.prologue],
    )
    if args.gpu:
        kwargs["job_extra_directives"] = ["--gres=gpu:1"]
        kwargs["worker_extra_args"] = ["--resources", "GPU=1"]
    return {k: v for k, v in kwargs.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    """Start the cluster, scale it to ``--jobs``, print the address and wait for Ctrl-C."""
    args = parse_args(argv)
    try:
        import dask
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        print(f"infra/cluster/slurm.py needs dask-jobqueue, which is not installed here ({exc}).\n"
              "It comes with the `cluster` extra: install it on the login node, in the environment of\n"
              "audiopipe, with `pip install 'audiopipe[cluster]'`.", file=sys.stderr)
        return 2
    dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES})  # the scheduler runs here
    cluster = SLURMCluster(**cluster_kwargs(args))
    try:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        kind = "GPU" if args.gpu else "CPU"
        print(f"Dask scheduler: {cluster.scheduler_address}  ({args.jobs} {kind} jobs submitted)")
        print(f"  audiopipe ... --dask-address {cluster.scheduler_address}")
        print("Ctrl-C stops the cluster and cancels its jobs.", flush=True)
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        print("stopping: cancelling the jobs", file=sys.stderr)
        return 0
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
