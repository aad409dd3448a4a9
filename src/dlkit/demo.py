"""`make demo`: the offline quickstart, three seed experiments end to end and a results table: the S0.1
CNN on 5,000 real MNIST digits (about 30 s for all three on 2 CPU cores, reports included)."""
from __future__ import annotations

import sys

from dlkit.engine.progress import PlainProgress
from dlkit.evaluate.compare import compare_runs
from dlkit.recipes import load_recipe
from dlkit.runner import execute

DEMO_RECIPES = ("mnist5k-cnn", "digits-mlp", "breast-cancer-lstm")


def main() -> None:
    """Run each demo recipe with its own settings, then print one table over the runs."""
    runs = []
    for name in DEMO_RECIPES:
        print(f"== dlkit run {name}", flush=True)
        result = execute(load_recipe(name), progress=PlainProgress(), report=True)
        print(f"   -> {result.run_dir}  (report: {result.run_dir / 'report.html'})", flush=True)
        runs.append(result.run_dir)
    print()
    print(compare_runs(runs, "md"))


if __name__ == "__main__":
    sys.exit(main())
