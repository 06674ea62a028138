"""The sensor source plug-in interface.

A source only reads: the sampler calls :meth:`Source.read` at a fixed rate and owns timing,
windows, buffering and publishing. A source never touches MQTT or the outbox.

Failure kinds (as in Telegraf): a bad configuration raises ``ValueError`` from the constructor
(the agent refuses to start, naming the option); a reading that cannot be had is ``None`` for that
channel (the sampler counts it and carries on); an exception from ``read`` is treated by the
sampler as a transient failure of the whole sample.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence, TypeVar

import msgspec

__all__ = ["Source", "SourceOptions", "parse_options"]

_O = TypeVar("_O", bound="SourceOptions")
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$\.(?P<key>[A-Za-z0-9_]+)(?P<rest>[^`]*)`)?$", re.S)


def _literal_values(schema: type, key: str) -> list[Any]:
    """The allowed values of field ``key`` when it is (a list of, or optional) ``Literal``."""
    import msgspec.inspect as mi

    info = mi.type_info(schema)
    for field in getattr(info, "fields", ()):
        if field.name == key:
            t = field.type
            while True:
                if isinstance(t, mi.LiteralType):
                    return list(t.values)
                if isinstance(t, mi.Metadata):
                    t = t.type
                elif isinstance(t, (mi.ListType, mi.SetType, mi.VarTupleType)):
                    t = t.item_type
                elif isinstance(t, mi.UnionType):
                    t = next((x for x in t.types if not isinstance(x, mi.NoneType)), None)
                else:
                    return []
    return []


class SourceOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of a source's typed options: defaults and constraints on the fields, cross-field rules
    in ``__post_init__`` (raise ``ValueError`` naming the keys). Built by :func:`parse_options`."""


def parse_options(source: str, schema: type[_O], options: dict[str, Any]) -> _O:
    """Validate ``options`` against ``schema``; errors are ``ValueError`` naming the source and key.

    Examples of messages: ``source 'csv' needs option 'path'``, ``source 'csv' has no option
    'sped'; its options are: ...``, ``source 'csv' option 'speed': Expected `float` > 0.0``.
    """
    try:
        return msgspec.convert(dict(options), schema)
    except msgspec.ValidationError as exc:
        text = str(exc)
        names = ", ".join(f.name for f in msgspec.structs.fields(schema))
        if m := re.fullmatch(r"Object contains unknown field `(.+)`", text):
            raise ValueError(f"source {source!r} has no option {m[1]!r}; its options are: {names}") from None
        if m := re.fullmatch(r"Object missing required field `(.+)`", text):
            raise ValueError(f"source {source!r} needs option {m[1]!r}") from None
        m = _AT.match(text)
        if m and m["key"]:
            what = m["what"]
            if what.startswith("Invalid enum value") and (allowed := _literal_values(schema, m["key"])):
                what += f"; allowed: {', '.join(map(repr, allowed))}"
            raise ValueError(f"source {source!r} option {m['key'] + m['rest']!r}: {what}") from None
        raise ValueError(f"source {source!r}: {text}") from None


class Source(ABC):
    """One device's sensors, read one sample at a time.

    Subclasses set the class attribute ``name`` (their registered name) and the instance
    attribute ``channels`` (names matching the wire contract's name pattern, fixed for the
    source's lifetime), and take their options as keyword arguments with defaults. A source
    with a typed schema sets ``Options`` (a :class:`SourceOptions` subclass) and builds
    ``self.options = parse_options(self.name, self.Options, kwargs)`` from ``**kwargs``.
    """

    name: ClassVar[str]
    #: The typed options schema, or ``None`` when the constructor's signature is the schema.
    Options: ClassVar[type[SourceOptions] | None] = None
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
