"""Search spaces: the distribution grammar, and a recipe's tune section validated like every other field."""
from __future__ import annotations

import math

import pytest
import yaml

from dlkit.config import parse_recipe
from dlkit.errors import ConfigError
from dlkit.recipes import load_recipe, recipe_source
from dlkit.space import Distribution, parse_distribution


@pytest.mark.parametrize(("text", "dist", "canonical"), [
    ("uniform(0.0, 0.5)", Distribution("uniform", 0.0, 0.5), "uniform(0.0, 0.5)"),
    ("loguniform(1e-4, 1e-2)", Distribution("loguniform", 1e-4, 1e-2), "loguniform(0.0001, 0.01)"),
    ("  int( 16 ,128, 16 ) ", Distribution("int", 16, 128, 16), "int(16, 128, 16)"),
    ("int(1, 5, 1)", Distribution("int", 1, 5), "int(1, 5)"),
    ("logint(8, 512)", Distribution("logint", 8, 512), "logint(8, 512)"),
    ("choice(32, 64, 128)", Distribution("choice", choices=(32, 64, 128)), "choice(32, 64, 128)"),
    ("choice(adam, sgd)", Distribution("choice", choices=("adam", "sgd")), "choice(adam, sgd)"),
    ("choice([128, 64], [256, 128, 64])", Distribution("choice", choices=([128, 64], [256, 128, 64])),
     "choice([128, 64], [256, 128, 64])"),
    ("choice(1, 1.0, true, null)", Distribution("choice", choices=(1, 1.0, True, None)), "choice(1, 1.0, true, null)"),
])
def test_distributions_parse_and_print_back(text, dist, canonical):
    parsed = parse_distribution(text)
    assert parsed == dist
    assert str(parsed) == canonical
    assert parse_distribution(str(parsed)) == parsed


@pytest.mark.parametrize(("text", "message"), [
    ("gauss(0, 1)", "'gauss' is not a distribution; use one of uniform(low, high), loguniform(low, high), "
                    "int(low, high[, step]), logint(low, high), choice(a, b, ...)"),
    ("0.001", "'0.001' is not a distribution; use one of uniform(low, high)"),
    ("uniform(1)", "'uniform(1)': uniform takes low and high"),
    ("int(1, 5, 2, 3)", "'int(1, 5, 2, 3)': int takes low, high and an optional step"),
    ("uniform(0.5, 0.1)", "'uniform(0.5, 0.1)': low must be below high"),
    ("uniform(0, .inf)", "'uniform(0, .inf)': the bounds must be finite numbers"),
    ("uniform(a, b)", "'uniform(a, b)': the bounds must be finite numbers"),
    ("loguniform(0, 1)", "'loguniform(0, 1)': loguniform needs low > 0 (it draws uniformly in log scale)"),
    ("logint(0, 8)", "'logint(0, 8)': logint needs low >= 1"),
    ("int(1.5, 4)", "'int(1.5, 4)': int takes whole numbers; use uniform or loguniform for a float"),
    ("int(16, 100, 16)", "'int(16, 100, 16)': the step must be at least 1 and divide high - low (84)"),
    ("choice(32)", "'choice(32)': choice needs at least two values"),
    ("choice(32, 64, 32)", "'choice(32, 64, 32)': 32 is given twice"),
])
def test_a_bad_distribution_says_what_is_wrong(text, message):
    with pytest.raises(ValueError) as err:
        parse_distribution(text)
    assert str(err.value).startswith(message)


def test_probes_contains_and_labels():
    lr = parse_distribution("loguniform(1e-4, 1e-2)")
    assert lr.probes()[:2] == [1e-4, 1e-2] and lr.probes()[2] == pytest.approx(1e-4 * 100 ** (1 / math.pi))
    assert lr.contains(1e-3) and not lr.contains(1e-5) and not lr.contains("0.001") and not lr.contains(True)
    steps = parse_distribution("int(16, 128, 16)")
    assert steps.probes() == [16, 128] and steps.contains(48) and not steps.contains(50) and not steps.contains(48.5)
    hidden = parse_distribution("choice([128, 64], [256])")
    assert hidden.labels() == ["[128, 64]", "[256]"]  # Optuna's categorical choices must be scalars
    assert hidden.value_of("[256]") == [256] and hidden.label_of([128, 64]) == "[128, 64]"
    assert hidden.contains([256]) and not hidden.contains([512])
    plain = parse_distribution("choice(1, 1.0)")
    assert plain.labels() == [1, 1.0] and plain.value_of(1.0) == 1.0 and isinstance(plain.value_of(1.0), float)


