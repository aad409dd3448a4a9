"""Ensembles: finished runs' models side by side, their class probabilities averaged (or their votes counted).

An ensemble is an ordinary model family: its bundle arguments name each member's architecture (the
member bundle's own `model` spec) and its weights file holds every member's tensors under
`members.<i>.`, so `build_from_bundle`, `load_weights`, `predict`, `serve` and the ONNX export treat
it as any other model. Its output is log-probabilities, which softmax (or, binary, the log-odds,
which a sigmoid) turns back into the ensemble's probabilities exactly:

- `mean`: p = sum_m w_m p_m, computed as logsumexp_m(log w_m + log p_m), so no probability underflows.
- `vote`: each member's predicted class gets its weight w_m (the weights sum to 1); the ensemble's
  probability is the vote share mixed with a little of the mean probability,
  p = (votes + VOTE_MIX * mean p) / (1 + VOTE_MIX): the votes decide, the mean probability breaks
  ties (and only ties, while shares differ by more than VOTE_MIX), and no class is given probability
  0, so log loss stays finite.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlkit.errors import ConfigError
from dlkit.models import build, register_model
from dlkit.models.surface import ModelSurface

METHODS = ("mean", "vote")
TASKS = ("multiclass", "binary", "regression")
VOTE_MIX = 1e-3  # share of the mean probability in a vote's output: ties broken, never a zero probability


class Combine(nn.Module):
    """Members' outputs (members, batch, outputs) to the ensemble's (batch, outputs); no parameters."""

    def __init__(self, weights: Sequence[float], method: str, task: str) -> None:
        super().__init__()
        w = torch.tensor([float(v) for v in weights], dtype=torch.float32)
        # not persistent: the weights live in bundle.json (member_weights), the weights file holds tensors to load
        self.register_buffer("weights", w / w.sum(), persistent=False)
        self.method, self.task = method, task

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        w = self.weights.view(-1, 1, 1)
        if self.task == "regression":
            return (w * outputs).sum(0)
        # log-probabilities (members, batch, classes): a binary logit z gives (log(1 - p), log p)
        lp = (torch.cat([F.logsigmoid(-outputs), F.logsigmoid(outputs)], dim=2) if self.task == "binary"
              else F.log_softmax(outputs, dim=2))
        mean = torch.logsumexp(torch.log(w) + lp, dim=0)
        if self.method == "vote":
            votes = (w * F.one_hot(lp.argmax(2), lp.shape[2]).to(lp.dtype)).sum(0)
            mixed = torch.stack([torch.log(votes), mean + math.log(VOTE_MIX)])
            mean = torch.logsumexp(mixed, dim=0) - math.log1p(VOTE_MIX)
        return mean[:, 1:] - mean[:, :1] if self.task == "binary" else mean


class Ensemble(ModelSurface):
    """Members run on the same input; `Combine` turns their outputs into the ensemble's."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], method: str, task: str,
                 input_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine = Combine(weights, method, task)
        self.input_dtype = input_dtype or members[0].input_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's log-probabilities (binary: log-odds; regression: the weighted mean)."""
        return self.combine(self.member_outputs(x))

    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's outputs, stacked: (members, batch, outputs)."""
        return torch.stack([member(x) for member in self.members])

    @property
    def features(self) -> nn.Module:
        """The members: the trunk, in parallel rather than in sequence."""
        return self.members

    @property
    def head(self) -> nn.Module:
        """The combination of the members' outputs (no parameters)."""
        return self.combine

    @property
    def cam_layer(self) -> nn.Module | None:
        """None: Grad-CAM hooks one layer of one model, and an ensemble has many."""
        return None

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.members, self.combine]

    def mapped(self, fn: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """The same ensemble with each member replaced by `fn(member)` (sharing its parameters)."""
        other = Ensemble([fn(m) for m in self.members], self.combine.weights.tolist(), self.combine.method,
                         self.combine.task, self.input_dtype)
        return other.train(self.training)


@register_model("ensemble")
def ensemble(
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (1, 28, 28),
    members: Sequence[dict[str, Any]] = (),
    member_weights: Sequence[float] | None = None,
    method: str = "mean",
    task: str = "multiclass",
) -> Ensemble:
    """Each of `members` (a bundle's model spec: name, args, head) built for these classes and inputs,
    weighted by `member_weights` (default equal; scaled to sum to 1), combined by `method`."""
    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least two members, got {len(members)}")
    if method not in METHODS:
        raise ConfigError(f"model.method must be mean or vote, got '{method}'")
    if task not in TASKS:
        raise ConfigError(f"model.task must be one of {', '.join(TASKS)}, got '{task}'")
    if method == "vote" and task == "regression":
        raise ConfigError("a regression ensemble averages its members' values; --method vote needs classes")
    weights = list(member_weights) if member_weights is not None else [1.0] * len(members)
    if len(weights) != len(members) or not all(isinstance(w, int | float) and 0 < w < math.inf for w in weights):
        raise ConfigError(f"model.member_weights must be {len(members)} positive numbers, one per member, "
                          f"got {weights}")
    return Ensemble([_member(spec, num_classes, tuple(input_shape)) for spec in members], weights, method, task)


def _member(spec: dict[str, Any], num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """One member, its data arguments those of the ensemble (a member spec saying otherwise is refused)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"an ensemble member must be a model spec with a name and args, got {spec!r}")
    args = dict(spec.get("args") or {})
    given = {"num_classes": args.pop("num_classes", num_classes), "input_shape": tuple(args.pop("input_shape", input_shape))}
    if given != {"num_classes": num_classes, "input_shape": input_shape}:
        raise ConfigError(f"ensemble member '{spec['name']}' has {given}, the ensemble "
                          f"num_classes {num_classes} and input_shape {input_shape}")
    return build(spec["name"], head=spec.get("head"), num_classes=num_classes, input_shape=input_shape, **args)
