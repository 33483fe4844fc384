"""One registry for keyshard's plug-ins: encryption methods (``keyshard.methods``) and tasks
(``keyshard.tasks``).

A registry maps names to plug-in instances, as litdata's ``compression.py`` maps compressor
names to compressors.  It fills itself on first use, in one order everywhere: the built-in
modules (each exposes its instance under one attribute, ``METHOD`` or ``TASK``), then the
installed packages' entry points of its group (if it has one), then whatever ``register`` adds
in-process.  A name is registered once; a kind of plug-in adds its own rule (``check``) for what
else must not clash.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one kind (``what``: "method", "task"), by name."""

    def __init__(self, what: str, base: type, package: str, builtins: tuple[str, ...], attr: str,
                 group: str | None = None, check: Callable[[T, list[T]], None] | None = None):
        self.what, self.base, self.package, self.builtins, self.attr = what, base, package, builtins, attr
        self.group, self.check = group, check
        self._plugins: dict[str, T] = {}
        self._loaded = False

    def register(self, plugin) -> T:
        """Add a plug-in (an instance or a class) under its ``name``."""
        self._load()
        instance = plugin() if isinstance(plugin, type) else plugin
        self._add(instance)
        return instance

    def get(self, name) -> T:
        """The plug-in called ``name``; KeyshardError naming the known ones otherwise."""
        self._load()
        try:
            return self._plugins[name]
        except (KeyError, TypeError):
            from keyshard.errors import KeyshardError

            raise KeyshardError(f"unknown {self.what} {str(name)[:40]!r}; expected one of "
                                f"{', '.join(self._plugins)}") from None

    def names(self) -> tuple[str, ...]:
        """Every name: the built-ins first (in ``builtins`` order), then entry points, then in-process."""
        self._load()
        return tuple(self._plugins)

    def __iter__(self) -> Iterator[T]:
        self._load()
        return iter(list(self._plugins.values()))

    def _add(self, plugin: T) -> None:
        if not isinstance(plugin, self.base):
            raise TypeError(f"{plugin!r} is not a {self.base.__module__}.{self.base.__qualname__}")
        if plugin.name in self._plugins:
            raise ValueError(f"{self.what} {plugin.name!r} is already registered")
        if self.check is not None:
            self.check(plugin, list(self._plugins.values()))
        self._plugins[plugin.name] = plugin

    def _load(self) -> None:
        """The built-ins, then the installed entry points: once per process."""
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtins:
            self._add(getattr(importlib.import_module(f"{self.package}.{module}"), self.attr))
        if self.group is not None:
            from importlib.metadata import entry_points

            for ep in entry_points(group=self.group):
                loaded = ep.load()
                self._add(loaded() if isinstance(loaded, type) else loaded)
