"""One table over finished runs: our result beside the seed's claim, with size and cost."""
from __future__ import annotations

from pathlib import Path

from dlkit.rundir import RunDir

COLUMNS = ("recipe", "seed", "test_accuracy", "test_f1", "test_roc_auc", "claimed", "params", "train_s")


def compare_rows(paths: list[str | Path]) -> list[dict[str, str]]:
    """One row of formatted cells per run."""
    rows = []
    for path in paths:
        s = RunDir.open(path).summary()
        claims = s.get("expect", {}).get("claims", [])
        claimed = ", ".join(f"{c['metric'].removeprefix('test_')} {c['claimed']}" for c in claims) or "-"
        rows.append({
            "recipe": s["recipe"], "seed": str(s["seed"]),
            **{k: f"{s[k]:.4f}" if k in s else "-" for k in ("test_accuracy", "test_f1", "test_roc_auc")},
            "claimed": claimed, "params": f"{s['params']:,}", "train_s": f"{s['train_seconds']:.1f}",
        })
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    """A GitHub-style markdown table with aligned columns."""
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    line = lambda cells: "| " + " | ".join(cells[c].ljust(widths[c]) for c in COLUMNS) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"
    return "\n".join([line({c: c for c in COLUMNS}), sep, *map(line, rows)])
