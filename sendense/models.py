"""Pydantic models: the job spec users write, and what activities and workflows exchange.

Everything here is small and serializable: disk data never travels in these models, only
references (disk keys, change ids, offsets, digests). New fields always get defaults so that old and
new workers can run side by side.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# Errors name the rule, never the value given: a secret pasted into the wrong field is not echoed.
_BAD_DURATION = "not a duration (use e.g. 30s, 5m, 1h)"


def parse_duration(value: Any) -> Any:
    """Accept `30s`, `5m`, `1h`, `1.5h`, plain seconds, or a timedelta. A value too large for a
    timedelta (or not finite) is a ValueError, so the field is named instead of an OverflowError."""
    if isinstance(value, bool):
        raise ValueError(_BAD_DURATION)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return _seconds(value, float(m.group(1)) * _UNITS[m.group(2)])
        if value.strip().upper().startswith("P"):
            return value  # ISO 8601, as the model serializes itself
        raise ValueError(_BAD_DURATION)
    if isinstance(value, int | float):
        return _seconds(value, value)
    return value


def _seconds(value: Any, seconds: float) -> timedelta:
    try:
        return timedelta(seconds=seconds)
    except (OverflowError, ValueError):
        raise ValueError("duration out of range (at most 30d)") from None


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _bounded(what: str, low: timedelta, high: timedelta) -> Any:
    def check(v: timedelta) -> timedelta:
        if v < low:
            raise ValueError(f"{what} must be at least {_show(low)}")
        if v > high:
            raise ValueError(f"{what} must be at most {_show(high)}")
        return v

    return AfterValidator(check)


def _show(d: timedelta) -> str:
    s = d.total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{s / n:.0f}{unit}"
    return f"{s:g}s"


# The bounds of what a job may be set to, in the spec and in `job settings` alike (one definition):
# a value outside them would be stored and then refused by every activity that decodes the spec.
INTERVAL_MIN, INTERVAL_MAX = timedelta(seconds=1), timedelta(days=30)
HEARTBEAT_MIN, HEARTBEAT_MAX = timedelta(seconds=1), timedelta(hours=1)
RETENTION_MIN, RETENTION_MAX = 1, 10000
BANDWIDTH_MIN, BANDWIDTH_MAX = 1 << 20, 1 << 40  # bytes/s: 1 MiB/s .. 1 TiB/s


def check_bandwidth(v: int) -> int:
    if not BANDWIDTH_MIN <= v <= BANDWIDTH_MAX:
        raise ValueError(f"bandwidth limit must be {BANDWIDTH_MIN} (1 MiB/s) to {BANDWIDTH_MAX} bytes/s")
    return v


Interval = Annotated[Duration, _bounded("interval", INTERVAL_MIN, INTERVAL_MAX)]
RetentionPoints = Annotated[int, Field(ge=RETENTION_MIN, le=RETENTION_MAX)]
BandwidthLimit = Annotated[int, AfterValidator(check_bandwidth)]
Heartbeat = Annotated[Duration, _bounded("heartbeat_timeout", HEARTBEAT_MIN, HEARTBEAT_MAX)]

# no dots: bitmap names use them as separators; \Z, not $ (which admits a trailing newline)
JOB_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")

# A job's class on its link (sendense.links): how the link's budget is shared among its copies.
Priority = Literal["critical", "normal", "low"]


def _check_link_name(v: str | None) -> str | None:
    if v is not None and not JOB_NAME.match(v):
        raise ValueError("not a link name (1-63 chars of a-z 0-9 _ - starting with a letter or digit)")
    return v


# A host id names the task queue of that host's agent (host-<id>): a typo or a stray newline would be
# a queue no agent serves, and the job would wait there for ever.
_HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


def _check_host(v: str) -> str:
    if not _HOST_ID.match(v):
        raise ValueError("not a host id (1-63 chars of A-Z a-z 0-9 . _ -, as the agent's)")
    return v


HostId = Annotated[str, AfterValidator(_check_host)]


# A point hold's id (a drill's or failover's name): it becomes a file name and a tag key.
HOLD_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")


def check_hold_id(hold_id: str) -> str:
    if not HOLD_ID.match(hold_id):
        raise ValueError(f"hold id {hold_id!r}: 1-64 chars of a-z 0-9 _ . - starting with a letter or digit")
    return hold_id


# ------------------------------------------------------------------- bounds of what a spec may hold

# Disks per VM. The largest real VMs have about 60; 128 leaves room for the largest a cloud offers
# (128 volume attachments on the largest instances of one cloud, 64 data disks and the OS disk on
# another), and a job of 128 disks still keeps every activity payload a small fraction of
# Temporal's 2 MB limit (tests/sendense/test_payload_sizes.py). A hypervisor's own ceiling (256
# virtual disks on some) is theory: no VM of that many disks is replicated here.
MAX_DISKS = 128
MAX_NICS = 64  # per VM (the largest cloud instances have about 50 network interfaces)
MAX_PATH_BYTES = 512  # a path in a spec: ample for real paths, and 128 of them stay small in history
MAX_TEXT = 1024  # characters in any other string of a spec (names, ids, URIs)


def _check_path(v: Any) -> Any:
    """Before the path is parsed: a longer one is refused naming the limit (pydantic would say only
    "not a valid path")."""
    if isinstance(v, str | Path) and len(os.fsencode(v)) > MAX_PATH_BYTES:
        raise ValueError(f"a path of at most {MAX_PATH_BYTES} bytes")
    return v


SpecPath = Annotated[Path, BeforeValidator(_check_path)]


def check_path_length(p: Path, what: str) -> Path:
    """A path made longer by resolution (relative to the spec file, `~`) is held to the same limit."""
    if len(os.fsencode(p)) > MAX_PATH_BYTES:
        raise ValueError(f"{what}: a path of at most {MAX_PATH_BYTES} bytes")
    return p


def capped(what: str, limit: int) -> Any:
    """A list (or mapping) of at most `limit` items, refused naming the limit before any item is
    validated: a spec listing a million disks costs nothing more than its length."""

    def check(v: Any) -> Any:
        if isinstance(v, list | tuple | dict) and len(v) > limit:
            raise ValueError(f"at most {limit} {what}")
        return v

    return BeforeValidator(check)


class Strict(BaseModel):
    """Spec models reject unknown fields, so a typo is an error and not a silent default; errors never
    carry the value given (a mistyped secret), and no string is longer than MAX_TEXT."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, str_max_length=MAX_TEXT)


