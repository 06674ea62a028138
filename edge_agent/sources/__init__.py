"""Sensor sources, registered by name and imported only when used.

Adding a source: write ``edge_agent/sources/<name>.py`` with a :class:`Source` subclass whose
``name`` is ``<name>`` and whose ``Options`` schema (a :class:`SourceOptions` Struct) declares
its options with defaults and constraints, and add one line to :data:`SOURCES`. Lazy import
keeps a device from loading code (or drivers such as smbus2) for sources it does not use.

:class:`GuardedSource` and :class:`CompositeSource` (``guard.py``, ``composite.py``) put a time
budget on every read and combine several sources so that one slow source never stalls the others.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from edge_agent.sources.base import Source, SourceOptions, parse_options
from edge_agent.sources.guard import GuardedSource, SourceStatus

__all__ = [
    "SOURCES",
    "CompositeSource",
    "GuardedSource",
    "Source",
    "SourceOptions",
    "SourceStatus",
    "create_source",
    "known_sources",
    "parse_options",
    "source_class",
]

#: Registered name -> "module:Class". The module name is the registered name.
SOURCES: dict[str, str] = {
    "simulated": "edge_agent.sources.simulated:SimulatedSource",
    "host": "edge_agent.sources.host:HostSource",
    "ds18b20": "edge_agent.sources.ds18b20:DS18B20Source",
    "bme280": "edge_agent.sources.bme280:BME280Source",
    "csv": "edge_agent.sources.csv:CsvSource",
    "composite": "edge_agent.sources.composite:CompositeSource",
}


def __getattr__(name: str) -> Any:  # CompositeSource imports the registry, so load it on demand
    if name == "CompositeSource":
        from edge_agent.sources.composite import CompositeSource

        return CompositeSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    if cls.Options is not None:  # typed schema: validate before the constructor opens anything
        parse_options(name, cls.Options, options)
        return cls(**options)
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
