"""Load and validate job specs, with one-line errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.models import JobSpec, KvmSource, KvmTarget

PLATFORMS = ("kvm", "aws")  # the platforms a spec may name, as source or target


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """The first problem as `field.path: message`; a count if there are more."""
    problems = err.errors()
    first = problems[0]
    parts = [str(p) for p in first["loc"] if not str(p).startswith("function-after")]
    if len(parts) >= 2 and parts[0] in ("source", "target") and parts[1] in PLATFORMS:
        del parts[1]  # the union's tag: source.aws.region reads as source.region
    loc = ".".join(parts)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "field required"
    elif first["type"] == "union_tag_invalid":
        loc += ".platform"
        msg = f"{first['ctx']['tag']!r} is not supported (one of: {', '.join(PLATFORMS)})"
    elif first["type"] == "union_tag_not_found":
        loc += ".platform"
        msg = f"field required (one of: {', '.join(PLATFORMS)})"
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "spec"
    return f"{where}: {msg}{more}"


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    if not isinstance(data, dict):
        raise InvalidSpec(f"{source}: expected a mapping with name, source and target")
    if "job_id" in data:
        raise InvalidSpec(f"{source}: job_id: assigned by sendense when the job is created, never in a spec")
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
    disks = spec.source.disks if isinstance(spec.source, KvmSource) else None
    if disks is not None and len(set(disks)) != len(disks):
        raise InvalidSpec(f"{path}: source: disks lists the same image twice")
    return spec


def _resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Relative paths in a spec are relative to the spec file."""
    src = spec.source
    if isinstance(src, KvmSource):
        if src.disks is not None:
            src.disks = [(base / d).resolve() if not d.is_absolute() else d for d in src.disks]
        if src.qmp is not None and not src.qmp.is_absolute():
            src.qmp = (base / src.qmp).resolve()
    if isinstance(spec.target, KvmTarget) and not spec.target.path.is_absolute():
        spec.target.path = (base / spec.target.path).resolve()
    return spec
