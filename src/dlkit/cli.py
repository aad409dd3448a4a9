"""The `dlkit` command: parses options and calls the library; every user error is one line, exit 2."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import Abort, TyperException

from dlkit import __version__
from dlkit.errors import ConfigError, DlkitError, RunInterrupted, Terminated

# every heavy import (torch, scikit-learn, the run directory) happens inside the command that needs it:
# `dlkit --help`, `--version` and `list` answer in a fraction of a second (benchmarks/cli_startup.py)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Classic deep-learning experiments as reproducible recipes.")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"dlkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                help="Print dlkit's version and exit.")] = False) -> None:
    """Classic deep-learning experiments as reproducible recipes."""


SetOpt = Annotated[list[str], typer.Option("--set", metavar="FIELD=VALUE",
                                            help="Override a recipe field: FIELD=VALUE (repeatable).")]
EpochsOpt = Annotated[int | None, typer.Option(metavar="N", help="Epochs of every training stage.")]
SeedOpt = Annotated[int | None, typer.Option(metavar="N", help="Random seed (splits, init, batch order).")]
OutOpt = Annotated[Path | None, typer.Option(metavar="DIR", help="Run directory to create (default runs/RECIPE-TIME).")]
DataOpt = Annotated[str | None, typer.Option("--data", metavar="PATH", help="Your own data: a folder or file.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", metavar="DIR",
                                                 help="Folder holding the data set's official files.")]
MovedDataOpt = Annotated[Path | None, typer.Option(
    "--data", metavar="PATH", help="Where the run's data file or folder is now, if it moved (replaces the recipe's data.path).")]
MovedDataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", metavar="DIR", help="Where the run's data set files are now, if they moved (replaces data.data_dir).")]
DeviceOpt = Annotated[str | None, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or mps.")]
PrecisionOpt = Annotated[str | None, typer.Option(metavar="PRECISION", help="auto, fp32 or bf16.")]
NprocOpt = Annotated[int, typer.Option(metavar="N", help="Train on N processes of this machine (torchrun's agent, "
                                                        "gloo on CPU, NCCL on GPUs); batch_size stays the global batch.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress output.")]
RecipeArg = Annotated[str, typer.Argument(metavar="RECIPE", help="A packaged recipe (dlkit list recipes) or a YAML file.")]
ReportOpt = Annotated[bool | None, typer.Option("--report/--no-report", show_default=False, metavar="",
                                                help="Write plots/ and report.html after testing "
                                                     "[default: yes, unless DLKIT_REPORT=0].")]
TrackOpt = Annotated[str | None, typer.Option(
    "--track", metavar="BACKEND", help="mlflow: also log the run to MLflow (MLFLOW_TRACKING_URI, else "
                                       "runs/mlflow.db); none: not, whatever the recipe's track section says.")]
RegisterOpt = Annotated[str | None, typer.Option(
    "--register", metavar="NAME", help="Register the run's model in MLflow's model registry as NAME "
                                       "(tracks the run with MLflow).")]
UriOpt = Annotated[str | None, typer.Option(
    "--uri", metavar="URI", help="MLflow tracking URI [default: MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db].")]


def _fields(data: str | None, data_dir: Path | None, device: str | None, precision: str | None) -> dict[str, Any]:
    return {"data.path": data, "data.data_dir": str(data_dir) if data_dir else None,
            "train.device": device, "train.precision": precision}


@app.command("list")
def list_(what: Annotated[str, typer.Argument(help="recipes, models, datasets or all.")] = "all") -> None:
    """List the packaged recipes, the registered models and data sets."""
    from dlkit.catalog import catalog_lines

    for line in catalog_lines(what):
        typer.echo(line)


@app.command()
def describe(recipe: RecipeArg, overrides: SetOpt = [],
             as_json: Annotated[bool, typer.Option("--json", metavar="", help="The table as JSON.")] = False) -> None:
    """Show a recipe's model layer by layer with its parameter counts (no data needed)."""
    from dlkit.catalog import describe_recipe

    info = describe_recipe(recipe, overrides)
    typer.echo(json.dumps(info.to_dict(), indent=2) if as_json else info.to_text())


