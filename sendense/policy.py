"""STAND-IN until the lead's sendense/policy.py lands on main (replaced by it at the merge): the
agent's allowed roots. Here every path is allowed."""

from __future__ import annotations

from pathlib import Path


def require_source_path(path: Path, what: str) -> None:
    """Raise (one line) unless `path` is inside the agent's allowed source roots."""
