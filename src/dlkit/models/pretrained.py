"""Pretrained weights for the torchvision-layout models: torchvision's published ImageNet checkpoints
(from torch.hub's cache, else downloaded and sha256-checked) or a local .pth / .safetensors file,
copied into a model whose head may differ from the checkpoint's.

The cache is torch.hub's own folder (`$TORCH_HOME/hub/checkpoints`), so a checkpoint that torchvision
already downloaded is used as it is, and one downloaded here serves torchvision too.
"""
from __future__ import annotations

import contextlib
import http.client
import inspect
import os
import pickle
import re
import socket
import sys
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlkit.errors import ConfigError, DataError
from dlkit.files import sha256_file

_MIRROR_ENV = "DLKIT_WEIGHTS_URL"
DOWNLOAD_TIMEOUT_S = 30.0  # a server that stops answering fails the download instead of hanging it
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPERS = ("state_dict", "model")
_LISTED = 6  # keys named in a report line before "and N more"


@dataclass(frozen=True)
class HubFile:
    """One published torchvision checkpoint: its file name (`name-<sha256 prefix>.pth`) and official URL."""

    file: str
    url: str

    @property
    def sha256_prefix(self) -> str:
        """The hex after the last '-' of the file name: what the file's sha256 must start with."""
        return self.file.rsplit("-", 1)[-1].split(".", 1)[0]


def _torchvision(file: str) -> HubFile:
    return HubFile(file, f"https://download.pytorch.org/models/{file}")


# torchvision's DEFAULT weights of each model (torchvision/models/*.py, `<Model>_Weights.DEFAULT`)
IMAGENET: dict[str, HubFile] = {
    "alexnet": _torchvision("alexnet-owt-7be5be79.pth"),  # AlexNet_Weights.IMAGENET1K_V1
    "mobilenet_v2": _torchvision("mobilenet_v2-7ebf99e0.pth"),  # MobileNet_V2_Weights.IMAGENET1K_V2
    "resnet18": _torchvision("resnet18-f37072fd.pth"),  # ResNet18_Weights.IMAGENET1K_V1
    "resnet50": _torchvision("resnet50-11ad3fa6.pth"),  # ResNet50_Weights.IMAGENET1K_V2
    "vgg11": _torchvision("vgg11-8a719046.pth"),  # VGG11_Weights.IMAGENET1K_V1
    "vgg16": _torchvision("vgg16-397923af.pth"),  # VGG16_Weights.IMAGENET1K_V1
    "vgg16_bn": _torchvision("vgg16_bn-6c64b313.pth"),  # VGG16_BN_Weights.IMAGENET1K_V1
}


def checkpoint_dir() -> Path:
    """torch.hub's checkpoint folder, `$TORCH_HOME/hub/checkpoints` (default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_url(hub: HubFile) -> str:
    """Where to download `hub` from: its official URL, or `$DLKIT_WEIGHTS_URL/<file>` when that mirror is set."""
    mirror = os.environ.get(_MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{hub.file}" if mirror else hub.url


def source_name(weights: str, model_name: str) -> str:
    """How a report names the weights: "imagenet (<file>)" for "imagenet", else the path as given."""
    if weights == "imagenet" and model_name in IMAGENET:
        return f"imagenet ({IMAGENET[model_name].file})"
    return str(weights)


def load_state(weights: str, model_name: str, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """The state dict that `weights` names: "imagenet" for torchvision's checkpoint of `model_name`, else a path."""
    if weights == "imagenet":
        return imagenet_state(model_name, progress=progress)
    return local_state(weights)