class Wire(BaseModel):
    """Models exchanged between workflows and activities: tolerant of fields added by newer workers."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)


# --------------------------------------------------------------------------------------------- spec


# Words that mark a credential: never in a spec (it is stored in workflow history and shown by status).
SECRET_WORDS = (
    "secret",
    "access_key",
    "accesskey",
    "password",
    "passwd",
    "credentials",
    "session_token",
    "token",
)


def refuse_credentials(data: Any, hint: str) -> Any:
    """A spec's mapping with a key that names a credential is refused, saying where credentials go
    instead (`hint`), without echoing the value."""
    if isinstance(data, dict):
        for k in data:
            if any(w in str(k).lower().replace("-", "_") for w in SECRET_WORDS):
                raise ValueError(f"{k}: credentials never go in a job spec; {hint}")
    return data


_QUERY_SECRET = re.compile(
    r"[?&;](sig|signature|token|access_token|password|passwd|secret|x-amz-[a-z-]+|se|sp|sv)=", re.I
)


def check_url_secrets(url: str, instead: str, *, user: bool = True, noun: str = "URL") -> str:
    """Every URL of a spec goes into workflow history: one with a password in its user-info
    (`scheme://user:password@host`), a signed or token query, or (unless `user`) any user-info at
    all is refused, saying what to do `instead`, without echoing the URL."""
    if re.search(r"[\x00-\x20\x7f]", url):
        raise ValueError(f"a {noun} has no spaces or control characters")
    rest = url.partition("://")[2]
    # the user-info is what precedes the first '@': where a password holds '/', '?' or '#'
    # unescaped, the host part ends earlier than the '@' (so the '@' is looked for in all of it)
    userinfo, at, _ = rest.partition("@")
    if at and ":" in userinfo:
        raise ValueError(f"the {noun} carries a password (user:password@): {instead}")
    if at and not user:
        raise ValueError(f"the {noun} carries user-info (user@): {instead}")
    if _QUERY_SECRET.search(url):
        raise ValueError(f"the {noun} carries a token or a signature: {instead}")
    return url


class Reach(BaseModel):
    """What one end of a job touches on the agent's host and beyond, each named by its spec field: the
    agent's policy (sendense.policy) allows or refuses a job by it."""

    reads: list[tuple[str, Path]] = Field(default_factory=list, description="files and sockets read")
    writes: list[tuple[str, Path]] = Field(default_factory=list, description="directories written")
    endpoints: list[tuple[str, str]] = Field(default_factory=list, description="APIs called")


