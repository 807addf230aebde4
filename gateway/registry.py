"""One registry per family of interchangeable algorithms (defenses here, attacks in the offline job).

Classes register by their ``name`` attribute with a decorator; duplicates and unknown names raise.
Built-in members live in modules that are imported on first lookup, so importing a package stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


class ParameterError(ValueError):
    """A user's bad choice: an unknown member, or a parameter it refuses. The CLIs print it without a traceback."""


class Registry:
    def __init__(self, kind: str, builtin_modules: Sequence[str] = ()) -> None:
        self.kind = kind
        self._builtin_modules = tuple(builtin_modules)
        self._classes: dict[str, Any] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute `name`")
        self._add(name, cls)
        return cls

    def function(self, name: str) -> Callable[[F], F]:
        """Decorator for a family of plain functions (e.g. trainers), registered under ``name``."""
        return lambda fn: self._add(name, fn)

    def _add(self, name: str, member: Any) -> Any:
        if name in self._classes and self._classes[name] is not member:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._classes[name].__qualname__}")
        self._classes[name] = member
        return member

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

    def get(self, name: str) -> Any:
        self._load_builtins()
        try:
            return self._classes[name]
        except KeyError:
            raise ParameterError(f"unknown {self.kind} {name!r}; choose one of {self.names()}") from None
