"""What a run directory gives MLflow, as plain data: the resolved recipe as params, the tags, the metrics of
every epoch and of the test, the files to upload. Nothing here imports MLflow: the live tracker and
`dlkit track sync` send the same things, read from the same run directory.

MLflow's limits (mlflow/utils/validation.py): a param value holds 6,000 characters, a tag value 8,000, a key
250 of letters, digits, `_ - . / : ` and spaces; a batch holds 100 params or tags and 1,000 metrics.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import dlkit
from dlkit.rundir import RunDir

MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^\w.\-/: ]")
NOT_PARAMS = ("track",)  # where a run is logged is not a setting of what ran

# the run directory's files that are uploaded as artifacts, beside the model; checkpoints stay local
# (the final weights are model.safetensors) and status.json is the MLflow run's own status
ARTIFACT_FILES = ("recipe.yaml", "metrics.jsonl", "summary.json", "bundle.json", "model.safetensors", "model.onnx",
                  "evaluation.json", "report.html")
ARTIFACT_FOLDERS = ("plots",)
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def flatten_params(recipe: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A resolved recipe as MLflow params: sections become dotted names (`train.optimizer.lr`), lists of
    sections go by index as `--set` names them (`train.stages.0.epochs`), other lists and every value are
    JSON (`[128, 64]`, `true`, `0.001`); strings stay bare."""
    flat: dict[str, str] = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if not prefix and key in NOT_PARAMS:
            continue
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten_params(item, f"{name}.{i}."))
        elif value is not None:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def within_limits(entries: dict[str, str], max_value: int) -> tuple[dict[str, str], list[str]]:
    """`entries` with keys MLflow accepts (other characters become `_`) and values cut to `max_value`
    characters (ending in `...`); also the names that were cut or dropped (a key too long)."""
    kept, changed = {}, []
    for key, value in entries.items():
        clean = _BAD_KEY_CHARS.sub("_", key)
        if len(clean) > MAX_KEY:
            changed.append(key)
            continue
        if len(value) > max_value:
            value = value[: max_value - 3] + "..."
            changed.append(key)
        kept[clean] = value
    return kept, changed


def start_tags(run: RunDir, recipe: dict[str, Any], group: str | None) -> dict[str, str]:
    """The tags a run gets when it starts: its recipe, seed, seed write-up, dlkit's version, where the run
    directory is, its group (`--seeds`) and the git commit of the working folder when it is a repository."""
    expect = recipe.get("expect") or {}
    tags = {
        "dlkit.recipe": str(recipe["name"]),
        "dlkit.seed": str(recipe.get("seed", 0)),
        "dlkit.version": dlkit.__version__,
        "dlkit.run_dir": str(run.path.resolve()),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "dlkit",
    }
    if expect.get("source"):
        tags["dlkit.writeup"] = str(expect["source"])
    if recipe.get("description"):
        tags["mlflow.note.content"] = str(recipe["description"])
    if group:
        tags["dlkit.group"] = group
    commit, dirty = git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["dlkit.git_dirty"] = "true" if dirty else "false"
    return within_limits(tags, MAX_TAG_VALUE)[0]


def git_commit(folder: Path) -> tuple[str | None, bool]:
    """(HEAD's commit, whether tracked files differ from it) when `folder` is in a git repository with a
    commit; (None, False) otherwise, or when git is missing or takes over 5 s."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None, False
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    return head.stdout.strip() or None, bool(status.stdout.strip())


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """One line of metrics.jsonl as MLflow metrics (its epoch is their step): every number but the epoch."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)}


def result_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's numbers as metrics: every test metric, latency, train time, sizes and parameter
    counts; and each claim of the seed write-up beside ours as `claimed_<metric>`."""
    metrics = {k: float(v) for k, v in summary.items()
               if k != "seed" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    for claim in (summary.get("expect") or {}).get("claims", []):
        if isinstance(claim.get("claimed"), int | float):
            metrics[f"claimed_{claim['metric']}"] = float(claim["claimed"])
    return metrics


def result_tags(summary: dict[str, Any], bundle: dict[str, Any] | None) -> dict[str, str]:
    """The tags a finished run adds: data fingerprint, device, precision, the weights tested, and the
    claim beside ours in one line (`test_accuracy: claimed 0.99 (S0.1), ours 0.9666, below`)."""
    tags = {"dlkit.device": str(summary.get("device")), "dlkit.precision": str(summary.get("precision")),
            "dlkit.tested_weights": str(summary.get("tested_weights"))}
    if bundle is not None:
        tags["dlkit.data_fingerprint"] = str(bundle.get("data_fingerprint"))
    expect = summary.get("expect") or {}
    source = f" ({expect['source']})" if expect.get("source") else ""
    claims = [f"{c['metric']}: claimed {c['claimed']:g}{source}, ours "
              f"{'-' if c.get('achieved') is None else format(c['achieved'], '.4f')}, {c.get('status')}"
              for c in expect.get("claims", [])]
    if claims:
        tags["dlkit.claim"] = "; ".join(claims)
    if expect.get("training_set"):
        tags["dlkit.training_set"] = str(expect["training_set"])
    return within_limits({k: v for k, v in tags.items() if v != "None"}, MAX_TAG_VALUE)[0]


def artifact_files(run: RunDir) -> list[str]:
    """The run directory's files to upload, as paths relative to it (plots/ by name), those present now."""
    files = [name for name in ARTIFACT_FILES if (run.path / name).is_file()]
    for folder in ARTIFACT_FOLDERS:
        if (run.path / folder).is_dir():
            files += sorted(f"{folder}/{p.name}" for p in (run.path / folder).iterdir() if p.is_file())
    return files


def model_files(bundle: dict[str, Any]) -> list[str]:
    """What the pyfunc model carries to rebuild the run's Predictor: the files `RunDir.open` requires and
    every file the bundle names (weights, model.onnx when exported), each checked against its sha256."""
    from dlkit.rundir import REQUIRED

    return list(dict.fromkeys([*REQUIRED, *bundle["files"]]))


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    """`items` in consecutive lists of at most `size`."""
    return [items[i : i + size] for i in range(0, len(items), size)]
