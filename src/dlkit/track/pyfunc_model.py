"""A dlkit run as an MLflow pyfunc model, logged from code (MLflow's "models from code"): MLflow keeps this
file as the model's code and the run's bundle (bundle.json, model.safetensors, recipe, summary) as its one
artifact, so nothing is pickled. Loading it rebuilds dlkit's Predictor from the bundle, the way
`dlkit predict` does (sha256 of every file checked), so `mlflow.pyfunc.load_model(...).predict` and
`mlflow models serve` answer with the same label, confidence and probabilities as `dlkit predict`.

Inputs, as `dlkit serve`'s JSON API takes them (a served model never reads paths on its server):
- an image model: images as base64 strings (or data: URLs), or bytes;
- a text model: texts;
- a table model: rows as lists of numbers or objects by feature name, or a DataFrame of the features
  (its rows are predicted as one batch, as `dlkit predict` does a CSV's).
A list, a NumPy array, a pandas Series, a DataFrame with one column, or `{"inputs": [...]}` all hold them.
The answer is a list with one object per input (per row): label, confidence, probabilities (and a note
when a digit picture does not look like the training digits); a regression model's is {"value": ...}.
"""
from __future__ import annotations

import base64
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


class DlkitBundleModel(PythonModel):
    """Predicts with the run bundle in the artifact `run`, as dlkit predict does."""

    # the inputs are checked here, as dlkit serve checks them: MLflow's own type-hint validation (and its
    # warning, on every load, that predict has no type hints) is for models that declare a schema
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from dlkit.data.preprocess import prep_from_dict
        from dlkit.predict import Predictor

        self.predictor = Predictor.from_run(context.artifacts["run"])
        self.spec = prep_from_dict(self.predictor.bundle["preprocessing"])

    # model_input has no type hint on purpose: MLflow would turn one into a signature and convert inputs
    def predict(self, context, model_input, params=None):
        """One answer per input (per table row), as dlkit predict's: label, confidence, probabilities."""
        import torch

        from dlkit.data.preprocess import ImagePrep, TablePrep
        from dlkit.serve.inputs import prepare
        from dlkit.serve.limits import MAX_INPUTS, MAX_ROWS, ClientError

        items = as_items(model_input, self.spec.feature_names if isinstance(self.spec, TablePrep) else None)
        if isinstance(self.spec, ImagePrep):  # image bytes given in process travel as the API's base64
            items = [(k, base64.b64encode(v).decode() if isinstance(v, bytes) else v) for k, v in items]
        step = MAX_ROWS if isinstance(self.spec, TablePrep) else MAX_INPUTS  # serve's limits hold per call
        try:
            prepared = [p for i in range(0, len(items), step) for p in prepare(self.spec, items[i : i + step], False)]
        except ClientError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None  # 400 in mlflow models serve
        if isinstance(self.spec, TablePrep):  # the rows as one batch, as dlkit predict reads a CSV
            return self.predictor.predict_tensor(torch.cat([x for x, _ in prepared]))
        return [row for x, note in prepared for row in self.predictor.predict_tensor(x, note)]


def as_items(model_input: Any, features: list[str] | None) -> list[tuple[str, Any]]:
    """The inputs as (`inputs[i]`, value) pairs, from whatever container MLflow or the caller hands over."""
    if isinstance(model_input, dict) and "inputs" in model_input:
        model_input = model_input["inputs"]
    if hasattr(model_input, "columns") and hasattr(model_input, "to_dict"):  # a pandas DataFrame
        columns = [str(c) for c in model_input.columns]
        if features is not None and set(features) <= set(columns):
            values: list[Any] = model_input.to_dict(orient="records")
        elif len(columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        elif features is not None:
            values = model_input.values.tolist()
        else:
            raise MlflowException.invalid_parameter_value(
                f"expected one column of inputs, got {len(columns)} ({', '.join(columns[:4])})")
    elif hasattr(model_input, "tolist"):  # a NumPy array or a pandas Series
        values = model_input.tolist()
    elif isinstance(model_input, str | bytes | dict):
        values = [model_input]
    elif isinstance(model_input, list | tuple):
        values = list(model_input)
    else:
        raise MlflowException.invalid_parameter_value(
            f"inputs must be a list of inputs, got {type(model_input).__name__}")
    if features is not None and values and all(isinstance(v, int | float) for v in values):
        values = [values]  # one table row given bare
    return [(f"inputs[{i}]", _plain(v)) for i, v in enumerate(values)]


def _plain(value: Any) -> Any:
    """NumPy scalars inside rows as Python numbers (dlkit's row reader checks for int and float)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value.item() if hasattr(value, "item") and not isinstance(value, str | bytes) else value


mlflow.models.set_model(DlkitBundleModel())
