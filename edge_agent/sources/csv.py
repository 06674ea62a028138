"""Replay recorded data from a CSV file: a time column and one column per channel.

``pace = "sampler"`` gives row ``index`` at sample ``index`` (the recording's own timing is
ignored); ``pace = "recorded"`` keeps the recording's timing: at the sampler's time ``now`` it gives
the latest row recorded at or before ``(now - first now) * speed`` seconds into the recording,
so rows are repeated when the sampler is faster than the recording and skipped when it is slower.

``loop = true`` starts over at the end (for ``recorded``, one typical row spacing after the last
row); otherwise the source reports ``None`` for every channel once the recording is over and
:attr:`CsvSource.finished` turns true. Empty cells, ``NaN`` and ``NA`` are ``None``; so is a cell
that is not a number (counted in :attr:`CsvSource.bad_cells`).

Times are seconds (epoch or relative, any float) or ISO 8601 timestamps (naive ones count as UTC).
The file is checked once at start-up (header, channel names, times that never go backwards) and
then streamed, so a recording larger than memory replays too.
"""

from __future__ import annotations

import csv
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta

from edge_agent.sources.base import Source, SourceOptions, parse_options

__all__ = ["CsvOptions", "CsvSource", "parse_time"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}\Z")
_MISSING = {"", "nan", "na", "n/a", "null", "none"}


class CsvOptions(SourceOptions):
    path: str
    time_column: Annotated[str, Meta(min_length=1)] = "time"
    #: Columns to replay, in this order; empty: every column but the time column.
    columns: list[str] = []
    #: Channel name per column, for headers that are not valid channel names ("temp (C)").
    rename: dict[str, str] = {}
    pace: Literal["recorded", "sampler"] = "sampler"
    #: With pace "recorded": recording seconds per sampler second.
    speed: Annotated[float, Meta(gt=0, le=1_000_000)] = 1.0
    loop: bool = False
    delimiter: Annotated[str, Meta(min_length=1, max_length=1)] = ","

    def __post_init__(self) -> None:
        if self.speed != 1.0 and self.pace != "recorded":
            raise ValueError("option 'speed' only applies with pace = \"recorded\"")