def digits(tune: dict) -> dict:
    raw, _ = recipe_source("digits-mlp")
    raw.pop("tune", None)
    return {**raw, "name": "digits-mlp", "tune": tune}


@pytest.mark.parametrize(("tune", "message"), [
    ({"train.optimzer.lr": "loguniform(1e-4, 1e-2)"},
     "field 'tune': 'train.optimzer.lr' names no recipe field: there is no 'optimzer' in 'train' "
     "(did you mean 'optimizer'?)"),
    ({"trian.epochs": "int(1, 3)"},
     "field 'tune': 'trian.epochs' names no recipe field: there is no 'trian' at the top of a recipe "
     "(did you mean 'train'?)"),
    ({"train.epochs.x": "int(1, 3)"},
     "field 'tune': 'train.epochs.x' names no recipe field: 'train.epochs' is a value, not a section"),
    ({"seed": "int(0, 9)"}, "field 'tune': 'seed' cannot be searched: name, description, seed, expect, tune describe a "
                            "run or pick its luck"),
    ({"train.optimizer.lr": "loguniform(0, 1)"},
     "field 'tune.train.optimizer.lr': 'loguniform(0, 1)': loguniform needs low > 0 (it draws uniformly in log scale)"),
    ({"train.batch_size": "uniform(16, 128)"},
     "field 'tune': train.batch_size: uniform(16, 128) can draw 51.6507, which the recipe refuses (field "
     "'train.batch_size' got 51.65070725258456: input should be a valid integer, got a number with a fractional part)"),
    ({"train.batch_size": "choice(0, 32)"},
     "field 'tune': train.batch_size: choice(0, 32) can draw 0, which the recipe refuses (field 'train.batch_size' "
     "got 0: input should be greater than or equal to 1)"),
    ({"train.optimizer.name": "choice(adam, sgdd)"},
     "field 'tune': train.optimizer.name: choice(adam, sgdd) can draw sgdd, which the recipe refuses (field "
     "'train.optimizer.name' got 'sgdd' (did you mean 'sgd'?); allowed: sgd, adam, adamw, rmsprop)"),
    ({"train.stages.1.epochs": "int(1, 3)"}, "field 'tune': train.stages.1.epochs: '1' is not an index of a list of 0"),
    ({}, "field 'tune': the search space is empty; give FIELD: DISTRIBUTION lines or leave tune out"),
])
def test_a_bad_tune_section_is_one_error_naming_the_field(tune, message):
    with pytest.raises(ConfigError) as err:
        parse_recipe(digits(tune), origin="recipe 'digits-mlp'")
    assert str(err.value) == f"recipe 'digits-mlp': {message}"


def test_a_tune_section_round_trips_and_run_ignores_it(tmp_path):
    recipe = parse_recipe(digits({"train.optimizer.lr": "loguniform(1e-4, 1e-2)", "model.hidden":
                                  "choice([128, 64], [32])", "train.epochs": "int(1, 4)"}))
    dumped = recipe.model_dump(mode="json", exclude_none=True)["tune"]
    assert dumped == {"train.optimizer.lr": "loguniform(0.0001, 0.01)", "model.hidden": "choice([128, 64], [32])",
                      "train.epochs": "int(1, 4)"}
    assert parse_recipe({**recipe.model_dump(mode="json", exclude_none=True)}).tune == recipe.tune
    # the packaged recipe's space; `dlkit run` leaves the section out of the run's recipe.yaml
    assert {k: str(v) for k, v in load_recipe("digits-mlp").tune.items()} == {
        "train.optimizer.lr": "loguniform(0.0001, 0.01)", "train.batch_size": "choice(20, 32, 64, 128)",
        "model.dropout": "uniform(0.0, 0.5)"}
    from dlkit.runner import run

    result = run("digits-mlp", epochs=1, out=tmp_path / "run")
    assert "tune" not in yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert load_recipe("digits-mlp", ["train.optimizer.lr=0.5"]).tune == load_recipe("digits-mlp").tune
