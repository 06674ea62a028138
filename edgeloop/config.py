"""Typed configuration files: TOML in, a msgspec Struct out, errors that name the file and key.

Both the agent and the aggregator describe their configuration as msgspec Structs with
defaults; this module turns a TOML file plus command-line overrides into one, and turns every
problem into a :class:`ConfigError` such as::

    agent.toml: key 'sampling.rate_hz': Expected `float` >= 0.01, got `str`

Secrets never live in the file itself: a key ending in ``_file`` names a file to read, and
``env:NAME`` names an environment variable (see :func:`resolve_secret`).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

__all__ = ["ConfigError", "load", "convert", "resolve_secret", "default_data_dir"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; ``str()`` names the source (file or flag) and the key."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        where = f"{source}: key '{key}'" if key else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


_PATH_RE = re.compile(r"at `\$\.?(.*?)`")


def convert(data: dict[str, Any], type_: type[T], source: str) -> T:
    """Build ``type_`` from plain data, translating msgspec's error into a ConfigError."""
    try:
        return msgspec.convert(data, type_, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH_RE.search(text)
        key = match.group(1) if match else None
        problem = _PATH_RE.sub("", text).strip().rstrip("-").strip()
        if key is None and (m := re.search(r"(?:missing required|unknown) field `(\w+)`", text)):
            key = m.group(1)
        raise ConfigError(source, key, problem) from None


def load(path: str | Path | None, type_: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Read a TOML file (if given), apply dotted-key overrides, and convert to ``type_``."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(source, None, "file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, None, f"not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return convert(data, type_, source)


def resolve_secret(value: str | None, file: str | None = None, what: str = "secret") -> str | None:
    """A secret from ``env:NAME``, from a file (first line), or the literal value."""
    if file:
        try:
            return Path(file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(file, None, f"cannot read {what} from file: {exc}") from None
    if value and value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ConfigError("environment", name, f"{what} variable is not set")
        return os.environ[name]
    return value


def default_data_dir() -> Path:
    """``$EDGELOOP_DATA_DIR``, else ``$XDG_DATA_HOME/edgeloop``, else ``~/.local/share/edgeloop``."""
    if os.environ.get("EDGELOOP_DATA_DIR"):
        return Path(os.environ["EDGELOOP_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgeloop"
