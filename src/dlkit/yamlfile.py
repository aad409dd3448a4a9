"""Recipes' YAML, read with bounds: a safe loader that refuses what no recipe needs.

A recipe is a few hundred YAML nodes. Aliases are shared when read but copied when the recipe is
merged and validated, so nine levels of ten aliases (a 700-byte "billion laughs") would become 10^9
nodes: the expanded count is bounded before anything is built. Recursion, nesting and file size are
bounded too; python tags and bad UTF-8 are one ConfigError line naming the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dlkit.errors import ConfigError

MAX_YAML_NODES = 100_000
MAX_YAML_BYTES = 1 << 20  # 1 MiB; the largest packaged recipe is under 2 KB
MAX_YAML_DEPTH = 64  # packaged recipes nest 4 levels; PyYAML's composer recurses, 300 levels crash it


class _YamlRefused(yaml.YAMLError):
    """A document dlkit will not build: why, as the end of one line."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`; a string would reach model
    builders) and refuses documents whose aliases expand past MAX_YAML_NODES or refer to themselves."""

    _depth = 0

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expansion(node)
        return node

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlRefused(f"its lists or mappings are nested more than {MAX_YAML_DEPTH} deep; "
                                   "a recipe needs a few levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes the document has once every alias is copied out (shared nodes counted once per
    use, each computed once), refusing a cycle or a count over MAX_YAML_NODES."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()  # the nodes on the current path: reaching one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_ids.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise _YamlRefused(f"its aliases expand to more than {MAX_YAML_NODES:,} values (a recipe needs a few "
                                   "hundred); write the values out instead of nesting aliases")
        elif key not in sizes:
            if key in open_ids:
                raise _YamlRefused("an alias refers to its own anchor (a recursive structure); write the values out")
            open_ids.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node))


def load_yaml_text(text: str, origin: str) -> Any:
    """Parse YAML text with dlkit's bounded safe loader; any problem is one ConfigError line naming `origin`."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except _YamlRefused as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    except yaml.constructor.ConstructorError as exc:
        tag = re.search(r"tag '([^']*)'", str(exc.problem or ""))
        if tag:
            name = tag[1].replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(f"{origin}: YAML tag '{name}' is not allowed: a recipe holds plain mappings, "
                              "lists and values only") from None
        raise ConfigError(f"{origin} is not valid YAML{_line(exc)}; fix the syntax") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML{_line(exc)}; fix the syntax") from None


def _line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}" if mark is not None else ""


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping from `path`, turning I/O, encoding, size and syntax problems into ConfigErrors."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read recipe file {path}: {exc.strerror}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"recipe file {path} is larger than {MAX_YAML_BYTES >> 20} MiB; a recipe is a few KB of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    raw = load_yaml_text(text, f"recipe file {path}")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe file {path} must hold a YAML mapping with data, model and train")
    return raw


def load_yaml_value(text: str, origin: str) -> Any:
    """One `--set` value as YAML (bounded like a recipe); text that is not valid YAML stays a string."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except _YamlRefused as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    except yaml.YAMLError:
        return text
