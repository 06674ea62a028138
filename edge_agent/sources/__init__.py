"""Sensor sources, registered by name and imported only when used.

Adding a source: write ``edge_agent/sources/<name>.py`` with a :class:`Source` subclass whose
``name`` is ``<name>``, and add one line to :data:`SOURCES`. Lazy import keeps a device from
loading code (or drivers) for sources it does not use.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from edge_agent.sources.base import Source

__all__ = ["SOURCES", "Source", "create_source", "known_sources", "source_class"]

#: Registered name -> "module:Class".
SOURCES: dict[str, str] = {
    "simulated": "edge_agent.sources.simulated:SimulatedSource",
}


def known_sources() -> list[str]:
    return sorted(SOURCES)


def source_class(name: str) -> type[Source]:
    """Import and return the class registered as ``name``."""
    target = SOURCES.get(name)
    if target is None:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(known_sources())}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise TypeError(f"{target} registered as source {name!r} is not a Source subclass")
    return cls


def create_source(name: str, options: dict[str, Any] | None = None) -> Source:
    """Build the source ``name`` from its options, refusing unknown or missing options by name."""
    cls = source_class(name)
    options = dict(options or {})
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(options) - set(allowed))
    if unknown and not takes_any:
        raise ValueError(
            f"source {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(allowed) or '(none)'}"
        )
    missing = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n not in options
    ]
    if missing:
        raise ValueError(f"source {name!r} needs option(s): {', '.join(missing)}")
    return cls(**options)