@app.command()
def run(recipe: RecipeArg, overrides: SetOpt = [], epochs: EpochsOpt = None, seed: SeedOpt = None, out: OutOpt = None,
        data: DataOpt = None, data_dir: DataDirOpt = None, device: DeviceOpt = None,
        precision: PrecisionOpt = None, quiet: QuietOpt = False, report: ReportOpt = None,
        seeds: Annotated[int, typer.Option(metavar="N", help="Run N seeds (the recipe's, then the next ones) and "
                                                             "print their comparison.")] = 1,
        nproc: NprocOpt = 1,
        ensemble: Annotated[bool, typer.Option("--ensemble", metavar="", help=(
            "With --seeds N: train the seeds on one data split (data.split_seed) and ensemble them "
            "(the ensemble's run directory is printed last)."))] = False,
        track: TrackOpt = None, register: RegisterOpt = None) -> None:
    """Run a recipe (a packaged name or a YAML file): train, test, save; prints the run directory last."""
    from dlkit.recipes import load_recipe

    if seeds < 1:
        raise ConfigError(f"--seeds must be 1 or more, got {seeds}")
    if ensemble and seeds < 2:
        raise ConfigError(f"--ensemble needs --seeds 2 or more, got --seeds {seeds}")
    _maybe_launch(nproc)
    resolved = load_recipe(recipe, overrides, epochs=epochs, seed=seed,
                           fields=_fields(data, data_dir, device, precision))
    resolved = _tracked(resolved, track, register, seeds)
    if seeds == 1:
        _execute(resolved, out, quiet, report)
        return
    from dlkit.evaluate.compare import compare_runs

    if ensemble:
        from dlkit.ensemble import shared_split

        resolved = shared_split(resolved)
    runs = [_execute(resolved.model_copy(update={"seed": resolved.seed + k}, deep=True),
                     out / f"seed-{resolved.seed + k}" if out is not None else None, quiet, report)
            for k in range(seeds)]
    if runs[0] is None:  # a rank other than 0 of many processes: rank 0 compares
        return
    typer.echo(compare_runs(runs, "md"))
    if ensemble and runs[0] is not None:  # rank 0 alone ensembles, after every seed
        _ensemble(runs, None, "mean", out / "ensemble" if out is not None else None, quiet, report)


@app.command("ensemble")
def ensemble_(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Finished runs of one task, classes and test split.")],
    weights: Annotated[str | None, typer.Option(metavar="W,W,...", help="One positive weight per run (default equal).")]
    = None,
    method: Annotated[str, typer.Option(metavar="METHOD", help="mean (of probabilities) or vote.")] = "mean",
    out: OutOpt = None, quiet: QuietOpt = False, report: ReportOpt = None,
) -> None:
    """Ensemble finished runs: their probabilities averaged (or votes counted), tested on their shared test
    split, written as a run of its own (predict, serve, compare use it as any run); prints the members
    beside the ensemble, and its run directory last."""
    from dlkit.ensemble import parse_weights

    _ensemble(runs, parse_weights(weights), method, out, quiet, report)


def _ensemble(runs: list[Path], weights: list[float] | None, method: str, out: Path | None, quiet: bool,
              report: bool | None) -> Path | None:
    from dlkit.ensemble import build_ensemble, members_table

    result = build_ensemble(runs, weights=weights, method=method, out=out, report=report)
    if not quiet:
        typer.echo(members_table(result.summary))
    return _show_result(result, quiet)


@app.command()
def train(model: Annotated[str, typer.Option(metavar="NAME", help="A registered model (dlkit list models).")],
          data: Annotated[str, typer.Option("--data", metavar="NAME|PATH", help="A registered data set or a CSV file.")],
          epochs: Annotated[int, typer.Option(metavar="N", help="Training epochs.")] = 10,
          batch_size: Annotated[int, typer.Option(metavar="N", help="Batch size.")] = 32,
          optimizer: Annotated[str, typer.Option(metavar="NAME", help="sgd, adam, adamw or rmsprop.")] = "adam",
          lr: Annotated[float, typer.Option(metavar="RATE", help="Learning rate.")] = 1e-3,
          weights: Annotated[str | None, typer.Option(
              metavar="WEIGHTS", help="Pretrained weights: imagenet, or a .pth/.safetensors file.")] = None,
          freeze: Annotated[str, typer.Option(
              metavar="WHAT", help="none, or base: train only the classifier on a frozen base.")] = "none",
          overrides: SetOpt = [], seed: SeedOpt = None, out: OutOpt = None, data_dir: DataDirOpt = None,
          device: DeviceOpt = None, precision: PrecisionOpt = None, quiet: QuietOpt = False,
          report: ReportOpt = None, track: TrackOpt = None, register: RegisterOpt = None) -> None:
    """Train a model on a data set without a recipe file."""
    from dlkit.recipes import adhoc_recipe

    fields = _fields(None, data_dir, device, precision) | {"model.weights": weights, "train.freeze": freeze}
    resolved = adhoc_recipe(model, data, overrides, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                            lr=lr, seed=seed, fields=fields)
    _execute(_tracked(resolved, track, register), out, quiet, report)


