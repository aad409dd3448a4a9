"""Recipes: the packaged YAMLs validate, `--set` overrides coerce types, every mistake is one ConfigError line."""
from __future__ import annotations

from pathlib import Path

import pytest

from dlkit.config import Recipe, apply_overrides, parse_recipe, set_epochs
from dlkit.errors import ConfigError, RegistryError
from dlkit.models import build, check_args
from dlkit.recipes import load_recipe, recipe_registry
from dlkit.runner import build_model
from dlkit.yamlfile import read_yaml

PACKAGED = ["breast-cancer-lstm", "digits-cnn", "digits-mlp"]


def config_error(*args, **kwargs) -> str:
    """The message of the ConfigError `load_recipe(*args, **kwargs)` raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        load_recipe(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_recipes_validate_and_are_named_after_their_file(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    assert recipe.seed == 0
    assert recipe.data.val_split == 0.1 and recipe.data.test_split == 0.2
    assert recipe.expect.claims  # each seed write-up states what it achieved


def test_packaged_recipes_hold_the_seed_settings():
    cnn = load_recipe("digits-cnn")
    assert (cnn.model.name, cnn.model.args()) == ("seed_cnn", {})
    assert (cnn.train.epochs, cnn.train.batch_size) == (15, 32)
    assert (cnn.train.optimizer.name, cnn.train.optimizer.lr) == ("adam", 0.001)
    assert cnn.train.checkpoint.monitor == "val_accuracy"
    mlp = load_recipe("digits-mlp")
    assert mlp.model.args() == {"hidden": [128, 64]}
    assert (mlp.train.epochs, mlp.train.batch_size) == (10, 20)
    lstm = load_recipe("breast-cancer-lstm")
    assert lstm.model.args() == {"steps": 1, "hidden": 64}
    assert lstm.data.normalize == "standard"


def test_overrides_parse_values_as_yaml_scalars():
    raw = {"train": {"optimizer": {"name": "sgd"}}}
    out = apply_overrides(raw, ["train.epochs=5", "train.optimizer.lr=1e-2", "train.optimizer.nesterov=true",
                                "train.schedule.milestones=[5,8]", "data.name=digits", "data.path="])
    assert out["train"]["epochs"] == 5 and type(out["train"]["epochs"]) is int
    assert out["train"]["optimizer"]["lr"] == pytest.approx(0.01) and type(out["train"]["optimizer"]["lr"]) is float
    assert out["train"]["optimizer"]["nesterov"] is True
    assert out["train"]["schedule"]["milestones"] == [5, 8]
    assert out["data"] == {"name": "digits", "path": ""}
    assert out["train"]["optimizer"]["name"] == "sgd"
    assert raw == {"train": {"optimizer": {"name": "sgd"}}}  # the input is left untouched


def test_overrides_reach_the_validated_recipe_with_their_types():
    recipe = load_recipe("digits-cnn", ["train.epochs=5", "train.optimizer.lr=1e-2", "train.optimizer.nesterov=true",
                                        "train.schedule.name=multistep", "train.schedule.milestones=[5,8]",
                                        "model.dropout=2.5e-1"])
    assert recipe.train.epochs == 5
    assert recipe.train.optimizer.lr == pytest.approx(0.01)
    assert recipe.train.optimizer.nesterov is True
    assert recipe.train.schedule.name == "multistep" and recipe.train.schedule.milestones == [5, 8]
    # the model section is untyped: `2.5e-1` must arrive as a float, not as the string YAML 1.1 makes of it
    assert recipe.model.args() == {"dropout": 0.25} and type(recipe.model.args()["dropout"]) is float
    assert build_model(recipe, 10, (1, 28, 28)).head[3].p == 0.25


def test_set_epochs_sets_the_train_section_and_every_stage():
    raw = {"train": {"epochs": 10, "stages": [{"name": "head"}, {"name": "all", "epochs": 4}]}}
    set_epochs(raw, 3)
    assert raw["train"]["epochs"] == 3
    assert [s["epochs"] for s in raw["train"]["stages"]] == [3, 3]
    empty: dict = {}
    set_epochs(empty, 2)
    assert empty == {"train": {"epochs": 2}}


def test_epochs_and_seed_options_win_over_set_overrides():
    recipe = load_recipe("digits-cnn", ["train.epochs=3", "seed=4"])
    assert (recipe.train.epochs, recipe.seed) == (3, 4)
    recipe = load_recipe("digits-cnn", ["train.epochs=3", "seed=4"], epochs=7, seed=11)
    assert (recipe.train.epochs, recipe.seed) == (7, 11)
    recipe = load_recipe("digits-cnn", epochs=0, fields={"train.device": "cpu", "data.path": None})
    assert (recipe.train.epochs, recipe.train.device, recipe.data.path) == (0, "cpu", None)
    assert config_error("digits-cnn", epochs=-1) == "--epochs must be 0 or more, got -1"


def test_a_yaml_path_with_stages_gets_epochs_everywhere(tmp_path):
    path = tmp_path / "two-stage.yaml"
    path.write_text(
        "data: {name: digits}\nmodel: {name: mlp}\n"
        "train:\n  epochs: 9\n  optimizer: {lr: 3e-4}\n  stages:\n    - {name: head, epochs: 2}\n    - {name: all}\n"
    )
    recipe = load_recipe(str(path), epochs=4)
    assert recipe.name == "two-stage"
    assert recipe.train.epochs == 4
    assert recipe.train.optimizer.lr == pytest.approx(3e-4)
    assert [(s.name, s.epochs) for s in recipe.train.stages] == [("head", 4), ("all", 4)]


def test_unknown_field_suggests_the_close_one_and_lists_the_section():
    message = config_error("digits-cnn", ["train.optimzer.lr=1"])
    assert message.startswith("recipe 'digits-cnn': unknown field 'train.optimzer' (did you mean 'optimizer'?); ")
    assert "allowed here: epochs, batch_size, eval_batch_size, loss, label_smoothing, optimizer, schedule, stages" in message


def test_unknown_nested_field_lists_the_allowed_fields():
    message = config_error("digits-cnn", ["train.optimizer.lrr=1"])
    assert message == (
        "recipe 'digits-cnn': unknown field 'train.optimizer.lrr' (did you mean 'lr'?); "
        "allowed here: name, lr, momentum, nesterov, weight_decay, betas, eps, alpha, base_lr, base_weight_decay"
    )
    message = config_error("digits-cnn", ["train.early_stopping.zzz=1"])
    assert message == (
        "recipe 'digits-cnn': unknown field 'train.early_stopping.zzz'; "
        "allowed here: monitor, mode, patience, min_delta, restore_best"
    )


def test_literal_value_suggests_and_lists_the_choices():
    message = config_error("digits-cnn", ["train.optimizer.name=adm"])
    assert message == (
        "recipe 'digits-cnn': field 'train.optimizer.name' got 'adm' (did you mean 'adam'?); "
        "allowed: sgd, adam, adamw, rmsprop"
    )
    message = config_error("digits-mlp", ["train.schedule.name=cosin"])
    assert "did you mean 'cosine'" in message
    assert message.endswith("allowed: constant, step, multistep, cosine, linear, onecycle, plateau")


def test_ill_typed_and_out_of_range_values():
    assert config_error("digits-cnn", ["train.epochs=ten"]) == (
        "recipe 'digits-cnn': field 'train.epochs' got 'ten': "
        "input should be a valid integer, unable to parse string as an integer"
    )
    assert config_error("digits-cnn", ["data.val_split=1.5"]) == (
        "recipe 'digits-cnn': field 'data.val_split' got 1.5: input should be less than 1"
    )
    assert config_error("digits-cnn", ["train.optimizer.lr=0"]) == (
        "recipe 'digits-cnn': field 'train.optimizer.lr' got 0: input should be greater than 0"
    )


def test_set_without_equals_and_set_below_a_value():
    assert config_error("digits-cnn", ["train.epochs"]) == (
        "--set expects FIELD=VALUE (e.g. train.epochs=5), got 'train.epochs'"
    )
    assert config_error("digits-cnn", ["=3"]) == "--set expects FIELD=VALUE (e.g. train.epochs=5), got '=3'"
    assert config_error("digits-cnn", ["train.epochs.x=1"]) == (
        "--set train.epochs.x: 'train.epochs' is a value, not a section"
    )


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: {name: digits}\nmodel: {name: mlp\ntrain:\n  epochs: 3\n")
    message = config_error(str(path))
    assert message.startswith(f"recipe file {path} is not valid YAML at line ")
    assert message.endswith("; fix the syntax")
    line = int(message.split(" at line ")[1].split(";")[0])
    assert line in (2, 3)  # the unclosed mapping of line 2, detected where line 3 begins
    with pytest.raises(ConfigError, match="at line"):
        read_yaml(Path(path))


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert config_error(str(path)) == f"recipe file {path} must hold a YAML mapping with data, model and train"
    with pytest.raises(ConfigError) as info:
        parse_recipe([1, 2])
    assert str(info.value) == "recipe: a recipe must be a YAML mapping with data, model and train"


def test_missing_yaml_path_and_missing_required_field(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert config_error(str(missing)) == (
        f"recipe file {missing} not found; give a packaged recipe name (dlkit list recipes) or a YAML path"
    )
    path = tmp_path / "nodata.yaml"
    path.write_text("model: {name: mlp}\n")
    assert config_error(str(path)) == "recipe 'nodata': field 'data' is required"


def test_unknown_recipe_name_suggests_the_close_one():
    with pytest.raises(RegistryError) as info:
        load_recipe("digits-cnm")
    assert str(info.value) == (
        "unknown recipe 'digits-cnm' (did you mean 'digits-cnn'?); available: "
        + ", ".join(recipe_registry().names())
    )
    assert set(PACKAGED) <= set(recipe_registry().names())


def test_model_argument_the_builder_does_not_take():
    expected = "unknown field 'model.dropot' for model 'mlp' (did you mean 'dropout'?); allowed: hidden, dropout, activation"
    with pytest.raises(ConfigError) as info:
        check_args("mlp", {"hidden": [8], "dropot": 0.1})
    assert str(info.value) == expected
    with pytest.raises(ConfigError) as info:
        build("mlp", num_classes=3, input_shape=(4,), dropot=0.1)
    assert str(info.value) == expected
    recipe = load_recipe("digits-cnn", ["model.widht=3"])  # the model section is open until the builder is known
    with pytest.raises(ConfigError) as info:
        build_model(recipe, 10, (1, 28, 28))
    assert str(info.value) == (
        "unknown field 'model.widht' for model 'seed_cnn'; allowed: batch_norm, dropout"
    )
    check_args("mlp", {"hidden": [8], "dropout": 0.1, "activation": "gelu"})  # all known: no error


def test_a_recipe_extends_another_and_overrides_what_it_names(tmp_path):
    from dlkit.recipes import load_recipe

    smoke = load_recipe("mnist-cnn-smoke")
    full = load_recipe("mnist-cnn")
    assert smoke.name == "mnist-cnn-smoke" and smoke.train.epochs == 1 and smoke.data.subset == 512
    assert smoke.model == full.model and smoke.train.optimizer == full.train.optimizer
    assert smoke.data.name == full.data.name and smoke.expect == full.expect


def test_an_extends_loop_is_one_clear_error(tmp_path):
    from dlkit.recipes import load_recipe

    (tmp_path / "a.yaml").write_text("extends: ./b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: ./a.yaml\n")
    with pytest.raises(ConfigError, match=r"^recipe '\w+': 'extends' loops back to '\./\w\.yaml'; break the cycle$"):
        load_recipe(str(tmp_path / "a.yaml"))


def laughs(levels: int, width: int = 10) -> str:
    """A "billion laughs" recipe: each level lists the previous one `width` times (width**levels values)."""
    lines = ["l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(["data: {name: digits}", "model: {name: mlp}", *lines]) + "\n"


def test_nested_aliases_are_refused_before_they_expand(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(9))  # 10^9 values once expanded, from a file of about 700 bytes
    assert path.stat().st_size < 800
    assert config_error(str(path)) == (
        f"recipe file {path}: its aliases expand to more than 100,000 values (a recipe needs a few hundred); "
        "write the values out instead of nesting aliases"
    )
    bomb = "[&a [" + ", ".join(["1"] * 10) + "]" + "".join(
        f", &{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcd", "bcde")) + "]"  # 10^5 ones
    with pytest.raises(ConfigError, match=r"^--set value '\[&a \[1, 1, 1, 1, 1, 1, 1, 1, 1, 1\], &b \[': its aliases"):
        apply_overrides({}, [f"x={bomb}"])


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("data: {name: digits}\nmodel: &m {name: mlp, hidden: [16]}\nexpect: {note: ok}\n"
                    "train: {epochs: 1, optimizer: &o {name: sgd, lr: 0.1}, stages: [{optimizer: *o}, {optimizer: *o}]}\n")
    recipe = load_recipe(str(path))
    assert recipe.train.stages[1].optimizer.lr == 0.1 and recipe.model.args() == {"hidden": [16]}


@pytest.mark.parametrize(("text", "ending"), [
    ("a: &a [1, *a]\n", ": an alias refers to its own anchor (a recursive structure); write the values out"),
    ("a: &a {b: *a}\n", ": an alias refers to its own anchor (a recursive structure); write the values out"),
    ("a: " + "[" * 3000 + "]" * 3000 + "\n", ": its lists or mappings are nested more than 64 deep; a recipe needs a few levels"),
    ("a: !!python/object/apply:os.system [echo hi]\n",
     ": YAML tag '!!python/object/apply:os.system' is not allowed: a recipe holds plain mappings, lists and values only"),
    ("a: !!python/name:os.system ''\n",
     ": YAML tag '!!python/name:os.system' is not allowed: a recipe holds plain mappings, lists and values only"),
])
def test_hostile_yaml_is_one_config_error_line(tmp_path, text, ending):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    assert config_error(str(path)) == f"recipe file {path}{ending}"


def test_a_recipe_that_is_not_utf8_or_too_large_is_refused_before_parsing(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert config_error(str(path)) == f"recipe file {path} is not UTF-8 text (byte 9); save it as UTF-8"
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# padding\n" * 110_000)  # 1.1 MB
    assert config_error(str(big)) == f"recipe file {big} is larger than 1 MiB; a recipe is a few KB of YAML"


def test_load_yaml_text_names_its_origin():
    from dlkit.yamlfile import load_yaml_text

    assert load_yaml_text("a: 1e-3\nb: [x]\n", "run x's recipe.yaml") == {"a": 0.001, "b": ["x"]}
    with pytest.raises(ConfigError, match=r"^run x's recipe.yaml is not valid YAML at line 3; fix the syntax$"):
        load_yaml_text("a: 1\nb: [\n", "run x's recipe.yaml")