def parse_time(text: str) -> float:
    """Seconds from a number or an ISO 8601 timestamp; ``ValueError`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        stamp = datetime.fromisoformat(text.strip())
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        return stamp.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"time {text!r} is not finite")
    return value


class CsvSource(Source):
    """Rows of a recorded CSV file, replayed at the sampler's rate or the recording's own."""

    name = "csv"
    Options = CsvOptions

    def __init__(self, **options: Any) -> None:
        self.options = opts = parse_options(self.name, CsvOptions, options)
        self.path = Path(opts.path)
        try:
            self._file = open(self.path, newline="", encoding="utf-8-sig")
        except OSError as exc:
            raise ValueError(f"source 'csv' option 'path': cannot open {opts.path}: {exc.strerror}") from None
        try:
            self._scan()
        except BaseException:
            self._file.close()
            raise
        self.finished = False
        self.bad_cells = 0
        self._rewind()
        self._start: float | None = None  # the sampler's `now` at the first read (pace "recorded")

    def _scan(self) -> None:
        """Check the header and the times once; learn the row count and the recording's span."""
        opts = self.options
        reader = csv.reader(self._file, delimiter=opts.delimiter)
        header = next(reader, None)
        if not header:
            raise ValueError(f"source 'csv': {self.path} is empty (a header line is expected)")
        header = [h.strip() for h in header]
        if opts.time_column not in header:
            raise ValueError(
                f"source 'csv' option 'time_column': no column {opts.time_column!r} in {self.path}; "
                f"its columns are: {', '.join(header)}"
            )
        columns = list(opts.columns) or [h for h in header if h != opts.time_column]
        absent = [c for c in columns + list(opts.rename) if c not in header]
        if absent:
            raise ValueError(f"source 'csv': no column {', '.join(map(repr, absent))} in {self.path}; "
                             f"its columns are: {', '.join(header)}")
        if not columns:
            raise ValueError(f"source 'csv': {self.path} has no channel columns besides {opts.time_column!r}")
        channels = [opts.rename.get(c, c) for c in columns]
        for column, channel in zip(columns, channels):
            if not _NAME.match(channel):
                raise ValueError(
                    f"source 'csv': column {column!r} is not a valid channel name (letters, digits and '_', "
                    f"starting with a letter); give it one with option 'rename'"
                )
        if len(set(channels)) != len(channels):
            raise ValueError(f"source 'csv': channel names repeat: {', '.join(channels)}")
        self.channels = tuple(channels)
        self._time_at = header.index(opts.time_column)
        self._value_at = [header.index(c) for c in columns]

        first = prev = last = None
        self.rows = 0
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            line = reader.line_num
            try:
                t = parse_time(row[self._time_at])
            except (ValueError, IndexError):
                cell = row[self._time_at] if self._time_at < len(row) else ""
                raise ValueError(f"source 'csv': {self.path} line {line}: bad time {cell!r}") from None
            if last is not None and t < last:
                raise ValueError(f"source 'csv': {self.path} line {line}: time goes backwards ({t} < {last})")
            first = t if first is None else first
            prev, last = last, t
            self.rows += 1
        if not self.rows:
            raise ValueError(f"source 'csv': {self.path} has a header but no rows")
        self.t_first, self.t_last = first, last
        step = last - prev if prev is not None else 0.0
        #: Seconds before a looped recording starts over: its span plus one last row spacing.
        self.period = (self.t_last - self.t_first) + (step if step > 0 else 1.0)

    # -- streaming -------------------------------------------------------------------------------

    def _rewind(self) -> None:
        self._file.seek(0)
        self._reader = csv.reader(self._file, delimiter=self.options.delimiter)
        next(self._reader)  # header
        self._pos = -1  # number of the row in self._row
        self._row: list[str] | None = None
        self._next: list[str] | None = self._next_row()

    def _next_row(self) -> list[str] | None:
        for row in self._reader:
            if row and not (len(row) == 1 and not row[0].strip()):
                return row
        return None

    def _advance(self) -> bool:
        if self._next is None:
            return False
        self._row, self._next = self._next, self._next_row()
        self._pos += 1
        return True

    def _values(self, row: list[str]) -> list[float | None]:
        out: list[float | None] = []
        for at in self._value_at:
            cell = row[at].strip() if at < len(row) else ""
            if cell.lower() in _MISSING:
                out.append(None)
                continue
            try:
                value = float(cell)
            except ValueError:
                self.bad_cells += 1
                value = math.nan
            out.append(value if math.isfinite(value) else None)
        return out

    def _seek_row(self, k: int) -> list[str] | None:
        """Row ``k`` (0-based), reading forward, rewinding when ``k`` lies behind."""
        if k < self._pos:
            self._rewind()
        while self._pos < k:
            if not self._advance():
                return None
        return self._row

    def _seek_time(self, t: float) -> list[str] | None:
        """The last row recorded at or before ``t`` (recording time)."""
        if self._row is not None and parse_time(self._row[self._time_at]) > t:
            self._rewind()
        while self._next is not None and parse_time(self._next[self._time_at]) <= t:
            self._advance()
        return self._row

    # -- the sample --------------------------------------------------------------------------------

    def read(self, index: int, now: float) -> list[float | None]:
        opts = self.options
        if opts.pace == "sampler":
            k = index % self.rows if opts.loop else index
            row = self._seek_row(k) if k < self.rows else None
        else:
            if self._start is None:
                self._start = now
            offset = max(0.0, now - self._start) * opts.speed  # a clock stepped back holds the first row
            if offset >= self.period and not opts.loop:
                row = None
            else:
                row = self._seek_time(self.t_first + (offset % self.period if opts.loop else offset))
        if row is None:
            self.finished = True
            return [None] * len(self.channels)
        return self._values(row)

    def close(self) -> None:
        self._file.close()