class PlatformSpec(Strict):
    """What a job spec says about one end of a job. Each platform's package subclasses SourceSpec or
    TargetSpec with its own fields and checks (sendense.platforms finds them by `platform`)."""

    platform: str
    host: HostId | None = Field(
        default=None, description="host id whose agent serves this end (default: the local agent)"
    )

    # where the agent finds its credentials instead, for the refusal of credentials in a spec
    credentials_hint: ClassVar[str] = "the agent finds its own credentials"

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        return refuse_credentials(data, cls.credentials_hint)

    def describe(self) -> str:
        """One line for status and search attributes: the platform and what this end is."""
        return self.platform

    def reach(self) -> Reach:
        """What this end reads, writes and calls (each platform says; nothing by default)."""
        return Reach()

    def resolved(self, base: Path) -> Self:
        """This end with paths given relative to the spec file (in `base`) made absolute, and what can
        only be checked on the machine that reads the spec (the same image named twice). Raises
        ValueError with a one-line reason."""
        return self


class SourceSpec(PlatformSpec):
    """A job's source: the VM to replicate."""

    def pinned(self, vm_id: str) -> Self:
        """This source pinned to the VM found when the job was created (VmInfo.vm_id), where the spec
        names it by something another VM could take (a name): later syncs refuse
        another VM under that name. Nothing to pin by default."""
        return self

    def locator(self) -> tuple[str, str] | None:
        """(platform, VM id) by which host agents announce this source VM when they run it
        (sendense.agents): a job follows it to the host that runs it now, before each sync. None
        (default): the source does not move between agents (a disk path, an API endpoint)."""
        return None

    def moved(self, host: str, where: str) -> Self:
        """This source as served by the agent of `host`, which announced the VM at `where` (its local
        address for the VM, e.g. a hypervisor connection URI)."""
        return self.model_copy(update={"host": host})


class TargetSpec(PlatformSpec):
    """A job's target: where its replicas and recovery points live."""


def resolve_path(p: Path, base: Path) -> Path:
    """A path from a spec: `~` is the user's home, as in a shell; relative to the spec file's directory."""
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


class UnknownPlatform(PydanticCustomError):
    """Raised by JobSpec's validators for a missing or unknown `platform` (sendense.spec words it)."""


def _end(kind: str) -> Any:
    """JobSpec.source / JobSpec.target: validated as the model of the platform it names, found in the
    registry (sendense.platforms), and serialized with all of that model's fields."""

    def validate(cls: Any, value: Any, handler: Any) -> PlatformSpec:
        from sendense import platforms  # (platforms imports this module)

        if isinstance(value, PlatformSpec):
            value = value.model_dump()
        if not isinstance(value, dict):
            raise PydanticCustomError("model_type", "expected a mapping with platform and its fields")
        name = value.get("platform")
        model = platforms.spec_model(kind, name) if isinstance(name, str) else None
        if model is None:
            offered = ", ".join(platforms.offered(kind))
            if name is None:
                raise PydanticCustomError("platform_missing", f"field required (one of: {offered})")
            raise PydanticCustomError("platform_unknown", f"not a supported platform (one of: {offered})")
        return model.model_validate(value)

    return validate


class Schedule(Strict):
    interval: Interval = Field(default=timedelta(minutes=5), description="time between sync starts")


class Retention(Strict):
    points: RetentionPoints = Field(default=24, description="recovery points kept per job")


