"""The live tracker: a Callback that hands each epoch to a background thread, which sends it to MLflow.

Training never waits on MLflow. The thread imports MLflow, creates the run and logs the params while the
first stage waits for it (at most START_WAIT_S: a server that is slow to answer lets training start);
then epochs are queued as they end and sent in batches (one call per SEND_EVERY_S at most). At the end the
thread sends whatever the run directory holds that MLflow does not (results, files, the model, the status)
and the caller waits for it. The first error stops all sending with one warning: training goes on, and
tracking.json says what was sent, so `dlkit track sync RUN` sends the rest later.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Any

from dlkit.engine.callbacks import Callback, FitState
from dlkit.errors import error_line
from dlkit.rundir import RunDir
from dlkit.track.settings import client_env

START_WAIT_S = 15.0  # the first stage waits this long for the run to exist in MLflow (import, database, server)
SEND_EVERY_S = 2.0  # epochs shorter than this are sent together: one database or HTTP call per 2 s at most
INTERRUPTED_WAIT_S = 10.0  # after Ctrl-C / SIGTERM, the status gets this long to reach MLflow; sync sends the rest
_STOP = ("stop",)


class MlflowTracker(Callback):
    """Logs one run to MLflow from a background thread; `end` sends the rest and waits for it."""

    def __init__(self, run: RunDir, state: dict[str, Any], *, resumed: bool = False) -> None:
        self.run, self.state = run, state
        self.failure: str | None = None
        self.ended = False
        # what tracking cost: the sending thread's CPU seconds per kind of job, and how long the run waited
        # for it (benchmarks/track_overhead.py reports them)
        self.cpu_seconds = {"open": 0.0, "epochs": 0.0, "end": 0.0}
        self.waited_s = 0.0  # before the first epoch
        self.ending_s = 0.0  # after the run, for the results, files, model and status
        self._jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._opened = threading.Event()
        self._waited = False
        client_env()  # here, not in the thread: setting environment variables races with the C code reading them
        # a daemon: a process that must stop (Ctrl-C while MLflow hangs) is not held by it; what it had not
        # sent is still recorded as not sent
        self._thread = threading.Thread(target=self._work, name="dlkit-mlflow", daemon=True)
        self._jobs.put(("open", resumed))
        self._thread.start()

    # ---- Callback hooks (the training thread: queue and return) -------------------------------------

    def on_stage_start(self, state: FitState) -> None:
        if not self._waited:
            self._waited = True
            started = time.perf_counter()
            self._opened.wait(START_WAIT_S)
            self.waited_s = time.perf_counter() - started

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        self._jobs.put(("epoch", dict(metrics), int(time.time() * 1000)))

    # ---- the end ------------------------------------------------------------------------------------

    def end(self, outcome: tuple[str, str] | None = None, wait: float | None = None) -> bool:
        """Send everything left (the status from status.json, or `outcome` = (state, message)) and wait for
        it, at most `wait` seconds (None: until the thread is done); True when all of it was sent."""
        if self.ended:
            return self.failure is None
        self.ended = True
        started = time.perf_counter()
        self._jobs.put(("end", outcome))
        self._jobs.put(_STOP)
        self._thread.join(wait)
        self.ending_s = time.perf_counter() - started
        return self.failure is None and not self._thread.is_alive()

    # ---- the sending thread ------------------------------------------------------------------------

    def _work(self) -> None:
        sender = None
        epochs: list[tuple[dict[str, Any], int]] = []
        last = 0.0
        while True:
            timeout = max(0.0, last + SEND_EVERY_S - time.monotonic()) if epochs else None
            try:
                job = self._jobs.get(timeout=timeout)
            except queue.Empty:
                job = ("flush",)
            kind = job[0]
            if kind == "epoch":
                epochs.append((job[1], job[2]))
                if time.monotonic() - last < SEND_EVERY_S:
                    continue
            cpu = time.thread_time()
            try:
                if self.failure is None:
                    if kind == "open":
                        sender = self._open(resumed=job[1])
                    if epochs and sender is not None:
                        sender.send_epochs(epochs)
                        last = time.monotonic()
                    if kind == "end" and sender is not None:
                        sender.send_all(job[1])
            except Exception as exc:  # any failure of MLflow stops the sending, never the training
                self._fail(exc)
            finally:
                epochs = []  # sent, or recorded as not sent (tracking.json): sync sends them from metrics.jsonl
                self.cpu_seconds[kind if kind in ("open", "end") else "epochs"] += time.thread_time() - cpu
                if kind == "open":
                    self._opened.set()
            if kind == "stop":
                return

    def _open(self, resumed: bool) -> Any:
        """Import MLflow, create (or reopen) the run and log its params: the first job."""
        from dlkit.track.sync import Sender

        sender = Sender(self.run, self.state)
        if resumed:
            sender.reopen()
        sender.open_run()
        sender.send_start()
        return sender

    def _fail(self, exc: BaseException) -> None:
        """Stop sending, with one warning naming the server, the error and the way to send the rest."""
        self.failure = error_line(exc)[:400]
        print(f"warning: MLflow tracking at {self.state['tracking_uri']} stopped ({self.failure}); the run goes "
              f"on, and `dlkit track sync {self.run.path}` sends what was not sent", file=sys.stderr, flush=True)