@app.command()
def resume(run_dir: Annotated[Path, typer.Argument(metavar="RUN")],
           force: Annotated[bool, typer.Option("--force", help=(
               "Continue even though the recipe, data or library versions differ from the checkpoint's "
               "(said in the report)."))] = False,
           quiet: QuietOpt = False, report: ReportOpt = None, nproc: NprocOpt = 1) -> None:
    """Continue an interrupted or killed run from its newest whole checkpoint and finish it: the same
    weights and metrics the uninterrupted run would have (same machine, seed, versions, threads)."""
    _maybe_launch(nproc)
    from dlkit.engine.progress import make_progress
    from dlkit.runner import resume as resume_run

    _show_result(resume_run(run_dir, force=force, report=report, progress=make_progress(quiet)), quiet)


@app.command()
def tune(recipe: RecipeArg,
         trials: Annotated[int, typer.Option(metavar="N", help=(
             "The study's budget: trials over every process that shares the study (it stops once it holds N)."))],
         space: Annotated[list[str], typer.Option("--space", metavar="FIELD=DIST", help=(
             "A searched field (repeatable), over the recipe's tune section: uniform(a, b), loguniform(a, b), "
             "int(a, b[, step]), logint(a, b) or choice(x, y, ...).")),] = [],
         metric: Annotated[str, typer.Option(metavar="METRIC", help=(
             "The per-epoch metric to optimise and prune on: val_accuracy, val_loss, train_accuracy, train_loss."))]
         = "val_accuracy",
         direction: Annotated[str | None, typer.Option(metavar="DIRECTION", help=(
             "maximize or minimize [default: the metric's: maximize accuracy, minimize loss]."))] = None,
         pruner: Annotated[str, typer.Option(metavar="PRUNER", help="median, hyperband or none.")] = "median",
         storage: Annotated[str | None, typer.Option(metavar="URL", help=(
             "Optuna storage shared by every process of the study, e.g. postgresql://user@host/db "
             "[default: sqlite:///runs/STUDY/study.db]."))] = None,
         study: Annotated[str | None, typer.Option(metavar="NAME", help=(
             "The study's name and its folder under runs/ [default: the recipe's name]."))] = None,
         timeout: Annotated[str | None, typer.Option(metavar="DURATION", help=(
             "Start no trial after this long (30s, 10m, 2h); the trial under way finishes."))] = None,
         jobs: Annotated[int, typer.Option(metavar="J", help="Trials at once on this machine (processes).")] = 1,
         overrides: SetOpt = [], epochs: EpochsOpt = None, seed: SeedOpt = None, data: DataOpt = None,
         data_dir: DataDirOpt = None, device: DeviceOpt = None, precision: PrecisionOpt = None,
         quiet: QuietOpt = False, report: ReportOpt = None,
         track: Annotated[str | None, typer.Option("--track", metavar="BACKEND", help=(
             "mlflow: log the study to MLflow, one parent run with every trial's run nested under it; none: "
             "not, whatever the recipe's track section says."))] = None) -> None:
    """Search a recipe's hyperparameters with Optuna: each trial an ordinary run in runs/STUDY/trial-N/,
    pruned on the per-epoch metric; prints the trials, writes best.yaml (`dlkit run` reproduces the best
    trial) and study.html. Several processes (or machines, with --storage) can share one study."""
    from dlkit.tune import tune as tune_recipe

    result = tune_recipe(recipe, trials=trials, space=space, overrides=overrides, epochs=epochs, seed=seed,
                         fields=_fields(data, data_dir, device, precision), metric=metric, direction=direction,
                         pruner=pruner, storage=storage, study=study, timeout=timeout, jobs=jobs, quiet=quiet,
                         report=report, track=track)
    if not quiet:
        typer.echo(result.table)
        for row in result.rows:
            if row["state"] == "failed":
                typer.echo(f"trial {row['trial']} failed: {row['note']}")
        best = result.best
        if best is None:
            typer.echo("no trial has completed yet: no best recipe")
        else:
            tests = "".join(f", {k} {v:.4f}" for k, v in best["test"].items() if k in ("test_accuracy", "test_mse"))
            typer.echo(f"best: trial {best['trial']}, {result.metric} {best['value']:.4f}{tests} ({best['run_dir']})")
            typer.echo(f"best recipe {result.files['best']} (dlkit run {result.files['best']} trains it again)")
        typer.echo(f"report {result.files['html']}")
    typer.echo(str(result.folder))