class Tuning(Strict):
    """Data path settings; the defaults suit local disks."""

    # 8 connections x 512 KiB measured fastest into a local NBD replica target (more writes in flight
    # for O_DIRECT + native AIO than a few large ones); see bench/ and README "Benchmarks"
    chunk_size: int = Field(default=512 << 10, ge=64 << 10, le=32 << 20)
    connections: int = Field(default=8, ge=1, le=16)
    checkpoint_bytes: int = Field(
        default=64 << 20, ge=1 << 20, le=1 << 40, description="resume token granularity"
    )
    bandwidth_limit: BandwidthLimit | None = Field(default=None, description="bytes/s, none = unlimited")
    compare_block: int = Field(
        default=4096, ge=512, le=1 << 20, description="granularity of digest compares (resync, dedupe)"
    )
    dedupe_incremental: bool = Field(
        default=True,
        description="compare changed ranges with the replica and send only blocks that differ "
        "(costs a read of the replica; dirty bitmaps track 64 KiB, guests often write 4 KiB)",
    )
    heartbeat_timeout: Heartbeat = Field(
        default=timedelta(seconds=20), description="a copy whose worker died is resumed after this long"
    )
    in_flight: int = Field(
        default=4,
        ge=1,
        le=64,
        description="requests in flight per connection when the source is read across a site link "
        "(with the connections: at least the link's bandwidth x round trip)",
    )
    compression: Literal["auto", "zstd", "off"] = Field(
        default="auto",
        description="zstd on the link between two agents: auto = on when the source is another agent's "
        "(chunks that do not compress are sent as they are), off for a fast LAN",
    )
    inline_copy_bytes: int = Field(
        default=64 << 20,
        ge=0,
        le=1 << 40,
        description="a sync whose changes are at most this many bytes is copied inside its first task "
        "(one task less per sync; no resume token, which so little data does not need); 0 = never",
    )


class BootCheckSpec(Strict):
    """How a VM made from a point shows it booted (a drill's test VM, a failover's VM)."""

    console_contains: str = Field(
        default="login:",
        min_length=1,
        max_length=256,
        description="regular expression the VM's console shows once it is up",
    )
    timeout: Duration = Field(default=timedelta(minutes=10), description="from power-on; then it failed")
    guest_agent: bool = Field(
        default=False,
        description="also: the guest's agent answers through the platform's agent channel (refused where "
        "the platform has none)",
    )
    status_checks: bool = Field(
        default=False,
        description="also: the platform's own status checks pass (its instance and system checks, or its "
        "hypervisor's run state)",
    )

    @field_validator("console_contains")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression ({e.msg})") from None
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: timedelta) -> timedelta:
        if not timedelta(seconds=10) <= v <= timedelta(hours=2):
            raise ValueError("must be between 10s and 2h")
        return v


class RecoverySpec(Strict):
    """What a VM made from the job's points looks like (drills, failover); unset: the defaults."""

    cpus: int | None = Field(default=None, ge=1, le=256, description="vCPUs (default 1)")
    memory_mib: int | None = Field(default=None, ge=64, le=4 << 20, description="memory (default 512 MiB)")
    firmware: Literal["bios", "uefi"] | None = Field(default=None, description="default bios")
    network_map: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="source network -> target network (failover)"
    )
    boot_check: BootCheckSpec = Field(default_factory=BootCheckSpec)


class DrillSummary(Wire):
    """A drill's outcome as `job status` shows the newest one."""

    drill_id: str
    point_id: str = ""
    ok: bool | None = Field(default=None, description="the boot check passed (None: not reached)")
    seconds: float = 0.0
    evidence: str = ""
    error: str | None = None
    ended_at: datetime | None = None
    cleaned: bool = False


class FailedOver(Wire):
    """A job whose VM runs on its target now (`sendense failover`): its schedule is stopped."""

    failover_id: str
    point_id: str
    planned: bool
    vm: str = Field(description="the production VM's name on the target")
    vm_id: str = ""
    at: datetime


class FailbackSummary(Wire):
    """A failback's outcome as `job status` shows the newest one."""

    failback_id: str
    point_id: str = ""
    syncs: int = 0
    bytes_written: int = 0
    cutover_seconds: float | None = None
    started: bool = False
    note: str | None = Field(default=None, description="why the source VM was not started, if not")
    at: datetime


