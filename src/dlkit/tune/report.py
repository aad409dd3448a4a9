"""What a study leaves in runs/<study>/ besides its trials: study.json (every trial), best.yaml (the best
trial's recipe, which `dlkit run` trains again) and study.html (self-contained: Optuna's plots drawn
with matplotlib, embedded as base64 PNGs, the trials' table, the best recipe); and the table the
command prints."""
from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from dlkit.errors import error_line
from dlkit.files import write_json, write_text
from dlkit.space import shown
from dlkit.tune.settings import TuneSettings
from dlkit.tune.study import shown_url

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
          TrialState.WAITING: "waiting"}
SHOWN_TESTS = ("test_accuracy", "test_f1", "test_roc_auc", "test_mse")  # the best trial's test metrics on the page
LOST = "its process stopped before it finished (killed, or the machine went away)"
PLOTS = {
    "history": "Optimisation history: each completed trial's value and the best so far.",
    "importances": "Parameter importances (fANOVA over the completed trials): how much of the value's variance "
                   "each searched field explains.",
    "parallel": "Parallel coordinates: every completed trial as a line through its values, coloured by its value.",
}
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #e3f4e8; } figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
.missing { color: #777; font-style: italic; }
"""


def trial_rows(study: optuna.Study, settings: TuneSettings) -> list[dict[str, Any]]:
    """One row per trial of the study, in order (trials dropped as surplus, or that ended the study on
    an error every trial would have, are left out)."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = t.user_attrs
        if attrs.get("surplus") or "aborted" in attrs:
            continue
        state = STATES.get(t.state) or ("interrupted" if attrs.get("interrupted") else "failed")
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete is not None and t.datetime_start is not None else None)
        note = attrs.get("note") or attrs.get("error") or (LOST if state == "failed" else None)
        if state == "interrupted":
            note = "stopped by Ctrl-C or SIGTERM; not counted"
        rows.append({"trial": t.number, "state": state,
                     "params": {k: settings.space[k].value_of(t.params[k]) for k in settings.space if k in t.params},
                     "value": t.value if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                     "seconds": round(seconds, 2) if seconds is not None else None,
                     "test": attrs.get("test") or {}, "run_dir": attrs.get("run_dir"), "host": attrs.get("host"),
                     "as_given": bool(attrs.get("as_given")), "note": note})
    return rows


def trial_line(t: FrozenTrial, settings: TuneSettings) -> str:
    """`trial 3: train.optimizer.lr=0.00312 -> val_accuracy 0.9611 (complete, 4.2 s)`, and the like."""
    values = ", ".join(f"{k}={shown(settings.space[k].value_of(v))}" for k, v in t.params.items())
    seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
               if t.datetime_complete is not None and t.datetime_start is not None else 0.0)
    head = f"trial {t.number}: {values or '(no values drawn)'}"
    if t.state == TrialState.COMPLETE:
        return f"{head} -> {settings.metric} {t.value:.4f} ({seconds:.1f} s)"
    if t.state == TrialState.PRUNED:
        return f"{head} -> {t.user_attrs.get('note', 'pruned')} ({seconds:.1f} s)"
    reason = t.user_attrs.get("error") or ("interrupted" if t.user_attrs.get("interrupted") else LOST)
    return f"{head} -> failed: {reason}"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed trial with the best value, or None while none has completed."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if done else None


