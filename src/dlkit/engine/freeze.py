"""Freezing for transfer learning: which parameters train in a stage, and what "frozen" means.

A frozen parameter has `requires_grad=False`, so it gets no gradient and the optimizer (built from
trainable parameters only) keeps no state for it. A batch norm whose parameters are all frozen runs
in eval mode while the rest of the model trains, so its running statistics do not drift (the Keras
trap of issue #9965, which TensorFlow 2 fixed the same way).

`base` is everything but the model's `head`. `unfreeze` opens the top of a frozen base again: its
last `blocks` (the model's `blocks` surface) or its last `layers`, counted as Keras lists them, so
that a seed's "unfreeze the last 15 layers" means the same here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlkit.config import OptimizerCfg, UnfreezeCfg
from dlkit.errors import ConfigError

# the layers Keras lists in a conv base (activations are part of their conv or dense layer there)
KERAS_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LSTM, nn.GRU, nn.Embedding)


@dataclass(frozen=True)
class Trainable:
    """What a stage trains: counts of trainable and frozen parameters (elements)."""

    trainable: int
    frozen: int

    def line(self) -> str:
        return f"{self.trainable:,} trainable parameters, {self.frozen:,} frozen"


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's head (every dlkit model has one)."""
    head = getattr(model, "head", None)
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no head to keep trainable; it cannot freeze its base")
    return list(head.parameters())


def base_blocks(model: nn.Module) -> list[nn.Module]:
    """The trunk's blocks, input side first (the `blocks` surface without the head)."""
    head_ids = {id(p) for p in head_parameters(model)}
    return [b for b in model.blocks if not any(id(p) in head_ids for p in b.parameters())]


def keras_layers(model: nn.Module) -> list[nn.Module]:
    """The base's layers in forward order, as Keras counts them (conv, batch norm, pooling, dense)."""
    return [m for block in base_blocks(model) for m in block.modules() if isinstance(m, KERAS_LAYERS)]


def set_trainable(model: nn.Module, freeze: str, unfreeze: UnfreezeCfg | None = None,
                  where: str = "train") -> Trainable:
    """Freeze nothing (`none`) or the base (`base`), then unfreeze the base's top as `unfreeze` says."""
    if freeze == "none":
        if unfreeze is not None:
            raise ConfigError(f"{where}.unfreeze needs {where}.freeze=base: nothing is frozen to unfreeze")
        for p in model.parameters():
            p.requires_grad_(True)
        return count(model)
    model.requires_grad_(False)
    for p in head_parameters(model):
        p.requires_grad_(True)
    if unfreeze is not None:
        if unfreeze.last_blocks is not None:
            opened, unit, k = base_blocks(model), "blocks", unfreeze.last_blocks
        else:
            opened, unit, k = keras_layers(model), "layers", unfreeze.last_layers
        if k > len(opened):
            raise ConfigError(f"{where}.unfreeze.last_{unit} is {k} but the base of {type(model).__name__} "
                              f"has {len(opened)} {unit}")
        for module in opened[len(opened) - k:]:
            module.requires_grad_(True)
    return count(model)


def count(model: nn.Module) -> Trainable:
    """Trainable and frozen parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Trainable(trainable, sum(p.numel() for p in model.parameters()) - trainable)


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except batch norms whose parameters are all frozen, which stay in eval mode."""
    model.train()
    for module in frozen_norms(model):
        module.eval()
    return model


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """Batch norms with affine parameters, none of them trainable."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.weight is not None and not any(p.requires_grad for p in m.parameters())]


def param_groups(model: nn.Module, cfg: OptimizerCfg) -> list[dict]:
    """Trainable parameters as optimizer groups: one, or head and base when the base has its own
    learning rate or weight decay (`optimizer.base_lr`, `optimizer.base_weight_decay`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.base_lr is None and cfg.base_weight_decay is None:
        return [{"params": trainable}]
    head_ids = {id(p) for p in head_parameters(model)}
    head = [p for p in trainable if id(p) in head_ids]
    base = [p for p in trainable if id(p) not in head_ids]
    groups = [{"params": head, "name": "head"}]
    if base:
        groups.append({"params": base, "name": "base",
                       "lr": cfg.base_lr if cfg.base_lr is not None else cfg.lr,
                       "weight_decay": cfg.base_weight_decay if cfg.base_weight_decay is not None
                       else cfg.weight_decay})
    return groups


def frozen_prefix(model: nn.Module) -> tuple[list[nn.Module], nn.Module] | str:
    """Split a model whose base is wholly frozen into (modules computed once, module that trains).

    The prefix is `features` plus the head's leading parameter-free steps (pooling, flatten), so the
    cache holds pooled features where the head pools first. Returns why not, when it cannot.
    """
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if not isinstance(features, nn.Module) or head is None:
        return f"{type(model).__name__} has no features/head split"
    if any(p.requires_grad for p in features.parameters()):
        return "the base trains in this stage"
    if any(isinstance(m, nn.Dropout) for m in features.modules()):
        return "the base has dropout, which changes its output every epoch"
    if not any(True for _ in features.parameters()):
        return "the model has no base to cache"
    prefix: list[nn.Module] = [features]
    rest = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    while rest and not any(True for _ in rest[0].parameters()) and not isinstance(rest[0], nn.Dropout):
        prefix.append(rest.pop(0))
    if not any(p.requires_grad for m in rest for p in m.parameters()):
        return "nothing trains in this stage"
    return prefix, nn.Sequential(*rest)


@torch.no_grad()
def run_prefix(prefix: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The prefix applied to a batch, in eval mode (identical to train mode: its norms are frozen, it has no dropout)."""
    for module in prefix:
        was = module.training
        module.eval()
        x = module(x)
        module.train(was)
    return x
