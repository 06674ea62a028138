"""Remote configuration: apply a desired-config message to the running agent, key by key.

The cloud publishes ``{"settings": {name: value}}`` retained on the device's config topic (see
docs/protocol.md). Each setting is checked on its own against the same typed configuration the
file uses, so one bad value is refused with its reason while the others apply. What was refused
goes back to the cloud in the retained status (``config_rejected``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from edge_agent.config import AgentConfig
from edgeloop.config import ConfigError, convert

__all__ = ["SETTINGS", "apply_settings"]

#: Remote setting name -> dotted key in AgentConfig. Anything else is refused as unknown.
SETTINGS = {
    "rate_hz": "sampling.rate_hz",
    "batch_s": "sampling.batch_s",
    "window_s": "sampling.window_s",
    "privacy": "privacy",
    "threshold": "threshold",
    "status_interval_s": "status_interval_s",
}


def apply_settings(config: AgentConfig, settings: dict[str, Any]) -> tuple[AgentConfig, dict[str, Any], dict[str, str]]:
    """Return (new config, applied {name: value}, rejected {name: reason})."""
    applied: dict[str, Any] = {}
    rejected: dict[str, str] = {}
    data = msgspec.to_builtins(config)
    for name, value in settings.items():
        key = SETTINGS.get(name)
        if key is None:
            rejected[name] = f"unknown setting; known: {', '.join(sorted(SETTINGS))}"
            continue
        trial = msgspec.to_builtins(config)  # each key is checked against the original alone
        _set(trial, key, value)
        try:
            convert(trial, AgentConfig, "remote config")
        except ConfigError as exc:
            rejected[name] = exc.problem[:200]
            continue
        _set(data, key, value)
        applied[name] = value
    return convert(data, AgentConfig, "remote config"), applied, rejected


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value