@app.command("tune-worker", hidden=True)
def tune_worker() -> None:
    """A helper process of `dlkit tune --jobs J` (its settings come on stdin as JSON)."""
    from dlkit.tune.session import work

    work(json.loads(sys.stdin.read()))


@app.command()
def evaluate(run_dir: Annotated[Path, typer.Argument(metavar="RUN")], data: MovedDataOpt = None,
             data_dir: MovedDataDirOpt = None) -> None:
    """Re-test a finished run on its test split and print the metrics as JSON (the data must be
    those it was trained on: their fingerprint is checked)."""
    from dlkit.evaluate.retest import evaluate_run

    typer.echo(json.dumps(evaluate_run(run_dir, data_path=data, data_dir=data_dir), indent=2))


@app.command()
def export(run_dir: Annotated[Path, typer.Argument(metavar="RUN")],
           format: Annotated[str, typer.Option("--format", metavar="FORMAT", help="Export format: onnx.")] = "onnx",
           ) -> None:
    """Write model.onnx into a finished run (dynamic batch axis), checked against PyTorch on its test
    inputs; prints the file and the largest difference as one JSON line."""
    if format != "onnx":
        raise ConfigError(f"--format must be onnx, got '{format}'")
    from dlkit.serve.export import export_onnx

    result = export_onnx(run_dir)
    typer.echo(json.dumps({"file": str(result.path), "format": format, "opset": result.opset,
                           "max_abs_diff": result.max_abs_diff, "checked_on": result.checked_on,
                           "seconds": result.seconds}))


@app.command()
def predict(run_dir: Annotated[Path, typer.Argument(metavar="RUN")],
            inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Image files or folders of them, "
                                                        ".npy arrays, CSV files or rows; texts.")]) -> None:
    """Predict with a finished run: one JSON object per input (label, confidence, probabilities).

    A folder stands for the image files directly inside it, by name (other files are skipped). An
    input that cannot be read gets {"input": ..., "error": ...} in its place, the others are still
    predicted, and the command exits 1; a lone input that cannot be read is an error (exit 2)."""
    from dlkit.errors import InputError
    from dlkit.predict import Predictor

    results = Predictor.from_run(run_dir).predict(inputs, errors="report")
    failed = [r for r in results if "error" in r]
    if failed and len(results) == 1:
        raise InputError(failed[0]["error"])
    for result in results:
        typer.echo(json.dumps(result))
    if failed:
        print(f"error: {len(failed)} of {len(results)} inputs could not be predicted; see their \"error\" lines",
              file=sys.stderr)
        raise SystemExit(1)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(metavar="RUN")], data: MovedDataOpt = None,
           data_dir: MovedDataDirOpt = None) -> None:
    """Re-test a finished run and write its plots (plots/*.png) and report.html; prints the report's path."""
    from dlkit.evaluate.report import build_report

    typer.echo(str(build_report(run_dir, data_path=data, data_dir=data_dir)))