class JobSpec(Strict):
    name: str
    job_id: str = Field(
        default="",
        description="the job's unique identity, assigned at create (never written in a spec): replicas and "
        "points belong to it, not to the name; '' for jobs created before it existed",
    )
    source: SerializeAsAny[SourceSpec]
    target: SerializeAsAny[TargetSpec]
    schedule: Schedule = Field(default_factory=Schedule)
    retention: Retention = Field(default_factory=Retention)
    tuning: Tuning = Field(default_factory=Tuning)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    priority: Priority = Field(default="normal", description="its class on its link: critical, normal, low")
    link: Annotated[str | None, AfterValidator(_check_link_name)] = Field(
        default=None, description="the site link its data crosses (`sendense link`); None: not governed"
    )

    _source = field_validator("source", mode="wrap")(_end("source"))
    _target = field_validator("target", mode="wrap")(_end("target"))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not JOB_NAME.match(v):
            raise ValueError("must be 1-63 chars of a-z 0-9 _ - starting with a letter or digit")
        return v


class SettingsChange(Wire):
    """What `job settings` sends to a running job, as the workflow decodes it: tolerant, so that a
    value out of bounds reaches the update's validator and is refused there in one line (a strict
    decode would refuse it as "Failed decoding arguments", naming nothing). Unknown fields are kept
    for the validator to refuse: a setting this worker does not know is not silently dropped."""

    model_config = ConfigDict(extra="allow")

    interval: timedelta | None = None
    retention_points: int | None = None
    bandwidth_limit: int | None = None
    priority: str | None = None

    def applied(self, spec: JobSpec) -> JobSpec:
        """`spec` with these settings, validated as a whole like a spec (raises ValidationError)."""
        data = spec.model_dump(mode="json")
        if self.interval is not None:
            data["schedule"]["interval"] = self.interval.total_seconds()
        if self.retention_points is not None:
            data["retention"]["points"] = self.retention_points
        if self.bandwidth_limit is not None:
            data["tuning"]["bandwidth_limit"] = self.bandwidth_limit or None
        if self.priority is not None:
            data["priority"] = self.priority
        return JobSpec.model_validate(data)


class Settings(SettingsChange):
    """What `job settings` may change on a running job, within the spec's own bounds."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # (a mistyped secret)

    interval: Interval | None = None
    retention_points: RetentionPoints | None = None
    bandwidth_limit: int | None = Field(default=None, description="bytes/s; 0 = unlimited")
    priority: Priority | None = Field(default=None, description="its class on its link")

    @field_validator("bandwidth_limit")
    @classmethod
    def _bandwidth(cls, v: int | None) -> int | None:
        return v if v is None or v == 0 else check_bandwidth(v)


# ------------------------------------------------------------------- VM hardware, VMs from points


Firmware = Literal["bios", "uefi", ""]


class NicInfo(Wire):
    """A VM's network interface: its MAC and the network it is on (the platform's name for it)."""

    mac: str = ""
    network: str = Field(default="", description="the platform's network name or id; '' if none")
    model: str = Field(default="", description="virtio, e1000, ena, vmxnet3, ... ('' unknown)")


class NetworkInfo(Wire):
    """A network a VM from a point can be put on (`list_networks`)."""

    name: str
    kind: str = Field(default="", description="the platform's kind: bridge, user, subnet, ...")
    isolated: bool = Field(default=False, description="reaches nothing outside (a test network)")


VmMode = Literal["test", "production"]


class PlanDisk(Wire):
    key: str = Field(description="the point's disk key")
    bus: str = Field(default="", description="virtio, scsi, sata, ide, nvme; '' = the source's or virtio")
    boot_order: int | None = Field(default=None, description="1 = boots first; None: the point's order")


class VmPlan(Wire):
    """How a VM is made from a recovery point (a drill's test VM, a failover's production VM).

    `name` is chosen by the caller before the VM exists and identifies it on the target: a saga
    registers `destroy_vm(name)` as its undo before `create_vm` runs, so a step killed half-way is
    undone by the same name."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")  # (Rust regex: $ is the very end)
    point_id: str
    mode: VmMode = Field(default="test", description="test: isolated, no effect on production")
    cpus: int = Field(default=1, ge=1, le=256)
    memory_mib: int = Field(default=512, ge=64, le=4 << 20)
    firmware: Literal["bios", "uefi"] = "bios"
    disks: list[PlanDisk] = Field(default_factory=list, description="empty: every disk of the point")
    nics: list[NicInfo] = Field(default_factory=list, description="production mode: NICs to create")
    network_map: dict[str, str] = Field(
        default_factory=dict, description="production mode: source network -> target network"
    )


