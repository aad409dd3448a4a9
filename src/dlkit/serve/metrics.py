"""The server's numbers in Prometheus' text format (exposition format 0.0.4), written by hand: requests
by model, endpoint and status, a latency histogram, the batch sizes each model ran, queue depth."""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable

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

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP dlkit_requests_total Requests answered, by model, endpoint and status.",
                     "# TYPE dlkit_requests_total counter"]
            lines += [f'dlkit_requests_total{{model="{m}",endpoint="{e}",status="{s}"}} {n}'
                      for (m, e, s), n in sorted(self.requests.items())]
            lines += ["# HELP dlkit_request_seconds Time from a request's arrival to its answer.",
                      "# TYPE dlkit_request_seconds histogram",
                      *self.latency.lines("dlkit_request_seconds", ("model", "endpoint")),
                      "# HELP dlkit_batch_size Rows in each model call the batcher made.",
                      "# TYPE dlkit_batch_size histogram",
                      *self.batches.lines("dlkit_batch_size", ("model",))]
        lines += ["# HELP dlkit_queue_depth Requests waiting for a model's worker.", "# TYPE dlkit_queue_depth gauge"]
        lines += [f'dlkit_queue_depth{{model="{m}"}} {n}' for m, n in sorted(self.queue_depth().items())]
        return "\n".join(lines) + "\n"
