"""Small helpers every layer uses."""

from __future__ import annotations

from typing import Any


def drop_none(mapping: dict[str, Any]) -> dict[str, Any]:
    """The keys that were given: a request or file carries no ``null`` for what was left out."""
    return {k: v for k, v in mapping.items() if v is not None}
