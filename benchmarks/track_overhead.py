"""What tracking with MLflow costs a digits-cnn run (the recipe's settings, 15 epochs, no report), tracked
into the default store (a SQLite file beside the runs) against the same run untracked, in one process.

A first pair of runs warms up (imports, the store's tables; how long the first tracked run's training
waited for that is reported apart), then PAIRS pairs alternate which goes first. What training pays is the goal (under 2%): each
epoch's seconds (median, and the fastest, which other load on a shared machine disturbs least) and the
CPU seconds of the whole process while `fit` runs (every thread: PyTorch's and the tracker's, which sends
in the background; creating the MLflow run happens inside fit too), and, less disturbed by other load,
the tracker thread's own CPU seconds for sending the epochs as a share of training's. The seconds around
training (sending the files and the pyfunc model after the test) are reported as extra seconds per run.
Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from dlkit import runner
from dlkit.recipes import load_recipe

PAIRS = 5
EPOCHS = 15
_fit_cpu: list[float] = []


def _timed_fit(*args, **kwargs):
    """runner's fit, with the process's CPU seconds while it runs recorded."""
    started = time.process_time()
    try:
        return _fit(*args, **kwargs)
    finally:
        _fit_cpu.append(time.process_time() - started)


_fit, runner.fit = runner.fit, _timed_fit
_trackers: list = []


def _kept_tracker(*args, **kwargs):
    """runner's start_tracking, with the tracker kept to read what it cost."""
    tracker = _start(*args, **kwargs)
    _trackers.append(tracker)
    return tracker


_start, runner.start_tracking = runner.start_tracking, _kept_tracker


def one_run(root: Path, name: str, tracked: bool) -> dict[str, float]:
    """Seconds of one run: its training (fit, wall and CPU), its epochs, and the whole of it."""
    fields = {"track.backend": "mlflow"} if tracked else None
    recipe = load_recipe("digits-cnn", epochs=EPOCHS, fields=fields)
    started = time.perf_counter()
    result = runner.execute(recipe, out=root / name, runs_root=root, report=False)
    cost = {"wall": time.perf_counter() - started, "train": result.summary["train_seconds"], "cpu": _fit_cpu[-1],
            "epochs": [e["seconds"] for e in result.history]}
    if tracked:
        tracker = _trackers[-1]
        cost |= {"send_cpu": tracker.cpu_seconds["epochs"], "open_cpu": tracker.cpu_seconds["open"],
                 "end_cpu": tracker.cpu_seconds["end"], "waited": tracker.waited_s, "ending": tracker.ending_s}
    return cost


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the default store: <runs>/mlflow.db
    with tempfile.TemporaryDirectory(prefix="dlkit-track-bench-") as tmp:
        root = Path(tmp)
        cold_tracked = one_run(root, "warm-tracked", True)
        one_run(root, "warm-plain", False)
        plain, tracked = [], []
        for k in range(PAIRS):
            order = [(False, plain), (True, tracked)] if k % 2 == 0 else [(True, tracked), (False, plain)]
            for is_tracked, into in order:
                into.append(one_run(root, f"{'tracked' if is_tracked else 'plain'}-{k}", is_tracked))
    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    epochs_plain = [e for r in plain for e in r["epochs"]]
    epochs_tracked = [e for r in tracked for e in r["epochs"]]
    print(json.dumps({
        "benchmark": "track_overhead", "recipe": "digits-cnn", "epochs": EPOCHS, "pairs": PAIRS,
        "store": "sqlite (runs/mlflow.db)", "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "epoch_seconds_median": {"untracked": round(statistics.median(epochs_plain), 4),
                                 "tracked": round(statistics.median(epochs_tracked), 4)},
        "epoch_ratio_median": round(statistics.median(epochs_tracked) / statistics.median(epochs_plain), 4),
        "epoch_seconds_fastest": {"untracked": min(epochs_plain), "tracked": min(epochs_tracked)},
        "epoch_ratio_fastest": round(min(epochs_tracked) / min(epochs_plain), 4),
        "fit_cpu_seconds": {"untracked": round(median(plain, "cpu"), 3), "tracked": round(median(tracked, "cpu"), 3)},
        "fit_cpu_ratio": round(median(tracked, "cpu") / median(plain, "cpu"), 4),
        # the tracker thread's own CPU seconds: sending the epochs while training runs, against fit's CPU
        # seconds untracked (the share of the 2 cores it takes from training, whatever else runs there)
        "epoch_sending_cpu_seconds": round(median(tracked, "send_cpu"), 4),
        "epoch_sending_cpu_share": round(median(tracked, "send_cpu") / median(plain, "cpu"), 5),
        "opening_wait_seconds": round(median(tracked, "waited"), 3),
        "opening_cpu_seconds": round(median(tracked, "open_cpu"), 3),
        "ending_cpu_seconds": round(median(tracked, "end_cpu"), 3),
        "ending_wait_seconds": round(median(tracked, "ending"), 3),
        "train_seconds": {"untracked": round(median(plain, "train"), 3), "tracked": round(median(tracked, "train"), 3)},
        "run_seconds": {"untracked": round(median(plain, "wall"), 2), "tracked": round(median(tracked, "wall"), 2)},
        "extra_seconds_per_run": round(median(tracked, "wall") - median(plain, "wall"), 2),
        # the process's first tracked run also imports MLflow and creates the store's tables before its first epoch
        "first_run_opening_wait_seconds": round(cold_tracked["waited"], 2),
    }))

if __name__ == "__main__":
    main()
