"""The libvirt domains this host runs, for the agent's announcements (sendense.agents): a job whose
source is a libvirt domain follows it to the host that runs it now.

The agent lists the running domains of each libvirt URI in SENDENSE_KVM_LIBVIRT_URIS (comma-separated;
default qemu:///system), by UUID, with the URI it reaches them at: a job that moves here reads the
domain through that URI. A host with no libvirt running (the default URI unreachable) runs none.
"""

from __future__ import annotations

import os

from sendense.agents import LocalVm
from sendense.errors import ResourceUnavailable
from sendense.models import check_url_secrets

URIS_ENV = "SENDENSE_KVM_LIBVIRT_URIS"
DEFAULT_URI = "qemu:///system"


def local_vms() -> list[LocalVm]:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors come as exceptions
    configured = os.environ.get(URIS_ENV)
    uris = [u.strip() for u in (configured or DEFAULT_URI).split(",") if u.strip()]
    vms: list[LocalVm] = []
    failed: list[str] = []
    for i, uri in enumerate(uris):
        try:  # announced URIs become specs' (moved) and go into history: never one with a password
            check_url_secrets(uri, "give the agent ssh keys instead", noun="URI")
        except ValueError as e:
            failed.append(f"{URIS_ENV} entry {i + 1}: {e}")
            continue
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            if configured:  # (the default one unreachable: this host runs no libvirt)
                failed.append(f"libvirt {uri}: {e.get_error_message()}")
            continue
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                vms.append(LocalVm(platform="kvm", vm_id=dom.UUIDString(), name=dom.name(), where=uri))
        except libvirt.libvirtError as e:
            failed.append(f"libvirt {uri}: {e.get_error_message()}")
        finally:
            conn.close()
    if failed and not vms:
        raise ResourceUnavailable("; ".join(failed))
    return vms
