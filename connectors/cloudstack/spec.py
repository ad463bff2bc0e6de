"""The CloudStack platform's part of a job spec: a VM of a CloudStack zone (source), and a primary storage
pool of a zone where the replicas and recovery points live, with the offerings, template and networks
that VMs made from the points get (target).

Keys never go in a spec: the spec names a login (`login`, default `default`) and the agent finds its
API key and secret key in its environment (`SENDENSE_CLOUDSTACK_API_KEY` /
`SENDENSE_CLOUDSTACK_SECRET_KEY`, or `SENDENSE_CLOUDSTACK_<LOGIN>_API_KEY` / `..._SECRET_KEY` for
another login), or from a lab on its machine that registered them for the URL (`sendense lab up`).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Literal, Self

from pydantic import Field, field_validator

from sendense.models import PlatformSpec, Reach, SourceSpec, Strict, TargetSpec, check_url_secrets

CLOUDSTACK_CREDENTIALS = (
    "the agent reads the login's API key and secret key from SENDENSE_CLOUDSTACK_API_KEY/"
    "SENDENSE_CLOUDSTACK_SECRET_KEY (or SENDENSE_CLOUDSTACK_<LOGIN>_API_KEY/_SECRET_KEY)"
)

_LOGIN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}\Z")
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_NAME = r"^[^\x00-\x1f\x7f]{1,255}$"  # a CloudStack name or uuid: no control characters


def key_envs(login: str) -> tuple[str, str]:
    """The environment names of a login's API key and secret key."""
    prefix = "SENDENSE_CLOUDSTACK_" if login == "default" else f"SENDENSE_CLOUDSTACK_{login.upper()}_"
    return prefix + "API_KEY", prefix + "SECRET_KEY"


class CloudStackPlace(PlatformSpec):
    """Where a CloudStack end is reached: the management server's API URL, the zone, the agent's login."""

    url: str = Field(description="the management server's API URL, e.g. https://cloud.example/client/api")
    zone: str = Field(pattern=_NAME, description="the zone, by name or id")
    login: str = Field(default="default", description="which of the agent's CloudStack logins to use")

    credentials_hint = CLOUDSTACK_CREDENTIALS

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        check_url_secrets(v, f"the keys go in the agent's environment: {CLOUDSTACK_CREDENTIALS}", user=False)
        u = urllib.parse.urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(
                "not an http(s) URL of a management server (e.g. https://cloud.example/client/api)"
            )
        if u.query or u.fragment:
            raise ValueError("the API URL has no query or fragment (the client adds the command)")
        try:
            u.port  # noqa: B018 - raises for a bad port
        except ValueError:
            raise ValueError("the port is 1 to 65535") from None
        return v

    @field_validator("login")
    @classmethod
    def _login(cls, v: str) -> str:
        if not _LOGIN.match(v):
            raise ValueError("a login name: a letter, then letters, digits or _ (at most 32)")
        return v

    def endpoint(self) -> str:
        """The URL as the agent's policy names it (cloudstack:<url>)."""
        return f"cloudstack:{self.url.rstrip('/')}"

    def reach(self) -> Reach:
        end = "source" if isinstance(self, SourceSpec) else "target"
        return Reach(endpoints=[(f"{end}.url", self.endpoint())])


class CloudStackSource(CloudStackPlace, SourceSpec):
    """A CloudStack VM on a KVM host: each sync asks the API which host runs it and its volumes, and the
    agent of that host takes the snapshot with libvirt checkpoints (QEMU dirty bitmaps) and reads it."""

    platform: Literal["cloudstack"]
    vm: str = Field(pattern=_NAME, description="the VM, by name or id")
    vm_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        description="set when the job is made: later syncs refuse another VM under the same name",
    )

    def describe(self) -> str:
        return f"cloudstack:{self.zone}:{self.vm}"

    def the_id(self) -> str | None:
        """The VM's id if the spec or the job pinned it."""
        return self.vm_id or (self.vm if UUID.match(self.vm) else None)

    def pinned(self, vm_id: str) -> Self:
        if not vm_id or self.vm_id or UUID.match(self.vm):
            return self
        return self.model_copy(update={"vm_id": vm_id})

    def locator(self) -> tuple[str, str] | None:
        """The VM moves between the zone's hosts (live migration, HA restarts): the API says where it
        runs before each sync (connectors.cloudstack.placement)."""
        return ("cloudstack", self.the_id() or self.vm)


class CloudStackNetworkMap(Strict):
    """A source network (by the name a VM's NIC has) and the target network a VM from a point gets."""

    source: str = Field(pattern=_NAME, description="the source NIC's network name (or '*': any)")
    target: str = Field(pattern=_NAME, description="a network of the target zone, by name or id")


class CloudStackTarget(CloudStackPlace, TargetSpec):
    """Replicas and recovery points as qcow2 files on a primary storage pool of the zone, written by the
    agent of a host that mounts it (`host`); VMs from points are CloudStack VMs over volumes imported
    from them (importVolume), deployed stopped with the point as ROOT (the deviceid 0 swap), started
    and boot-checked."""

    platform: Literal["cloudstack"]
    storage: str = Field(pattern=_NAME, description="the primary storage pool, by name or id")
    service_offering: str | None = Field(
        default=None, pattern=_NAME, description="VMs' offering (default: the smallest that fits the source)"
    )
    disk_offering: str | None = Field(
        default=None,
        pattern=_NAME,
        description="imported volumes' disk offering (default: custom size)",
    )
    template: str | None = Field(
        default=None, pattern=_NAME, description="template a VM is deployed from (its root is replaced)"
    )
    networks: list[CloudStackNetworkMap] = Field(
        default_factory=list, max_length=32, description="source network -> target network for VMs"
    )
    drill_network: str | None = Field(
        default=None, pattern=_NAME, description="the isolated network drills run on"
    )
    vm_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[A-Za-z][A-Za-z0-9-]*$",
        description="prefix of the CloudStack names of VMs from points (<vm_name>-<the drill's or "
        "failover's VM name>; default: that name alone)",
    )

    def describe(self) -> str:
        return f"cloudstack:{self.zone}:{self.storage}"
