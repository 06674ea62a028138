"""Retention policies and the 1-minute downsampling continuous query on InfluxDB 1.x.

``InfluxStore.open()`` on a 1.x server makes the database look like this, idempotently:

* retention policy ``raw`` (default 30 days), the database's DEFAULT, which every write and every
  query without an explicit policy uses;
* retention policy ``long_term`` (default 365 days);
* continuous query ``telemetry_1m``: every minute it writes mean, min and max of every telemetry
  field per device and 1-minute interval into ``long_term.telemetry_1m`` (fields ``mean_<ch>``,
  ``min_<ch>``, ``max_<ch>``; the seq/idx/flags columns come along, ``max_flags`` is the useful one).

A policy that exists with another duration is altered to the configured one; an existing
continuous query is left alone (InfluxQL cannot alter one: drop it to change it). A user without
admin rights cannot create either: ``open`` then logs what an admin must run and goes on writing
into the database's default policy. InfluxDB 2.x/3.x have no retention policies or continuous
queries (buckets and tasks instead); docs/storage.md shows the equivalent there.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from edgeloop.wire import NAME_PATTERN

__all__ = ["Retention", "DURATION_PATTERN", "apply_v1", "duration_hours"]

log = logging.getLogger(__name__)

#: Durations InfluxQL takes for a retention policy (at least 1h) or ``INF`` (keep forever).
DURATION_PATTERN = r"^(?:[1-9][0-9]{0,5}[hdw]|INF)\Z"
#: Intervals for the downsampling query.
INTERVAL_PATTERN = r"^[1-9][0-9]{0,4}[smhd]\Z"
_HOURS = {"h": 1, "d": 24, "w": 168}
_NAME_RE = re.compile(NAME_PATTERN)


def duration_hours(duration: str) -> int:
    """Hours of a DURATION_PATTERN duration (0 = INF), or of SHOW's "720h0m0s" form."""
    if duration in ("INF", "0s", "0"):
        return 0
    m = re.fullmatch(r"(\d+)([hdw])", duration)
    if m:
        return int(m.group(1)) * _HOURS[m.group(2)]
    m = re.fullmatch(r"(\d+)h0m0s", duration)
    if m:
        return int(m.group(1))
    raise ValueError(f"unrecognised duration {duration!r}")


@dataclass(frozen=True)
class Retention:
    """What ``open()`` sets up on InfluxDB 1.x; ``None`` instead of one leaves the database be."""

    raw_policy: str = "raw"
    raw_duration: str = "30d"
    long_policy: str = "long_term"
    long_duration: str = "365d"
    #: Downsampling interval of the continuous query; None: no continuous query.
    downsample_every: str | None = "1m"

    def __post_init__(self) -> None:
        for name in ("raw_policy", "long_policy"):
            if not _NAME_RE.match(getattr(self, name)):
                raise ValueError(f"invalid {name} {getattr(self, name)!r}: must match {NAME_PATTERN}")
        if self.raw_policy == self.long_policy:
            raise ValueError("raw_policy and long_policy must differ")
        for name in ("raw_duration", "long_duration"):
            if not re.match(DURATION_PATTERN, getattr(self, name)):
                raise ValueError(
                    f"invalid {name} {getattr(self, name)!r}: expected e.g. 30d, 12h, 52w or INF"
                )
        every = self.downsample_every
        if every is not None and not re.match(INTERVAL_PATTERN, every):
            raise ValueError(f"invalid downsample_every {every!r}: expected e.g. 1m, 30s, 1h")

    @property
    def cq_name(self) -> str:
        return f"telemetry_{self.downsample_every}"

    def policy_statements(self, database: str, existing: dict[str, tuple[int, bool]]) -> list[str]:
        """Statements that bring the policies to this configuration.

        ``existing`` maps a policy name to (duration in hours, 0 = INF; is default)."""
        out = []
        for name, duration, default in (
            (self.raw_policy, self.raw_duration, True),
            (self.long_policy, self.long_duration, False),
        ):
            suffix = " DEFAULT" if default else ""
            have = existing.get(name)
            if have is None:
                out.append(
                    f'CREATE RETENTION POLICY "{name}" ON "{database}" DURATION {duration}'
                    f" REPLICATION 1{suffix}"
                )
            elif have[0] != duration_hours(duration) or (default and not have[1]):
                out.append(
                    f'ALTER RETENTION POLICY "{name}" ON "{database}" DURATION {duration}{suffix}'
                )
        return out

    def select_into(self, database: str, where: str = "") -> str:
        """The downsampling SELECT ... INTO (the continuous query's body; with ``where`` a
        backfill of a past time range)."""
        every = self.downsample_every or "1m"
        return (
            f'SELECT mean(*), min(*), max(*) INTO "{database}"."{self.long_policy}".'
            f'"telemetry_{every}" FROM "{database}"."{self.raw_policy}"."telemetry"'
            f"{where} GROUP BY time({every}), *"
        )

    def cq_statement(self, database: str) -> str:
        """CREATE CONTINUOUS QUERY: every interval, resample the last two intervals (late points
        of the previous interval are taken in once more)."""
        every = self.downsample_every
        n, unit = int(every[:-1]), every[-1]
        return (
            f'CREATE CONTINUOUS QUERY "{self.cq_name}" ON "{database}" RESAMPLE EVERY {every}'
            f" FOR {2 * n}{unit} BEGIN {self.select_into(database)} END"
        )


def apply_v1(store, retention: Retention) -> list[str]:
    """Bring ``store``'s 1.x database to ``retention``; returns the statements it ran.

    ``store`` is an open ``InfluxStore``. Statements the user may not run are logged with what an
    admin must run instead; any other refusal raises StoreError."""
    from .base import StoreError

    database = store.database
    existing = {
        row[0]: (duration_hours(row[1]), bool(row[4]))
        for series in store.query(f'SHOW RETENTION POLICIES ON "{database}"')
        for row in series.get("values") or []
    }
    todo = retention.policy_statements(database, existing)
    if retention.downsample_every is not None:
        names = {
            row[0]
            for series in store.query("SHOW CONTINUOUS QUERIES")
            if series.get("name") == database
            for row in series.get("values") or []
        }
        if retention.cq_name not in names:
            todo.append(retention.cq_statement(database))
    for k, statement in enumerate(todo):
        error = store.run(statement)
        if not error:
            continue
        if "not authorized" in error or "requires admin" in error:
            log.warning(
                "InfluxDB at %s: not allowed to set up retention/downsampling (%s); ask an admin "
                "to run: %s", store.url, error, "; ".join(todo[k:])
            )
            return todo[:k]
        raise StoreError(f"InfluxDB at {store.url} refused {statement!r}: {error}")
    return todo
