"""`dlkit ensemble RUN RUN...`: finished runs of one task, classes and test split combined into a run of their own.

The ensemble is tested on the shared test split (loaded through the first member's recipe and checked
against its data fingerprint) and written as an ordinary run directory: its bundle names the model
family `ensemble` (dlkit.models.ensemble) with every member's architecture, its weights file holds
every member's tensors, so `predict`, `evaluate`, `report`, `export`, `serve` and `compare` read it as
any other run. summary.json adds `ensemble`: the method, each member's weight and its test metrics,
measured in the same pass as the ensemble's, and the members' mean and std.
"""
from __future__ import annotations

import hashlib
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dlkit.config import ModelCfg, Recipe
from dlkit.data import DataBundle
from dlkit.data.bundle import TensorSplit
from dlkit.engine.checkpoint import load_run_model, save_weights
from dlkit.engine.loop import History, predict_split
from dlkit.engine.outcome import RunResult, bundle_meta, summarize_run
from dlkit.errors import DlkitError, error_line
from dlkit.evaluate.metrics import classification_metrics
from dlkit.evaluate.predictions import evaluation_notes, measure_test, predict_test
from dlkit.evaluate.retest import load_run
from dlkit.models.ensemble import METHODS, Ensemble
from dlkit.rundir import RunDir, check_out

# what members must share, with the words an error uses for it
ALIKE = (("task", "task"), ("classes", "classes"), ("input_kind", "kind of input"), ("input_shape", "input shape"),
         ("input_dtype", "input dtype"), ("preprocessing", "preprocessing"))
TABLE_METRICS = (("test_accuracy", "accuracy"), ("test_loss", "log loss"), ("test_ece", "ECE"), ("test_f1", "F1"))
CPU = torch.device("cpu")


class EnsembleError(DlkitError):
    """Runs that cannot be ensembled (different tasks, classes, inputs or test splits), or bad options."""


def build_ensemble(runs: Sequence[str | Path], *, weights: Sequence[float] | None = None, method: str = "mean",
                   out: str | Path | None = None, runs_root: str | Path = "runs",
                   report: bool | None = None) -> RunResult:
    """Ensemble the finished `runs` (`weights`: one positive number each, default equal; `method`: mean
    of probabilities or vote), test it on their shared test split and write it as a run directory
    (`out`, else runs_root/<recipe>-ensemble-<time>); refused in one line when the runs differ."""
    from dlkit.runner import report_default

    report = report_default() if report is None else report
    if method not in METHODS:
        raise EnsembleError(f"--method must be mean or vote, got '{method}'")
    members = open_members(runs)
    scaled = check_weights(weights, len(members))
    bundles = [member.verify() for member in members]
    check_alike(members, bundles)
    task = bundles[0]["task"]
    if method == "vote" and task == "regression":
        raise EnsembleError("--method vote needs classes; a regression ensemble averages its members' values "
                            "(--method mean)")
    check_out(out, runs_root)  # before any data or weights are loaded
    _, first_model, data = load_run(members[0].path)
    notes = check_test_split(members, bundles, data)
    models = [first_model, *(load_run_model(member) for member in members[1:])]
    recipes = [member.recipe() for member in members]
    recipe = ensemble_recipe(recipes, bundles, weights, method)
    # built from the weights as bundle.json records them, so a rebuilt ensemble computes the same bits
    model = Ensemble(models, weights if weights is not None else [1.0] * len(models), method, task).eval()

    batch = recipe.train.eval_batch_size
    outputs = [predict_split(m, data.test, device=CPU, batch_size=batch) for m in models]
    scores = [member_metrics(m, out, data, batch) for m, out in zip(models, outputs)]
    with torch.no_grad():
        combined = model.combine(torch.stack(outputs))
    test, predictions = measure_test(model, data, batch, combined)
    notes += evaluation_notes(predictions, data.classes)
    summaries = [member.summary() for member in members]
    history = History(notes=notes, train_seconds=sum(s.get("train_seconds") or 0.0 for s in summaries))
    summary = summarize_run(recipe, data, model, history, test, CPU, "fp32") | {
        "seed": None, "epochs_run": None, "tested_weights": "each member's, as its run tested them",
        "ensemble": ensemble_record(members, recipes, summaries, scaled, method, scores)}

    run = RunDir.create(recipe, out, runs_root)
    try:
        run.finish(lambda path: save_weights(model, path), bundle_meta(recipe, data, model), summary)
    except BaseException as exc:
        run.mark("failed", error_line(exc))
        raise
    if report:
        from dlkit.evaluate.report import report_after_run

        report_after_run(run.path, model, data, predictions)
    return RunResult(run.path, summary, [])


