"""One registry type for everything editlab looks up by name: methods, models, architectures, dataset
formats, datasets (and later suites, probes, metrics).

An entry has a name, a one-line description, a factory (called lazily, so a broken optional dependency
breaks only its own entry) and free-form metadata that the CLI, docs and reports read (a metric's
direction and range, a method's family, a dataset's file). Nothing keeps a second list by hand: the
CLI listings and error messages are generated from these registries.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import EditlabError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    description: str
    factory: Callable[[], T]
    meta: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def load(self) -> T:
        return self.factory()


def lazy(target: str) -> Callable[[], Any]:
    """A factory for "package.module:attr" that imports the module only when called."""
    module, _, attr = target.partition(":")

    def factory() -> Any:
        return getattr(importlib.import_module(module), attr)

    factory.__qualname__ = f"lazy({target})"
    return factory


class Registry(Generic[T]):
    """Named entries of one kind. `kind` names the thing in error messages ("method", "model", ...);
    `error` is the EditlabError subclass raised for an unknown name."""

    def __init__(self, kind: str, error: type[EditlabError] = EditlabError, case_sensitive: bool = False) -> None:
        self.kind = kind
        self.error = error
        self.case_sensitive = case_sensitive
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def _norm(self, name: str) -> str:
        return name if self.case_sensitive else name.lower()

    def register(self, name: str, description: str, factory: Callable[[], T], *, aliases: tuple[str, ...] = (),
                 **meta: Any) -> Entry[T]:
        key = self._norm(name)
        if key in self._entries or key in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        entry = Entry(name, description, factory, dict(meta), tuple(aliases))
        self._entries[key] = entry
        for a in aliases:
            self._aliases[self._norm(a)] = key
        return entry

    def resolve(self, name: str) -> str:
        """Canonical name for `name` (or an alias); raises the registry's error for unknown names."""
        if not isinstance(name, str) or not name.strip():
            raise self.error(f"no {self.kind} given (got {name!r}); available: {', '.join(self.names())}")
        key = self._norm(name.strip())
        key = self._aliases.get(key, key)
        if key not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[key].name

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self._norm(self.resolve(name))]

    def get(self, name: str) -> T:
        return self.entry(name).load()

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = self._norm(name)
        return key in self._entries or key in self._aliases

    def names(self) -> list[str]:
        return [e.name for e in self._entries.values()]

    def entries(self) -> list[Entry[T]]:
        return list(self._entries.values())

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self._entries)

    def copy(self) -> "Registry[T]":
        """An independent registry with the same entries (tests extend a copy, never the original)."""
        new: Registry[T] = Registry(self.kind, self.error, self.case_sensitive)
        new._entries = dict(self._entries)
        new._aliases = dict(self._aliases)
        return new

    def describe(self) -> dict[str, str]:
        """name -> one-line description, in registration order."""
        return {e.name: e.description for e in self._entries.values()}
