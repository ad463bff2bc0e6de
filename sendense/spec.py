"""Load and validate job specs, with one-line errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.models import JobSpec


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """The first problem as `field.path: message`; a count if there are more."""
    problems = err.errors()
    first = problems[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "field required"
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "spec"
    return f"{where}: {msg}{more}"


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    if not isinstance(data, dict):
        raise InvalidSpec(f"{source}: expected a mapping with name, source and target")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise InvalidSpec(f"{source}: {format_validation_error(e)}") from None


def load_spec(path: Path) -> JobSpec:
    if not path.is_file():
        raise ResourceNotFound(f"spec file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InvalidSpec(f"{path}{where}: not valid YAML") from None
    spec = _resolve_paths(parse_spec(data, str(path)), path.parent)
    disks = spec.source.disks
    if disks is not None and len(set(disks)) != len(disks):
        raise InvalidSpec(f"{path}: source: disks lists the same image twice")
    return spec


def _resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Relative paths in a spec are relative to the spec file."""
    src = spec.source
    if src.disks is not None:
        src.disks = [(base / d).resolve() if not d.is_absolute() else d for d in src.disks]
    if src.qmp is not None and not src.qmp.is_absolute():
        src.qmp = (base / src.qmp).resolve()
    if not spec.target.path.is_absolute():
        spec.target.path = (base / spec.target.path).resolve()
    return spec
