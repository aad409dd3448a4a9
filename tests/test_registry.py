"""Registries: a name is taken once, unknown names get a suggestion, listings are sorted."""
from __future__ import annotations

import pytest

from dlkit.data import DATASETS, DataSource
from dlkit.errors import RegistryError
from dlkit.models import MODELS
from dlkit.recipes import recipe_registry
from dlkit.registry import Registry


def make_registry() -> Registry[int]:
    registry: Registry[int] = Registry("widget")
    registry.add("zeta", 3)
    registry.add("alpha", 1)

    @registry.register("mid")
    def mid() -> int:
        return 2

    return registry


def test_add_register_and_get():
    registry = make_registry()
    assert registry.get("alpha") == 1
    assert registry.get("mid")() == 2
    assert "zeta" in registry and "omega" not in registry
    assert len(registry) == 3


def test_names_are_sorted_whatever_the_order_of_registration():
    registry = make_registry()
    assert registry.names() == ["alpha", "mid", "zeta"]
    assert list(registry) == ["alpha", "mid", "zeta"]


def test_duplicates_are_refused_with_the_exact_message_and_the_first_entry_kept():
    registry = make_registry()
    with pytest.raises(RegistryError) as info:
        registry.add("alpha", 99)
    assert str(info.value) == "widget 'alpha' is already registered; pick another name"
    with pytest.raises(RegistryError, match="^widget 'mid' is already registered; pick another name$"):
        registry.register("mid")(lambda: 5)
    assert registry.get("alpha") == 1 and registry.get("mid")() == 2
    assert len(registry) == 3


def test_unknown_names_suggest_the_closest_and_list_the_rest():
    registry = make_registry()
    with pytest.raises(RegistryError) as info:
        registry.get("alpah")
    assert str(info.value) == "unknown widget 'alpah' (did you mean 'alpha'?); available: alpha, mid, zeta"
    with pytest.raises(RegistryError) as info:
        registry.get("qqqq")
    assert str(info.value) == "unknown widget 'qqqq'; available: alpha, mid, zeta"


def test_the_model_registry():
    assert {"lstm", "mlp", "seed_cnn", "seed_cnn3"} <= set(MODELS.names())
    with pytest.raises(RegistryError) as info:
        MODELS.get("seed-cnn")
    assert str(info.value) == (
        "unknown model 'seed-cnn' (did you mean 'seed_cnn'?); available: " + ", ".join(MODELS.names())
    )
    builder = MODELS.get("mlp")
    with pytest.raises(RegistryError, match="^model 'mlp' is already registered; pick another name$"):
        MODELS.register("mlp")(lambda **kw: None)
    assert MODELS.get("mlp") is builder


def test_the_dataset_registry():
    assert {"breast_cancer", "csv_table", "digits"} <= set(DATASETS.names())
    assert all(isinstance(DATASETS.get(n), DataSource) for n in DATASETS)
    source = DATASETS.get("digits")
    with pytest.raises(RegistryError, match="^dataset 'digits' is already registered; pick another name$"):
        DATASETS.add("digits", source)
    with pytest.raises(RegistryError, match=r"^unknown dataset 'digit' \(did you mean 'digits'\?\)"):
        DATASETS.get("digit")


def test_the_recipe_registry():
    registry = recipe_registry()
    assert registry is recipe_registry()  # built once
    assert {"breast-cancer-lstm", "digits-cnn", "digits-mlp", "mnist-cnn", "cifar10-resnet"} <= set(registry.names())
    assert registry.names() == sorted(registry.names())
    path = registry.get("digits-mlp")
    assert path.name == "digits-mlp.yaml" and path.is_file()
    with pytest.raises(RegistryError, match="^recipe 'digits-mlp' is already registered; pick another name$"):
        registry.add("digits-mlp", path)
    assert registry.get("digits-mlp") == path
