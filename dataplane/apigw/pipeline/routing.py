"""Route matching: a table compiled once per config, looked up per request.

Precedence follows the Gateway API: the most specific host wins (exact, then the longest wildcard,
then any host); within a host, an exact path beats a prefix and a longer prefix beats a shorter one;
for the same path, a route naming the method beats one that takes any method. Prefixes match whole
path segments: `/api` matches `/api` and `/api/x`, never `/apix`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from apigw.config.model import Route

T = TypeVar("T")


@dataclass(slots=True)
class _PathTable(Generic[T]):
    """Routes of one host: exact paths in a dict, prefixes longest first."""

    exact: dict[str, list[tuple[frozenset[str] | None, T]]] = field(default_factory=dict)
    prefixes: list[tuple[str, list[tuple[frozenset[str] | None, T]]]] = field(default_factory=list)

    def lookup(self, path: str, method: str) -> T | None:
        candidates = self.exact.get(path)
        if candidates:
            found = _by_method(candidates, method)
            if found is not None:
                return found
        for prefix, candidates in self.prefixes:
            if path.startswith(prefix) and (
                len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"
            ):
                found = _by_method(candidates, method)
                if found is not None:
                    return found
        return None


def _by_method(candidates: list[tuple[frozenset[str] | None, T]], method: str) -> T | None:
    for methods, target in candidates:  # method-specific entries come first
        if methods is None or method in methods:
            return target
    return None


class Router(Generic[T]):
    """Maps (host, path, method) to the target compiled for the best matching route."""

    def __init__(self, routes: Sequence[tuple[Route, T]]):
        exact: dict[str | None, dict[str, list]] = {}
        prefixes: dict[str | None, dict[str, list]] = {}
        for route, target in routes:
            if not route.enabled:
                continue
            methods = frozenset(route.match.methods) or None
            host = route.match.host
            if route.match.path is not None:
                exact.setdefault(host, {}).setdefault(route.match.path, []).append((methods, target))
            else:
                prefix = route.match.path_prefix or "/"
                prefixes.setdefault(host, {}).setdefault(prefix, []).append((methods, target))
        tables: dict[str | None, _PathTable[T]] = {}
        for host in {*exact, *prefixes}:
            by_length = sorted(prefixes.get(host, {}).items(), key=lambda item: len(item[0]), reverse=True)
            table = tables[host] = _PathTable(exact.get(host, {}), by_length)
            for candidates in [*table.exact.values(), *(c for _, c in table.prefixes)]:
                candidates.sort(key=lambda item: item[0] is None)
        self._exact_hosts = {h: t for h, t in tables.items() if h is not None and not h.startswith("*.")}
        wildcards = [(h[1:], t) for h, t in tables.items() if h is not None and h.startswith("*.")]
        self._wildcards = sorted(wildcards, key=lambda item: len(item[0]), reverse=True)
        self._any_host = tables.get(None)

    def match(self, host: str, path: str, method: str) -> T | None:
        """`host` and `path` in normal form (see `apigw.http.target`)."""
        if self._exact_hosts or self._wildcards:
            table = self._exact_hosts.get(host)
            if table is not None:
                found = table.lookup(path, method)
                if found is not None:
                    return found
            for suffix, table in self._wildcards:
                if host.endswith(suffix) and len(host) > len(suffix):
                    found = table.lookup(path, method)
                    if found is not None:
                        return found
        if self._any_host is not None:
            return self._any_host.lookup(path, method)
        return None
