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


# What a YAML text may build before it is refused: a job spec nests a few levels and holds a few
# hundred values (MAX_DISKS disks, MAX_NICS NICs of a few fields each). The composer stops at the
# first value past a limit, before the rest of the text is even scanned; aliases count as the
# values they repeat, so a small text cannot expand into a huge one (a "billion laughs").
MAX_SPEC_DEPTH = 16
MAX_SPEC_VALUES = 10_000


class _SpecTooBig(yaml.YAMLError):
    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that bounds nesting and size (above) and refuses a key given twice in one mapping
    (plain YAML keeps the last, silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._values = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it holds (for its aliases)

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):  # type: ignore[no-untyped-call]
            node = super().compose_node(parent, index)  # type: ignore[no-untyped-call]
            if id(node) not in self._sizes:  # its own anchor, still being composed
                raise _SpecTooBig("an alias inside its own anchor: a job spec is not recursive", mark)
            self._count(self._sizes[id(node)], mark)
            return node
        self._depth += 1
        if self._depth > MAX_SPEC_DEPTH:
            raise _SpecTooBig(f"nested deeper than {MAX_SPEC_DEPTH} levels: not a job spec", mark)
        before = self._values
        self._count(1, mark)
        try:
            node = super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        finally:
            self._depth -= 1
        self._sizes[id(node)] = self._values - before
        return node

    def _count(self, n: int, mark: Any) -> None:
        self._values += n
        if self._values > MAX_SPEC_VALUES:
            raise _SpecTooBig(
                f"more than {MAX_SPEC_VALUES} values (an alias counts what it repeats): not a job spec",
                mark,
            )

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


def load_yaml(path: Path) -> Any:
    """A spec file's YAML, with the job spec's bounds (size, nesting, values, keys given twice)."""
    text = _read(path)
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or ""
        why = problem if isinstance(e, _SpecTooBig) or problem.startswith("key ") else "not valid YAML"
        raise InvalidSpec(f"{path}{where}: {why}") from None


def load_spec(path: Path) -> JobSpec:
    text = _read(path)
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or ""
        # ours (a duplicate key, a limit) say what is wrong; PyYAML's may quote the text
        why = problem if isinstance(e, _SpecTooBig) or problem.startswith("key ") else "not valid YAML"
        raise InvalidSpec(f"{path}{where}: {why}") from None
    return _resolve_paths(parse_spec(data, str(path)), path.parent, str(path))


def _resolve_paths(spec: JobSpec, base: Path, where: str) -> JobSpec:
    """Paths in a spec are relative to the spec file, `~` is the user's home, as in a shell: each
    platform's spec model resolves its own (and checks what only the reading machine can)."""
    try:
        return spec.model_copy(
            update={"source": spec.source.resolved(base), "target": spec.target.resolved(base)}
        )
    except ValueError as e:
        raise InvalidSpec(f"{where}: {e}") from None