def shared_split(recipe: Recipe) -> Recipe:
    """The recipe with `data.split_seed` set (to its seed, unless set already), so that its seeds differ in
    initialisation and batch order but train and test on the same examples, as ensemble members must."""
    if recipe.data.split_seed is not None:
        return recipe
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"split_seed": recipe.seed})})


def open_members(runs: Sequence[str | Path]) -> list[RunDir]:
    """The finished runs, each given once, at least two."""
    if len(runs) < 2:
        raise EnsembleError(f"an ensemble needs at least two runs, got {len(runs)}")
    seen: dict[Path, str] = {}
    members = []
    for path in runs:
        run = RunDir.open(path)
        key = run.path.resolve()
        if key in seen:
            raise EnsembleError(f"{path} is given twice (also as {seen[key]}); give each run once "
                                "(--weights gives one run more say)")
        seen[key] = str(path)
        members.append(run)
    return members


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """The weights scaled to sum to 1 (equal when None); refused unless one positive number per run."""
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in weights]
    if len(values) != n or not all(0.0 < w < float("inf") for w in values):
        raise EnsembleError(f"--weights must be {n} positive numbers, one per run, got "
                            f"{','.join(f'{w:g}' for w in values)}")
    return [w / sum(values) for w in values]


def parse_weights(text: str | None) -> list[float] | None:
    """`--weights 1,1,2` as numbers (None when not given)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise EnsembleError(f"--weights takes numbers separated by commas (e.g. 1,1,2), got '{text}'") from None


def check_alike(members: list[RunDir], bundles: list[dict[str, Any]]) -> None:
    """Refuse, in one line naming what differs, runs whose task, classes or inputs differ from the first's."""
    base = bundles[0]
    for run, bundle in zip(members[1:], bundles[1:]):
        for key, words in ALIKE:
            if bundle[key] != base[key]:
                raise EnsembleError(f"cannot ensemble {run.path} with {members[0].path}: their {words} differ "
                                    f"({_difference(bundle[key], base[key])}); ensembles take runs of the same "
                                    "task, classes and inputs")


