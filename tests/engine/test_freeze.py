"""Freezing and staged fine-tuning: frozen really means frozen, stages open exactly what they say,
per-group learning rates, and the feature cache trains the same head as the uncached path."""
from __future__ import annotations

import pytest
import torch

from dlkit.config import OptimizerCfg, StageCfg, TrainCfg, UnfreezeCfg, parse_recipe
from dlkit.data.bundle import DataBundle, TensorSplit
from dlkit.engine import Callback, FitState, feature_cache, fit
from dlkit.engine.feature_cache import build_cache
from dlkit.engine.freeze import base_blocks, keras_layers, param_groups, set_trainable, train_mode
from dlkit.engine.runtime import seed_everything
from dlkit.errors import ConfigError
from dlkit.models import build, with_model_defaults

CPU = torch.device("cpu")
HEAD = {"pool": "avg", "hidden": [16], "dropout": 0.3}


def mobilenet(**head) -> torch.nn.Module:
    """A narrow MobileNetV2 on 32x32 images with a seed-style head (one sigmoid output), its batch-norm
    statistics set from data as a pretrained base's are (at init they are 0/1, and the deep base's
    output collapses to ~1e-8 in eval mode)."""
    seed_everything(0)
    model = build("mobilenet_v2", num_classes=1, input_shape=(3, 32, 32), width_mult=0.25, head=head or HEAD)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        model.train()(image_bundle(128, 0).train.x)
    for m in norms:
        m.momentum = 0.1
    return model


def image_bundle(n: int = 64, n_val: int = 32) -> DataBundle:
    """Binary images whose class is their brightness: learnable from pooled features."""
    g = torch.Generator().manual_seed(0)

    def split(rows: int) -> TensorSplit:
        y = torch.randint(0, 2, (rows,), generator=g)
        x = torch.randn(rows, 3, 32, 32, generator=g)
        x += 2.0 * y[:, None, None, None]
        return TensorSplit(x, y.float())

    return DataBundle(split(n), split(n_val), split(16), ["a", "b"], (3, 32, 32), "binary", "image", {})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (batch-norm statistics included), copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    """Keys whose tensors are no longer bit-identical."""
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def train(model, data, cfg: TrainCfg, callbacks=(), augment=None):
    return fit(model, data, cfg, device=CPU, precision="fp32", generator=torch.Generator().manual_seed(0),
               callbacks=callbacks, augment=augment)


class StageSnapshots(Callback):
    """Keeps the model's tensors at each stage's end and the optimizer's state size at each epoch."""

    def __init__(self) -> None:
        self.at_end: list[dict[str, torch.Tensor]] = []
        self.optimizer_state: list[set[int]] = []
        self.groups: list[list[tuple[str, float, float]]] = []

    def on_epoch_end(self, state: FitState, metrics) -> None:
        opt = state.optimizer
        self.optimizer_state.append({id(p) for p in opt.state})
        self.groups.append([(g.get("name", ""), g["lr"], g["weight_decay"]) for g in opt.param_groups])

    def on_stage_end(self, state: FitState) -> None:
        self.at_end.append(snapshot(state.model))


def head_keys(model) -> set[str]:
    head_ids = {id(t) for t in [*model.head.parameters(), *model.head.buffers()]}
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k for k, t in named.items() if id(t) in head_ids}


