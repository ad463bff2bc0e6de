"""What this agent will do for a job, whoever started it.

Anyone who can start a workflow on the Temporal server can hand an agent a job spec. An agent may run
as root on its host, so the spec alone must not decide what it reads, writes or calls: every activity
checks the job's spec against this agent's own policy before it touches anything (activities.guard),
and a source that opens image files checks each file an image refers to as well.

The policy is a YAML file owned by the agent's user: `SENDENSE_POLICY`, or `SENDENSE_HOME/policy.yaml`.
An agent without one refuses every job. `sendense up` writes a starter policy for the embedded stack
when there is none (`starter()`). Its fields:

    platforms      the platforms it serves, as source or target
    source_roots   directories whose files (images, the files they refer to, sockets) it reads
    target_roots   directories it writes replicas, points and VMs into
    endpoints      the APIs it calls, as fnmatch patterns

An end of a job says what it reaches (`PlatformSpec.reach()`): paths it reads, paths it writes, and
endpoints it calls. A cloud end without an endpoint URL reaches `<platform>:<region>`, its provider's
own endpoints; with one, that URL. Endpoints a lab on this machine registered (`sendense lab up`,
under the agent's private SENDENSE_HOME) are allowed too.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from sendense import config
from sendense.errors import NotAllowed
from sendense.models import JobSpec, Reach, Strict

MAX_POLICY_BYTES = 64 << 10

# Never a replica directory, whatever a policy says: kernel interfaces and the system's own trees.
SYSTEM_TREES = ("/proc", "/sys", "/dev", "/run", "/boot", "/etc", "/bin", "/sbin", "/lib", "/usr")


class Policy(Strict):
    """An agent's policy file."""

    platforms: list[str] = Field(default_factory=list, max_length=64, description="platforms served")
    source_roots: list[Path] = Field(default_factory=list, max_length=256)
    target_roots: list[Path] = Field(default_factory=list, max_length=256)
    endpoints: list[str] = Field(default_factory=list, max_length=256, description="fnmatch patterns")
    hooks: list[Path] = Field(
        default_factory=list, max_length=256, description="programs a recovery plan's hooks may run"
    )


def path() -> Path:
    explicit = os.environ.get("SENDENSE_POLICY")
    return Path(explicit) if explicit else config.home() / "policy.yaml"


@dataclass
class _Loaded:
    path: Path
    stamp: tuple[int, int, int]
    policy: Policy


_cache: _Loaded | None = None


def current() -> Policy:
    """This agent's policy, read again whenever its file changes (no restart to widen or narrow it)."""
    global _cache
    p = path()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise NotAllowed(
            f"this agent has no policy ({p}): it refuses every job until one says what it may read, "
            "write and call (see README, 'Agent policy')"
        ) from None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    if _cache is not None and _cache.path == p and _cache.stamp == stamp:
        return _cache.policy
    _cache = _Loaded(p, stamp, load(p))
    return _cache.policy


def load(p: Path) -> Policy:
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise NotAllowed(f"agent policy {p}: cannot be read ({e.strerror})") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise NotAllowed(f"agent policy {p}: larger than {MAX_POLICY_BYTES >> 10} KiB")
    try:
        data: Any = yaml.safe_load(raw) or {}
        return Policy.model_validate(data)
    except (yaml.YAMLError, RecursionError):
        raise NotAllowed(f"agent policy {p}: not valid YAML") from None
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "policy"
        raise NotAllowed(f"agent policy {p}: {loc}: {first['msg']}") from None


