"""The run directory: the one contract between training and everything that reads a run later.

This module alone writes and reads it. Both engines (torch and numpy) create a run with
`RunDir.create`, write through its methods and end it with `finish`; evaluate, predict, explain,
report and compare open it with `RunDir.open`, which refuses a run that is not finished and turns
any corrupt or hand-edited file into one error line naming the file.

    recipe.yaml        the resolved recipe: what ran
    status.json        running | interrupted | failed | finished, with a one-line message
    metrics.jsonl      one JSON object per epoch
    checkpoints/       last.safetensors, best.safetensors (weights + metadata in one file)
    model.safetensors  the final weights
    bundle.json        what rebuilds the model and prepares its inputs, and the sha256 of every file
                       the bundle needs (verified before use)
    summary.json       test metrics, sizes, cost, environment, the claim beside ours
    evaluation.json, plots/, report.html   the report (written after the run is finished)
    tracking.json      a tracked run: where (MLflow's URI, experiment, run id) and what was sent there

Every file is written atomically (dlkit.files). `finish` writes the weights, then the bundle that
names their digest, then the summary, then the status: a run is finished only once all are there.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dlkit.config import Recipe, parse_recipe
from dlkit.errors import ConfigError, RunDirError
from dlkit.files import sha256_file, write_json, write_text
from dlkit.yamlfile import read_yaml

BUNDLE_FORMAT = "dlkit-bundle/2"  # 2: bundle.json records the sha256 of the files it needs
WEIGHTS = "model.safetensors"
STATUS = "status.json"
TRACKING = "tracking.json"
REQUIRED = ("recipe.yaml", "bundle.json", WEIGHTS, "summary.json", STATUS)
State = Literal["running", "interrupted", "failed", "finished"]


def check_out(out: str | Path | None, root: str | Path = "runs") -> None:
    """Refuse, before any data are loaded, a run directory that could not be created: a path under a
    file, an existing non-empty folder, a folder without write permission."""
    target = Path(out).expanduser() if out is not None else Path(root)
    flag = "--out" if out is not None else "the runs folder"
    if out is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RunDirError(f"--out {target} already exists and is not an empty folder; choose a new path")
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"{flag} {target}: {probe} is a file, not a folder; choose another path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag} {target}: no permission to write in {probe}; choose another path")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelSpec(_Spec):
    name: str = Field(min_length=1)
    args: dict[str, Any]
    head: dict[str, Any] | None = None
    weights: str | None = None


class BundleSpec(_Spec):
    """bundle.json as read back: every field a reader relies on, checked."""

    format: str
    recipe: str
    model: ModelSpec
    task: Literal["multiclass", "binary", "regression"]
    classes: list[str]
    input_kind: Literal["image", "tabular", "tokens"]
    input_shape: list[int] = Field(min_length=1)
    input_dtype: str
    preprocessing: dict[str, Any]
    data_fingerprint: str
    versions: dict[str, str]
    files: dict[str, str] = Field(min_length=1)

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if any(d < 1 for d in shape):
            raise ValueError(f"every dimension must be at least 1, got {shape}")
        return shape

    @field_validator("files")
    @classmethod
    def _digests(cls, files: dict[str, str]) -> dict[str, str]:
        for name, digest in files.items():
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ValueError(f"'{name}' is not a file of the run directory")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"'{name}' has no sha256 (64 hex digits)")
        return files

    @model_validator(mode="after")
    def _classes_fit(self) -> BundleSpec:
        if self.task == "regression":
            return self
        if len(self.classes) < 2:
            raise ValueError(f"a {self.task} model needs at least two class names, got {len(self.classes)}")
        if self.task == "binary" and len(self.classes) != 2:
            raise ValueError(f"a binary model has two class names, got {len(self.classes)}")
        outputs = self.model.args.get("num_classes")
        expected = 1 if self.task == "binary" else len(self.classes)
        if outputs != expected:
            raise ValueError(f"model.args.num_classes is {outputs!r} but {len(self.classes)} classes need {expected}")
        if WEIGHTS not in self.files:
            raise ValueError(f"files names no {WEIGHTS}")
        return self


class ClaimRow(_Spec):
    metric: str
    claimed: float
    achieved: float | None = None
    status: str | None = None


class ExpectSpec(_Spec):
    source: str | None = None
    note: str = ""
    claims: list[ClaimRow] = []


class SummarySpec(_Spec):
    """summary.json as read back: the fields compare, report and serve use, checked."""

    recipe: str = Field(min_length=1)
    n_train: int | None = Field(None, ge=0)
    n_test: int | None = Field(None, ge=0)
    params: int | None = Field(None, ge=0)
    train_seconds: float | None = Field(None, ge=0)
    epochs_run: int | None = Field(None, ge=0)
    seed: int | None = None
    expect: ExpectSpec = ExpectSpec()
    notes: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _metrics_are_numbers(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for key, value in raw.items():
                if key.startswith("test_") and not (value is None or (isinstance(value, (int, float))
                                                    and not isinstance(value, bool))):
                    raise ValueError(f"'{key}' must be a number, got {value!r}")
        return raw


class TrackingSpec(_Spec):
    """tracking.json as read back: where the run is tracked; `sent` records what reached the tracker."""

    backend: Literal["mlflow"]
    tracking_uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    run_name: str = Field(min_length=1)
    run_id: str | None = None  # None until the tracker has created the run
    sent: dict[str, Any] = {}


class EpochSpec(_Spec):
    epoch: int = Field(ge=1)
    stage: int = Field(ge=0)


class RunDir:
    """A run on disk. `create` starts one (state running); `open` reads a finished one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- writing ----------------------------------------------------------------------------

    @classmethod
    def create(cls, recipe: Recipe, out: str | Path | None = None, root: str | Path = "runs") -> RunDir:
        """Make the folder (`out`, or `root/<recipe>-<timestamp>`), record the recipe and mark it running."""
        check_out(out, root)
        if out is not None:
            path = Path(out).expanduser()
            path.mkdir(parents=True, exist_ok=True)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = Path(root) / f"{recipe.name}-{stamp}"
            path, n = base, 1
            while True:
                try:
                    path.mkdir(parents=True)
                    break
                except FileExistsError:
                    n += 1
                    path = base.with_name(f"{base.name}-{n}")
        run = cls(path)
        run.mark("running", "training")
        run.write_recipe(recipe)
        run.checkpoints.mkdir(exist_ok=True)
        run.write_epochs([])
        return run

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    def write_recipe(self, recipe: Recipe) -> None:
        """recipe.yaml: the resolved recipe, unset optional fields left out."""
        text = yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
        write_text(self.path / "recipe.yaml", text)

    def write_epochs(self, epochs: list[dict[str, Any]]) -> None:
        """metrics.jsonl with every epoch so far (rewritten whole: never a half line)."""
        write_text(self.path / "metrics.jsonl", "".join(json.dumps(e) + "\n" for e in epochs))

    def mark(self, state: State, message: str = "", **extra: Any) -> None:
        """Record the run's state in status.json."""
        write_json(self.path / STATUS, {"state": state, "message": message, "pid": os.getpid(),
                                        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})

    def finish(self, save_model: Any, bundle: dict[str, Any], summary: dict[str, Any]) -> None:
        """Write the final weights (`save_model(path)`), the bundle with their digest, the summary, and
        mark the run finished: the last step, so a run that is not finished was stopped before."""
        save_model(self.weights)
        write_json(self.path / "bundle.json", {**bundle, "format": BUNDLE_FORMAT,
                                               "files": {WEIGHTS: sha256_file(self.weights)}})
        write_json(self.path / "summary.json", summary)
        self.mark("finished", "")

    def write_tracking(self, state: dict[str, Any]) -> None:
        """tracking.json: where the run is tracked and what was sent there (rewritten whole)."""
        write_json(self.path / TRACKING, state)

    def record_export(self, name: str, info: dict[str, Any]) -> None:
        """Record an export (`info["file"]`, e.g. model.onnx, already written) as bundle["exports"][name],
        and its file's digest beside the weights', in one write of bundle.json."""
        bundle = self.bundle()
        bundle["files"][info["file"]] = sha256_file(self.path / info["file"])
        bundle.setdefault("exports", {})[name] = info
        write_json(self.path / "bundle.json", bundle)

    # ---- reading ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open a finished run, or fail with one line saying what it is instead."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise RunDirError(f"run directory {p} not found; pass the folder `dlkit run` printed")
        run = cls(p)
        if (p / STATUS).is_file():
            status = run.status()
            if status["state"] != "finished":
                said = f": {status['message']}" if status.get("message") else ""
                raise RunDirError(f"{p} is not a finished run (it is {status['state']}{said}); "
                                  "re-run the recipe")
        missing = [name for name in REQUIRED if not (p / name).is_file()]
        if missing:
            raise RunDirError(f"{p} is not a finished run (missing {', '.join(missing)}); re-run the recipe")
        return run

    @classmethod
    def resumable(cls, path: str | Path) -> RunDir:
        """Open a run that stopped before it finished (interrupted, failed, or killed while running),
        or fail with one line: a finished run, one whose process is still alive, or a trial of a
        `dlkit tune` study (the study would not count it: the study goes on with a new trial)."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise RunDirError(f"run directory {p} not found; pass the folder `dlkit run` printed")
        run = cls(p)
        if not (p / STATUS).is_file() or not (p / "recipe.yaml").is_file():
            raise RunDirError(f"{p} is not a dlkit run directory (no {STATUS} or recipe.yaml)")
        status = run.status()
        if status["state"] == "finished":
            raise RunDirError(f"{p} is finished; there is nothing to resume (`dlkit run` starts a new run)")
        if run.owner_alive():
            raise RunDirError(f"{p} is still running (process {status['pid']}); stop it first, or wait for it to finish")
        study = study_of_trial(p)
        if study is not None:
            raise RunDirError(f"{p} is a trial of study '{study}', which a resumed run would not count; run `dlkit "
                              "tune` again with the same options to continue the study (a new trial takes this one's "
                              "place)")
        return run

    def owner_alive(self) -> bool:
        """Whether the run says running and the process that runs it (not this one) is alive."""
        status = self.status()
        pid = status.get("pid")
        return status["state"] == "running" and pid != os.getpid() and process_alive(pid)

    def read_json(self, name: str) -> Any:
        """One of the run's JSON files; unreadable, bad UTF-8 or bad JSON is one line naming it."""
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise RunDirError(f"{path} is not UTF-8 text; it is corrupt, re-run the recipe") from None
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); re-run the recipe") from None
        except OSError as exc:
            raise RunDirError(f"{path} is unreadable ({exc.strerror}); re-run the recipe") from None

    def _checked(self, name: str, spec: type[BaseModel]) -> dict[str, Any]:
        raw = self.read_json(name)
        if not isinstance(raw, dict):
            raise RunDirError(f"{self.path / name} must hold a JSON object; it is corrupt, re-run the recipe")
        try:
            spec.model_validate(raw)
        except ValidationError as exc:
            raise RunDirError(f"{self.path / name}: {_first_error(exc)}; re-run the recipe") from None
        return raw

    def status(self) -> dict[str, Any]:
        """status.json: state and message."""
        raw = self.read_json(STATUS)
        if not isinstance(raw, dict) or raw.get("state") not in ("running", "interrupted", "failed", "finished"):
            raise RunDirError(f"{self.path / STATUS} holds no valid state; it is corrupt")
        return raw

    def summary(self) -> dict[str, Any]:
        return self._checked("summary.json", SummarySpec)

    def tracking(self) -> dict[str, Any] | None:
        """tracking.json checked field by field, or None for a run that was never tracked."""
        if not (self.path / TRACKING).is_file():
            return None
        return self._checked(TRACKING, TrackingSpec)

    def bundle(self) -> dict[str, Any]:
        """The bundle metadata, checked field by field (a format this version reads, classes that fit
        the outputs, a positive input shape, a digest for the weights)."""
        raw = self.read_json("bundle.json")
        if isinstance(raw, dict) and raw.get("format") != BUNDLE_FORMAT:
            raise RunDirError(f"{self.path / 'bundle.json'} has format {raw.get('format')!r}, expected "
                              f"{BUNDLE_FORMAT}; re-run the recipe with this version of dlkit")
        return self._checked("bundle.json", BundleSpec)

    def verify(self) -> dict[str, Any]:
        """The bundle, after checking every file it names against its recorded sha256."""
        bundle = self.bundle()
        for name, digest in bundle["files"].items():
            path = self.path / name
            if not path.is_file():
                raise RunDirError(f"{path} not found, though bundle.json needs it; re-run the recipe")
            if sha256_file(path) != digest:
                raise RunDirError(f"{path} does not match the sha256 in bundle.json (changed or corrupt); "
                                  "restore it or re-run the recipe")
        return bundle

    def recipe(self) -> Recipe:
        """The resolved recipe the run was made with."""
        path = self.path / "recipe.yaml"
        try:
            raw = read_yaml(path)
            return parse_recipe(raw, origin=str(path))
        except ConfigError as exc:
            raise RunDirError(f"{exc} (in the run directory; re-run the recipe)") from None

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics, in order; a corrupt line is one error naming the file and the line."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise RunDirError(f"{path} is not UTF-8 text; it is corrupt") from None
        epochs = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                EpochSpec.model_validate(row)
            except json.JSONDecodeError:
                raise RunDirError(f"{path}: line {number} is not valid JSON (truncated?); it is corrupt") from None
            except ValidationError as exc:
                raise RunDirError(f"{path}: line {number}: {_first_error(exc)}") from None
            epochs.append(row)
        return epochs


def study_of_trial(path: Path) -> str | None:
    """The study whose trial `path` is (dlkit tune's runs/<study>/trial-<n>/, beside the study's study.json
    or study.db), else None."""
    name = path.resolve().name
    folder = path.resolve().parent
    if not (name.startswith("trial-") and name.removeprefix("trial-").isdigit()):
        return None
    return folder.name if (folder / "study.json").is_file() or (folder / "study.db").is_file() else None


def process_alive(pid: Any) -> bool:
    """Whether process `pid` (status.json's) exists and runs dlkit (a reused pid of another program does
    not count); anything but a positive int is no process."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return b"dlkit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: the process exists, assume it is the run


def _first_error(exc: ValidationError) -> str:
    """The first pydantic error as `field 'a.b': what is wrong`."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return f"field '{field}' is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"field '{field}': {msg[0].lower() + msg[1:]}" if field else msg[0].lower() + msg[1:]
