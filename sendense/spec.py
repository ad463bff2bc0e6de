"""Load and validate job specs, with one-line errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sendense import platforms
from sendense.errors import InvalidSpec, ResourceNotFound
from sendense.models import JobSpec


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """The first problem as `field.path: message`; a count if there are more."""
    problems = err.errors()
    first = problems[0]
    parts = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    loc = ".".join(parts)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "field required"
    elif first["type"] in ("platform_unknown", "platform_missing"):
        loc += ".platform"
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "spec"
    return f"{where}: {msg}{more}"


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    if not isinstance(data, dict):
        raise InvalidSpec(f"{source}: expected a mapping with name, source and target")
    if "job_id" in data:
        raise InvalidSpec(f"{source}: job_id: assigned by sendense when the job is created, never in a spec")
    for kind in ("source", "target"):  # a developer_only platform is not offered to users
        end = data.get(kind)
        name = end.get("platform") if isinstance(end, dict) else None
        if isinstance(name, str) and name not in platforms.offered(kind) and platforms.get(name) is not None:
            raise InvalidSpec(
                f"{source}: {kind}.platform: {name!r} is for developers "
                f"(set {platforms.DEVELOPER_PLATFORMS}=1); one of: {', '.join(platforms.offered(kind))}"
            )
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise InvalidSpec(f"{source}: {format_validation_error(e)}") from None


MAX_SPEC_BYTES = 1 << 20  # a job spec is a few hundred bytes; anything near this is not one


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                dup = key in seen
            except TypeError:  # an unhashable key: let SafeLoader say so
                break
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read(path: Path) -> str:
    """The spec file's text; every way it cannot be one is a one-line error naming the file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ResourceNotFound(f"spec file {path}: not found") from None
    except OSError as e:
        raise InvalidSpec(f"spec file {path}: cannot be read ({e.strerror})") from None
    if path.is_dir():
        raise InvalidSpec(f"spec file {path}: is a directory, not a YAML file")
    if not path.is_file():
        raise InvalidSpec(f"spec file {path}: not a regular file")
    if st.st_size > MAX_SPEC_BYTES:
        raise InvalidSpec(f"spec file {path}: {st.st_size} bytes; a job spec is at most {MAX_SPEC_BYTES}")
    try:
        data = path.read_bytes()[: MAX_SPEC_BYTES + 1]
    except OSError as e:
        raise InvalidSpec(f"spec file {path}: cannot be read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidSpec(f"spec file {path}: not UTF-8 text (byte {e.start}); a spec is YAML") from None


def load_spec(path: Path) -> JobSpec:
    text = _read(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or ""
        why = problem if problem.startswith("key ") else "not valid YAML"  # (a duplicate key)
        raise InvalidSpec(f"{path}{where}: {why}") from None
    except RecursionError:
        raise InvalidSpec(f"{path}: nested too deeply to be a job spec") from None
    try:
        spec = _resolve_paths(parse_spec(data, str(path)), path.parent, str(path))
    except RecursionError:
        raise InvalidSpec(f"{path}: nested too deeply to be a job spec") from None
    return spec


def _resolve_paths(spec: JobSpec, base: Path, where: str) -> JobSpec:
    """Paths in a spec are relative to the spec file, `~` is the user's home, as in a shell: each
    platform's spec model resolves its own (and checks what only the reading machine can)."""
    try:
        return spec.model_copy(
            update={"source": spec.source.resolved(base), "target": spec.target.resolved(base)}
        )
    except ValueError as e:
        raise InvalidSpec(f"{where}: {e}") from None
