"""report.html: one self-contained page about a finished run, read from its run directory only.

Plots are embedded as base64 PNGs and the style is inline: no scripts, no network, every text
escaped. A piece that is missing (no plots yet, no evaluation.json) is said so in its section.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import yaml

from dlkit.evaluate.plots import MIN_BIN_COUNT
from dlkit.files import write_atomic
from dlkit.rundir import RunDir

# the report's plots in the order shown, with their captions; other PNGs in plots/ follow, by name
PLOT_CAPTIONS = {
    "curves": "Training curves: loss and accuracy per epoch on the train and validation splits.",
    "loss_curve": "Loss (mean squared error) per epoch.",
    "fit_line": "The learned line y = w x + b over the train and test points.",
    "numpy_vs_torch": "The same network trained in NumPy and in PyTorch from the same start: training loss per epoch.",
    "confusion_counts": "Confusion matrix of the test split (rows: true class, columns: predicted class).",
    "confusion_normalized": "Confusion matrix with each row divided by its class's test examples: "
                            "recall on the diagonal.",
    "roc": "ROC curves on the test split, with their AUC.",
    "pr": "Precision-recall curves on the test split, with average precision.",
    "reliability": ("Reliability diagram: accuracy per confidence bin; the red line from each bar to its bin's mean "
                    f"confidence is the miscalibration. Bins of fewer than {MIN_BIN_COUNT} test examples are faded: "
                    "too few to judge."),
    "class_distribution": "Examples per class in each split.",
    "samples": "The first test examples: true / predicted (confidence); mistakes in red.",
    "confident_mistakes": "The test mistakes the model made with the highest confidence.",
    "gradcam": "Grad-CAM: the image regions behind each predicted class (red: most).",
    "attention_rollout": "Attention rollout: how much of each image patch reaches the class token through every "
                         "block's attention (red: most); where the model looks, the same map for every class.",
    "token_importance": "Token importance by occlusion: the drop in the predicted class's probability when a token "
                        "is replaced by the unknown-word id (green: supports the prediction, red: against it).",
}
# recipe settings that do nothing for a kind of input (the bundle's input_kind), left out of the page:
# only image loaders read image_size / channels / bad_files / augment, only text loaders data.text,
# tabular and image data are normalised (text is not), and channels_last concerns conv layers on images
NOT_APPLICABLE = {
    "image": ("data.text",),
    "tabular": ("data.text", "data.augment", "data.image_size", "data.channels", "data.bad_files",
                "train.channels_last"),
    "tokens": ("data.augment", "data.image_size", "data.channels", "data.normalize", "data.bad_files",
               "train.channels_last"),
}
SECTIONS = ("Summary", "Claim vs ours", "Plots", "Per-class metrics", "Recipe", "Environment", "Data")
ENSEMBLE_SECTION = "Ensemble members"
ENSEMBLE_METRICS = (("test_accuracy", "accuracy"), ("test_loss", "log loss"), ("test_ece", "ECE"), ("test_f1", "F1"),
                    ("test_mse", "MSE"), ("test_mae", "MAE"), ("test_r2", "R2"))
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.unmet td { background: #fde2e2; } .flag { color: #b00020; font-weight: bold; } .ok { color: #1b7f3b; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
.missing { color: #777; font-style: italic; } code { font-size: 0.95em; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html (atomically) from the run's files and plots; return its path."""
    run = RunDir.open(run_dir)
    summary, bundle, recipe = run.summary(), run.bundle(), run.recipe()
    evaluation = run.read_json("evaluation.json") if (run.path / "evaluation.json").is_file() else None
    left_out = NOT_APPLICABLE.get(bundle.get("input_kind"), ())
    description, weights_note = _description(recipe.description, recipe.model.weights)
    bodies = {
        "Summary": _summary(summary),
        "Claim vs ours": _claims(summary.get("expect") or {}),
        "Plots": _plots(run.path / "plots"),
        "Per-class metrics": _per_class(evaluation, bundle),
        "Recipe": _recipe(run.path / "recipe.yaml", left_out, bundle.get("input_kind"), description),
        "Environment": _table([*bundle.get("versions", {}).items(), ("device", summary.get("device")),
                               ("precision", summary.get("precision")), ("seed", summary.get("seed")),
                               ("created", summary.get("created"))]),
        "Data": _data(_without(recipe.data.model_dump(exclude_none=True), left_out, "data."), bundle, summary),
    }
    sections = SECTIONS
    if isinstance(summary.get("ensemble"), dict):  # an ensemble run: its members beside it, after the summary
        bodies[ENSEMBLE_SECTION] = _ensemble(summary)
        sections = (SECTIONS[0], ENSEMBLE_SECTION, *SECTIONS[1:])
    title = f"dlkit report: {recipe.name}"
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_esc(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_esc(recipe.name)}</h1>\n"
            f"<p>{_esc(description)}</p>\n{weights_note}"
            + "".join(f"<h2>{_esc(name)}</h2>\n{bodies[name]}\n" for name in sections)
            + "</body>\n</html>\n")
    return write_atomic(run.path / "report.html", lambda f: f.write(page.encode("utf-8")))


