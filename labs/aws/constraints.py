"""Model constraints of the EBS API's inputs, refused in the wording of AWS's request validation
("1 validation error detected: Value ... at 'name' failed to satisfy constraint: ...")."""

from __future__ import annotations

import re

from labs.aws.wire import constraint


def integer(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise constraint(
            f"Value '{value}' at '{name}' failed to satisfy constraint: Member must be a number"
        ) from None


def at_least(value: int | None, name: str, low: int) -> None:
    if value is not None and value < low:
        raise constraint(
            f"Value '{value}' at '{name}' failed to satisfy constraint: "
            f"Member must have value greater than or equal to {low}"
        )


def at_most(value: int | None, name: str, high: int) -> None:
    if value is not None and value > high:
        raise constraint(
            f"Value '{value}' at '{name}' failed to satisfy constraint: Member must have value less than or "
            f"equal to {high}"
        )


def required(value: object, name: str) -> None:
    if value is None:
        raise constraint(f"Value null at '{name}' failed to satisfy constraint: Member must not be null")


def pattern(value: str | None, name: str, pattern: re.Pattern[str]) -> None:
    if value is not None and not pattern.match(value):
        raise constraint(
            f"Value '{value}' at '{name}' failed to satisfy constraint: "
            f"Member must satisfy regular expression pattern: {pattern.pattern}"
        )


def integer_value(value: object, name: str) -> int | None:
    """A JSON member that must be an integer (bool is not)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise constraint(f"Value '{value}' at '{name}' failed to satisfy constraint: Member must be a number")
