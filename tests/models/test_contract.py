"""One contract every registered model meets, plus the registry's errors and seed_cnn's layer order."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from dlkit.errors import ConfigError, RegistryError
from dlkit.models import MODELS, build


@dataclass
class Case:
    """How to build one model, what to feed it and what its parameter count must be."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    params: int | None = None
    conv: bool = False


CASES: dict[str, list[Case]] = {
    "mlp": [Case(params=109_386)],  # S2.3: 784*128+128 + 128*64+64 + 64*10+10
    # S0.1: conv 320 + conv 18,496 + dense 1600*128+128 = 204,928 + 1,290
    "seed_cnn": [
        Case(params=225_034, conv=True),
        Case(input_shape=(3, 32, 32), params=315_722, conv=True),  # flatten 6*6*64 = 2304
        Case(kwargs={"batch_norm": True, "dropout": 0.5}, params=225_034 + 2 * (32 + 64), conv=True),
    ],
    "seed_cnn3": [Case(params=93_322, conv=True)],  # S3.A, as the write-up states
    "lstm": [
        # tabular: 4 * (64 * 1 + 64 * 64 + 2 * 64) + 65 (PyTorch keeps two bias vectors per gate)
        Case(input_shape=(30,), num_classes=1, params=17_217),
        # token ids: embedding 50*8 + 4 * (16*8 + 16*16 + 2*16) + 17
        Case(kwargs={"vocab_size": 50, "embed_dim": 8, "hidden": 16}, input_shape=(12,), num_classes=1, params=2_081),
        Case(kwargs={"vocab_size": 50, "embed_dim": 8, "stacked": (8, 4), "bidirectional": True, "cell": "gru"},
             input_shape=(12,), num_classes=3),
    ],
}


def default_case(name: str) -> Case:
    """A model nobody has tabled yet still gets every check but the parameter count."""
    params = inspect.signature(MODELS.get(name)).parameters
    return Case(input_shape=tuple(params["input_shape"].default), num_classes=params["num_classes"].default)


CONTRACT = [
    pytest.param(name, case, id=f"{name}-{i}")
    for name in MODELS.names()
    for i, case in enumerate(CASES.get(name) or [default_case(name)])
]


def dummy_batch(model: nn.Module, input_shape: tuple[int, ...], n: int = 4) -> torch.Tensor:
    """Random floats, or non-pad token ids (1..4) for models that read ids."""
    dtype = getattr(model, "input_dtype", torch.float32)
    if dtype.is_floating_point:
        return torch.randn(n, *input_shape, dtype=dtype)
    return torch.randint(1, 5, (n, *input_shape), dtype=dtype)


@pytest.mark.parametrize(("name", "case"), CONTRACT)
def test_model_contract(name: str, case: Case) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=case.num_classes, input_shape=case.input_shape, **case.kwargs)

    out = model(dummy_batch(model, case.input_shape))
    assert out.shape == (4, case.num_classes)
    assert torch.isfinite(out).all()

    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"

    if case.params is not None:
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == case.params

    assert isinstance(model.features, nn.Module) and isinstance(model.head, nn.Module)
    assert model.blocks and model.blocks[-1] is model.head
    assert sum(p.numel() for b in model.blocks for p in b.parameters()) == sum(p.numel() for p in model.parameters())
    if case.conv:
        assert isinstance(model.cam_layer, nn.Module)
        assert any(isinstance(m, nn.Conv2d) for m in model.cam_layer.modules())
    else:
        assert model.cam_layer is None


def test_cam_layer_is_the_last_conv_block_and_not_a_second_copy_of_its_weights() -> None:
    model = build("seed_cnn3")
    assert model.cam_layer is model.features[2]
    assert not any(key.startswith("cam") for key in model.state_dict())


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32)])
def test_seed_cnn_pool_before_relu_matches_keras_order(input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build("seed_cnn", input_shape=input_shape)
    one, two = model.features
    keras = nn.Sequential(one.conv, nn.ReLU(), nn.MaxPool2d(2), two.conv, nn.ReLU(), nn.MaxPool2d(2), model.head)
    x = torch.randn(8, *input_shape, requires_grad=True)

    ours, theirs = model(x), keras(x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)


def test_batch_norm_blocks_keep_keras_order() -> None:
    block = build("seed_cnn", batch_norm=True).features[0]
    assert [name for name, _ in block.named_children()] == ["conv", "bn", "relu", "pool"]


def test_unknown_model_suggests_a_close_name() -> None:
    with pytest.raises(RegistryError, match="unknown model 'nope'"):
        build("nope")
    with pytest.raises(RegistryError, match="did you mean 'seed_cnn'"):
        build("seed_cn")


def test_unknown_model_argument_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"'model\.hiddn'.*did you mean 'hidden'"):
        build("mlp", hiddn=3)


def test_bad_activation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.activation.*relu.*did you mean 'relu'"):
        build("mlp", activation="rleu")


def test_too_small_image_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="too small"):
        build("seed_cnn3", input_shape=(1, 12, 12))
