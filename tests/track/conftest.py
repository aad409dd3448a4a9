"""What the tracking tests share: a real MLflow tracking server (`dlkit ui`, which runs `mlflow server`) on a
free loopback port for the session, a `Gate` in front of it that can play a server that is down, refuses
or hangs, and `tools`: helpers that read what MLflow holds and run processes (tests run under
--import-mode=importlib, so they come as a fixture rather than an import)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("mlflow")

import httpx
from mlflow import MlflowClient

import dlkit

SRC = str(Path(dlkit.__file__).parents[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts connections on the loopback port (binding would be refused by the closed
    connections' TIME_WAIT for a minute, so this connects instead)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def env(**extra: str) -> dict[str, str]:
    """The environment of a dlkit or mlflow subprocess: this checkout first on the path, the venv's
    scripts on PATH (mlflow models serve starts `uvicorn` by name), no report, no colour."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return {**base, "PYTHONPATH": SRC, "PATH": path, "DLKIT_REPORT": "0", "NO_COLOR": "1", **extra}


def wait_until_ready(url: str, proc: subprocess.Popen, log: Path, deadline_s: float = 120) -> None:
    """Poll `url` until it answers 200; fail with the process's log if it exits or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def stop(proc: subprocess.Popen, log: Path, timeout: float = 30) -> int:
    """SIGTERM by PID, then wait; a process that does not stop is killed and the test fails."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"process {proc.pid} did not stop within {timeout} s of SIGTERM:\n{log.read_text()}") from None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """`dlkit ui` (a real `mlflow server`) over a fresh SQLite store on a free loopback port; its URL.
    Stopped by PID at the end, and nothing may answer on its port then (no server process left behind)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    db = folder / "server.db"
    db.touch()  # dlkit ui serves an existing store; MLflow makes its tables
    port = free_port()
    log = folder / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dlkit", "ui", "--uri", f"sqlite:///{db}", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/health", proc, log)
        yield url
    finally:
        assert stop(proc, log) == 0, log.read_text()[-2000:]  # SIGTERM is how a server stops: no error
        deadline = time.monotonic() + 20
        while listening(port):
            assert time.monotonic() < deadline, f"port {port} still answers after dlkit ui stopped:\n" + "\n".join(
                log.read_text().splitlines()[-15:])
            time.sleep(0.2)


class Gate:
    """A loopback TCP port in front of a server: `open` passes connections through, `down` refuses them
    (nothing listens), `refuse` accepts and closes at once, `hang` accepts and never answers."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "down"
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []

    def set(self, mode: str) -> None:
        assert mode in ("open", "down", "refuse", "hang")
        self.mode = mode
        if mode == "down":
            self.close()
        elif self._listener is None:
            self._listener = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._held:
            conn.close()
        self._held.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                conn.close()
            elif self.mode == "hang":
                self._held.append(conn)
            else:
                up = socket.create_connection(self.upstream)
                for a, b in ((conn, up), (up, conn)):
                    threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def gate(mlflow_server) -> Iterator[Gate]:
    g = Gate(mlflow_server)
    try:
        yield g
    finally:
        g.close()


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric's whole history, by step."""
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def artifact_paths(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, recursively, as paths."""
    found = []
    for item in client(uri).list_artifacts(run_id, path):
        found += artifact_paths(uri, run_id, item.path) if item.is_dir else [item.path]
    return sorted(found)


@pytest.fixture(scope="session")
def tools() -> SimpleNamespace:
    return SimpleNamespace(client=client, history=history, artifact_paths=artifact_paths, env=env, stop=stop,
                           free_port=free_port, wait_until_ready=wait_until_ready)
