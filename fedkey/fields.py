"""The one helper every settings dataclass uses: a field that carries its own --help text."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and the help text its command-line flag shows."""
    return field(default=default, metadata={"help": help})