def test_a_frozen_base_is_bit_identical_after_training_batch_norm_statistics_included():
    model, data = mobilenet(), image_bundle()
    before = snapshot(model)
    spy = StageSnapshots()
    cfg = TrainCfg(epochs=2, batch_size=16, freeze="base", cache_features="off", optimizer=OptimizerCfg(lr=1e-2))
    history = train(model, data, cfg, [spy])
    assert changed(before, model) == head_keys(model) == {"classifier.0.weight", "classifier.0.bias",
                                                          "classifier.3.weight", "classifier.3.bias"}
    assert any(k.endswith("running_mean") for k in before)  # the base has batch norms, and they did not move
    trainable = {id(p) for p in model.head.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    assert spy.optimizer_state[-1] == trainable  # no optimizer state for a frozen tensor
    assert history.stages[0]["trainable_params"] == sum(p.numel() for p in model.head.parameters())
    assert history.stages[0]["cached_features"] is False


def test_frozen_batch_norms_stay_in_eval_mode_while_the_rest_trains():
    model = mobilenet()
    set_trainable(model, "base", UnfreezeCfg(last_blocks=1))
    train_mode(model)
    norms = [m for m in model.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    last = list(model.features[-1].modules())
    assert all(m.training == any(m is n for n in last) for m in norms)
    assert model.head.training


def test_stages_change_exactly_the_parameters_they_open():
    model, data = mobilenet(), image_bundle()
    before = snapshot(model)
    spy = StageSnapshots()
    cfg = TrainCfg(batch_size=16, cache_features="off", stages=[
        StageCfg(name="head", epochs=1, freeze="base", optimizer=OptimizerCfg(lr=1e-2)),
        StageCfg(name="top", epochs=1, freeze="base", unfreeze=UnfreezeCfg(last_blocks=2),
                 optimizer=OptimizerCfg(lr=1e-3))])
    history = train(model, data, cfg, [spy])
    head = head_keys(model)
    assert {k for k in before if not torch.equal(before[k], spy.at_end[0][k])} == head
    opened = {k for k in before if k.startswith(("features.17.", "features.18."))}
    assert {k for k in before if not torch.equal(spy.at_end[0][k], spy.at_end[1][k])} == head | opened
    assert [s["freeze"] for s in history.stages] == ["base", "base"]
    assert history.stages[1]["trainable_params"] > history.stages[0]["trainable_params"]


def test_the_feature_cache_trains_the_same_head_as_the_uncached_path():
    runs = {}
    for mode in ("off", "auto"):
        model, data = mobilenet(), image_bundle()
        torch.manual_seed(0)  # dropout draws from the global generator on both paths
        cfg = TrainCfg(epochs=3, batch_size=16, freeze="base", cache_features=mode, optimizer=OptimizerCfg(lr=1e-2))
        runs[mode] = (train(model, data, cfg), model)
    (plain, plain_model), (cached, cached_model) = runs["off"], runs["auto"]
    assert cached.stages[0]["cached_features"] is True and plain.stages[0]["cached_features"] is False
    for a, b in zip(plain.epochs, cached.epochs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    for (key, a), b in zip(plain_model.state_dict().items(), cached_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
    assert changed(snapshot(mobilenet()), cached_model) == head_keys(cached_model)  # the head did train


def test_augmentation_turns_the_cache_off_and_says_why():
    model, data = mobilenet(), image_bundle()
    history = train(model, data, TrainCfg(epochs=1, batch_size=16, freeze="base"), augment=lambda x, g: x.flip(-1))
    assert history.stages[0]["cached_features"] is False
    assert history.notes == ["stage 1: features not cached: augmentation changes the base's input every epoch "
                             "(turn data.augment off to train on cached features)"]


def test_features_are_cached_once_and_recomputed_only_after_the_base_changed(monkeypatch):
    calls = []
    monkeypatch.setattr(feature_cache, "build_cache", lambda *a, **k: calls.append(1) or build_cache(*a, **k))
    model, data = mobilenet(), image_bundle()
    frozen = StageCfg(epochs=1, freeze="base")
    cfg = TrainCfg(batch_size=16, stages=[frozen, frozen, StageCfg(epochs=1, freeze="none"), frozen])
    history = train(model, data, cfg)
    assert [s["cached_features"] for s in history.stages] == [True, True, False, True]
    assert len(calls) == 2  # stage 2 reuses stage 1's features; stage 4 recomputes the base stage 3 trained


def test_head_and_base_get_their_own_learning_rate_and_weight_decay():
    model, data = mobilenet(), image_bundle()
    spy = StageSnapshots()
    opt = OptimizerCfg(lr=1e-3, weight_decay=1e-4, base_lr=1e-5, base_weight_decay=0.0)
    train(model, data, TrainCfg(epochs=1, batch_size=16, freeze="base", unfreeze=UnfreezeCfg(last_blocks=1),
                                optimizer=opt), [spy])
    assert spy.groups[0] == [("head", 1e-3, 1e-4), ("base", 1e-5, 0.0)]
    set_trainable(model, "base")  # nothing of the base trains: one group
    assert [len(g["params"]) for g in param_groups(model, opt)] == [4]


def test_vgg16_counts_its_base_layers_as_keras_does():
    model = build("vgg16", num_classes=10, input_shape=(3, 32, 32), head={"pool": "flatten", "hidden": [8]})
    layers = keras_layers(model)
    assert len(layers) == 18  # 13 convs + 5 max-pools: Keras' VGG16 base less its InputLayer
    counts = set_trainable(model, "base", UnfreezeCfg(last_layers=15))
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    assert [m.weight.requires_grad for m in convs] == [False, False] + [True] * 11
    assert counts.frozen == 1792 + 36928  # block1_conv1 and block1_conv2
    assert len(base_blocks(model)) == 13


@pytest.mark.parametrize(("stage", "message"), [
    ({"unfreeze": {"last_blocks": 2}},
     "train.stages.0.unfreeze needs train.stages.0.freeze=base: nothing is frozen to unfreeze"),
    ({"freeze": "base", "unfreeze": {"last_blocks": 20}},
     "train.stages.0.unfreeze.last_blocks is 20 but the base of MobileNetV2 has 19 blocks"),
])
def test_stage_mistakes_are_one_clear_line(stage, message):
    model, data = mobilenet(), image_bundle()
    with pytest.raises(ConfigError) as err:
        train(model, data, TrainCfg(stages=[StageCfg(epochs=1, **stage)]))
    assert str(err.value) == message


@pytest.mark.parametrize(("unfreeze", "message"), [
    ({}, "give exactly one of last_blocks or last_layers"),
    ({"last_blocks": 1, "last_layers": 2}, "give exactly one of last_blocks or last_layers"),
])
def test_unfreeze_wants_exactly_one_count(unfreeze, message):
    raw = {"name": "r", "data": {"name": "digits"}, "model": {"name": "mlp"},
           "train": {"stages": [{"freeze": "base", "unfreeze": unfreeze}]}}
    with pytest.raises(ConfigError) as err:
        parse_recipe(raw)
    assert str(err.value) == f"recipe: field 'train.stages.0.unfreeze': {message}"


def test_a_head_on_a_model_that_builds_its_own_is_refused():
    with pytest.raises(ConfigError, match="model.head needs a model with an ImageNet layout .*'lenet' builds"):
        build("lenet", num_classes=10, input_shape=(1, 28, 28), head={"pool": "avg"})


def test_weights_bring_imagenet_preprocessing_unless_the_recipe_says_otherwise():
    base = {"name": "r", "data": {"name": "mnist"}, "model": {"name": "mobilenet_v2", "weights": "imagenet"}}
    given = parse_recipe(base)
    recipe = with_model_defaults(given)
    assert (recipe.data.normalize, recipe.data.channels) == ("imagenet", 3)
    assert (given.data.normalize, given.data.channels) == ("scale", None)  # a new recipe; the given one as it was
    assert with_model_defaults(recipe) == recipe  # twice changes nothing
    explicit = with_model_defaults(parse_recipe(base | {"data": {"name": "mnist", "normalize": "scale", "channels": 1}}))
    assert (explicit.data.normalize, explicit.data.channels) == ("scale", 1)
    assert with_model_defaults(parse_recipe(base | {"model": {"name": "mobilenet_v2"}})).data.normalize == "scale"
