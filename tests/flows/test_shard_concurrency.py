"""Shard concurrency in a deployed run: the flow itself reads ``AUDIOPIPE_SHARD_CONCURRENCY`` at run start.

A deployment's run calls the flow function with its stored parameters (no ``settings``) in the worker's
``prefect.engine`` process, so the bound must come from that process's environment; the CLI's wrapper is
not involved. Task runs of ``extract-shard`` are read back from the API and their overlap measured.
"""

from __future__ import annotations

import pytest
import soundfile as sf

from audiopipe.tasks.synth import tone

pytestmark = [pytest.mark.s3]
NUM_SHARDS = 4


def _max_overlap(runs) -> int:
    """Most task runs that were running at the same instant (an end at t comes before a start at t)."""
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _shard_runs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="extract-shard")))
    assert len(runs) == NUM_SHARDS and all(r.start_time and r.end_time for r in runs), runs
    return runs


@pytest.mark.parametrize("concurrency", [1, 2])
def test_deployed_run_honours_shard_concurrency_from_its_environment(concurrency, tmp_path, monkeypatch,
                                                                      prefect_api, dask_cluster):
    from audiopipe.flows.extract_features import extract_features

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(NUM_SHARDS):  # one file per shard; long enough that shards overlap when allowed to
        sf.write(archive / f"tone{i}.wav", tone(200 + 50 * i, 20.0, 16_000), 16_000)
    for name, value in {"AUDIOPIPE_SHARD_CONCURRENCY": str(concurrency), "AUDIOPIPE_FILES_PER_SHARD": "1",
                        "AUDIOPIPE_DASK_ADDRESS": dask_cluster.scheduler_address,
                        "AUDIOPIPE_WORK_DIR": str(tmp_path / "work")}.items():
        monkeypatch.setenv(name, value)
    state = extract_features(str(archive), str(tmp_path / "out"), return_state=True)  # as a deployment calls it
    assert state.is_completed(), state
    assert state.result()["shards_written"] == NUM_SHARDS
    assert _max_overlap(_shard_runs(state.state_details.flow_run_id)) == concurrency