def table(rows: list[dict[str, Any]], settings: TuneSettings) -> str:
    """The trials as a Markdown table: trial, each searched field, the metric, state, seconds."""
    header = ["trial", *settings.space, settings.metric, "state", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        mark = " (as given)" if row["as_given"] else ""
        cells = [f"{row['trial']}{mark}", *(shown(row["params"][k]) if k in row["params"] else "-" for k in settings.space),
                 f"{row['value']:.4f}" if row["value"] is not None else "-", row["state"],
                 f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_recipe_text(study: optuna.Study, settings: TuneSettings, best: FrozenTrial) -> str:
    """best.yaml: the recipe the best trial ran (the base recipe with its values), with a header."""
    values = {k: settings.space[k].value_of(best.params[k]) for k in settings.space}
    recipe = settings.trial_recipe(values, origin=f"trial {best.number}")
    drawn = ", ".join(f"{k} = {shown(v)}" for k, v in values.items())
    head = (f"# the best trial of study '{settings.study}': trial {best.number}, {settings.metric} {best.value:.4f}\n"
            f"# its values: {drawn}\n"
            f"# `dlkit run` on this file trains it again (its run: {best.user_attrs.get('run_dir', '?')})\n")
    return head + yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


def write_study_files(study: optuna.Study, settings: TuneSettings, budget: int,
                      plots: bool = True) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write study.json, best.yaml (once a trial has completed) and study.html into the study folder;
    returns their paths and study.json's content."""
    folder = settings.folder
    rows = trial_rows(study, settings)
    best = best_trial(study)
    written: dict[str, Path] = {}
    best_text = best_recipe_text(study, settings, best) if best is not None else None
    if best_text is not None:
        written["best"] = write_text(folder / "best.yaml", best_text)
    summary = {"study": settings.study, "storage": shown_url(settings.storage), "recipe": settings.recipe.name,
               "metric": settings.metric, "direction": settings.direction, "pruner": settings.pruner,
               "budget": budget, "space": {k: str(d) for k, d in settings.space.items()},
               "counts": {s: sum(r["state"] == s for r in rows) for s in
                          ("complete", "pruned", "failed", "interrupted", "running", "waiting")},
               "best": _best_row(rows, best), "trials": rows}
    written["json"] = write_json(folder / "study.json", summary)
    page = _page(study, settings, summary, best_text, plots)
    written["html"] = write_text(folder / "study.html", page)
    return written, summary


def _best_row(rows: list[dict[str, Any]], best: FrozenTrial | None) -> dict[str, Any] | None:
    return next((r for r in rows if best is not None and r["trial"] == best.number), None)


# ---- study.html ----------------------------------------------------------------------------------

def _page(study: optuna.Study, settings: TuneSettings, summary: dict[str, Any], best_text: str | None,
          plots: bool) -> str:
    best = summary["best"]
    facts = [("recipe", settings.recipe.name), ("storage", summary["storage"]),
             ("metric", f"{settings.metric} ({settings.direction})"), ("pruner", settings.pruner),
             ("budget", f"{summary['budget']} trials"),
             ("trials", ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n) or "none yet")]
    if best is not None:
        tests = ", ".join(f"{k} {v:.4f}" for k, v in best["test"].items() if k in SHOWN_TESTS)
        facts.append(("best", f"trial {best['trial']}: {settings.metric} {best['value']:.4f}"
                               + (f" ({tests})" if tests else "") + f", {best['run_dir']}"))
    body = [f"<h1>Study {_esc(settings.study)}</h1>", _table(facts),
            "<h2>Search space</h2>", _table([(k, str(d)) for k, d in settings.space.items()], ("field", "distribution")),
            "<h2>Plots</h2>", _plots(study, settings.metric) if plots else _missing("Plots were not drawn."),
            "<h2>Trials</h2>", _trials(summary["trials"], settings, best),
            "<h2>Best recipe</h2>",
            f"<p>best.yaml; <code>dlkit run</code> on it trains the best trial again.</p><pre>{_esc(best_text)}</pre>"
            if best_text is not None else _missing("No trial has completed yet.")]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>dlkit study: {_esc(settings.study)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _plots(study: optuna.Study, metric: str) -> str:
    """Optuna's three plots through its matplotlib backend, each a base64 PNG (or why it is missing)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: draw into memory only
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if completed < 2:
        return _missing(f"The plots need two completed trials; the study has {completed}.")
    draw = {"history": lambda: vis.plot_optimization_history(study, target_name=metric),
            # a fixed seed: the importances of one study are the same every time they are drawn
            "importances": lambda: vis.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                              target_name=metric),
            "parallel": lambda: vis.plot_parallel_coordinate(study, target_name=metric)}
    parts = []
    for name, make in draw.items():
        try:
            # Optuna's plots switch pyplot's style: the context puts every setting back for dlkit's own plots
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = make()
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
                figure.set_size_inches(9, 5)
                buffer = io.BytesIO()
                figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
                plt.close(figure)
        except Exception as exc:  # a plot that cannot be drawn must not cost the study its other files
            parts.append(_missing(f"{PLOTS[name]} Not drawn: {error_line(exc)}"))
            continue
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        parts.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{_esc(PLOTS[name])}</figcaption></figure>")
    return "\n".join(parts)


def _trials(rows: list[dict[str, Any]], settings: TuneSettings, best: dict[str, Any] | None) -> str:
    hosts = len({r["host"] for r in rows if r["host"]}) > 1  # a study shared by machines: say where each ran
    header = ("trial", *settings.space, settings.metric, "state", "seconds", *(("host",) if hosts else ()), "run", "note")
    lines = []
    for r in rows:
        cls = ' class="best"' if best is not None and r["trial"] == best["trial"] else ""
        text = [str(r["trial"]) + (" (as given)" if r["as_given"] else ""),
                *(shown(r["params"][k]) if k in r["params"] else "-" for k in settings.space),
                f"{r['value']:.4f}" if r["value"] is not None else "-", r["state"],
                f"{r['seconds']:.1f}" if r["seconds"] is not None else "-", *((r["host"] or "",) if hosts else ())]
        cells = [*map(_esc, text), _run_link(r["run_dir"], settings.folder), _esc(r["note"] or "")]
        lines.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"
    return f"<table>{head}{''.join(lines)}</table>" if rows else _missing("No trial yet.")


def _run_link(run_dir: str | None, folder: Path) -> str:
    """The trial's run directory, linked to its report.html when that is here, beside study.html."""
    if not run_dir:
        return ""
    name = Path(run_dir).name
    page = folder / name / "report.html"
    return f'<a href="{_esc(name)}/report.html">{_esc(name)}</a>' if page.is_file() else _esc(name)


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] = ()) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _missing(text: str) -> str:
    return f'<p class="missing">{_esc(text)}</p>'


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)
