"""Resumable checkpoints: everything a run needs to continue to the same result, as one file.

`checkpoints/state-<global step>.safetensors` holds the tensors (model, optimizer, early stopping's
best weights, the epoch's batch order and running sums, every random generator's state) and, as JSON
in the safetensors header, the rest (position, history, schedule, callbacks, the hashes of the recipe
and data, library versions) with a sha256 over every tensor's bytes. One file, one `os.replace`: a
kill at any moment leaves the previous checkpoint whole. The newest `keep` files stay; a truncated or
corrupt newest one is skipped for the one before, with a note. No pickle: tensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dlkit.config import parse_duration
from dlkit.errors import RunDirError, Terminated
from dlkit.files import write_atomic_path

FORMAT = "dlkit-state/1"
META_KEY = "dlkit_state"
PREFIX = "state-"
HOLD_ENV = "DLKIT_HOLD_AFTER_STEP"  # test hook: after this global step, wait (for a kill or a signal)


@dataclass
class TrainState:
    """A checkpoint in memory: `tree` nests dicts and lists of tensors and JSON values; `meta` is JSON."""

    tree: dict[str, Any]
    meta: dict[str, Any]
    path: Path | None = None


# ---- tensors and JSON, kept apart -------------------------------------------------------------------

def pack(tree: Any, tensors: dict[str, torch.Tensor], at: str = "") -> Any:
    """`tree` as JSON, every tensor moved to `tensors` under its path and left as {"$t": path}; a
    dict with int keys (an optimizer's state) is kept as {"$int": {...}} so that the keys come back ints."""
    if isinstance(tree, torch.Tensor):
        # a copy: safetensors refuses tensors that share storage (tied weights)
        tensors[at] = tree.detach().to("cpu", copy=True).contiguous()
        return {"$t": at}
    if isinstance(tree, dict):
        ints = bool(tree) and all(isinstance(k, int) for k in tree)
        packed = {str(k): pack(v, tensors, f"{at}/{k}") for k, v in tree.items()}
        return {"$int": packed} if ints else packed
    if isinstance(tree, list | tuple):
        return [pack(v, tensors, f"{at}/{i}") for i, v in enumerate(tree)]
    return tree


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `pack`."""
    if isinstance(tree, dict):
        if set(tree) == {"$t"}:
            return tensors[tree["$t"]]
        if set(tree) == {"$int"}:
            return {int(k): unpack(v, tensors) for k, v in tree["$int"].items()}
        return {k: unpack(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    return tree


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# ---- random generators ------------------------------------------------------------------------------

def rng_state(batches: torch.Generator) -> dict[str, Any]:
    """Every generator a run draws from: torch's (CPU and each CUDA device), numpy's, python's, and
    dlkit's own (batch order and augmentation)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "batches": batches.get_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], batches: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    batches.set_state(state["batches"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- files ------------------------------------------------------------------------------------------

def state_files(directory: Path) -> list[Path]:
    """The resumable checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{PREFIX}*.safetensors") if p.name[len(PREFIX):-12].isdigit())


def save_state(directory: Path, step: int, state: TrainState, keep: int) -> Path:
    """Write `state` as `state-<step>.safetensors` atomically, then drop all but the newest `keep`."""
    tensors: dict[str, torch.Tensor] = {}
    tree = pack(state.tree, tensors)
    meta = {**state.meta, "format": FORMAT, "tree": tree, "digest": digest(tensors)}
    path = directory / f"{PREFIX}{step:09d}.safetensors"
    header = {META_KEY: json.dumps(meta)}
    write_atomic_path(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    for old in state_files(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_state(path: Path) -> TrainState:
    """A checkpoint read back and checked: readable, dlkit's format, every tensor's bytes as written."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise RunDirError(f"checkpoint {path.name} is unreadable ({' '.join(str(exc).split())})") from None
    try:
        meta = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunDirError(f"checkpoint {path.name} is not a dlkit resume checkpoint ({FORMAT})")
    if digest(tensors) != meta.get("digest"):
        raise RunDirError(f"checkpoint {path.name} is corrupt (its tensors do not match their sha256)")
    return TrainState(unpack(meta.pop("tree"), tensors), meta, path)


def read_position(path: Path) -> dict[str, Any] | None:
    """Where a checkpoint stands (epoch, step, stage), from its header alone; None when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        return meta["position"]
    except (SafetensorError, OSError, json.JSONDecodeError, TypeError, KeyError):
        return None


def latest_state(directory: Path) -> tuple[TrainState, list[str]]:
    """The newest checkpoint that reads back whole, and a note for each newer one that did not."""
    notes: list[str] = []
    for path in reversed(state_files(directory)):
        try:
            return load_state(path), notes
        except RunDirError as exc:
            notes.append(f"{exc}; resumed from the checkpoint before it")
    if notes:
        raise RunDirError(f"no checkpoint in {directory} reads back whole ({notes[-1].split(';')[0]})")
    raise RunDirError(f"{directory} holds no resumable checkpoint (the run stopped before its first one); "
                      "re-run the recipe")


# ---- when to write, and stopping at a step boundary ---------------------------------------------------

@dataclass
class Checkpointer:
    """Writes resumable checkpoints into `directory`: after every epoch, and inside an epoch every
    `every` optimizer steps (an int) or every `every` of training time (a duration such as "10m")."""

    directory: Path
    every: int | str = "10m"
    keep: int = 2
    run_meta: dict[str, Any] = field(default_factory=dict)  # recipe hash, data fingerprint, versions

    def __post_init__(self) -> None:
        self.seconds = None if isinstance(self.every, int) else parse_duration(self.every)
        self.last_step = 0
        self.last_time = time.monotonic()
        hold = os.environ.get(HOLD_ENV, "")
        self.hold_at = int(hold) if hold.isdigit() else None

    def due(self, global_step: int) -> bool:
        """Whether a mid-epoch checkpoint is due after this step."""
        if self.seconds is None:
            return global_step - self.last_step >= int(self.every)
        return time.monotonic() - self.last_time >= self.seconds

    def save(self, global_step: int, state: TrainState) -> Path:
        state.meta |= self.run_meta | {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path = save_state(self.directory, global_step, state, self.keep)
        self.last_step, self.last_time = global_step, time.monotonic()
        return path

    def hold(self, global_step: int, stop: StopFlag) -> None:
        """The test hook: after step `DLKIT_HOLD_AFTER_STEP`, say so on stderr and wait until a
        signal asks to stop (or the process is killed)."""
        if self.hold_at != global_step:
            return
        print(f"holding after step {global_step}", file=sys.stderr, flush=True)
        while stop.signum is None:
            time.sleep(0.01)


@dataclass
class StopFlag:
    """Set by the first Ctrl-C or SIGTERM during training: the loop stops at the next step boundary."""

    signum: int | None = None

    def exception(self) -> KeyboardInterrupt:
        import signal

        return Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """While the block runs (in the main thread), the first Ctrl-C or SIGTERM sets the flag and says
    that training stops after the current step; a second one stops at once. Elsewhere, a flag that
    no signal sets."""
    import signal
    import threading

    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    # under torchrun a Ctrl-C reaches each worker twice: from the terminal, then relayed by the agent
    relayed = 2.0 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0.0
    first = [0.0]

    def handler(signum: int, frame: Any) -> None:
        if flag.signum is not None:
            if time.monotonic() - first[0] < relayed:
                return
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        flag.signum, first[0] = signum, time.monotonic()
        if os.environ.get("RANK", "0") != "0":
            return  # many processes: rank 0 speaks for the run
        what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"{what}: stopping after this step to write a checkpoint (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in before.items():
            signal.signal(s, h)