def _description(text: str, weights: str | None) -> tuple[str, str]:
    """The recipe's description, and a flag paragraph when it had to be corrected: a run with random
    initial weights (model.weights: none) of a recipe written for ImageNet's must not claim them."""
    if weights is not None or not re.search(r"imagenet", text, re.IGNORECASE):
        return text, ""
    note = ("This run starts from random weights (model.weights: none), not the ImageNet weights its recipe "
            "was written for; the description above says so.")
    return re.sub(r"imagenet", "random weights", text, flags=re.IGNORECASE), f'<p class="flag">{_esc(note)}</p>\n'


def _recipe(path: Path, left_out: tuple[str, ...], kind: str | None, description: str) -> str:
    """recipe.yaml as run, less the settings that do not apply to the run's kind of input (named below
    it), with the description as the page corrected it."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):  # not a mapping: shown as it is
        return f"<pre>{_esc(path.read_text(encoding='utf-8'))}</pre>"
    shown = {section: _without(value, left_out, f"{section}.") if isinstance(value, dict) else value
             for section, value in raw.items()}
    if "description" in shown:
        shown["description"] = description
    dropped = [key for key in left_out if _has(raw, key)]
    note = (f"<p class=\"missing\">Not shown: {', '.join(dropped)} (no effect on {kind} data).</p>"
            if dropped else "")
    return f"<pre>{_esc(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True))}</pre>{note}"


def _without(section: dict[str, Any], left_out: tuple[str, ...], prefix: str) -> dict[str, Any]:
    """`section` less the keys that `left_out` names under `prefix` (e.g. 'data.')."""
    return {k: v for k, v in section.items() if f"{prefix}{k}" not in left_out}


def _has(raw: dict[str, Any], dotted: str) -> bool:
    """Whether the two-level key `dotted` (section.field) is in `raw`."""
    section, _, field = dotted.partition(".")
    return isinstance(raw.get(section), dict) and field in raw[section]


def _esc(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """A number printed for people (4 significant digits, thousands separated); anything else as text."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: Any) -> str:
    """A table cell; numbers right-aligned."""
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f"<td class=\"num\">{_esc(_fmt(value))}</td>" if numeric else f"<td>{_esc(_fmt(value))}</td>"


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] = (), row_class: list[str] | None = None) -> str:
    """An HTML table: an optional header, then one row per tuple (a class per row when given)."""
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    opens = [f'<tr class="{c}">' if c else "<tr>" for c in row_class or [""] * len(rows)]
    body = "".join(tr + "".join(_cell(v) for v in row) + "</tr>" for row, tr in zip(rows, opens))
    return f"<table>{head}{body}</table>"


def _missing(text: str) -> str:
    """A note that a section has nothing to show, and why."""
    return f"<p class=\"missing\">{_esc(text)}</p>"


def _summary(summary: dict[str, Any]) -> str:
    """Test metrics, then size, cost and run settings; the run's notes below."""
    skip = {"n_train", "n_val", "n_test", "params", "trainable_params", "train_seconds", "epochs_run", "seed",
            "latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_passes"}
    metrics = [(k, v) for k, v in summary.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and k not in skip]
    get = summary.get
    rows = [*metrics,
            ("examples (train / val / test)", f"{_fmt(get('n_train'))} / {_fmt(get('n_val'))} / {_fmt(get('n_test'))}"),
            ("parameters (trainable)", f"{_fmt(get('params'))} ({_fmt(get('trainable_params'))})"),
            ("train time (s)", get("train_seconds")), ("epochs run", get("epochs_run")),
            ("weights tested", get("tested_weights") or "—"),
            ("latency (ms per example, batch of 1)", _latency(summary)),
            ("device", get("device")), ("precision", get("precision")), ("seed", get("seed"))]
    notes = get("notes") or []
    listed = "<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>" if notes else ""
    return _table(rows, ("", "value")) + listed


def _ensemble(summary: dict[str, Any]) -> str:
    """Each member's test metrics on the ensemble's test split, their mean ± std, and the ensemble's."""
    record = summary["ensemble"]
    keys = [(k, name) for k, name in ENSEMBLE_METRICS if k in summary]
    mean, std = record.get("member_mean", {}), record.get("member_std", {})
    rows = [(f"{m.get('recipe')} (seed {m.get('seed')})", m.get("run"), m.get("weight"), *(m.get(k) for k, _ in keys))
            for m in record.get("members", [])]
    rows.append(("members: mean ± std", "", None, *(f"{_fmt(mean.get(k))} ± {_fmt(std.get(k))}" for k, _ in keys)))
    rows.append((f"ensemble ({record.get('method')})", "this run", 1.0, *(summary.get(k) for k, _ in keys)))
    how = ("the mean of the members' probabilities" if record.get("method") == "mean"
           else "the members' weighted votes (ties broken by the mean probability)")
    return (f"<p>Predicts {_esc(how)}. Every row is measured on the same test split, in one pass.</p>"
            + _table(rows, ("member", "run", "weight", *(name for _, name in keys))))


