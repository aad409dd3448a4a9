"""`dlkit serve --workers N`: N server processes, each with every model and, on Linux, each with its own
listening socket on the same port (SO_REUSEPORT), so that the kernel spreads new connections across them.

uvicorn's own workers share one socket, and a burst of new connections goes to whichever worker is awake
to accept it: of 32 keep-alive connections opened at once against two workers, 24, 25 and 29 landed on
one of them here, and a keep-alive client stays where it landed, so a second worker mostly idled. Where
the kernel does not balance SO_REUSEPORT sockets (macOS, Windows), uvicorn's workers serve as they are.

The supervisor is uvicorn's (signals, health checks, a dead worker replaced), with each worker bound to its
own socket for its whole life: a replacement takes over its predecessor's socket and the connections
waiting on it.
"""
from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from dlkit.errors import ConfigError

log = logging.getLogger("uvicorn.error")


def balanced() -> bool:
    """Whether the kernel spreads connections across sockets sharing a port (Linux's SO_REUSEPORT)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def check_port(host: str, port: int) -> None:
    """One ConfigError line unless host:port can be bound now (before the server starts and logs)."""
    with socket.socket(_family(host)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None


def listening_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """n sockets bound to host:port with SO_REUSEPORT. The port is first bound alone, without it: a port
    in use (by anything, another dlkit serve included, whose sockets would otherwise join this group
    and share its connections) is one ConfigError line."""
    check_port(host, port)
    family = _family(host)
    sockets = []
    for _ in range(n):
        sock = socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            for s in [*sockets, sock]:
                s.close()
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Workers(Multiprocess):
    """uvicorn's supervisor with one socket per worker (`sockets[i]` is worker i's, for good)."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.processes_num = len(sockets)

    def _start(self, slot: int) -> Process:
        process = Process(self.config, [self.sockets[slot]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._start(slot) for slot in range(len(self.sockets))]

    def keep_subprocess_alive(self) -> None:
        """As uvicorn's: a hung worker is killed, a dead one replaced (on its socket); a worker that failed
        before serving stops everything, since its replacement would fail the same way."""
        for slot, process in enumerate(self.processes):
            if self.should_exit.is_set() or process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error(f"Child process [{process.pid}] failed to start, stopping the parent process.")
                self.should_exit.set()
                return
            log.info(f"Child process [{process.pid}] died")
            self.processes[slot] = self._start(slot)

    def restart_all(self) -> None:
        """SIGHUP: each worker replaced in turn, its replacement serving before the old one stops."""
        for slot, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._start(slot)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                log.error(f"New child process [{new.pid}] was not ready in time; keeping worker [{old.pid}]")
                return
            old.terminate()
            old.join()
            self.processes[slot] = new

    def handle_ttin(self) -> None:
        self._fixed("SIGTTIN")

    def handle_ttou(self) -> None:
        self._fixed("SIGTTOU")

    @staticmethod
    def _fixed(signal_name: str) -> None:
        log.info(f"Received {signal_name}: ignored, the number of workers is fixed (a socket each); restart with "
                 "another --workers")


def run_workers(app: str, host: str, port: int, workers: int, **options: Any) -> None:
    """Serve the app factory `app` ("module:function") from `workers` processes on host:port."""
    import uvicorn

    if not balanced():
        uvicorn.run(app, factory=True, host=host, port=port, workers=workers, **options)
        return
    sockets = listening_sockets(host, port, workers)
    config = Config(app, factory=True, host=host, port=port, workers=workers, **options)
    log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit; %d workers, a socket each)", host, port, workers)
    try:
        Workers(config, sockets).run()
    finally:
        for sock in sockets:
            sock.close()
