"""What a study is about, checked before any trial runs: the base recipe, its search space, the metric
and its direction, the pruner, where the study lives. No Optuna here."""
from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlkit.config import ModelCfg, Recipe, parse_recipe, set_path
from dlkit.engine.loop import resolve_stages
from dlkit.engine.optim import metric_mode
from dlkit.errors import ConfigError, did_you_mean
from dlkit.models import MODELS, check_args, with_model_defaults
from dlkit.recipes import load_recipe
from dlkit.space import Distribution, parse_distribution

FORMAT = "dlkit-study/1"
# the per-epoch metrics a study can follow; the test split is never one (choosing on it would overfit it)
METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
# where a recipe's data are on this machine: processes on other machines may keep them elsewhere; and where
# its runs are tracked, which is not a setting of what the trials run (each command says it: --track)
LOCAL_FIELDS = ("data.path", "data.data_dir", "track.")
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class TuneSettings:
    """One study: trials are `recipe` with the drawn values of `space` set; `metric` is followed
    (maximized or minimized) epoch by epoch."""

    recipe: Recipe  # the base: the recipe as given (--set, --epochs, ...) without its tune section
    space: dict[str, Distribution]
    metric: str
    direction: str
    pruner: str
    study: str
    storage: str  # an Optuna RDB URL
    folder: Path  # runs/<study>: the trials' run directories and the study's files

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in resolve_stages(self.recipe.train))

    def trial_recipe(self, values: Mapping[str, Any], origin: str = "trial") -> Recipe:
        """The base recipe with `values` (field -> drawn value) set, validated; a ConfigError when the
        combination is not a valid recipe."""
        raw = self.recipe.model_dump(mode="json", exclude_none=True)
        for key, value in values.items():
            set_path(raw, key, value)
        return with_model_defaults(parse_recipe(raw, origin=origin))

    def base_values(self) -> dict[str, Any] | None:
        """The base recipe's own value of every searched field, when the search can draw all of them
        (the study's first trial then runs the recipe as given); else None."""
        raw = self.recipe.model_dump(mode="json")
        defaults = {name: p.default for name, p in inspect.signature(MODELS.get(self.recipe.model.name)).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        values = {}
        for key, dist in self.space.items():
            found, value = _get_path(raw, key)
            parts = key.split(".")
            if not found and len(parts) == 2 and parts[0] == "model" and parts[1] in defaults:
                found, value = True, defaults[parts[1]]
            if isinstance(value, tuple):
                value = list(value)
            if not found or not dist.contains(value):
                return None
            values[key] = value
        return values

    def identity(self) -> dict[str, Any]:
        """What the study records, so that every process working on it runs the same trials."""
        return {"format": FORMAT, "recipe": self.recipe.model_dump(mode="json", exclude_none=True, exclude={"track"}),
                "space": {k: str(d) for k, d in self.space.items()}, "metric": self.metric, "pruner": self.pruner}

    def differences(self, stored: Mapping[str, Any]) -> list[str]:
        """How this study's settings differ from those `stored` in an existing study (empty: none)."""
        out = []
        there = {k: parse_distribution(v) for k, v in (stored.get("space") or {}).items()}
        if there != self.space:
            shown = "; ".join(f"{k}: {d}" for k, d in there.items())
            out.append(f"its search space is {shown or 'empty'}")
        for name in ("metric", "pruner"):
            if stored.get(name) != getattr(self, name):
                out.append(f"its {name} is {stored.get(name)}")
        mine, theirs = _flat(self.recipe.model_dump(mode="json", exclude_none=True)), _flat(stored.get("recipe") or {})
        changed = [k for k in sorted(set(mine) | set(theirs))
                   if mine.get(k) != theirs.get(k) and not k.startswith(LOCAL_FIELDS)]
        out += [f"its recipe has {k} = {_short(theirs.get(k))} (here {_short(mine.get(k))})" for k in changed[:3]]
        if len(changed) > 3:
            out.append(f"and {len(changed) - 3} more recipe fields differ")
        return out

    @classmethod
    def from_identity(cls, stored: Mapping[str, Any], *, direction: str, study: str, storage: str,
                      folder: Path) -> TuneSettings:
        """The settings an existing study recorded (a helper process takes them from there)."""
        recipe = with_model_defaults(parse_recipe(stored["recipe"], origin=f"study '{study}'"))
        space = {k: parse_distribution(v) for k, v in stored["space"].items()}
        return cls(recipe, space, stored["metric"], direction, stored["pruner"], study, storage, folder)


def resolve(recipe: str | Path | Recipe, *, space: Sequence[str] | Mapping[str, str] = (),
            overrides: Sequence[str] = (), epochs: int | None = None, seed: int | None = None,
            fields: dict[str, Any] | None = None, metric: str = "val_accuracy", direction: str | None = None,
            pruner: str = "median", study: str | None = None, storage: str | None = None,
            runs_root: str | Path = "runs") -> TuneSettings:
    """Check everything a study needs before any trial runs; each mistake is one ConfigError line."""
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, list(overrides), epochs=epochs, seed=seed,
                                                                 fields=fields)
    extra = space_items(space)
    if extra:
        raw = base.model_dump(mode="json", exclude_none=True)
        raw["tune"] = {**(raw.get("tune") or {}), **extra}
        base = with_model_defaults(parse_recipe(raw, origin="--space"))
    if not base.tune:
        raise ConfigError(f"recipe '{base.name}' has no tune section; give the search space with --space "
                          "FIELD=DISTRIBUTION, e.g. --space 'train.optimizer.lr=loguniform(1e-4, 1e-2)'")
    searched = dict(base.tune)
    _check_model_args(base, searched)
    base = base.model_copy(update={"tune": None})
    if metric.startswith("test_"):
        raise ConfigError(f"--metric {metric} is measured on the test split, which a study must not choose on (it "
                          f"would overfit it); use {metric.replace('test_', 'val_', 1)}")
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric} is not a per-epoch metric{did_you_mean(metric, METRICS)}; "
                          f"choose {', '.join(METRICS)} (a study never chooses on the test split)")
    natural = "maximize" if metric_mode(metric) == "max" else "minimize"
    direction = direction or natural
    if direction not in DIRECTIONS:
        raise ConfigError(f"--direction must be maximize or minimize, got '{direction}'")
    if direction != natural:
        raise ConfigError(f"--direction {direction} would look for the worst {metric}; use {natural} "
                          "(or leave --direction out)")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got '{pruner}'{did_you_mean(pruner, PRUNERS)}")
    if not sum(s.epochs for s in resolve_stages(base.train)):
        raise ConfigError(f"recipe '{base.name}' trains no epoch; a trial needs at least one (--epochs)")
    name = study or base.name
    if not _STUDY_NAME.fullmatch(name):
        raise ConfigError(f"--study '{name}' must be a folder name: letters, digits, '.', '_' or '-' "
                          "(starting with a letter or digit)")
    folder = Path(runs_root) / name
    url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    return TuneSettings(base, searched, metric, direction, pruner, name, url, folder)


def space_items(items: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """`--space FIELD=DIST` items as a mapping (a mapping is taken as it is)."""
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise ConfigError(f"--space expects FIELD=DISTRIBUTION (e.g. 'train.optimizer.lr=loguniform(1e-4, 1e-2)'), "
                              f"got '{item}'")
        out[key.strip()] = text.strip()
    return out


def _check_model_args(recipe: Recipe, space: Mapping[str, Distribution]) -> None:
    """A searched model argument must be one the model's builder takes (model.name searched: each choice's)."""
    names = space["model.name"].choices if "model.name" in space else (recipe.model.name,)
    for key in space:
        parts = key.split(".")
        if parts[0] == "model" and parts[1] not in ModelCfg.model_fields:
            for name in names:
                try:
                    check_args(str(name), {parts[1]: None})
                except ConfigError as exc:
                    raise ConfigError(f"tune: {exc}") from None


def _get_path(raw: Any, dotted: str) -> tuple[bool, Any]:
    node = raw
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _flat(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return text if len(text) <= 40 else text[:37] + "..."
