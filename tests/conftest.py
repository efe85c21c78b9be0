"""Shared fixtures: a real SeaweedFS S3 server, Prefect's test harness, a real Dask LocalCluster.

Everything here is a real component started on 127.0.0.1; nothing is mocked.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.support import TEST_KEY, TEST_SECRET

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A SeaweedFS server on a free port; yields the store and leaves AWS_* set for the session."""
    from audiopipe.infra.store import SeaweedStore, free_port

    store = SeaweedStore(tmp_path_factory.mktemp("seaweed"), free_port())
    store.up(access_key=TEST_KEY, secret_key=TEST_SECRET)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID=TEST_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET,
                      AWS_ENDPOINT_URL=store.endpoint_url)
    yield store
    store.down()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3fs_client(s3_store):
    import s3fs

    return s3fs.S3FileSystem(key=TEST_KEY, secret=TEST_SECRET, endpoint_url=s3_store.endpoint_url,
                             skip_instance_cache=True)


@pytest.fixture()
def bucket(s3fs_client, request):
    """A fresh bucket per test, named after it."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{secrets.token_hex(3)}"
    s3fs_client.mkdir(name)
    return name


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test harness (a real API server on SQLite); yields its URL for subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def prefect_db(prefect_api) -> Path:
    """The harness's SQLite file: secrets must never land in it."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    return Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory, s3_store):
    """A LocalCluster of 2 real worker processes shared by flow tests (``--dask-address`` path).

    Depends on ``s3_store`` so the workers inherit the store's AWS_* environment.
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 2}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB",
                               local_directory=str(tmp_path_factory.mktemp("dask")), dashboard_address="127.0.0.1:0")
    yield cluster
    cluster.close()
