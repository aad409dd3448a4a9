"""Named registries of models, data sets and recipes; a name can be registered only once."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from dlkit.errors import RegistryError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table that refuses duplicates and suggests close names for typos."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers `obj` under `name`."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        """Register `obj` under `name`; a name already taken is an error."""
        if name in self._items:
            raise RegistryError(f"{self.kind} '{name}' is already registered; pick another name")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Look `name` up; an unknown name is an error listing what exists."""
        try:
            return self._items[name]
        except KeyError:
            hint = did_you_mean(name, self._items)
            raise RegistryError(
                f"unknown {self.kind} '{name}'{hint}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