def starter(home: Path) -> str:
    """The policy `sendense up` writes when there is none: the embedded stack's own directories (its
    demo guest's `lab/`, `replicas/`), and what each platform offers for a starter (its usual image
    directories, its own endpoints)."""
    from sendense import platforms  # (platforms imports the models; this module is imported early)

    offered = [p for p in platforms.load_all() if not p.developer_only]
    doc = {
        "platforms": [p.name for p in offered],
        "source_roots": [str(home / "lab")] + [r for p in offered for r in p.starter_source_roots],
        "target_roots": [str(home / "replicas"), "/var/lib/sendense/replicas"]
        + [r.replace("{home}", str(home)) for p in offered for r in p.starter_target_roots],
        "endpoints": [e for p in offered for e in p.starter_endpoints],
    }
    return (
        "# What this agent does for a job, whoever starts it (README, 'Security model'). Checked on\n"
        "# every activity; edits apply to the next one. Add the directories your VMs' images live in\n"
        "# and the directories replicas go to.\n" + yaml.safe_dump(doc, sort_keys=False)
    )


def _inside(p: Path, roots: list[Path]) -> bool:
    real = os.path.realpath(p)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip("/") + "/"):
            return True
    return False


def _system(p: Path) -> bool:
    real = os.path.realpath(p)
    return real == "/" or any(real == t or real.startswith(t + "/") for t in SYSTEM_TREES)


def _roots(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "none"


def require_source_path(p: Path, what: str, pol: Policy | None = None) -> None:
    """Raise NotAllowed unless `p` (named `what` to the user: a spec field, an image's backing file)
    is inside this agent's source roots."""
    pol = pol or current()
    if not _inside(p, pol.source_roots):
        raise NotAllowed(f"{what} {p} is outside this agent's source roots ({_roots(pol.source_roots)})")


def require_target_path(p: Path, what: str, pol: Policy | None = None) -> None:
    pol = pol or current()
    if _system(p):
        raise NotAllowed(f"{what} {p} is a system directory: replicas never go there")
    if not _inside(p, pol.target_roots):
        raise NotAllowed(f"{what} {p} is outside this agent's target roots ({_roots(pol.target_roots)})")


def require_endpoint(endpoint: str, what: str, pol: Policy | None = None) -> None:
    pol = pol or current()
    if any(fnmatch.fnmatchcase(endpoint, pat) for pat in pol.endpoints):
        return
    if config.lab_env(endpoint) is not None:  # a lab this agent's user started on this machine
        return
    allowed = ", ".join(pol.endpoints) or "none"
    raise NotAllowed(f"{what} {endpoint} is not among this agent's endpoints ({allowed})")


def require_hook(program: str, what: str) -> None:
    """Raise NotAllowed unless `program` (a hook's, an absolute path) is one of the policy's hooks: a
    plan's hooks run as the agent's user, so only programs its operator listed run at all."""
    pol = current()
    real = os.path.realpath(program)
    if not any(real == os.path.realpath(h) for h in pol.hooks):
        listed = ", ".join(str(h) for h in pol.hooks) or "none"
        raise NotAllowed(f"{what}: {program} is not among this agent's hooks ({listed})")


def is_local(end: Any) -> bool:
    """Whether this agent serves a job's end: it names no host (the local agent) or this one."""
    host = getattr(end, "host", None)
    return host is None or host == config.host_id()


def authorize(spec: JobSpec) -> None:
    """Raise NotAllowed, naming the spec field, unless this agent's policy allows everything the job
    reaches. Nothing is touched before it returns."""
    pol = current()
    for kind, end in (("source", spec.source), ("target", spec.target)):
        if not is_local(end):  # another agent's end: that agent checks it (and only it touches it)
            continue
        if end.platform not in pol.platforms:
            raise NotAllowed(
                f"job {spec.name}: {kind}.platform {end.platform} is not served by this agent "
                f"(it serves: {', '.join(pol.platforms) or 'none'})"
            )
        reach: Reach = end.reach()
        try:
            for what, p in reach.reads:
                require_source_path(p, what, pol)
            for what, p in reach.writes:
                require_target_path(p, what, pol)
            for what, e in reach.endpoints:
                require_endpoint(e, what, pol)
        except NotAllowed as e:
            raise NotAllowed(f"job {spec.name}: {e.message}") from None
