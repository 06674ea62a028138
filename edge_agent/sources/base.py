"""The sensor source plug-in interface.

A source only reads: the sampler calls :meth:`Source.read` at a fixed rate and owns timing,
windows, buffering and publishing. A source never touches MQTT or the outbox.

Failure kinds (as in Telegraf): a bad configuration raises ``ValueError`` from the constructor
(the agent refuses to start, naming the option); a reading that cannot be had is ``None`` for that
channel (the sampler counts it and carries on); an exception from ``read`` is treated by the
sampler as a transient failure of the whole sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

__all__ = ["Source"]


class Source(ABC):
    """One device's sensors, read one sample at a time.

    Subclasses set the class attribute ``name`` (their registered name) and the instance
    attribute ``channels`` (names matching the wire contract's name pattern, fixed for the
    source's lifetime), and take their options as keyword arguments with defaults.
    """

    name: ClassVar[str]
    channels: tuple[str, ...]

    @abstractmethod
    def read(self, index: int, now: float) -> Sequence[float | None]:
        """Values of sample ``index`` in ``channels`` order; ``None`` where a channel has none.

        ``index`` counts samples from the sampler's start at its fixed rate; ``now`` is the wall
        clock time (seconds since the epoch) the sample is taken for.
        """

    def close(self) -> None:
        """Release devices, files or connections. Idempotent; the default does nothing."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels!r})"
