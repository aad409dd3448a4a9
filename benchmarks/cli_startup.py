"""How long the `dlkit` command takes to answer: `list recipes`, `list`, `--help` and `describe
digits-cnn`, each the median of REPEATS fresh processes, against `python -c pass` (the interpreter's
own start) timed the same way in the same process. `list` and `--help` import neither torch nor
scikit-learn; `describe` builds the model, so it pays for torch (and for the digits, scikit-learn).

Prints one JSON line: seconds per command, the reference's, and each command's ratio to it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

REPEATS = 5
COMMANDS = {"list recipes": ["list", "recipes"], "list": ["list"], "--help": ["--help"],
            "--version": ["--version"], "describe digits-cnn": ["describe", "digits-cnn"]}


def seconds(argv: list[str]) -> float:
    """Median wall time of REPEATS runs of `argv` (after one unmeasured run that warms the file cache)."""
    env = {**os.environ, "NO_COLOR": "1"}
    subprocess.run(argv, check=True, capture_output=True, env=env)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    reference = seconds([sys.executable, "-c", "pass"])
    measured = {name: seconds([sys.executable, "-m", "dlkit", *args]) for name, args in COMMANDS.items()}
    print(json.dumps({
        "benchmark": "cli_startup", "repeats": REPEATS, "python_c_pass_seconds": round(reference, 3),
        "seconds": {k: round(v, 3) for k, v in measured.items()},
        "ratio_to_python": {k: round(v / reference, 1) for k, v in measured.items()},
    }))


if __name__ == "__main__":
    main()