@app.command()
def explain(run_dir: Annotated[Path, typer.Argument(metavar="RUN")],
            image: Annotated[str, typer.Argument(metavar="IMAGE", help="An image file.")],
            out: Annotated[Path | None, typer.Option(
                "-o", "--out", metavar="PNG",
                help="PNG to write (default: IMAGE.gradcam.png; IMAGE.attention.png for a ViT)")] = None) -> None:
    """Grad-CAM (attention rollout for a ViT): where the model looked, over the image; prints the class."""
    from dlkit.explain import explain_image

    typer.echo(json.dumps(explain_image(run_dir, image, out)))


@app.command()
def compare(
    runs: Annotated[list[Path] | None, typer.Argument(metavar="RUN...")] = None,
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="md, csv or html")] = "md",
    per_run: Annotated[bool, typer.Option("--per-run", metavar="", help="one row per run instead of per recipe")] = False,
    experiment: Annotated[str | None, typer.Option(
        "--experiment", metavar="NAME", help="Also the finished runs of this MLflow experiment.")] = None,
    uri: UriOpt = None,
) -> None:
    """One table over finished runs, grouped by recipe: mean ± std over seeds (95% interval from 3
    runs), the seed's claim beside ours, params, train time and latency. Runs whose recipe.yaml
    differ in more than the seed get rows of their own, labelled with the differing settings."""
    from dlkit.evaluate.compare import compare_rows, compare_table, markdown_table, render

    runs = runs or []
    if not runs and experiment is None:
        raise ConfigError("give run directories, --experiment NAME (an MLflow experiment), or both")
    records, notes = [], []
    if experiment is not None:
        from dlkit.track import tracking_uri
        from dlkit.track.experiment import experiment_records
        from dlkit.track.settings import checked_uri, require_mlflow

        require_mlflow()
        records, notes = experiment_records(experiment, checked_uri(uri) if uri else tracking_uri(), runs)
        if not runs and not records:
            raise ConfigError(f"MLflow experiment '{experiment}' holds no finished dlkit run to compare"
                              + (f" ({'; '.join(notes)})" if notes else ""))
    table = markdown_table(compare_rows(runs, records)) if per_run else render(compare_table(runs, records, notes), fmt)
    typer.echo(table, nl=not table.endswith("\n"))  # csv ends its last record itself