def boot_disks(point: PointInfo, chosen: list[PlanDisk]) -> list[PointDisk]:
    """The point's disks a VM gets, the boot disk first: those `chosen` names (the one with boot order 1
    first, then by boot order, then as listed), or every disk of the point in its order."""
    by_key = {d.key: d for d in point.disks}
    if not chosen:
        return list(point.disks)
    unknown = [c.key for c in chosen if c.key not in by_key]
    if unknown:
        from sendense.errors import InvalidSpec

        raise InvalidSpec(f"point {point.point_id} has no disk {', '.join(unknown)}")
    ranked = sorted(
        enumerate(chosen), key=lambda ic: (ic[1].boot_order is None, ic[1].boot_order or 0, ic[0])
    )
    return [by_key[c.key] for _, c in ranked]


class VmRef(Wire):
    """A VM made from a point, as the target knows it (no secrets)."""

    name: str
    platform: str
    point_id: str
    mode: VmMode
    vm_id: str = Field(default="", description="the platform's id (a pid, a domain UUID, an instance id)")
    state: str = Field(default="", description="running, stopped, ... as the platform says")


class BootCheck(Wire):
    """Whether a VM booted, with the evidence that decided it."""

    ok: bool
    seconds: float = Field(description="from power-on to the decision")
    evidence: str = Field(description="the console line that matched, the status seen, or why not")
    via: str = Field(default="console", description="console, status, agent")


# --------------------------------------------------------------------------------------- runtime


class DiskInfo(Wire):
    key: str = Field(description="stable disk id within the VM, e.g. disk0 or vda")
    size: int
    ref: str = Field(default="", description="platform reference: image path, node name, volume id")
    bus: str = Field(default="", description="virtio, scsi, sata, ide, nvme ('' unknown)")
    boot_order: int | None = Field(default=None, description="1 boots first; None unknown or not bootable")


class VmInfo(Wire):
    """A source VM as discovered: what a VM made from its points needs to look like it."""

    name: str
    platform: str
    disks: list[DiskInfo]
    vm_id: str = Field(default="", description="the platform's immutable id of the VM ('' if none)")
    cpus: int = Field(default=0, description="vCPUs (0 unknown)")
    memory_mib: int = Field(default=0, description="memory in MiB (0 unknown)")
    firmware: Firmware = Field(default="", description="bios or uefi ('' unknown)")
    nics: list[NicInfo] = Field(default_factory=list)
    os_hint: str = Field(default="", description="linux, windows, ... as the platform says ('' unknown)")


_URL_SECRET = re.compile(r"://[^/\s]*@|[?&](sig|signature|token|x-amz-[a-z-]+|se|sp|sv)=", re.I)


def _no_secret_in_handle(h: Any) -> Any:
    """A handle goes into workflow history: a key naming a credential, or a URL with credentials or a
    signed query (a SAS URL, a presigned URL), never does. Said without echoing the value."""
    if isinstance(h, dict):
        for k, v in h.items():
            if any(w in str(k).lower() for w in SECRET_WORDS):
                raise ValueError(
                    f"snapshot handle field {k!r} names a credential: handles go to workflow history"
                )
            if isinstance(v, str) and _URL_SECRET.search(v):
                raise ValueError(f"snapshot handle field {k!r} holds a URL with credentials or a signature")
    return h


# A connector's data about its snapshot (exports, node names, volume ids): the JSON form of the
# connector's own Handle model (each connector parses it back with `Model.parse(handle)`).
HandleData = Annotated[dict[str, Any], AfterValidator(_no_secret_in_handle)]


class Handle(Wire):
    """Base of a connector's typed snapshot handle. Whatever it holds is stored in workflow history: a
    name or a path, never a credential, a signed URL or a session ticket (checked on every decode)."""

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)

    def dump(self) -> dict[str, Any]:
        return _no_secret_in_handle(self.model_dump(mode="json", exclude_defaults=True))  # type: ignore[no-any-return]


MAX_REASON = 512  # characters of a reason kept per disk (a platform's error text may be any length)


