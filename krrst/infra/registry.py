"""One registry for every name a user types: models, datasets, methods, protocols, presets.

timm's pattern, its core only: `register(name)` as a decorator or a call,
`get(name)` that fails in one line with "did you mean", `names()` and `in`.
A miss is a user mistake (`KrrstError`); registering a name twice is a
programming mistake (`ValueError`), caught when the module imports.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from krrst.infra.config import did_you_mean
from krrst.infra.errors import KrrstError

T = TypeVar("T")
_MISSING: Any = object()


def unknown_name(what: str, name: str, valid: Iterable[str], listing: str) -> KrrstError:
    """`unknown preset 'Demo'; did you mean 'demo'? valid presets: cifar100, demo` as a `KrrstError`."""
    valid = list(valid)
    return KrrstError(f"unknown {what} {name!r}{did_you_mean(name, valid) or ';'} {listing}: {', '.join(valid)}")


class Registry(Generic[T]):
    """Names -> objects of one kind (`kind`: "model", "dataset", ...), in registration order or sorted."""

    def __init__(self, kind: str, *, plural: str | None = None, sort: bool = False):
        self.kind = kind
        self.plural = plural or kind + "s"
        self.sort = sort  # list the names sorted (else in registration order)
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T = _MISSING) -> Any:
        """`registry.register("x", obj)` adds `obj`; `@registry.register("x")` adds the decorated function."""
        if entry is _MISSING:
            return lambda decorated: self.register(name, decorated)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str, what: str | None = None) -> T:
        """The entry of `name`, else a one-line `KrrstError` (see `unknown`)."""
        if name not in self._entries:
            raise self.unknown(name, what)
        return self._entries[name]

    def unknown(self, name: str, what: str | None = None, see: str = "") -> KrrstError:
        """`unknown <what> 'x'; did you mean 'y'? valid <kind>s: ...`; `what` (default: the kind) may name the
        option the user typed (e.g. "--arch"), `see` a command that lists them (e.g. "krrst models")."""
        listing = f"valid {self.plural}" + (f" ({see})" if see else "")
        return unknown_name(what or self.kind, name, self.names(), listing)

    def names(self) -> list[str]:
        return sorted(self._entries) if self.sort else list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._entries[name]) for name in self.names()]

    def select(self, keep: Callable[[T], bool]) -> tuple[str, ...]:
        """The names whose entry passes `keep`, in listing order (e.g. the subset baselines among the methods)."""
        return tuple(name for name, entry in self.items() if keep(entry))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
