"""VMs from points on the CloudStack target really boot (root: the lab's hosts are private libvirtds): the
bootable guest replicated into a point on the pool, a drill's test VM made from it over imported flat
copies on the isolated network, started by CloudStack on a lab host, its ready marker on the console,
destroyed leaving no VM, no volume, no file; a failover's VM on the mapped network with the platform's
status check too."""

from __future__ import annotations

import http.server
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cs_target_rig import HOST, api, job_spec, leftovers, point, use_lab

from connectors.cloudstack.vms import point_bitmap
from labs.cloudstack.server import LabServer
from labs.cloudstack.state import LabConfig
from labs.guest.build import build
from sendense.datapath.nbd import ALLOCATION, NbdConnection, dirty_context
from sendense.models import VmPlan
from sendense.platforms import vms_for
from tools.qemu import qemu_nbd

pytestmark = [pytest.mark.root, pytest.mark.slow]

READY = "SENDENSE-GUEST-READY"


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabServer]:
    cache = getattr(request.config, "cache", None)
    caps = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    caps = caps or Path.home() / ".cache" / "sendense" / "libvirt-qemu-caps"
    root = Path(tempfile.mkdtemp(prefix="cstvm-", dir="/tmp"))  # short: libvirt socket paths
    server = LabServer(root, LabConfig(pool_capacity_gib=8, libvirt_cache=str(caps), stop_timeout=2)).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _env(lab: LabServer, monkeypatch: pytest.MonkeyPatch) -> None:
    use_lab(lab, monkeypatch)


def written_since_point(flat: Path, job: str) -> int:
    """Bytes the flat copy's point bitmap says the VM wrote since its point (QEMU stored it at stop)."""
    bitmap = point_bitmap(job, "p1")
    with qemu_nbd(flat, bitmaps=[bitmap]) as srv:
        with NbdConnection(srv.uri, contexts=(ALLOCATION, dirty_context(bitmap))) as c:
            return sum(e.length for e in c.changed_extents(bitmap))


def test_a_drill_vm_from_a_point_boots_the_guest_and_leaves_nothing(lab: LabServer, tmp_path: Path) -> None:
    disk = tmp_path / "guest.qcow2"
    shutil.copyfile(build(), disk)
    spec = job_spec(lab, disk)
    tgt = point(spec, tmp_path / "work")
    vms = vms_for(spec)
    before = leftovers(lab)
    tgt.hold("p1", "drill-1", "drill")
    made = vms.create_vm(VmPlan(name="drill-1", point_id="p1", memory_mib=256))
    [root] = api(lab).call("listVolumes", virtualmachineid=made.vm_id)["volume"]
    flat = lab.cloud.state.pool.path / root["path"]
    assert written_since_point(flat, spec.name) == 0  # the flat copy's bitmap: nothing written yet
    ref = vms.power_on("drill-1")
    assert ref.state == "running" and vms.power_on("drill-1").vm_id == ref.vm_id  # running already
    check = vms.boot_check("drill-1", READY, timeout=180)
    assert check.ok, check.evidence
    assert READY in check.evidence and check.seconds > 0 and check.via == "console"
    assert READY in vms.console("drill-1")
    [vm] = api(lab).call("listVirtualMachines", id=ref.vm_id)["virtualmachine"]
    assert vm["state"] == "Running" and vm["hostname"] in ("cs-lab-host-1", "cs-lab-host-2")
    assert [n["networkname"] for n in vm["nic"]] == ["lab-isolated"]
    assert vms.power_off("drill-1").state == "stopped"
    assert written_since_point(flat, spec.name) > 0  # the guest's boot wrote (its root mounted read-write)
    vms.destroy_vm("drill-1")
    tgt.release("p1", "drill-1")
    assert vms.list_vms() == [] and leftovers(lab) == before
    assert [h.domains() for h in lab.cloud.hosts.values()] == [[], []]  # no domain on any host
    tgt.destroy()


def test_a_failover_vm_runs_on_the_mapped_network_and_passes_the_status_check(
    lab: LabServer, tmp_path: Path
) -> None:
    disk = tmp_path / "guest.qcow2"
    shutil.copyfile(build(), disk)
    spec = job_spec(lab, disk, vm_name="web")
    tgt = point(spec, tmp_path / "work")
    vms = vms_for(spec)
    before = leftovers(lab)
    plan = VmPlan(name="failover-1", point_id="p1", mode="production", cpus=2, memory_mib=512)
    vms.create_vm(plan)
    vms.power_on("failover-1")
    check = vms.boot_check("failover-1", READY, timeout=180, status_checks=True)
    assert check.ok and check.evidence.endswith("; CloudStack says Running"), check.evidence
    [vm] = api(lab).call("listVirtualMachines", name="web-failover-1")["virtualmachine"]
    assert vm["serviceofferingname"] == "lab-medium" and [n["networkname"] for n in vm["nic"]] == [
        "lab-shared"
    ]
    vms.destroy_vm("failover-1")
    assert leftovers(lab) == before
    tgt.destroy()


class _ApiOnly:
    """The lab's API alone, as a management server serves it (its /_lab console endpoint answers 404):
    a real HTTP server in front of the lab, forwarding /client/api."""

    def __init__(self, lab: LabServer) -> None:
        upstream = lab.url

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if not self.path.startswith("/client/api"):
                    self.send_error(404)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = urllib.request.Request(upstream, data=body, method="POST")
                req.add_header("Content-Type", self.headers.get("Content-Type", ""))
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.send_error(404)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/client/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_without_a_console_api_a_running_vm_is_not_a_passed_boot_check(
    lab: LabServer, tmp_path: Path
) -> None:
    """A real management server has no console text: the boot check says it could not look, and fails."""
    disk = tmp_path / "guest.qcow2"
    shutil.copyfile(build(), disk)
    proxy = _ApiOnly(lab)
    try:
        spec = job_spec(lab, disk, url=proxy.url)
        tgt = point(spec, tmp_path / "work")
        vms = vms_for(spec)
        vms.create_vm(VmPlan(name="blind", point_id="p1", memory_mib=256))
        vms.power_on("blind")
        check = vms.boot_check("blind", READY, timeout=60, status_checks=True)
        assert not check.ok and check.via == "status"
        assert check.evidence.startswith(
            f"VM blind is Running, but {READY!r} cannot be looked for: CloudStack's API has no console text"
        )
        assert vms.console("blind") == ""
        # the guest agent, through the libvirt of the host the VM was started on: this agent's (the VM
        # starts on the host of the agent that makes it); asked from another host's agent: refused
        [vm] = api(lab).call("listVirtualMachines", name=vms._read("blind")["cloud_name"])["virtualmachine"]
        assert vm["hostname"] == HOST, vm
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SENDENSE_HOST_ID", HOST)
            mp.setenv("SENDENSE_KVM_LIBVIRT_URIS", lab.cloud.hosts[vm["hostid"]].libvirtd.uri)
            check = vms.boot_check("blind", READY, timeout=120, guest_agent=True)
            assert check.ok and check.via == "agent", check
            assert check.evidence.startswith(
                f"the guest agent answered guest-sync through host {HOST}'s libvirt"
            )
            mp.setenv("SENDENSE_HOST_ID", "cs-lab-host-2")
            check = vms.boot_check("blind", READY, timeout=10, guest_agent=True)
            assert (
                not check.ok
                and f"it runs on host {HOST}, not on this agent's host cs-lab-host-2" in check.evidence
            )
        vms.destroy_vm("blind")
        tgt.destroy()
    finally:
        proxy.close()
