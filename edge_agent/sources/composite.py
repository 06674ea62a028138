"""Several sources read as one, each under a time budget, so one hung sensor never stalls the rest.

``CompositeSource`` concatenates the channels of its parts in order. A channel name that occurs in
more than one part is prefixed with its part's label (the source name, or ``prefix`` when given;
``host2``, ``host3`` ... when the same source appears twice), so names stay unique and stable.
Every part is wrapped in a :class:`GuardedSource`; all parts are read at once and share one
deadline, so a sample costs at most ``timeout_s`` however many parts hang. A hung or failing part
gives ``None`` for its own channels while the others keep producing.

From the agent's configuration::

    [source]
    name = "composite"
    options = { timeout_s = 0.2, sources = [
        { name = "host" },
        { name = "ds18b20", options = { poll_interval_s = 1.0 } },
    ] }
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Sequence

import msgspec
from msgspec import Meta

from edge_agent.sources.base import Source, SourceOptions, parse_options
from edge_agent.sources.guard import GuardedSource, SourceStatus

__all__ = ["CompositeSource", "CompositeOptions", "PartSettings"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}\Z")  # the wire contract's channel name pattern


class PartSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One part: a registered source name, its options and an optional channel prefix."""

    name: str
    options: dict[str, Any] = {}
    prefix: Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}\Z")] | None = None


class CompositeOptions(SourceOptions):
    sources: Annotated[list[PartSettings], Meta(min_length=1)]
    #: Budget of one sample for all parts together, in seconds.
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 0.5


class CompositeSource(Source):
    """The parts' channels side by side. Build from ``sources=[{name, options, prefix}]`` (config)
    or, in code, with :meth:`of` from already built :class:`Source` objects."""

    name = "composite"
    Options = CompositeOptions

    def __init__(self, **options: Any) -> None:
        self.options = opts = parse_options(self.name, CompositeOptions, options)
        from edge_agent.sources import create_source

        built: list[tuple[Source, str | None]] = []
        try:
            for i, part in enumerate(opts.sources):
                try:
                    built.append((create_source(part.name, dict(part.options)), part.prefix))
                except ValueError as exc:
                    raise ValueError(f"source 'composite' part {i} ({part.name!r}): {exc}") from None
            self._setup(built, opts.timeout_s)
        except BaseException:
            for source, _ in built:
                source.close()
            raise

    @classmethod
    def of(cls, sources: Sequence[Source], timeout_s: float = 0.5, prefixes: Sequence[str | None] | None = None) -> CompositeSource:
        """A composite of sources built in code (tests, embedding); it closes them on ``close``."""
        if not sources:
            raise ValueError("a composite source needs at least one source")
        prefixes = list(prefixes) if prefixes is not None else [None] * len(sources)
        if len(prefixes) != len(sources):
            raise ValueError(f"{len(prefixes)} prefixes for {len(sources)} sources")
        self = cls.__new__(cls)
        self.options = None
        self._setup(list(zip(sources, prefixes)), timeout_s)
        return self

    def _setup(self, parts: list[tuple[Source, str | None]], timeout_s: float) -> None:
        labels = _labels([p or (s.label if isinstance(s, GuardedSource) else s.name) for s, p in parts])
        self.timeout_s = float(timeout_s)
        self.parts = [
            s if isinstance(s, GuardedSource) else GuardedSource(s, timeout_s, label=label)
            for (s, _), label in zip(parts, labels)
        ]
        counts: dict[str, int] = {}
        for part in self.parts:
            for ch in part.channels:
                counts[ch] = counts.get(ch, 0) + 1
        channels = []
        for part, label in zip(self.parts, labels):
            for ch in part.channels:
                name = f"{label}_{ch}" if counts[ch] > 1 else ch
                if not _NAME.match(name):
                    raise ValueError(f"composite channel {name!r} (from {label!r}) is not a valid channel name")
                channels.append(name)
        if len(set(channels)) != len(channels):
            dupes = sorted({c for c in channels if channels.count(c) > 1})
            raise ValueError(f"composite channels clash even after prefixing: {', '.join(dupes)}; give each part a prefix")
        self.channels = tuple(channels)

    def read(self, index: int, now: float) -> list[float | None]:
        deadline = time.monotonic() + self.timeout_s
        jobs = [part.submit(index, now) for part in self.parts]
        values: list[float | None] = []
        for part, job in zip(self.parts, jobs):
            values.extend(part.collect(job, deadline))
        return values

    def status(self) -> list[SourceStatus]:
        """Per-part counters (reads, ok, errors, timeouts, skipped, last_error)."""
        return [part.status() for part in self.parts]

    def close(self) -> None:
        for part in getattr(self, "parts", ()):
            part.close()


def _labels(names: list[str]) -> list[str]:
    """Unique labels: a name used more than once gets 1-based numbers (``host``, ``host2``)."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}{seen[name]}")
    return labels
