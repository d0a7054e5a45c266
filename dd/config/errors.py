"""The configuration error, shared by the config readers and the engine registry."""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem, worded for the person who has to fix the file."""


def _err(where: Path | str, key: str | None, problem: str) -> ConfigError:
    loc = f"{where}" + (f": key {key!r}" if key else "")
    return ConfigError(f"{loc}: {problem}")
