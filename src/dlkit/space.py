"""Search spaces for `dlkit tune`, as data: `loguniform(1e-4, 1e-2)`, `choice(32, 64, 128)` and friends.

    uniform(low, high)        a float in [low, high]
    loguniform(low, high)     a float in [low, high], uniform in log scale (low > 0): learning rates
    int(low, high[, step])    an integer in [low, high] (every step-th from low)
    logint(low, high)         an integer in [low, high], uniform in log scale (low >= 1)
    choice(a, b, ...)         one of the values: numbers, words, true/false, lists such as [128, 64]

The arguments are read as YAML values (so `1e-4` is a number and `[128, 64]` a list), as `--set` reads
its values. No Optuna here: `dlkit.tune` turns a Distribution into Optuna's.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from dlkit.yamlfile import load_yaml_value

FORMS = ("uniform(low, high)", "loguniform(low, high)", "int(low, high[, step])", "logint(low, high)",
         "choice(a, b, ...)")
_CALL = re.compile(r"\s*([A-Za-z_]+)\s*\((.*)\)\s*", re.DOTALL)
_INTERIOR = 1 / math.pi  # where a float range is probed besides its ends: an irrational fraction, never round


@dataclass(frozen=True)
class Distribution:
    """One searched field: `kind` with its bounds (and step), or its choices."""

    kind: str  # uniform | loguniform | int | logint | choice
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    choices: tuple[Any, ...] = ()

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"choice({', '.join(_text(c) for c in self.choices)})"
        step = f", {self.step}" if self.step is not None else ""
        return f"{self.kind}({_text(self.low)}, {_text(self.high)}{step})"

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "logint")

    def probes(self) -> list[Any]:
        """Values the recipe must accept for the space to make sense: both ends, a float range's
        non-round inside value (an integer field given `uniform` fails there), every choice."""
        if self.kind == "choice":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.kind == "uniform":
            return [self.low, self.high, self.low + (self.high - self.low) * _INTERIOR]
        if self.kind == "loguniform":
            return [self.low, self.high, self.low * (self.high / self.low) ** _INTERIOR]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        """Whether the search can draw `value` (a recipe's own value, run as the study's first trial)."""
        if self.kind == "choice":
            return any(_same(value, c) for c in self.choices)
        if not _number(value) or (self.kind in ("int", "logint") and value != int(value)):
            return False
        assert self.low is not None and self.high is not None
        inside = self.low <= value <= self.high
        return inside and (self.step is None or (value - self.low) % self.step == 0)

    def labels(self) -> list[Any]:
        """The choices as Optuna stores them: the values themselves when all are plain scalars, else
        each one's JSON text (Optuna's categorical choices are None, bool, int, float or str)."""
        if all(c is None or isinstance(c, bool | int | float | str) for c in self.choices):
            return list(self.choices)
        return [json.dumps(c) for c in self.choices]

    def value_of(self, label: Any) -> Any:
        """The recipe value a stored parameter stands for (a choice's value for its label)."""
        if self.kind != "choice":
            return label
        for choice, own in zip(self.choices, self.labels()):
            if _same(own, label):
                return choice
        raise KeyError(label)

    def label_of(self, value: Any) -> Any:
        """The parameter Optuna stores for a recipe value (a choice's label)."""
        if self.kind != "choice":
            return value
        for choice, own in zip(self.choices, self.labels()):
            if _same(choice, value):
                return own
        raise KeyError(value)


def parse_distribution(text: Any) -> Distribution:
    """`loguniform(1e-4, 1e-2)` and friends as a Distribution; a ValueError saying what is wrong and
    which forms there are otherwise."""
    if isinstance(text, Distribution):
        return text
    forms = f"use one of {', '.join(FORMS)}"
    match = _CALL.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return _refuse(f"'{text}' is not a distribution; {forms}")
    kind, inner = match.group(1), match.group(2)
    if kind not in ("uniform", "loguniform", "int", "logint", "choice"):
        return _refuse(f"'{kind}' is not a distribution; {forms}")
    args = load_yaml_value(f"[{inner}]", f"'{text}'") if inner.strip() else []
    if not isinstance(args, list):
        return _refuse(f"the arguments of '{text}' are not a list of values; {forms}")
    if kind == "choice":
        return _choice(text, args)
    return _range(text, kind, args)


def _choice(text: str, args: list[Any]) -> Distribution:
    if len(args) < 2:
        _refuse(f"'{text}': choice needs at least two values")
    for i, value in enumerate(args):
        if any(_same(value, other) for other in args[:i]):
            _refuse(f"'{text}': {_text(value)} is given twice")
    return Distribution("choice", choices=tuple(args))


def _range(text: str, kind: str, args: list[Any]) -> Distribution:
    integer = kind in ("int", "logint")
    most = 3 if kind == "int" else 2
    if not 2 <= len(args) <= most:
        _refuse(f"'{text}': {kind} takes {'low, high and an optional step' if most == 3 else 'low and high'}")
    if not all(_number(a) and math.isfinite(a) for a in args):
        _refuse(f"'{text}': the bounds must be finite numbers")
    if integer and not all(isinstance(a, int) for a in args):
        _refuse(f"'{text}': {kind} takes whole numbers; use uniform or loguniform for a float")
    low, high = args[0], args[1]
    step = args[2] if len(args) == 3 else None
    if not low < high:
        _refuse(f"'{text}': low must be below high")
    if kind == "loguniform" and low <= 0:
        _refuse(f"'{text}': loguniform needs low > 0 (it draws uniformly in log scale)")
    if kind == "logint" and low < 1:
        _refuse(f"'{text}': logint needs low >= 1 (it draws uniformly in log scale)")
    if step is not None and (step < 1 or (high - low) % step):
        _refuse(f"'{text}': the step must be at least 1 and divide high - low ({high - low})")
    return Distribution(kind, low, high, step if step != 1 else None)


def _refuse(message: str) -> Distribution:
    raise ValueError(message)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind: 1, 1.0 and true are three different choices to a recipe field."""
    return type(a) is type(b) and a == b


def shown(value: Any) -> str:
    """A drawn value for people: floats to 6 significant digits, the rest as the distribution's text."""
    return f"{value:.6g}" if isinstance(value, float) else _text(value)


def _text(value: Any) -> str:
    """A value as the distribution's text writes it: words bare, everything else as JSON."""
    if isinstance(value, str) and load_yaml_value(value, "value") == value and "," not in value and value.strip():
        return value
    return json.dumps(value)
