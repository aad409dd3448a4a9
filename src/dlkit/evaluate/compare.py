"""A results table over finished runs: one row per recipe, mean ± std over its seeds, beside the seed's claim.

Runs are averaged as seeds only when their resolved recipes (recipe.yaml) differ in `seed` alone;
runs of one recipe made with other settings (`--epochs 1`, `--set ...`) get rows of their own,
labelled with the settings that tell them apart, and a note says so.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from scipy import stats

from dlkit.errors import ConfigError, RunDirError
from dlkit.rundir import RunDir

METRICS = {"accuracy": "test_accuracy", "f1": "test_f1", "roc_auc": "test_roc_auc"}
CLAIM_METRICS = ("test_accuracy", "val_accuracy")  # the accuracy claim a row is held to, test first
TOLERANCE = 0.01  # 'met' when at most one point worse, the rule runner.expect_vs_achieved applies per run
# (key, header, right-aligned) of the md / html table
COLUMNS = (("recipe", "recipe", False), ("n", "n", True), ("accuracy", "accuracy", True), ("f1", "F1", True),
           ("roc_auc", "ROC-AUC", True), ("claimed", "claimed", True), ("status", "vs claim", False),
           ("params", "params", True), ("train_s", "train time (s)", True), ("latency", "latency (ms/ex)", True))
IGNORED_FIELDS = ("seed",)  # recipe fields that may differ between runs averaged together
IGNORED_SECTIONS = ("track",)  # where a run was logged says nothing about what ran
RunRecord = tuple[dict[str, Any], dict[str, Any]]  # one run read elsewhere: (fields_of(its recipe), its summary)
MAX_LABEL_FIELDS = 2  # differing settings spelled out in a row's label; the note names them all
RUN_COLUMNS = ("recipe", "seed", "test_accuracy", "test_f1", "test_roc_auc", "claimed", "params", "train_s")


@dataclass(frozen=True)
class Stat:
    """One metric over a group's runs: mean, sample std (n >= 2), 95% Student-t interval of the mean (n >= 3)."""

    mean: float
    n: int
    std: float | None = None
    ci: tuple[float, float] | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        """The statistics of `values`, or None when there are none."""
        n = len(values)
        if n == 0:
            return None
        mean = statistics.fmean(values)
        if n == 1:
            return cls(mean, 1)
        std = statistics.stdev(values)
        if n == 2:
            return cls(mean, 2, std)
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        # every metric compared is a fraction: an interval reaching past 0 or 1 is cut there
        return cls(mean, n, std, (max(0.0, mean - half), min(1.0, mean + half)))


@dataclass(frozen=True)
class Claim:
    """The seed's accuracy claim, and our mean over the group's runs on the same metric."""

    metric: str
    claimed: float
    source: str
    achieved: float | None

    @property
    def gap_points(self) -> float | None:
        """Accuracy points we fall short of the claim (negative when above); None when not measured."""
        # rounded so that float noise (0.93 - 0.92 = 0.0100000...09) does not turn 'met' into 'below'
        return None if self.achieved is None else round((self.claimed - self.achieved) * 100, 4)

    @property
    def status(self) -> str:
        """'met' (at most one point worse), 'below' or 'not measured'."""
        if self.gap_points is None:
            return "not measured"
        return "met" if self.gap_points <= TOLERANCE * 100 else "below"


@dataclass(frozen=True)
class Row:
    """One recipe's runs with the same settings but the seed, summarised."""

    recipe: str
    seeds: tuple[Any, ...]
    metrics: dict[str, Stat | None]
    claim: Claim | None
    params: int | None
    train_seconds: float | None
    latency_ms: float | None
    variant: str = ""  # the settings telling these runs from the recipe's other rows, e.g. "train.epochs=1"

    @property
    def n(self) -> int:
        """How many runs the row is over."""
        return len(self.seeds)

    @property
    def label(self) -> str:
        """The recipe, with its variant's settings when it has other rows: 'digits-cnn (train.epochs=1)'."""
        return f"{self.recipe} ({self.variant})" if self.variant else self.recipe


