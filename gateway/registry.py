"""One registry per family of interchangeable algorithms (defenses here, attacks in the offline job).

Classes register by their ``name`` attribute with a decorator; duplicates and unknown names raise.
Built-in members live in modules that are imported on first lookup, so importing a package stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T", bound=type)


class Registry:
    def __init__(self, kind: str, builtin_modules: Sequence[str]) -> None:
        self.kind = kind
        self._builtin_modules = tuple(builtin_modules)
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute `name`")
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._classes[name].__qualname__}")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """For tests that register a dummy."""
        self._classes.pop(name, None)

    def _load_builtins(self) -> None:
        if not self._loaded:
            for module in self._builtin_modules:
                importlib.import_module(module)
            self._loaded = True

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        self._load_builtins()
        try:
            return self._classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}") from None
