"""The run directory: the contract between training and everything that reads a run later."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlkit.config import Recipe, parse_recipe
from dlkit.errors import DlkitError, RunDirError

BUNDLE_FORMAT = "dlkit-bundle/1"
REQUIRED = ("recipe.yaml", "bundle.json", "model.safetensors", "summary.json")


def new_run_dir(recipe_name: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """Create `out`, or `root/<recipe>-<timestamp>`; refuse to reuse a folder that holds files."""
    if out is not None:
        path = Path(out).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise DlkitError(f"--out {path} already exists and is not an empty folder; choose a new path")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{recipe_name}-{stamp}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


@dataclass
class RunDir:
    """A finished run on disk: its resolved recipe, summary, bundle and metrics."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open a finished run, or fail with what is missing."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise RunDirError(f"run directory {p} not found; pass the folder `dlkit run` printed")
        missing = [name for name in REQUIRED if not (p / name).is_file()]
        if missing:
            raise RunDirError(f"{p} is not a finished run (missing {', '.join(missing)}); re-run the recipe")
        return cls(p)

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    def read_json(self, name: str) -> dict[str, Any]:
        """One of the run's JSON files, with a clear error when it is corrupt."""
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{self.path / name} is unreadable ({exc}); re-run the recipe") from None

    def summary(self) -> dict[str, Any]:
        return self.read_json("summary.json")

    def bundle(self) -> dict[str, Any]:
        """The bundle metadata; checks it is a format this version reads."""
        bundle = self.read_json("bundle.json")
        if bundle.get("format") != BUNDLE_FORMAT:
            raise RunDirError(f"{self.path / 'bundle.json'} has format {bundle.get('format')!r}, expected {BUNDLE_FORMAT}")
        return bundle

    def recipe(self) -> Recipe:
        """The resolved recipe the run was made with."""
        raw = yaml.safe_load((self.path / "recipe.yaml").read_text(encoding="utf-8"))
        return parse_recipe(raw, origin=str(self.path / "recipe.yaml"))

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics, in order."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