@dataclass(frozen=True)
class Table:
    """The rows in the order their recipes were first seen, and notes on anything odd in the grouping."""

    rows: list[Row]
    notes: list[str]


def load_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The summaries of the runs at `paths`, in order; a path given twice counts once."""
    return [summary for _, summary in _open_runs(paths)]


def _open_runs(paths: Sequence[str | Path]) -> list[tuple[RunDir, dict[str, Any]]]:
    """The distinct runs at `paths` with their summaries, in order."""
    seen, runs = set(), []
    for path in paths:
        key = Path(path).expanduser().resolve()
        if key in seen:
            continue
        seen.add(key)
        run = RunDir.open(path)
        runs.append((run, run.summary()))  # checked: a summary without a recipe is refused there
    return runs


def compare_table(paths: Sequence[str | Path], also: Sequence[RunRecord] = (), notes: Sequence[str] = ()) -> Table:
    """One row per recipe and settings (all but the seed) over the distinct runs at `paths`, and the
    runs read elsewhere (`also`: an MLflow experiment's) with `notes` about them."""
    groups: dict[str, list[RunRecord]] = {}
    records = [(recipe_fields(run), summary) for run, summary in _open_runs(paths)] + list(also)
    for fields, summary in records:
        groups.setdefault(str(summary["recipe"]), []).append((fields, summary))
    rows, notes = [], list(notes)
    for recipe, runs in groups.items():
        variants: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []  # settings -> runs, first seen first
        for fields, summary in runs:
            same = next((members for settings, members in variants if settings == fields), None)
            if same is None:
                variants.append((fields, [summary]))
            else:
                same.append(summary)
        differing = _differing([settings for settings, _ in variants])
        if differing:
            notes.append(f"runs of {recipe} differ in {', '.join(differing)}: kept apart")
        for settings, members in variants:
            row = _row(recipe, members, _variant(settings, differing))
            rows.append(row)
            notes += _notes(row.label, members)
    return Table(rows, notes)


def recipe_fields(run: RunDir) -> dict[str, Any]:
    """The run's resolved recipe (recipe.yaml) as dotted keys, less the fields seeds may differ in."""
    path = run.path / "recipe.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunDirError(f"{path} is unreadable ({exc.strerror}); re-run the recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RunDirError(f"{path} is not valid YAML{where}; re-run the recipe") from None
    if not isinstance(raw, dict):
        raise RunDirError(f"{path} holds no recipe mapping; re-run the recipe")
    return fields_of(raw)


def fields_of(recipe: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe mapping as dotted keys, less the fields seeds may differ in and the sections
    that say nothing about what ran."""
    return {k: v for k, v in _flatten(recipe).items()
            if k not in IGNORED_FIELDS and k.split(".")[0] not in IGNORED_SECTIONS}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as {dotted.key: leaf} (list items by index, as --set names them)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None or not node:  # a leaf, or an empty section / list (kept, so [] differs from [x])
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


def _differing(settings: list[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values are not the same in every one of `settings`, in first-seen order."""
    keys = list(dict.fromkeys(k for fields in settings for k in fields))
    return [k for k in keys if len({_shown(fields.get(k)) for fields in settings}) > 1 or
            any(k not in fields for fields in settings)]


def _variant(settings: dict[str, Any], differing: list[str]) -> str:
    """'train.epochs=1, train.batch_size=64, +1 more': a variant's values of the differing keys."""
    parts = [f"{k}={_shown(settings.get(k))}" for k in differing[:MAX_LABEL_FIELDS]]
    if len(differing) > MAX_LABEL_FIELDS:
        parts.append(f"+{len(differing) - MAX_LABEL_FIELDS} more")
    return ", ".join(parts)


def _shown(value: Any) -> str:
    """A recipe value as --set would take it: strings bare, others as JSON (null for unset)."""
    return value if isinstance(value, str) else json.dumps(value)


def render(table: Table, fmt: Literal["md", "csv", "html"]) -> str:
    """The table as GitHub markdown, CSV (raw numbers, one column each) or an HTML <table> fragment."""
    renderers = {"md": _render_md, "csv": _render_csv, "html": _render_html}
    if fmt not in renderers:
        raise ConfigError(f"unknown table format {fmt!r}; choose md, csv or html")
    return renderers[fmt](table)


def compare_runs(paths: Sequence[str | Path], fmt: Literal["md", "csv", "html"] = "md") -> str:
    """The results table over the runs at `paths`, rendered as `fmt`."""
    return render(compare_table(paths), fmt)


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    """The finite values of `key` over the runs that have it."""
    values = [run.get(key) for run in runs]
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def _mean(values: list[float]) -> float | None:
    """The mean, or None for no values."""
    return statistics.fmean(values) if values else None


def _claim(runs: list[dict[str, Any]]) -> Claim | None:
    """The first run's accuracy claim, with the mean achieved over every run that carries it."""
    for metric in CLAIM_METRICS:
        found = [(run["expect"], c) for run in runs for c in run.get("expect", {}).get("claims", [])
                 if c.get("metric") == metric]
        if found:
            expect, first = found[0]
            achieved = _values([c for _, c in found], "achieved")
            return Claim(metric, float(first["claimed"]), str(expect.get("source") or ""), _mean(achieved))
    return None


def _row(recipe: str, runs: list[dict[str, Any]], variant: str = "") -> Row:
    """The summary row of one recipe's runs with the same settings."""
    params = [run["params"] for run in runs if "params" in run]
    return Row(recipe, tuple(run.get("seed") for run in runs),
               {name: Stat.of(_values(runs, key)) for name, key in METRICS.items()}, _claim(runs),
               params[0] if params else None, _mean(_values(runs, "train_seconds")), _mean(_values(runs, "latency_ms")),
               variant)


def _notes(recipe: str, runs: list[dict[str, Any]]) -> list[str]:
    """Runs of one row sharing a seed, or differing in size (same recipe.yaml, other code or data)."""
    notes = [f"{count} runs of {recipe} share seed {seed}"
             for seed, count in Counter(run.get("seed") for run in runs).items() if count > 1]
    sizes = list(dict.fromkeys(run["params"] for run in runs if "params" in run))
    if len(sizes) > 1:
        notes.append(f"runs of {recipe} differ in params ({', '.join(f'{p:,}' for p in sizes)}); showing the first")
    return notes


def _stat_cell(stat: Stat | None) -> str:
    """'mean', 'mean ± std' or 'mean ± std [ci_low, ci_high]'; '-' when not measured."""
    if stat is None:
        return "-"
    cell = f"{stat.mean:.4f}"
    if stat.std is not None:
        cell += f" ± {stat.std:.4f}"
    if stat.ci is not None:
        cell += f" [{stat.ci[0]:.4f}, {stat.ci[1]:.4f}]"
    return cell


def _latency_cell(ms: float | None) -> str:
    """Three significant figures, whole milliseconds from 100 up."""
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def _claim_cells(claim: Claim | None) -> tuple[str, str]:
    """The 'claimed' and 'vs claim' cells: '0.99 (S0.1)' and 'met' / 'below by 2.3 points'."""
    if claim is None:
        return "-", "-"
    split = " val" if claim.metric == "val_accuracy" else ""
    claimed = f"{claim.claimed:g}{split}" + (f" ({claim.source})" if claim.source else "")
    status = f"below by {claim.gap_points:.1f} points" if claim.status == "below" else claim.status
    return claimed, status


def _cells(row: Row) -> dict[str, str]:
    """A row's display cells, keyed as COLUMNS."""
    claimed, status = _claim_cells(row.claim)
    return {"recipe": row.label, "n": str(row.n), **{name: _stat_cell(s) for name, s in row.metrics.items()},
            "claimed": claimed, "status": status, "params": "-" if row.params is None else f"{row.params:,}",
            "train_s": "-" if row.train_seconds is None else f"{row.train_seconds:.1f}",
            "latency": _latency_cell(row.latency_ms)}


def _markdown(rows: list[list[str]], right: Sequence[bool]) -> list[str]:
    """Markdown table lines (header first) padded to one width per column; `right` columns right-aligned."""
    rows = [[cell.replace("|", r"\|") for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(right))]
    lines = ["| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |"
             for row in rows]
    sep = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|"
    return [lines[0], sep, *lines[1:]]


def _render_md(table: Table) -> str:
    """The table, then its notes as a list."""
    cells = [_cells(row) for row in table.rows]
    lines = _markdown([[h for _, h, _ in COLUMNS], *([c[k] for k, _, _ in COLUMNS] for c in cells)],
                      [r for _, _, r in COLUMNS])
    return "\n".join(lines + ([""] + [f"- {note}" for note in table.notes] if table.notes else []))


def _render_csv(table: Table) -> str:
    """One line per row, every number in its own column; the settings a row differs in last (variant,
    empty when its recipe has one row); no notes, so the file stays one table."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["recipe", "n", "seeds",
                     *(f"{m}_{part}" for m in METRICS for part in ("mean", "std", "ci_low", "ci_high")),
                     "claim_metric", "claimed", "claim_source", "claim_status", "claim_gap_points",
                     "params", "train_seconds_mean", "latency_ms_mean", "variant"])
    for row in table.rows:
        numbers: list[float | None] = []
        for stat in row.metrics.values():
            numbers += [None] * 4 if stat is None else [stat.mean, stat.std, *(stat.ci or (None, None))]
        c = row.claim
        claim = [c.metric, c.claimed, c.source, c.status, c.gap_points] if c is not None else [None] * 5
        writer.writerow([row.recipe, row.n, " ".join(map(str, row.seeds)), *numbers, *claim,
                         row.params, row.train_seconds, row.latency_ms, row.variant])
    return out.getvalue()


def _render_html(table: Table) -> str:
    """A <table class="dlkit-compare"> fragment, cells escaped, notes in its <tfoot>."""
    def cell(tag: str, key: str, right: bool, text: str, extra: str = "") -> str:
        """One escaped th/td with its column's classes."""
        return f'<{tag} class="col-{key}{" num" if right else ""}{extra}">{html.escape(text)}</{tag}>'

    lines = ['<table class="dlkit-compare">', "<thead>", "<tr>"
             + "".join(cell("th", k, r, h) for k, h, r in COLUMNS) + "</tr>", "</thead>", "<tbody>"]
    for row in table.rows:
        cells = _cells(row)
        status = f" status-{row.claim.status.replace(' ', '-')}" if row.claim is not None else ""
        lines.append("<tr>" + "".join(cell("td", k, r, cells[k], status if k == "status" else "")
                                      for k, _, r in COLUMNS) + "</tr>")
    lines.append("</tbody>")
    if table.notes:
        lines += ["<tfoot>", *(f'<tr><td class="note" colspan="{len(COLUMNS)}">{html.escape(n)}</td></tr>'
                               for n in table.notes), "</tfoot>"]
    return "\n".join(lines + ["</table>"])


def compare_rows(paths: Sequence[str | Path], also: Sequence[RunRecord] = ()) -> list[dict[str, str]]:
    """One row of formatted cells per run (the per-run table `markdown_table` prints), the runs at
    `paths` first, then those read elsewhere (`also`)."""
    rows = []
    for s in load_runs(paths) + [summary for _, summary in also]:
        claims = s.get("expect", {}).get("claims", [])
        claimed = ", ".join(f"{c['metric'].removeprefix('test_')} {c['claimed']}" for c in claims) or "-"
        rows.append({
            "recipe": s["recipe"], "seed": "-" if s.get("seed") is None else str(s["seed"]),  # an ensemble has none
            **{k: f"{s[k]:.4f}" if k in s else "-" for k in ("test_accuracy", "test_f1", "test_roc_auc")},
            "claimed": claimed, "params": f"{s['params']:,}", "train_s": f"{s['train_seconds']:.1f}",
        })
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    """A GitHub-style markdown table of `compare_rows`' rows, with aligned columns."""
    return "\n".join(_markdown([list(RUN_COLUMNS), *([r[c] for c in RUN_COLUMNS] for r in rows)],
                               [False] * len(RUN_COLUMNS)))