def _difference(ours: Any, theirs: Any) -> str:
    """`size [8, 8] vs [28, 28]`: the first key of two mappings that differs, else both values."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        key = next(k for k in (*ours, *theirs) if ours.get(k) != theirs.get(k))
        return f"{key} {_short(ours.get(key))} vs {_short(theirs.get(key))}"
    return f"{_short(ours)} vs {_short(theirs)}"


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_test_split(members: list[RunDir], bundles: list[dict[str, Any]], data: DataBundle) -> list[str]:
    """Refuse members whose test split is not `data.test` (the first member's); a member trained on other
    data (another fingerprint) has its data loaded to compare the test splits. Returns notes."""
    base, want = bundles[0]["data_fingerprint"], split_digest(data.test)
    others = [(run, b["data_fingerprint"]) for run, b in zip(members[1:], bundles[1:]) if b["data_fingerprint"] != base]
    for run, fingerprint in others:
        _, _, theirs = load_run(run.path, model=torch.nn.Identity())  # their data, checked against their bundle
        if split_digest(theirs.test) != want:
            raise EnsembleError(
                f"cannot ensemble {run.path} with {members[0].path}: their test splits differ (data fingerprint "
                f"{fingerprint[:12]} vs {base[:12]}); ensemble runs made with the same data settings and "
                "data.split_seed (`dlkit run RECIPE --seeds N --ensemble` sets it)")
    if not others:
        return []
    return [f"{len(others)} of {len(members)} members were trained on other data than the first (their data "
            "fingerprints differ) but share its test split"]


def split_digest(split: TensorSplit) -> str:
    """sha256 over a split's inputs and labels (shapes and bytes)."""
    h = hashlib.sha256()
    for t in (split.x, split.y):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def member_metrics(model: torch.nn.Module, outputs: torch.Tensor, data: DataBundle, batch: int) -> dict[str, float]:
    """A member's test metrics from its outputs on the shared test split, as a run measures its own."""
    if data.task == "regression":
        return classification_metrics(outputs, data.test.y, data.task)
    return predict_test(model, data, batch, outputs).evaluation.metrics("test_")


def ensemble_recipe(recipes: list[Recipe], bundles: list[dict[str, Any]], weights: Sequence[float] | None,
                    method: str) -> Recipe:
    """The first member's recipe (its data, seed, evaluation settings and claim) with the ensemble as its
    model (`weights` as given, None for equal) and `<recipe>-ensemble` as its name."""
    names = list(dict.fromkeys(r.name for r in recipes))
    spec: dict[str, Any] = {"method": method, "task": bundles[0]["task"]}
    if weights is not None:
        spec["member_weights"] = [float(w) for w in weights]
    model = ModelCfg(name="ensemble", **spec, members=[b["model"] for b in bundles])
    # the runs and seeds are in summary.json: a description naming them would tell apart in `compare`
    # ensembles that differ in nothing but their members' seeds
    described = f"Ensemble of {len(recipes)} runs of {', '.join(names)}"
    return recipes[0].model_copy(update={"name": "+".join(names) + "-ensemble", "model": model,
                                         "description": described})


def ensemble_record(members: list[RunDir], recipes: list[Recipe], summaries: list[dict[str, Any]],
                    weights: list[float], method: str, scores: list[dict[str, float]]) -> dict[str, Any]:
    """summary.json's `ensemble`: the method, each member (run, recipe, seed, weight, test metrics on the
    shared split) and the members' mean and sample std of each metric."""
    rows = [{"run": str(run.path), "recipe": recipe.name, "seed": summary.get("seed"), "weight": weight, **score}
            for run, recipe, summary, weight, score in zip(members, recipes, summaries, weights, scores)]
    keys = [k for k in scores[0] if all(isinstance(s.get(k), int | float) for s in scores)]
    return {"method": method, "members": rows,
            "member_mean": {k: statistics.fmean(s[k] for s in scores) for k in keys},
            "member_std": {k: statistics.stdev(s[k] for s in scores) for k in keys}}


def members_table(summary: dict[str, Any]) -> str:
    """A markdown table of an ensemble run's members, their mean ± std and the ensemble, on one test split."""
    record = summary["ensemble"]
    keys = [(k, name) for k, name in TABLE_METRICS if k in summary]
    lines = ["| run | weight | " + " | ".join(name for _, name in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for row in record["members"]:
        label = f"{row['recipe']} seed {row['seed']}" if row.get("seed") is not None else row["recipe"]
        lines.append(f"| {label} | {row['weight']:.3g} | " + " | ".join(f"{row[k]:.4f}" for k, _ in keys) + " |")
    mean, std = record["member_mean"], record["member_std"]
    lines.append("| members: mean ± std | | " + " | ".join(f"{mean[k]:.4f} ± {std[k]:.4f}" for k, _ in keys) + " |")
    lines.append(f"| **ensemble ({record['method']})** | 1 | " + " | ".join(f"**{summary[k]:.4f}**" for k, _ in keys)
                 + " |")
    return "\n".join(lines)
