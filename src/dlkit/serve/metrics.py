"""The server's numbers in Prometheus' text format (exposition format 0.0.4), written by hand: requests
by model, endpoint and status, a latency histogram, the batch sizes each model ran, queue depth.

With several worker processes (`dlkit serve --workers N`) each keeps its own numbers and publishes them
(`state()`, JSON) every second into a folder the workers share (`Shared`); whichever worker answers
/metrics adds up every worker's, so a scrape sees the whole server. A worker that died keeps its
counts (counters only grow), not its queue."""
from __future__ import annotations

import bisect
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# latency buckets in seconds: a digit CNN answers in about a millisecond, an image upload in tens
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative buckets, sum and count per label set."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: Counter[tuple[str, ...]] = Counter()

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.bounds) + 1))
        counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[labels] += value

    def state(self) -> list[list[Any]]:
        """[[labels, bucket counts, sum], ...]: JSON-able."""
        return [[list(labels), counts, self.sums[labels]] for labels, counts in self.counts.items()]

    def add(self, state: list[list[Any]]) -> None:
        """Add another worker's `state()` to these counts."""
        for labels, counts, total in state:
            mine = self.counts.setdefault(tuple(labels), [0] * (len(self.bounds) + 1))
            for i, n in enumerate(counts):
                mine[i] += n
            self.sums[tuple(labels)] += total

    def lines(self, name: str, keys: tuple[str, ...]) -> list[str]:
        out = []
        for labels, counts in sorted(self.counts.items()):
            base = ",".join(f'{k}="{v}"' for k, v in zip(keys, labels))
            total = 0
            for bound, n in zip((*self.bounds, "+Inf"), counts):
                total += n
                out.append(f'{name}_bucket{{{base},le="{bound}"}} {total}')
            out.append(f"{name}_sum{{{base}}} {self.sums[labels]:.6f}")
            out.append(f"{name}_count{{{base}}} {total}")
        return out


class Metrics:
    """Counters the app and the batch workers (in their threads) update; `render` writes them."""

    def __init__(self, queue_depth: Callable[[], dict[str, int]]) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batches = Histogram(BATCH_BUCKETS)
        self.queue_depth = queue_depth

    def request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(model, endpoint, str(status))] += 1
            self.latency.observe((model, endpoint), seconds)

    def batch(self, model: str, size: int) -> None:
        with self.lock:
            self.batches.observe((model,), size)

    def state(self) -> dict[str, Any]:
        """This process's numbers, JSON-able (what `render` adds up across workers)."""
        with self.lock:
            return {"requests": [[*labels, n] for labels, n in self.requests.items()],
                    "latency": self.latency.state(), "batches": self.batches.state(),
                    "queue": self.queue_depth()}

    def render(self, others: Sequence[dict[str, Any]] = ()) -> str:
        """Prometheus text of this process's numbers plus `others` (other workers' `state()`; their
        queues only when given as live)."""
        total = Metrics(lambda: {})
        queue: Counter[str] = Counter()
        for state in [self.state(), *others]:
            for m, e, st, n in state["requests"]:
                total.requests[(m, e, st)] += n
            total.latency.add(state["latency"])
            total.batches.add(state["batches"])
            queue.update(state["queue"])
        lines = ["# HELP dlkit_requests_total Requests answered, by model, endpoint and status.",
                 "# TYPE dlkit_requests_total counter"]
        lines += [f'dlkit_requests_total{{model="{m}",endpoint="{e}",status="{s}"}} {n}'
                  for (m, e, s), n in sorted(total.requests.items())]
        lines += ["# HELP dlkit_request_seconds Time from a request's arrival to its answer.",
                  "# TYPE dlkit_request_seconds histogram",
                  *total.latency.lines("dlkit_request_seconds", ("model", "endpoint")),
                  "# HELP dlkit_batch_size Rows in each model call the batcher made.",
                  "# TYPE dlkit_batch_size histogram",
                  *total.batches.lines("dlkit_batch_size", ("model",))]
        lines += ["# HELP dlkit_queue_depth Requests waiting for a model's worker.", "# TYPE dlkit_queue_depth gauge"]
        lines += [f'dlkit_queue_depth{{model="{m}"}} {n}' for m, n in sorted(queue.items())]
        return "\n".join(lines) + "\n"


FRESH_S = 5.0  # a worker's file older than this is a worker that stopped publishing (dead): no queue, not ready


class Shared:
    """The folder `dlkit serve --workers N` gives its workers: each writes `worker-<pid>-<start>.json`
    (its numbers and whether its models are ready) atomically, and reads the others'. The start time
    keeps a dead worker's file (its counts) when a new worker gets its pid again."""

    def __init__(self, folder: str | Path, workers: int) -> None:
        self.folder, self.workers = Path(folder), workers
        self.mine = self.folder / f"worker-{os.getpid()}-{time.time_ns()}.json"

    def publish(self, state: dict[str, Any], ready: bool) -> None:
        part = self.mine.with_suffix(".part")
        part.write_text(json.dumps({**state, "ready": ready, "time": time.time()}))
        os.replace(part, self.mine)

    def others(self) -> list[dict[str, Any]]:
        """The other workers' last states; a stale one's queue dropped (its process is gone)."""
        found = []
        for path in sorted(self.folder.glob("worker-*.json")):
            if path == self.mine:
                continue
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):  # removed or replaced while read: its next write counts
                continue
            if time.time() - state.get("time", 0) > FRESH_S:
                state["queue"], state["ready"] = {}, False
            found.append(state)
        return found

    def ready_workers(self) -> int:
        """How many workers are live with every model ready, counting this one (asked once it is)."""
        return 1 + sum(bool(state["ready"]) for state in self.others())