def imagenet_state(model_name: str, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict of `model_name`: from torch.hub's cache (hash-checked), else downloaded."""
    hub = IMAGENET.get(model_name)
    if hub is None:
        raise ConfigError(
            f"model '{model_name}' has no ImageNet checkpoint; models with one: {', '.join(sorted(IMAGENET))}"
        )
    folder = checkpoint_dir()
    path = folder / hub.file
    if path.is_file():
        _check_cached(path, hub)
        return _as_state(_torch_load(path, cached=True), path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the checkpoint folder {folder} ({_reason(exc)}): set TORCH_HOME to a writable folder"
        ) from None
    url = weights_url(hub)
    try:
        # torch.hub announces the download on stdout, which belongs to dlkit's results: send it to stderr
        with contextlib.redirect_stdout(sys.stderr), _socket_timeout(DOWNLOAD_TIMEOUT_S):
            obj = torch.hub.load_state_dict_from_url(
                url, model_dir=str(folder), map_location="cpu", progress=progress, check_hash=True,
                file_name=hub.file, weights_only=True,
            )
    except Exception as exc:  # sorted by _download_error: bad hash, no network, unreadable file
        error = _download_error(exc, model_name, hub, url, path)
        if error is None:
            raise
        raise error from None
    return _as_state(obj, path)


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Sockets opened inside time out after `seconds` of silence: torch.hub's urlopen sets no timeout."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _check_cached(path: Path, hub: HubFile) -> None:
    """Refuse a cached checkpoint whose sha256 does not start with its name's prefix (torch.hub never re-checks)."""
    prefix = hub.sha256_prefix
    if not re.fullmatch(r"[0-9a-f]+", prefix):
        return  # no hash in the name: nothing to check against
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise DataError(
            f"{path} is corrupt (sha256 {digest[:max(8, len(prefix))]} does not start with {prefix}): "
            "delete it and run again"
        )


def _download_error(exc: Exception, model_name: str, hub: HubFile, url: str, path: Path) -> DataError | None:
    """The DataError for a failed `load_state_dict_from_url`, or None for a failure of another kind."""
    folder = path.parent
    if path.is_file():  # the download landed (hash-checked), so reading it failed
        return _unreadable_torch_file(path, exc, cached=True)
    if isinstance(exc, RuntimeError) and "invalid hash value" in str(exc):
        return DataError(
            f"downloaded {hub.file} from {url} but its sha256 does not match (the download was cut short, or the "
            f"server or a proxy altered it): try again or download {hub.url} by hand into {folder}"
        )
    if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
        where = f" from {url}" if url != hub.url else ""
        return DataError(
            f"ImageNet weights for {model_name} are not on this machine and cannot be downloaded{where} "
            f"({_reason(exc)}): download {hub.url} into {folder} (set TORCH_HOME to use another folder), "
            "or set model.weights to a local .pth or .safetensors file"
        )
    return None


def _reason(exc: BaseException) -> str:
    """A short, one-line description of why a download or a folder failed."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        reason: Any = exc.reason
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    elif isinstance(exc, http.client.IncompleteRead):
        text = f"connection dropped after {len(exc.partial)} bytes"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return _one_line(text)


def _one_line(text: str, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def local_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a local .safetensors or weights-only PyTorch file (.pth, .pt, .bin, .ckpt)."""
    path = Path(path).expanduser()
    accepted = f"{', '.join(_TORCH_SUFFIXES)} (PyTorch, weights only) or {_SAFETENSORS_SUFFIX}"
    choices = f"set model.weights to a {accepted} file, to 'imagenet', or to 'none' for random initial weights"
    if not path.exists():
        raise DataError(f"{path}: weights file not found; {choices}")
    if not path.is_file():
        raise DataError(f"{path} is not a file; {choices}")
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        return _as_state(_safetensors_load(path), path)
    if suffix in _TORCH_SUFFIXES:
        return _as_state(_torch_load(path, cached=False), path)
    raise DataError(f"{path}: unknown weights format '{suffix or '(no suffix)'}'; accepted: {accepted}")


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({_one_line(str(exc), 120)})") from None


def _torch_load(path: Path, *, cached: bool) -> Any:
    """torch.load with weights_only=True (never arbitrary pickles), its failures as one-line DataErrors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError,
            KeyError, TypeError, IndexError) as exc:
        raise _unreadable_torch_file(path, exc, cached=cached) from None


def _unreadable_torch_file(path: Path, exc: BaseException, *, cached: bool) -> DataError:
    """The DataError for a PyTorch file that weights-only loading cannot read."""
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        detail = f"it pickles {refused.group(1)}, which weights-only loading refuses to run"
        advice = "save a plain state dict (torch.save(model.state_dict(), path)) or a .safetensors file"
    elif "Weights only load failed" in text:
        detail = "it holds Python objects that weights-only loading refuses to run"
        advice = "save a plain state dict (torch.save(model.state_dict(), path)) or a .safetensors file"
    else:
        if isinstance(exc, EOFError):
            detail = "it ends too early: empty or truncated"
        elif isinstance(exc, RuntimeError) and text.strip():
            detail = _one_line(text.strip().split(". ")[0], 120)  # torch's first sentence says what failed
        else:
            detail = f"unreadable: {type(exc).__name__} {_one_line(text, 80)}".rstrip()
        advice = "it is truncated, corrupt or not a PyTorch file; save or copy it again"
    if cached:
        advice = "delete it and run again"
    return DataError(f"{path} is not a weights-only PyTorch checkpoint ({detail}): {advice}")


def _as_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A name -> tensor dict from a loaded file: unwraps {"state_dict": ...} / {"model": ...} and DDP's "module."."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapped = [k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)]
        others = [k for k, v in obj.items() if k not in wrapped and _is_tensor_dict(v)]
        if len(wrapped) + len(others) > 1:
            names = ", ".join(f"'{k}'" for k in [*wrapped, *others])
            raise DataError(f"{path} holds several state dicts ({names}); save the one to load on its own")
        if wrapped:
            obj = obj[wrapped[0]]
    for key, value in obj.items():
        if not isinstance(key, str):
            raise DataError(f"{path}: key {key!r} is not a parameter name; a weights file maps names to tensors")
        if not isinstance(value, torch.Tensor):
            raise DataError(
                f"{path}: '{key}' is not a tensor but {type(value).__name__}; a weights file maps names to tensors"
            )
    if not obj:
        raise DataError(f"{path} holds no tensors")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


@dataclass
class LoadReport:
    """What `load_into` did: tensors copied, model keys left fresh, checkpoint keys not used."""

    source: str
    loaded: int
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One human line, e.g. "loaded 312 tensors from imagenet (...); new: classifier.1.weight, ..."."""
        text = f"loaded {self.loaded} tensor{'' if self.loaded == 1 else 's'} from {self.source}"
        if self.fresh:
            text += f"; new: {_listing(self.fresh)}"
        fresh = set(self.fresh)
        unused = [k for k in self.ignored if k not in fresh]
        if unused:
            text += f"; not in the model: {_listing(unused)}"
        return text


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown if len(keys) <= _LISTED else f"{shown} and {len(keys) - _LISTED} more"


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Copy `state` into `model` in place: every trunk tensor must fit; head tensors load when their shapes match.

    The head is `model.head` (found by tensor identity, since torchvision-layout heads are views);
    a head tensor missing from `state` or of another shape keeps its initialisation (`fresh`), and the
    checkpoint's tensors left unused (absent from the model, or head tensors of another shape) are
    `ignored`. Nothing is copied unless every trunk tensor fits, and tensors are copied in place so
    optimizers and views that hold them keep working.
    """
    head = getattr(model, "head", None)
    head_ids = {id(t) for t in (*head.parameters(), *head.buffers())} if isinstance(head, nn.Module) else set()
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    model_name = type(model).__name__
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    fresh: list[str] = []
    for key, target in targets.items():
        value = state.get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            raise DataError(f"{source}: '{key}' is not a tensor but {type(value).__name__}")
        if value is not None and value.shape == target.shape:
            copies.append((target, value))
        elif id(target) in head_ids:
            fresh.append(key)
        elif value is None:
            first = next(iter(state), None)
            seen = f" (its first key is '{first}')" if first is not None else " (it is empty)"
            raise DataError(
                f"{source} does not fit {model_name}: '{key}' is missing from the checkpoint{seen}; check model.name"
            )
        else:
            hint = " and model.width_mult" if _takes(model, "width_mult") else ""
            raise DataError(
                f"{source} does not fit {model_name}: '{key}' has shape {_shape(value)} in the checkpoint but "
                f"{_shape(target)} in the model; check model.name{hint}"
            )
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)
    copied = set(targets) - set(fresh)
    ignored = [k for k in state if k not in copied]
    return LoadReport(source=source, loaded=len(copies), fresh=fresh, ignored=ignored)


def _takes(model: nn.Module, arg: str) -> bool:
    """Whether the model's class is built with argument `arg` (for the hint of a shape mismatch)."""
    try:
        return arg in inspect.signature(type(model)).parameters
    except (TypeError, ValueError):
        return False


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in t.shape) + ")"