@app.command()
def serve(
    runs: Annotated[list[str], typer.Argument(metavar="RUN...", help="Finished run directories, or NAME=RUN.")],
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to bind (0.0.0.0 opens it to the network).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT")] = 8000,
    backend: Annotated[str, typer.Option(metavar="BACKEND", help="onnx (ONNX Runtime) or torch.")] = "onnx",
    workers: Annotated[int, typer.Option(metavar="N", help="Server processes, each with every model.")] = 1,
    max_batch: Annotated[int, typer.Option(metavar="N", help="Most rows in one model call.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(metavar="MS", help="Extra wait to fill a batch (0: what is waiting).")] = 0,
    api_key_file: Annotated[Path | None, typer.Option(metavar="FILE", help="File holding the key every /v1 "
                                                      "call must send (Authorization: Bearer KEY).")] = None,
    cors: Annotated[list[str], typer.Option(metavar="ORIGIN", help="Allow browser calls from ORIGIN "
                                            "(repeatable); none by default.")] = [],
    access_log: Annotated[bool, typer.Option("--access-log", help="Print a line per request (off by default: "
                                             "/metrics counts them, and the log costs a sixth of a small "
                                             "model's throughput).")] = False,
) -> None:
    """Serve runs over HTTP: a REST API (OpenAPI at /docs), predictions batched, explanations in PyTorch."""
    import uvicorn

    from dlkit.serve.app import create_app
    from dlkit.serve.workers import check_port, run_workers

    if not 0 < port < 65536 or workers < 1:
        raise ConfigError(f"--port must be 1..65535 and --workers at least 1, got {port} and {workers}")
    key = _api_key(api_key_file)
    settings = {"backend": backend, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "api_key": key,
                "cors": cors or None, "freeze_gc": True}
    application = create_app(runs, **settings)  # checks the runs and options before the server starts
    check_port(host, port)
    names = ", ".join(application.state.models)
    typer.echo(f"serving {names} on http://{host}:{port} ({backend} backend; API docs at /docs)", err=True)
    if workers == 1:
        uvicorn.run(application, host=host, port=port, log_level="info", access_log=access_log)
        return
    # each worker process builds its own app from the same settings, handed over by dlkit alone, and
    # publishes its numbers and readiness in a private folder the workers share (metrics.Shared)
    import os
    import shutil
    import tempfile

    from dlkit.serve.inputs import SCRATCH

    shared = tempfile.mkdtemp(prefix="dlkit-serve-workers-", dir=SCRATCH)
    os.environ["DLKIT_SERVE_SETTINGS"] = json.dumps({"runs": runs, **settings, "shared_dir": shared,
                                                     "workers": workers})
    try:
        run_workers("dlkit.serve.app:app_from_settings", host, port, workers, log_level="info", access_log=access_log)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@app.command()
def ui(uri: UriOpt = None, port: Annotated[int, typer.Option(metavar="PORT")] = 5000) -> None:
    """MLflow's UI over the tracking store (runs/mlflow.db unless MLFLOW_TRACKING_URI or --uri say
    otherwise), on 127.0.0.1:PORT; Ctrl-C stops it."""
    from dlkit.track import tracking_uri
    from dlkit.track.experiment import run_ui
    from dlkit.track.settings import checked_uri, require_mlflow

    require_mlflow()
    code = run_ui(checked_uri(uri) if uri else tracking_uri(), port)
    if code:
        raise SystemExit(code)


track_app = typer.Typer(no_args_is_help=True, help="Experiment tracking with MLflow.")
app.add_typer(track_app, name="track")


@track_app.command("sync")
def track_sync(run_dir: Annotated[Path, typer.Argument(metavar="RUN")], uri: UriOpt = None,
               experiment: Annotated[str | None, typer.Option(
                   metavar="NAME", help="Experiment of a run never tracked [default: its recipe's name].")] = None,
               ) -> None:
    """Send to MLflow what it does not have of a run: what a tracking server that was down missed, files
    written later (dlkit export, dlkit report), or a whole run that was never tracked. Prints one JSON line."""
    from dlkit.track import sync_run
    from dlkit.track.experiment import summary_line

    typer.echo(summary_line(sync_run(run_dir, uri=uri, experiment=experiment)))


def _tracked(recipe: Any, track: str | None, register: str | None, seeds: int = 1) -> Any:
    """The recipe with `--track` / `--register` applied (MLflow checked installed); runs of `--seeds N` get
    one group tag."""
    from dlkit.track import tracked

    recipe = tracked(recipe, track, register)
    if recipe.track is None:
        return recipe
    if seeds > 1 and recipe.track.group is None:
        import time

        group = f"{recipe.name}-seeds-{recipe.seed}-{recipe.seed + seeds - 1}-{time.strftime('%Y%m%d-%H%M%S')}"
        recipe = recipe.model_copy(update={"track": recipe.track.model_copy(update={"group": group})})
    return recipe


def _api_key(path: Path | None) -> str | None:
    """The key in --api-key-file (its first line, stripped), or None."""
    if path is None:
        return None
    try:
        key = path.expanduser().read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({exc}); give a UTF-8 file holding the key") from None
    if not key or len(key[0].strip()) < 16:
        raise ConfigError(f"--api-key-file {path}: the key on its first line must be at least 16 characters")
    return key[0].strip()


def _maybe_launch(nproc: int) -> None:
    """With `--nproc N` (N > 1) outside torchrun: run this same command on N processes, then leave."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be 1 or more, got {nproc}")
    if nproc == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from dlkit.launch import launch, without_nproc

    sys.exit(launch(nproc, without_nproc(_ARGV)))  # not typer.Exit: its 130 would read as a Ctrl-C here


def _execute(recipe: Any, out: Path | None, quiet: bool, report: bool | None = None) -> Path:
    """Run a resolved recipe, print its result line and report (unless quiet) and its run directory;
    return the latter."""
    from dlkit.engine.progress import make_progress
    from dlkit.runner import execute

    return _show_result(execute(recipe, out=out, progress=make_progress(quiet), report=report), quiet)


def _show_result(result: Any, quiet: bool) -> Path | None:
    """Print a finished run's result line and report (unless quiet) and its run directory; return the
    latter (a rank other than 0 of many processes says nothing)."""
    if result.run_dir is None:
        return None
    page = result.run_dir / "report.html"
    if not quiet:
        typer.echo(result_line(result.summary))
        if page.is_file():
            typer.echo(f"report {page}")
    typer.echo(str(result.run_dir))
    return result.run_dir


def result_line(summary: dict[str, Any]) -> str:
    """`test_accuracy 0.981 (claimed 0.99, S0.1)` and friends, for the end of a run."""
    keys = [k for k in ("test_accuracy", "test_f1", "test_roc_auc", "test_mse") if k in summary]
    text = "  ".join(f"{k} {summary[k]:.4f}" for k in keys)
    claims = summary.get("expect", {}).get("claims", [])
    said = ", ".join(f"{c['metric']} {c['claimed']}" for c in claims)
    source = summary.get("expect", {}).get("source")
    return text + (f"  (claimed {said}{', ' + source if source else ''})" if said else "")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app. A user's mistake is one `error:` line and exit code 2; Ctrl-C is one
    `interrupted:` line saying what was kept and exit 130 (SIGTERM: 143)."""
    if threading.current_thread() is not threading.main_thread():
        _main(argv)
        return
    global _ARGV
    _ARGV = list(argv) if argv is not None else sys.argv[1:]
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        _main(argv)
    finally:
        signal.signal(signal.SIGTERM, before)
        if _WORLD > 1:
            from dlkit.engine.distributed import close

            close()


def _main(argv: list[str] | None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except RunInterrupted as exc:
        _interrupted(f"interrupted: {exc}", exc.exit_code)
    except DlkitError as exc:
        _error(str(exc), secondary=False, config=isinstance(exc, ConfigError))
    except TyperException as exc:  # bad options or arguments
        if not exc.format_message():  # no arguments at all: the help was shown
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "dlkit"
        _error(f"{exc.format_message()} (see `{command} --help`)", secondary=False, config=True)
    except OSError as exc:  # the file system refused (full disk, read-only place, a file where a folder goes)
        from dlkit.errors import error_line

        _error(error_line(exc), secondary=False, config=False)
    except (Abort, KeyboardInterrupt) as exc:
        _interrupted("interrupted", 143 if isinstance(exc, Terminated) else 130)
    except Exception as exc:
        if _WORLD <= 1:
            raise
        # many processes: a collective that failed because another rank is gone is not the cause
        from dlkit.errors import error_line

        _error(f"crashed: {error_line(exc)}", secondary=_is_secondary(exc), config=False, code=1)
    if code == 130:  # typer turns a KeyboardInterrupt outside a run into this return value
        _interrupted("interrupted", 143 if _TERMINATED else 130)
    if isinstance(code, int) and code:
        sys.exit(code)


_ARGV: list[str] = []
_RANK = int(os.environ.get("RANK", "0"))
_WORLD = int(os.environ.get("WORLD_SIZE", "1"))


def _error(message: str, *, secondary: bool, config: bool, code: int = 2) -> None:
    """One `error:` line and exit 2. Many processes: under `--nproc` the launcher prints the first
    failing rank's line once; under torchrun rank 0 prints, other ranks print what only they met
    (not a recipe mistake every rank makes, nor a collective broken by another rank's failure)."""
    if _WORLD > 1:
        from dlkit.launch import report_failure

        if secondary or report_failure(message) or (_RANK > 0 and config):
            sys.exit(code)
        if _RANK > 0:
            message = f"rank {_RANK}: {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _interrupted(line: str, code: int) -> None:
    """`interrupted: ...` and exit 130 (SIGTERM 143); said by rank 0 alone when there are many processes."""
    if _WORLD > 1:
        from dlkit.launch import report_exit

        report_exit(code)
    if _RANK == 0:
        print(line, file=sys.stderr)
    sys.exit(code)


def _is_secondary(exc: BaseException) -> bool:
    """Whether a failure is a collective broken by another rank's exit (not this rank's own fault)."""
    import torch.distributed as tdist

    text = str(exc).lower()
    return isinstance(exc, tdist.DistBackendError) or any(
        k in text for k in ("connection closed by peer", "connection reset", "broken pipe", "gloo", "nccl"))


_TERMINATED = False


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM stops dlkit as Ctrl-C does (the run is marked interrupted), with exit code 143."""
    global _TERMINATED
    _TERMINATED = True
    raise Terminated()
