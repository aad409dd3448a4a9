"""Model weights on disk: safetensors only (never pickle), written atomically.

A checkpoint is one file: its tensors and its metadata (epoch, stage, metrics) live together, the
metadata as JSON in the safetensors header's `__metadata__["dlkit"]`. One `os.replace` swaps both,
so a kill at any moment leaves weights and metadata that agree.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dlkit.engine.runtime import model_device
from dlkit.errors import RunDirError
from dlkit.files import write_atomic_path
from dlkit.models import build_from_bundle
from dlkit.rundir import RunDir

META_KEY = "dlkit"


def save_weights(model: nn.Module, path: Path, meta: dict[str, Any] | None = None) -> None:
    """Write the model's state_dict to `path`, with `meta` (JSON) in the same file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _dedupe_shared(state)
    header = {META_KEY: json.dumps(meta)} if meta is not None else None
    write_atomic_path(path, lambda tmp: save_file(state, str(tmp), metadata=header))


def read_meta(path: Path) -> dict[str, Any] | None:
    """The metadata saved with a checkpoint's weights, or None when it has none."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as exc:
        raise RunDirError(f"checkpoint {path} is unreadable ({_one_line(exc)})") from None
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise RunDirError(f"checkpoint {path} has corrupt metadata") from None
    return meta if isinstance(meta, dict) else None


def load_run_model(run: RunDir) -> nn.Module:
    """A finished run's model on the CPU in eval mode: its files checked against the sha256s in
    bundle.json, the architecture rebuilt from the bundle, the weights loaded strictly."""
    bundle = run.verify()
    model = build_from_bundle(bundle, str(run.path / "bundle.json"))
    return load_weights(model, run.weights).eval()


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load weights saved by `save_weights` into `model` (strict: every name and shape must match)."""
    if not path.is_file():
        raise RunDirError(f"weights file {path} not found; was the run finished?")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RunDirError(f"weights file {path} is corrupt ({_one_line(exc)}); re-run the recipe") from None
    device = model_device(model)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise RunDirError(f"weights file {path} does not fit the model (shapes differ: {', '.join(wrong[:2])}); "
                          "bundle.json does not describe these weights")
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    missing = [m for m in missing if m not in _shared_aliases(model)]
    if missing or unexpected:
        raise RunDirError(f"weights file {path} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _dedupe_shared(state: dict[str, torch.Tensor]) -> None:
    # safetensors refuses tensors that share storage (tied weights): keep the first name only
    seen: dict[tuple[int, int], str] = {}
    for name in list(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            del state[name]
        else:
            seen[key] = name


def _shared_aliases(model: nn.Module) -> set[str]:
    """State-dict names dropped by `_dedupe_shared` because they alias an earlier tensor."""
    state = {k: v for k, v in model.state_dict().items()}
    before = set(state)
    _dedupe_shared(state)
    return before - set(state)
