"""`serving`, a real `dlkit serve` process; the runs it serves (`runs`, `digit_files`) are tests/conftest.py's."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest

import dlkit

Serving = Callable[[list[str], Path], AbstractContextManager[tuple[str, subprocess.Popen]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(args: list[str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m dlkit serve ARGS` on a free loopback port, its output in `log`: (base URL, process) once
    /ready answers 200 (60 s at most); stopped by PID with SIGTERM on exit (10 s, else killed and failed)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(dlkit.__file__).parents[1]), "DLKIT_REPORT": "0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dlkit", "serve", *args, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield base, proc
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the server did not stop within 10 s of SIGTERM:\n{log.read_text()}") from None


@pytest.fixture(scope="session")
def serving() -> Serving:
    """`with serving(args, log) as (base, process):` a real `dlkit serve` on a free loopback port."""
    return _serving
