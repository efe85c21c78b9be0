"""Credentials at any depth of the storage options never reach Prefect, a file or the terminal.

Distinct secrets are planted where users put them (top level, under ``client_kwargs`` and ``config_kwargs``,
through a ``--config`` file, inside a malformed config file) and the real CLI runs against SeaweedFS and
Prefect's harness; then every file the runs leave (Prefect's database with its -wal/-shm, the work dir,
reports, outputs in the store) and everything they printed is searched for each secret. Credentials with a
standard AWS variable must work from there (the runs have no other credentials); any other is refused,
named by its key path. Python callers of the flows and ``prefect deploy`` are refused before Prefect stores
anything.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from audiopipe.infra.errors import ConfigError
from audiopipe.tasks.synth import tone
from tests.support import TEST_KEY, TEST_SECRET, cli_env

pytestmark = [pytest.mark.slow]
CLI = [sys.executable, "-m", "audiopipe.flows.cli"]
ROOT = Path(__file__).resolve().parents[2]


def planted(label: str) -> str:
    return f"pl4nted-{label}-{secrets.token_hex(8)}"


def run(cmd: list[str], env: dict, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def db_texts(prefect_db: Path) -> dict[str, str]:
    """The harness database and everything beside it (its -wal and -shm files)."""
    files = [p for p in prefect_db.parent.rglob("*") if p.is_file()]
    assert prefect_db in files
    return {str(p): p.read_bytes().decode("latin-1") for p in files}


def leaked(secret_values: dict[str, str], texts: dict[str, str]) -> list[tuple[str, str]]:
    return [(label, name) for label, value in secret_values.items() for name, text in texts.items() if value in text]


@pytest.mark.s3
def test_cli_credentials_at_any_depth_are_moved_or_refused_and_never_written(tmp_path, s3_store, s3fs_client,
                                                                            bucket, prefect_api, prefect_db):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        sf.write(corpus / f"t{i}.wav", tone(300 + 50 * i, 1.0, 16000), 16000)
    s3fs_client.put(str(corpus) + "/", f"{bucket}/in/", recursive=True)
    env = cli_env(tmp_path, prefect_api)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]  # only the planted options can authenticate
    featurize = [*CLI, "featurize", f"s3://{bucket}/in"]
    common = ["--workers", "1", "--no-progress"]
    configs = tmp_path / "configs"  # written by the test, holding secrets on purpose: not searched
    configs.mkdir()

    def config(name: str, text: str) -> str:
        (configs / name).write_text(text)
        return str(configs / name)

    ok = {  # credentials with a standard variable: moved into the environment, and the run works with them
        "client_kwargs": featurize + [f"s3://{bucket}/out1", *common, "--report", str(tmp_path / "report"),
                                      "--storage-options", json.dumps({"aws_access_key_id": TEST_KEY, "client_kwargs": {
                                          "aws_secret_access_key": TEST_SECRET, "region_name": "us-east-1"}})],
        "top-level aws_*, config file": featurize + [f"s3://{bucket}/out2", *common, "--config", config(
            "aws.yaml", yaml.safe_dump({"storage_options": {"key": TEST_KEY, "aws_secret_access_key": TEST_SECRET}}))],
        "top-level password": featurize + [f"s3://{bucket}/out3", *common, "--storage-options",
                                           json.dumps({"username": TEST_KEY, "password": TEST_SECRET})],
    }
    refused = {name: planted(name.replace(" ", "-")) for name in
               ("proxy", "sse", "account", "conflict", "config nested", "bad yaml", "bad alias", "bad toml")}
    out = f"s3://{bucket}/refused"
    cases = {  # name -> (command, what the error must say)
        "proxy, sse, account": (featurize + [out, "--storage-options", json.dumps({
            "key": TEST_KEY, "secret": TEST_SECRET,
            "config_kwargs": {"proxies": {"https": f"http://me:{refused['proxy']}@127.0.0.1:9"}},
            "s3_additional_kwargs": {"SSECustomerKey": refused["sse"]}, "account_key": refused["account"]})],
            ["config_kwargs.proxies.https", "s3_additional_kwargs.SSECustomerKey", "account_key"]),
        "conflict": (featurize + [out, "--storage-options", json.dumps({
            "secret": TEST_SECRET, "client_kwargs": {"aws_secret_access_key": refused["conflict"]}})],
            ["secret", "client_kwargs.aws_secret_access_key", "different values"]),
        "config nested": (featurize + [out, "--config", config("nested.yaml", yaml.safe_dump({"storage_options": {
            "config_kwargs": {"retries": {"max_attempts": 1}, "proxies": {
                "http": f"http://me:{refused['config nested']}@127.0.0.1:9"}}}}))],
            ["config_kwargs.proxies.http"]),
        "bad yaml": (featurize + [out, "--config", config(
            "bad.yaml", f"workers: 1\nstorage_options:\n  secret: {refused['bad yaml']}: oops\n")],
            ["bad.yaml", "not valid YAML", "line 3"]),
        "bad alias": (featurize + [out, "--config", config(
            "alias.yaml", f"storage_options:\n  secret: *{refused['bad alias']}\n")],
            ["alias.yaml", "not valid YAML", "line 2"]),
        "bad toml": (featurize + [out, "--config", config(
            "bad.toml", f'workers = 1\n[storage_options]\nsecret = {refused["bad toml"]} oops\n')],
            ["bad.toml", "not valid TOML", "line 3"]),
    }
    printed: dict[str, str] = {}
    for name, cmd in ok.items():
        result = run(cmd, env)
        printed[name] = result.stdout + result.stderr
        assert result.returncode == 0, printed[name]
    for name, (cmd, needles) in cases.items():
        result = run(cmd, env, timeout=120)
        text = result.stdout + result.stderr
        printed[name] = text
        assert result.returncode == 2 and "Traceback" not in text, text
        for needle in needles:
            assert needle in " ".join(text.split()), (name, needle, text)
    assert not s3fs_client.exists(f"{bucket}/refused")  # refused before anything ran

    texts = {f"output of {name}": text for name, text in printed.items()}
    texts.update({str(p): p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*")
                  if p.is_file() and configs not in p.parents})  # work dir (Dask, Prefect home), report
    outputs = s3fs_client.find(f"{bucket}/")
    texts.update({p: blob.decode("latin-1") for p, blob in s3fs_client.cat(outputs).items()})
    texts.update(db_texts(prefect_db))
    assert any("manifest" in p for p in outputs) and (tmp_path / "report" / "index.html").exists()
    assert leaked({"the store's secret": TEST_SECRET, **refused}, texts) == []


def test_python_entry_points_refuse_credentials_before_prefect_stores_them(tmp_path, prefect_api, prefect_db):
    from prefect import get_client

    from audiopipe.flows.extract_features import extract_features, featurize
    from audiopipe.flows.infer import run_inference, transcribe_flow
    from audiopipe.flows.retrain import retrain_on_new_labels
    from audiopipe.flows.train_model import train_model_flow
    from audiopipe.infra.settings import RunSettings
    from audiopipe.tasks.features import FeatureConfig
    from audiopipe.tasks.training import TrainSpec

    secret = planted("python")
    nested = {"endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"aws_secret_access_key": secret}}
    deeper = {"config_kwargs": {"proxies": {"https": f"http://me:{secret}@127.0.0.1:9"}}}
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    settings = RunSettings(work_dir=tmp_path / "work", workers=1)
    spec = TrainSpec("classify", out, f"{out}/labels.parquet", f"{out}/reg", "0" * 16, work_dir=str(tmp_path))
    calls = {
        "featurize()": (lambda: featurize(src, out, feature_config=FeatureConfig(), settings=settings,
                                          storage_options=nested), "client_kwargs.aws_secret_access_key"),
        "extract_features flow": (lambda: extract_features(src, out, storage_options=nested),
                                  "client_kwargs.aws_secret_access_key"),
        "flow.with_options": (lambda: extract_features.with_options(name="copy")(src, out, storage_options=deeper),
                              "config_kwargs.proxies.https"),
        "transcribe flow": (lambda: transcribe_flow(src, out, "/r:asr@1", storage_options={"password": secret}),
                            "password"),
        "run_inference()": (lambda: run_inference("classify", src, out, "/r:c@1", settings=settings,
                                                  storage_options=deeper), "config_kwargs.proxies.https"),
        "retrain flow": (lambda: retrain_on_new_labels(src, src, out, "/r:c", src, storage_options=nested),
                         "client_kwargs.aws_secret_access_key"),
        "train flow": (lambda: train_model_flow(spec, settings, {"token": secret}), "token"),
        "to_deployment": (lambda: extract_features.to_deployment("leak", parameters={
            "in_url": src, "out_url": out, "storage_options": deeper}), "config_kwargs.proxies.https"),
    }
    with get_client(sync_client=True) as client:
        for name, (call, path) in calls.items():
            runs_before = client.count_flow_runs()
            with pytest.raises(ConfigError) as raised:
                call()
            assert path in str(raised.value) and secret not in str(raised.value), (name, str(raised.value))
            assert client.count_flow_runs() == runs_before, f"{name}: a flow run was stored before the refusal"
    assert leaked({"planted": secret}, db_texts(prefect_db)) == []


def deploy_env(tmp_path: Path, prefect_api: str) -> dict[str, str]:
    from audiopipe.infra.serve import DEPLOY_DEFAULTS

    return {**cli_env(tmp_path, prefect_api), **DEPLOY_DEFAULTS, "AUDIOPIPE_PROJECT_ROOT": str(ROOT),
            "PREFECT_HOME": str(tmp_path / "prefect-home")}


def test_deployments_with_credentials_are_refused_at_deploy_time(tmp_path, prefect_api, prefect_db):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from audiopipe.infra.deploy_check import refuse_credentials_in_deployments
    from audiopipe.infra.serve import PREFECT_FILE

    planted_values = {k: planted(k) for k in ("params", "schedule", "env", "cli-param")}
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    spec["deployments"] = copy.deepcopy(spec["deployments"])  # anchors are shared objects once loaded
    by_name = {d["name"]: d for d in spec["deployments"]}
    featurize, nightly, retrain = (by_name[n] for n in ("featurize-archive", "nightly-transcribe",
                                                         "retrain-on-new-labels"))
    featurize["parameters"]["storage_options"] = {"client_kwargs": {"aws_secret_access_key": planted_values["params"]}}
    nightly["schedules"][0]["parameters"] = {"storage_options": {"config_kwargs": {"proxies": {
        "https": f"http://me:{planted_values['schedule']}@127.0.0.1:9"}}}}
    retrain["work_pool"]["job_variables"] = {"env": {"AWS_SECRET_ACCESS_KEY": planted_values["env"],
                                                     "AWS_ENDPOINT_URL": "http://127.0.0.1:8333"}}
    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ConfigError) as raised:
        refuse_credentials_in_deployments(bad)
    message = " ".join(str(raised.value).split())
    for path in ("deployments[featurize-archive].parameters.storage_options.client_kwargs.aws_secret_access_key",
                 "deployments[nightly-transcribe].schedules[0].parameters.storage_options.config_kwargs.proxies.https",
                 "deployments[retrain-on-new-labels].work_pool.job_variables.env.AWS_SECRET_ACCESS_KEY"):
        assert path in message, message
    assert "AWS_ENDPOINT_URL" not in message and leaked(planted_values, {"message": message}) == []
    assert refuse_credentials_in_deployments(PREFECT_FILE) == {}  # the shipped file deploys

    with get_client(sync_client=True) as client:  # `prefect deploy` needs the pool to exist
        try:
            client.read_work_pool("audiopipe")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name="audiopipe", type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
    env = deploy_env(tmp_path, prefect_api)
    deploy = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "featurize-archive"]
    by_hand = {  # prefect deploy run by hand: the file's build step refuses
        "file": run(deploy + ["--prefect-file", str(bad)], env, cwd=ROOT),
        "--param": run(deploy + ["--prefect-file", str(PREFECT_FILE), "--param",
                                 "storage_options=" + json.dumps({"secret": planted_values["cli-param"]})],
                       env, cwd=ROOT),
    }
    for name, result in by_hand.items():
        text = " ".join((result.stdout + result.stderr).split())
        assert result.returncode != 0 and "would store credentials" in text, (name, text)
    param_text = by_hand["--param"].stdout + by_hand["--param"].stderr
    assert "parameters.storage_options.secret" in " ".join(param_text.split())
    with get_client(sync_client=True) as client:
        with pytest.raises(ObjectNotFound):
            client.read_deployment_by_name("extract-features/featurize-archive")
    clean = run(deploy + ["--prefect-file", str(PREFECT_FILE)], env, cwd=ROOT)  # the build step lets it through
    assert clean.returncode == 0, clean.stdout + clean.stderr
    with get_client(sync_client=True) as client:
        assert "storage_options" not in client.read_deployment_by_name("extract-features/featurize-archive").parameters
    printed = {f"prefect deploy {k}": r.stdout + r.stderr for k, r in {**by_hand, "clean": clean}.items()}
    # Prefect itself echoes a --param value back before any step runs ("The parameter value ... is parsed
    # as a JSON string"): that is the user's own command line; what follows, the refusal, must not quote it.
    param_output = printed.pop("prefect deploy --param")
    printed["refusal of --param"] = param_output[param_output.index("Running deployment build steps"):]
    homes = {str(p): p.read_bytes().decode("latin-1") for p in (tmp_path / "prefect-home").rglob("*") if p.is_file()}
    assert leaked(planted_values, {**printed, **homes, **db_texts(prefect_db)}) == []


@pytest.mark.parametrize("name", ["key", "secret", "token", "password", "username", "aws_access_key_id",
                                  "AWS_SECRET_ACCESS_KEY", "aws_session_token", "account_key", "sas_token",
                                  "connection_string", "client_secret", "credentials", "SSECustomerKey", "api_key",
                                  "private_key", "refresh_token", "Authorization"])
def test_credential_names(name):
    from audiopipe.infra.credentials import is_credential_name

    assert is_credential_name(name)


@pytest.mark.parametrize("name", ["profile", "endpoint_url", "region_name", "anon", "use_ssl", "signature_version",
                                  "retries", "max_attempts", "SSEKMSKeyId", "requester_pays", "AWS_ENDPOINT_URL",
                                  "AWS_REGION", "client_kwargs", "config_kwargs", "in_url", "model"])
def test_not_credential_names(name):
    from audiopipe.infra.credentials import is_credential_name

    assert not is_credential_name(name)


def test_move_credentials_to_the_standard_variables_and_refuse_the_rest():
    from audiopipe.infra.credentials import credential_paths, move_credentials

    kept, env = move_credentials({"username": "K", "client_kwargs": {"aws_secret_access_key": "S", "region_name": "r"},
                                  "aws_session_token": "T", "profile": "p", "endpoint_url": "http://h:1"})
    assert env == {"AWS_ACCESS_KEY_ID": "K", "AWS_SECRET_ACCESS_KEY": "S", "AWS_SESSION_TOKEN": "T"}
    assert kept == {"client_kwargs": {"region_name": "r"}, "profile": "p", "endpoint_url": "http://h:1"}
    found = credential_paths({"model": "s3://models:asr@champion", "a": [{"b": {"sas_token": "x"}}],
                              "proxy": "https://me:pw@proxy:3128", "c": {"token": None}})
    assert found == ["a[0].b.sas_token", "proxy"]
    with pytest.raises(ConfigError, match="key and aws_access_key_id both give AWS_ACCESS_KEY_ID") as raised:
        move_credentials({"key": "K1", "aws_access_key_id": "K2"})
    assert "K1" not in str(raised.value) and "K2" not in str(raised.value)


@pytest.mark.parametrize("name, text, where", [
    ("a.yaml", "storage_options:\n  secret: {s}: x\n", "line 2"),
    ("b.yaml", "storage_options: {{secret: '{s}\n", "line 2"),
    ("c.yaml", "storage_options:\n  secret: *{s}\n", "line 2"),
    ("d.yaml", "storage_options: !{s} x\n", "line 1"),
    ("e.toml", "[storage_options]\nsecret = {s} x\n", "line 2"),
    ("f.toml", 'storage_options = {{secret = "{s}\n', "line 1"),
])
def test_config_file_errors_never_quote_the_file(tmp_path, name, text, where):
    from audiopipe.infra.config_file import read_config_file

    secret = planted("config")
    (tmp_path / name).write_text(text.format(s=secret))
    with pytest.raises(ConfigError) as raised:
        read_config_file(tmp_path / name, {"storage_options"})
    message = str(raised.value)
    assert name in message and where in message and secret not in message, message
