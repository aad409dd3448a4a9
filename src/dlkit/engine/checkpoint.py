"""Model weights on disk: safetensors only (never pickle), written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dlkit.engine.runtime import model_device
from dlkit.errors import RunDirError


def save_weights(model: nn.Module, path: Path, meta: dict[str, Any] | None = None) -> None:
    """Write the model's state_dict to `path` (and `meta` as JSON beside it), atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _dedupe_shared(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    if meta is not None:
        write_json(path.with_suffix(".json"), meta)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load weights saved by `save_weights` into `model` (strict: every name must match)."""
    if not path.is_file():
        raise RunDirError(f"weights file {path} not found; was the run finished?")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RunDirError(f"weights file {path} is corrupt ({exc}); re-run the recipe") from None
    device = model_device(model)
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    missing = [m for m in missing if m not in _shared_aliases(model)]
    if missing or unexpected:
        raise RunDirError(f"weights file {path} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
