"""A finished run's bundle as an MLflow LoggedModel of its run (a pyfunc model from code: this package's
pyfunc_model.py is its code, the bundle's files its one artifact; no pickle, no signature), and its
registration in the model registry."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from dlkit.rundir import RunDir
from dlkit.track import content

PYFUNC_LOADER = Path(__file__).with_name("pyfunc_model.py")  # the model's code (MLflow's models from code)
MODEL_NAME = "model"  # the logged model's name, and its artifact folder


def log_bundle_model(client: Any, run: RunDir, run_id: str, experiment_id: str) -> str:
    """Log the run's bundle as a pyfunc model of MLflow run `run_id`, with what `RunDir.open` needs to
    rebuild dlkit's Predictor (every file checked against its sha256 first); returns the model's id."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    bundle = run.verify()  # what the model carries is what the run finished with
    logged = client.create_logged_model(experiment_id=experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        model_type="dlkit")
    try:
        with tempfile.TemporaryDirectory(prefix="dlkit-model-") as tmp:
            files = Path(tmp, "run")
            files.mkdir()
            for name in content.model_files(bundle):
                shutil.copyfile(run.path / name, files / name)
            meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                         model_id=logged.model_id)
            local = Path(tmp, MODEL_NAME)
            mlflow.pyfunc.save_model(path=str(local), python_model=str(PYFUNC_LOADER), artifacts={"run": str(files)},
                                     mlflow_model=meta, pip_requirements=requirements(bundle))
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def register(client: Any, name: str, model_id: str, run_id: str) -> str:
    """A new version of registered model `name` (created when missing) from the logged model; its number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # the logged model's own location as the source: MLflow's SQL registry would resolve `models:/<id>`
    # through the process-wide tracking URI rather than this client's (a TODO in its sqlalchemy_store)
    source = client.get_logged_model(model_id).artifact_location
    return str(client.create_model_version(name, source=source, run_id=run_id, model_id=model_id).version)


def requirements(bundle: dict[str, Any]) -> list[str]:
    """The pyfunc model's pip requirements: dlkit and the versions the bundle was made with (its loader
    imports dlkit; serve it with `--env-manager local` where dlkit is installed)."""
    import mlflow

    versions = bundle.get("versions", {})
    pins = [f"dlkit=={versions.get('dlkit')}", f"mlflow=={mlflow.__version__}"]
    pins += [f"{name}=={versions[name]}" for name in ("torch", "numpy", "safetensors", "scikit-learn") if name in versions]
    return pins