def _latency(summary: dict[str, Any]) -> str:
    """`0.21 median (p10 0.2, p90 0.34; 50 passes)`; a run from before the spread was kept: the median."""
    median = summary.get("latency_ms")
    if median is None or summary.get("latency_ms_p10") is None:
        return _fmt(median)
    return (f"{_fmt(median)} median (p10 {_fmt(summary['latency_ms_p10'])}, p90 {_fmt(summary['latency_ms_p90'])}; "
            f"{summary.get('latency_passes')} passes)")


def _claims(expect: dict[str, Any]) -> str:
    """The write-up's claims beside our values; each claim not met is flagged."""
    claims = expect.get("claims") or []
    if not claims:
        return _missing("The recipe states no claim to compare with.")
    # the claim's training-set size beside ours: a claim made on 60,000 images is not matched on 4,000
    sizes = f"<p>Training set: {_esc(expect['training_set'])}.</p>" if expect.get("training_set") else ""
    unmet = [c for c in claims if c.get("status") != "met"]
    mark = {c["metric"]: "✓ met" if c.get("status") == "met" else f"✗ {c.get('status')}" for c in claims}
    rows = [(c["metric"], c.get("claimed"), c.get("achieved"), c.get("delta"), mark[c["metric"]]) for c in claims]
    source = f"Source: {expect.get('source') or 'unnamed'}." + (f" {expect['note']}" if expect.get("note") else "")
    verdict = (f"<p class=\"flag\">✗ {len(unmet)} of {len(claims)} claims not met.</p>" if unmet
               else f"<p class=\"ok\">✓ all {len(claims)} claims met.</p>")
    table = _table(rows, ("metric", "claimed", "ours", "ours − claimed", "status"),
                   ["unmet" if c.get("status") != "met" else "" for c in claims])
    return f"<p>{_esc(source)}</p>{sizes}{verdict}{table}"


def _plots(folder: Path) -> str:
    """Every PNG in plots/, embedded, with its caption."""
    found = {p.stem: p for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}
    if not found:
        return _missing("No plots: run build_report (dlkit report RUN) to draw them.")
    order = [n for n in PLOT_CAPTIONS if n in found] + [n for n in found if n not in PLOT_CAPTIONS]
    figures = []
    for name in order:
        data = base64.b64encode(found[name].read_bytes()).decode("ascii")
        caption = PLOT_CAPTIONS.get(name, name.replace("_", " "))
        figures.append(f"<figure id=\"plot-{_esc(name)}\"><img src=\"data:image/png;base64,{data}\" "
                       f"alt=\"{_esc(name)}\"><figcaption>{_esc(caption)}</figcaption></figure>")
    return "\n".join(figures)


def _per_class(evaluation: dict[str, Any] | None, bundle: dict[str, Any]) -> str:
    """Precision, recall, F1 and support per class, with the macro and weighted averages."""
    if evaluation is None:
        why = ("a regression run has no classes" if bundle.get("task") == "regression"
               else "no evaluation.json: run build_report (dlkit report RUN) to compute it")
        return _missing(f"No per-class metrics: {why}.")
    ev, classes = evaluation, bundle.get("classes") or []
    names = [classes[i] if i < len(classes) else str(i) for i in range(len(ev["support"]))]
    rows = [(n, p, r, f, s) for n, p, r, f, s in zip(names, ev["precision"], ev["recall"], ev["f1"], ev["support"])]
    rows += [("macro average", ev["macro_precision"], ev["macro_recall"], ev["macro_f1"], ev["n"]),
             ("weighted F1", None, None, ev["weighted_f1"], ev["n"])]
    overall = [("accuracy", ev["accuracy"]), ("log loss", ev["log_loss"]), ("ROC AUC", ev["roc_auc"]),
               ("expected calibration error", ev["ece"]),
               *((f"top-{k} accuracy", v) for k, v in ev.get("top_k", {}).items())]
    return (_table(rows, ("class", "precision", "recall", "F1", "support"))
            + _table(overall, ("test split", "value")))


def _data(data_cfg: dict[str, Any], bundle: dict[str, Any], summary: dict[str, Any]) -> str:
    """Where the data came from (the recipe's data section) and the fingerprint of the exact tensors."""
    source = [(f"data.{k}", v) for k, v in data_cfg.items() if not isinstance(v, dict | list)]
    described = [("source", summary["data_source"])] if summary.get("data_source") else []
    rows = [("fingerprint (sha256)", bundle.get("data_fingerprint")), *described, *source,
            ("input", f"{bundle.get('input_kind')} {bundle.get('input_shape')}"), ("task", bundle.get("task")),
            ("classes", ", ".join(map(str, bundle.get("classes") or [])) or "—")]
    return _table(rows, ("", "value"))

