"""Hugging Face hub ids and local folders: load through `transformers` with safetensors only and no
remote code, quietly, and turn every failure into one line that says what to do.

A hub id may name its revision after an `@`: `distilbert/distilbert-base-uncased@12040acc...` (a
commit hash, full or short, a tag or a branch). Every load passes it as `revision=`, so the model
and its tokenizer are the same files on every machine; without one, the hub's `main` is read.
Hub ids cannot hold an `@`, so the suffix never clashes with a name; local folders are not split.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dlkit.errors import ConfigError

T = TypeVar("T")


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers on dlkit's output (its notes go to summary.json)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def is_local(source: str) -> bool:
    """True when `source` names a folder on disk (or looks like a path), not a hub id."""
    # a hub id is "name" or "owner/name"
    return (Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
            or "\\" in source)


def split_revision(source: str) -> tuple[str, str | None]:
    """(hub id, revision) of `owner/name@revision`; a local folder or an id without `@` has no revision."""
    if is_local(source) or "@" not in source:
        return source, None
    repo, _, revision = source.rpartition("@")
    if not repo or not revision:
        raise ConfigError(f"{source}: expected a hub id and its revision as owner/name@REVISION "
                          "(a commit hash, tag or branch)")
    return repo, revision


def hub_cached(source: str, revision: str | None = None) -> bool:
    """True when the hub id's config.json (at `revision`) is in the Hugging Face cache (HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (assumed yes behind a proxy, which we cannot probe)."""
    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hf_load(load: Callable[[str, bool, str | None], T], source: str, what: str) -> T:
    """`load(id_or_folder, local_only, revision)` for a hub id (`@revision` split off) or a local folder,
    failures turned into one ConfigError line.

    A hub id already in the cache loads from it without asking the hub (fast and the same every
    run); one that is not cached is downloaded, unless the hub is unreachable: then one line at
    once, instead of the hub client's minute of retries.
    """
    from huggingface_hub import constants

    quiet_transformers()
    local_only, repo, revision = True, source, None
    if is_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{what} {source}: no such folder; give a folder written by save_pretrained or a hub id")
        if what == "model.weights" and not any(folder.glob("*.safetensors")):
            raise ConfigError(
                f"{what} {source}: no .safetensors weights in the folder; dlkit loads no pickled checkpoints: "
                "re-save the model with save_pretrained(folder) (safetensors is its default)"
            )
        repo = str(folder)
    else:
        repo, revision = split_revision(source)
        if not hub_cached(repo, revision):
            local_only = bool(constants.HF_HUB_OFFLINE) or not hub_reachable()
    try:
        return load(repo, local_only, revision)
    except OSError as exc:
        raise ConfigError(_hub_message(source, repo, revision, what, exc)) from None
    except ValueError as exc:  # e.g. a config.json of another model type
        raise ConfigError(f"{what} {source}: {' '.join(str(exc).split())[:300]}") from None


def _hub_message(source: str, repo: str, revision: str | None, what: str, exc: OSError) -> str:
    """One line for a hub id that could not be loaded: offline and not cached, unknown, or not safetensors."""
    from huggingface_hub import constants

    detail = " ".join(str(exc).split())
    if "safetensors" in detail:
        return (f"{what} {source}: the model has no safetensors weights and dlkit loads no pickled checkpoints; "
                "pick a model that publishes model.safetensors, or convert it and give the local folder")
    if revision is not None and ("valid git identifier" in detail or "Revision Not Found" in detail):
        return (f"{what} {source}: the hub has no revision '{revision}' of {repo}; give a commit hash, tag or "
                "branch it has, or drop the @ to read main")
    if "couldn't connect" in detail or "offline" in detail.lower() or "cached files" in detail or "local_files_only" in detail:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        at = f" --revision {revision}" if revision else ""
        return (f"{what} {source}: not in the Hugging Face cache {constants.HF_HUB_CACHE} and the hub cannot be "
                f"reached{offline}; on a machine with internet run `hf download {repo}{at}` and copy its HF_HOME "
                "here (or point HF_HOME at it), or give a local folder saved with save_pretrained")
    if "is not a local folder and is not a valid model identifier" in detail or "404" in detail:
        return f"{what} {source}: no such model on the Hugging Face hub; check the id (e.g. distilbert/distilbert-base-uncased)"
    return f"{what} {source}: cannot load it ({detail[:300]})"