def shortened(text: str | None, limit: int = MAX_REASON) -> str | None:
    """`text` cut to `limit` characters, marked where it was cut."""
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


class DiskSnapshot(Wire):
    key: str
    size: int
    change_id: str = Field(description="change id that the next sync will diff against")
    base_change_id: str | None = Field(default=None, description="None: no base, a full sync")
    tracking_lost: str | None = Field(default=None, description="why change tracking was lost, if it was")
    handle: HandleData = Field(default_factory=dict, description="the connector's Handle model, as JSON")

    @field_validator("tracking_lost")
    @classmethod
    def _short(cls, v: str | None) -> str | None:
        return shortened(v)  # every disk of a VM may lose tracking at once, each with a long reason


class SnapshotRef(Wire):
    snapshot_id: str
    created_at: datetime
    disks: list[DiskSnapshot]
    handle: HandleData = Field(default_factory=dict)
    notes: list[str] = Field(
        default_factory=list, description="what the source did that an operator should know (job status)"
    )

    def disk(self, key: str) -> DiskSnapshot:
        for d in self.disks:
            if d.key == key:
                return d
        raise KeyError(key)


SyncKind = Literal["full", "incremental", "resync"]


class CopyStats(Wire):
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = Field(default=0, description="read but equal on the target (resync)")
    extents: int = 0
    seconds: float = 0.0
    recopied: int = Field(default=0, description="bytes copied again after a resume")
    bytes_on_wire: int = Field(
        default=0, description="what the data read cost on the link (compressed, zeros elided)"
    )

    def add(self, other: CopyStats) -> None:
        for name in type(self).model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class DiskCopyResult(Wire):
    key: str
    kind: SyncKind
    stats: CopyStats
    resumed_from: int = 0


class CopyToken(Wire):
    """Heartbeated resume token: everything below `offset` of this disk is on the target and flushed."""

    sync_id: str
    disk: str
    offset: int
    snapshot_at: datetime | None = Field(
        default=None,
        description="the snapshot it copies (its created_at): a token of another snapshot "
        "of the same sync (a retried begin) is worthless",
    )
    done: int = 0
    total: int = 0
    stats: CopyStats = Field(default_factory=CopyStats)


class PointDisk(Wire):
    key: str
    size: int
    change_id: str
    path: str = ""


class PointInfo(Wire):
    point_id: str
    job: str
    created_at: datetime = Field(description="the snapshot instant the point holds")
    committed_at: datetime
    kind: SyncKind
    disks: list[PointDisk]
    stats: CopyStats = Field(default_factory=CopyStats)
    holds: list[str] = Field(default_factory=list, description="who pins it (drills, failovers): kept")


class SyncResult(Wire):
    point_id: str
    kind: SyncKind
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    bytes_skipped: int = 0
    bytes_on_wire: int | None = Field(
        default=None,
        description="what the data read cost across the link between two agents (zstd, zeros elided); "
        "None when source and target were on one agent",
    )
    seconds: float
    created_at: datetime
    resync_reason: str | None = None
    notes: list[str] = Field(default_factory=list, description="the source's notes on this sync")


JobState = Literal[
    "starting",
    "idle",
    "syncing",
    "paused",
    "error",
    "failing-over",
    "failed-over",
    "failing-back",
    "deleting",
    "deleted",
]


class JobStatus(Wire):
    name: str
    state: JobState
    source: str
    target: str
    interval_seconds: float
    retention_points: int
    syncs: int = 0
    failures: int = 0
    last_point: str | None = None
    last_point_at: datetime | None = None
    last_sync: SyncResult | None = None
    next_sync_at: datetime | None = None
    rpo_lag_seconds: float | None = None
    last_error: str | None = None
    last_resync_reason: str | None = None
    resyncs: int = 0
    total_bytes_written: int = 0
    current_sync: str | None = None
    left_behind: list[str] = Field(default_factory=list, description="what a delete could not remove")
    last_drill: DrillSummary | None = None
    failed_over: FailedOver | None = None
    last_failback: FailbackSummary | None = None
    priority: str = Field(default="normal", description="its class on its link")
    link: str | None = Field(default=None, description="the site link its data crosses")
    source_host: str | None = Field(default=None, description="the agent its source's steps run on")
    last_move: str | None = Field(default=None, description="the source VM's last move to another host")


