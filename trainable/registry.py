"""A small name -> factory registry filled by a decorator, as timm keeps its models: each entry
may carry metadata registered with it (a backbone's ImageNet weights), and the listing doubles
as the test matrix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = fn
            self._meta[name] = meta
            return fn

        return deco

    def unregister(self, name: str) -> None:
        self.get(name)
        del self._factories[name], self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return self._factories[name]

    def meta(self, name: str, key: str, default: Any = None) -> Any:
        self.get(name)
        return self._meta[name].get(key, default)