# ------------------------------------------------------------------------ activity contracts


class SnapshotRequest(Wire):
    spec: JobSpec
    snapshot_id: str
    base: dict[str, str | None] = Field(default_factory=dict)
    copy_up_to: int = Field(default=0, description="begin_and_copy: copy disks inline up to this many bytes")
    finish: bool = Field(default=False, description="begin_and_copy: commit too if every disk was copied")


class FinishResult(Wire):
    """finish_sync: the committed point, and why releasing the snapshot failed (then the workflow
    runs release_snapshot on its own, with retries)."""

    point: PointInfo
    release_error: str | None = None


class BeginResult(Wire):
    """begin_and_copy: the snapshot, the disks copied inline (the first ones, in order), and, when
    asked to finish and every disk was copied, the committed point (the whole sync in one task)."""

    snapshot: SnapshotRef
    copied: list[DiskCopyResult] = Field(default_factory=list)
    finished: FinishResult | None = None


class PrepareRequest(Wire):
    spec: JobSpec
    sync_id: str
    disks: list[DiskInfo]


class RemoteExport(Wire):
    """A sync's snapshot served by the source's agent to the target's (sendense.datapath.remote)."""

    address: str = Field(description="host:port of the source agent's data server")
    host_id: str = Field(description="the source agent's host id: its certificate must name it")
    export: str = Field(description="<job>/<sync id>")
    token: str = Field(description="the export's secret (payloads are encrypted; never logged)", repr=False)


class ExportRequest(Wire):
    spec: JobSpec
    sync_id: str
    snapshot: SnapshotRef
    peer_host: str = Field(description="host id of the agent that will read it (the target's)")
    kind: Literal["sync", "reverse"] = Field(
        default="sync",
        description="sync: the source's snapshot (read by the target's agent); reverse: a failed-over "
        "VM's snapshot (failback: read by the source's agent)",
    )


class CopyRequest(Wire):
    spec: JobSpec
    sync_id: str
    snapshot: SnapshotRef
    disk: str
    export: RemoteExport | None = Field(
        default=None, description="read the source across the link from this export (target's agent)"
    )


class CommitRequest(Wire):
    spec: JobSpec
    sync_id: str
    snapshot: SnapshotRef
    results: list[DiskCopyResult]
    keep: int | None = Field(default=None, description="then prune to this many points (retention)")


class ReleaseRequest(Wire):
    spec: JobSpec
    snapshot: SnapshotRef
    committed: bool


class AbortRequest(Wire):
    spec: JobSpec
    sync_id: str


class PruneRequest(Wire):
    spec: JobSpec
    keep: int


class PruneResult(Wire):
    removed: list[str] = Field(default_factory=list)


class JobRequest(Wire):
    spec: JobSpec


# ------------------------------------------------------------------------ workflow contracts


class SyncNowRequest(Wire):
    reason: str = "requested"


class DeleteRequest(Wire):
    purge: bool = Field(default=False, description="also delete the replicas and recovery points")


class CarriedState(Wire):
    """What a job carries across continue-as-new."""

    seq: int = 0
    base: dict[str, str | None] = Field(default_factory=dict)
    last_point: PointInfo | None = None
    last_sync: SyncResult | None = None
    paused: bool = False
    pending_requests: int = 0
    syncs: int = 0
    failures: int = 0
    resyncs: int = 0
    last_error: str | None = None
    last_resync_reason: str | None = None
    total_bytes_written: int = 0
    last_sync_started_at: datetime | None = None
    validated: bool = False
    inconsistent_in_row: int = Field(default=0, description="syncs failed in a row on SnapshotInconsistent")
    last_drill: DrillSummary | None = None
    vm: VmInfo | None = Field(default=None, description="the source VM as validate found it at create")
    failed_over: FailedOver | None = None
    last_failback: FailbackSummary | None = None
    last_move: str | None = Field(default=None, description="the source VM's last move to another host")


class ReplicationInput(Wire):
    spec: JobSpec
    state: CarriedState = Field(default_factory=CarriedState)
    source_queue: str = ""
    target_queue: str = ""
    search_attributes: bool = True
    max_syncs_per_run: int = Field(default=200, description="continue-as-new after this many syncs")
