"""The CloudStack lab's VMs really run (root: each lab host is a private libvirtd), through PyPI `cs`:
a VM deployed from the bootable guest template boots (its ready marker on the serial console) as a
libvirt domain named by its instancename on its host's libvirtd, stops and starts, migrates to the
other host keeping its volumes, gets a data volume hot-plugged and grown; capacity runs out with
CloudStack's errors; destroy with expunge leaves no domain and no file; `sendense lab up`'s hook
starts the lab and says what a spec needs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest
import requests
from cs import CloudStack, CloudStackApiException

from labs.cloudstack.server import LabServer
from labs.cloudstack.state import GIB, LabConfig

pytestmark = [pytest.mark.root, pytest.mark.slow]

READY = "SENDENSE-GUEST-READY"


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabServer]:
    cache = getattr(request.config, "cache", None)  # none with -p no:cacheprovider (plant_bugs.py)
    caps = Path(cache.mkdir("sendense-libvirt-qemu-caps")) if cache is not None else None
    caps = caps or Path.home() / ".cache" / "sendense" / "libvirt-qemu-caps"
    root = Path(tempfile.mkdtemp(prefix="cslab-", dir="/tmp"))  # short: libvirt socket paths
    config = LabConfig(pool_capacity_gib=3, libvirt_cache=str(caps or ""), stop_timeout=2)
    server = LabServer(root, config).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cs(lab: LabServer) -> CloudStack:
    return CloudStack(
        endpoint=lab.url,
        key=lab.info["api_key"],
        secret=lab.info["secret_key"],
        poll_interval=0.1,
        job_timeout=180,
    )


def named(cs: CloudStack, command: str, item: str, name: str, **kw: Any) -> dict[str, Any]:
    [found] = [x for x in getattr(cs, command)(**kw)[item] if x["name"] == name]
    return found


def control(lab: LabServer, path: str) -> Any:
    r = requests.get(lab.url.rsplit("/client/api", 1)[0] + path, timeout=10)
    r.raise_for_status()
    return r.json() if r.headers["Content-Type"].startswith("application/json") else r.text


def wait_console(lab: LabServer, vm_id: str, pattern: str, timeout: float = 90) -> float:
    """Seconds until the VM's console shows `pattern`."""
    t0 = time.monotonic()
    while True:
        text = control(lab, f"/_lab/vms/{vm_id}/console")
        if re.search(pattern, text):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"no {pattern!r} on {vm_id}'s console: {text[-300:]!r}"
        time.sleep(0.2)


def domain(lab: LabServer, host_id: str, name: str) -> libvirt.virDomain | None:
    conn = lab.cloud.hosts[host_id].libvirtd.connect()
    try:
        dom = conn.lookupByName(name)
        return dom if dom.isActive() else None
    except libvirt.libvirtError:
        return None


def image_info(path: str) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, check=True)
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def deploy(lab: LabServer, cs: CloudStack, name: str, **kw: Any) -> dict[str, Any]:
    small = named(cs, "listServiceOfferings", "serviceoffering", "lab-small")
    [template] = cs.listTemplates(templatefilter="all")["template"]
    vm: dict[str, Any] = cs.deployVirtualMachine(
        zoneid=lab.info["zoneid"],
        serviceofferingid=small["id"],
        templateid=template["id"],
        name=name,
        fetch_result=True,
        **kw,
    )["virtualmachine"]
    return vm


def test_hosts_are_up_each_with_its_own_libvirtd(lab: LabServer, cs: CloudStack) -> None:
    hosts = cs.listHosts()["host"]
    assert [h["state"] for h in hosts] == ["Up", "Up"]
    uris = [h["uri"] for h in control(lab, "/_lab/hosts")]
    assert len(set(uris)) == 2 and all(u.startswith("qemu:///system?socket=") for u in uris)


def test_a_vm_from_the_guest_template_boots_as_a_domain_named_by_its_instancename(
    lab: LabServer, cs: CloudStack
) -> None:
    t0 = time.monotonic()
    vm = deploy(lab, cs, "boot-me")
    deployed = time.monotonic() - t0
    assert vm["state"] == "Running" and vm["hostid"] in lab.cloud.hosts
    [listed] = cs.listVirtualMachines(hostid=vm["hostid"], name="boot-me")["virtualmachine"]
    assert listed["instancename"] == vm["instancename"] and re.fullmatch(r"i-2-\d+-VM", vm["instancename"])
    dom = domain(lab, vm["hostid"], vm["instancename"])
    assert dom is not None and dom.UUIDString() == vm["id"]
    assert vm["nic"][0]["macaddress"] in dom.XMLDesc(0)
    [root] = cs.listVolumes(virtualmachineid=vm["id"], type="ROOT")["volume"]
    [pool] = cs.listStoragePools()["storagepool"]
    assert root["state"] == "Ready" and root["storageid"] == pool["id"] and root["deviceid"] == 0
    path = Path(pool["path"]) / root["path"]
    info = image_info(str(path))
    assert info["format"] == "qcow2" and info["backing-filename"] == str(
        Path(pool["path"]) / vm["templateid"]
    )
    assert pool["disksizeallocated"] == 2 * root["size"]  # the template's copy and the ROOT
    booted = wait_console(lab, vm["id"], READY)
    print(f"\nFIGURE deploy job {deployed:.1f} s, then {READY} after {booted:.1f} s more (TCG)")
    t1 = time.monotonic()
    for _ in range(20):
        cs.listVirtualMachines(id=vm["id"])
    print(
        f"FIGURE listVirtualMachines round trip {(time.monotonic() - t1) / 20 * 1000:.1f} ms (cs, loopback)"
    )


def test_stop_and_start_power_the_domain(lab: LabServer, cs: CloudStack) -> None:
    [vm] = cs.listVirtualMachines(name="boot-me")["virtualmachine"]
    host = vm["hostid"]
    # not forced: ACPI shutdown, destroyed after stop_timeout if the guest has not powered off by then
    t0 = time.monotonic()
    assert cs.stopVirtualMachine(id=vm["id"], fetch_result=True)["virtualmachine"]["state"] == "Stopped"
    assert time.monotonic() - t0 < lab.cloud.config.stop_timeout + 5
    assert domain(lab, host, vm["instancename"]) is None
    cs.startVirtualMachine(id=vm["id"], fetch_result=True)
    # the domain going away behind CloudStack's back (a guest power-off): the next list says Stopped
    dom = domain(lab, host, vm["instancename"])
    assert dom is not None
    dom.destroy()
    [gone] = cs.listVirtualMachines(id=vm["id"])["virtualmachine"]
    assert gone["state"] == "Stopped" and "hostid" not in gone
    cs.startVirtualMachine(id=vm["id"], fetch_result=True)
    stopped = cs.stopVirtualMachine(id=vm["id"], forced=True, fetch_result=True)["virtualmachine"]
    assert stopped["state"] == "Stopped" and "hostid" not in stopped
    assert domain(lab, host, vm["instancename"]) is None
    with pytest.raises(CloudStackApiException) as e:
        cs.migrateVirtualMachine(virtualmachineid=vm["id"], fetch_result=True)
    assert e.value.error["errorcode"] == 431
    started = cs.startVirtualMachine(id=vm["id"], fetch_result=True)["virtualmachine"]
    assert started["state"] == "Running" and started["hostid"] == host  # back on its last host
    wait_console(lab, vm["id"], READY)
    with pytest.raises(CloudStackApiException) as e:
        cs.startVirtualMachine(id=vm["id"], fetch_result=True)
    assert e.value.error["errorcode"] == 431 and "already running" in e.value.error["errortext"]


def guest_ping(dom: libvirt.virDomain, timeout: float = 30) -> float:
    """Seconds until the guest agent (the bootable guest's busybox one) answers guest-ping."""
    t0 = time.monotonic()
    while True:
        try:
            out = libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-ping"}', 2, 0)
            if json.loads(out) == {"return": {}}:
                return time.monotonic() - t0
        except libvirt.libvirtError:
            pass
        assert time.monotonic() - t0 < timeout, "the guest agent does not answer"
        time.sleep(0.2)


def qmp(dom: libvirt.virDomain, command: str, **args: Any) -> Any:
    cmd = json.dumps({"execute": command, "arguments": args})
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, cmd, 0))["return"]


def migrate(lab: LabServer, cs: CloudStack, vm: dict[str, Any], live: bool) -> dict[str, Any]:
    lab.cloud.config.live_migration = live
    [other] = [h for h in lab.cloud.hosts if h != vm["hostid"]]
    t0 = time.monotonic()
    moved: dict[str, Any] = cs.migrateVirtualMachine(
        virtualmachineid=vm["id"], hostid=other, fetch_result=True
    )["virtualmachine"]
    print(f"\nFIGURE migrate job ({'live' if live else 'cold'}) {time.monotonic() - t0:.1f} s")
    assert moved["hostid"] == other and moved["state"] == "Running"
    assert moved["instancename"] == vm["instancename"]
    assert domain(lab, vm["hostid"], vm["instancename"]) is None
    assert domain(lab, other, vm["instancename"]) is not None
    assert control(lab, f"/_lab/vms/{vm['id']}")["host"] == lab.cloud.hosts[other].name
    return moved


def test_migrate_moves_the_running_vm_live_to_the_other_host_with_the_same_volumes(
    lab: LabServer, cs: CloudStack
) -> None:
    [vm] = cs.listVirtualMachines(name="boot-me")["virtualmachine"]
    before = cs.listVolumes(virtualmachineid=vm["id"])["volume"]
    with pytest.raises(CloudStackApiException) as e:
        cs.migrateVirtualMachine(virtualmachineid=vm["id"], hostid=vm["hostid"], fetch_result=True)
    assert e.value.error["errortext"] == "Cannot migrate VM, destination host is same as current host"
    source = domain(lab, vm["hostid"], vm["instancename"])
    assert source is not None
    [root] = qmp(source, "query-block")
    node = root["inserted"]["node-name"]
    qmp(source, "block-dirty-bitmap-add", node=node, name="bm0", persistent=True)
    moved = migrate(lab, cs, vm, live=True)
    dom = domain(lab, moved["hostid"], vm["instancename"])
    assert dom is not None and guest_ping(dom) < 3  # the guest runs on: no reboot (that takes seconds)
    # a persistent dirty bitmap (what the KVM source tracks changes with) moves with the VM: QEMU stores
    # it in the qcow2 as the source lets go, and the destination loads it
    [moved_root] = qmp(dom, "query-block")
    bitmaps = {b["name"]: b for b in moved_root["inserted"].get("dirty-bitmaps", [])}
    assert bitmaps["bm0"]["persistent"] is True
    assert "SENDENSE-GUEST-BOOTED" not in control(lab, f"/_lab/vms/{vm['id']}/console")
    after = cs.listVolumes(virtualmachineid=vm["id"])["volume"]
    keep = ("id", "path", "storageid", "deviceid", "size", "state")
    assert [{k: v[k] for k in keep} for v in after] == [{k: v[k] for k in keep} for v in before]


def test_a_cold_migration_restarts_the_vm_on_the_other_host_over_the_same_volumes(
    lab: LabServer, cs: CloudStack
) -> None:
    [vm] = cs.listVirtualMachines(name="boot-me")["virtualmachine"]
    before = cs.listVolumes(virtualmachineid=vm["id"])["volume"]
    try:
        migrate(lab, cs, vm, live=False)
    finally:
        lab.cloud.config.live_migration = True
    wait_console(lab, vm["id"], READY)
    assert cs.listVolumes(virtualmachineid=vm["id"])["volume"] == before


def test_a_data_volume_is_created_on_attach_hot_plugged_and_grown(lab: LabServer, cs: CloudStack) -> None:
    [vm] = cs.listVirtualMachines(name="boot-me")["virtualmachine"]
    custom = named(cs, "listDiskOfferings", "diskoffering", "lab-custom")
    vol = cs.createVolume(
        zoneid=lab.info["zoneid"], diskofferingid=custom["id"], size=1, name="data-1", fetch_result=True
    )["volume"]
    assert vol["state"] == "Allocated"
    att = cs.attachVolume(id=vol["id"], virtualmachineid=vm["id"], fetch_result=True)["volume"]
    assert (att["state"], att["deviceid"], att["virtualmachineid"]) == ("Ready", 1, vm["id"])
    path = str(Path(lab.cloud.state.pool.path) / att["path"])
    dom = domain(lab, vm["hostid"], vm["instancename"])
    assert dom is not None and path in dom.XMLDesc(0) and dom.blockInfo("vdb")[0] == GIB
    grown = cs.resizeVolume(id=vol["id"], size=2, fetch_result=True)["volume"]
    assert grown["size"] == 2 * GIB
    assert dom.blockInfo("vdb")[0] == 2 * GIB and image_info(path)["virtual-size"] == 2 * GIB
    t0 = time.monotonic()
    det = cs.detachVolume(id=vol["id"], fetch_result=True)["volume"]  # hot-unplugged: the guest lets go
    print(f"\nFIGURE hot detach {time.monotonic() - t0:.1f} s")
    assert "virtualmachineid" not in det and det["state"] == "Ready" and Path(path).exists()
    assert path not in dom.XMLDesc(0)
    cs.deleteVolume(id=vol["id"])
    assert not Path(path).exists()


def test_capacity_runs_out_with_cloudstacks_errors(lab: LabServer, cs: CloudStack) -> None:
    huge = named(cs, "listServiceOfferings", "serviceoffering", "lab-huge")
    [template] = cs.listTemplates(templatefilter="all")["template"]
    with pytest.raises(CloudStackApiException) as e:
        cs.deployVirtualMachine(
            zoneid=lab.info["zoneid"],
            serviceofferingid=huge["id"],
            templateid=template["id"],
            name="too-big",
            fetch_result=True,
        )
    assert (e.value.error["errorcode"], e.value.error["cserrorcode"]) == (533, 4335)
    [vm] = cs.listVirtualMachines(name="boot-me")["virtualmachine"]
    custom = named(cs, "listDiskOfferings", "diskoffering", "lab-custom")
    vol = cs.createVolume(
        zoneid=lab.info["zoneid"], diskofferingid=custom["id"], size=4, name="too-much", fetch_result=True
    )["volume"]
    with pytest.raises(CloudStackApiException) as e:
        cs.attachVolume(id=vol["id"], virtualmachineid=vm["id"], fetch_result=True)
    assert (e.value.error["errorcode"], e.value.error["cserrorcode"]) == (533, 4340)
    assert "Insufficient capacity on storage pool lab-primary-1" in e.value.error["errortext"]
    [still] = cs.listVolumes(id=vol["id"])["volume"]
    assert still["state"] == "Allocated" and "virtualmachineid" not in still
    cs.deleteVolume(id=vol["id"])


def test_destroy_with_expunge_leaves_no_domain_and_no_file(lab: LabServer, cs: CloudStack) -> None:
    [vm] = cs.listVirtualMachines(name="boot-me")["virtualmachine"]
    [root] = cs.listVolumes(virtualmachineid=vm["id"], type="ROOT")["volume"]
    path = Path(lab.cloud.state.pool.path) / root["path"]
    assert path.exists()
    cs.destroyVirtualMachine(id=vm["id"], expunge=True, fetch_result=True)
    assert domain(lab, vm["hostid"], vm["instancename"]) is None
    assert not path.exists() and cs.listVirtualMachines(name="boot-me") == {}
    assert all(not h["domains"] for h in control(lab, "/_lab/hosts"))


def test_the_lab_hook_starts_the_lab_and_says_what_a_spec_needs() -> None:
    from labs.cloudstack import hook

    tmp_path = Path(tempfile.mkdtemp(prefix="cshome-", dir="/tmp"))  # short: libvirt socket paths
    old = os.environ.get("SENDENSE_HOME")
    os.environ["SENDENSE_HOME"] = str(tmp_path)
    try:
        info = hook.up()
        try:
            assert info["running"] and info["target"]["zone"] == "lab-zone-1"
            env = info["env"]
            from connectors.cloudstack.spec import key_envs

            assert (hook.API_KEY_ENV, hook.SECRET_KEY_ENV) == key_envs("default")  # the spec's login
            assert "login" not in info["source"] and set(env) == {hook.API_KEY_ENV, hook.SECRET_KEY_ENV}
            for value in env.values():  # the keys go by name only
                assert value not in json.dumps(info["target"]) + json.dumps(info["source"])
            c = CloudStack(
                endpoint=info["endpoint_url"], key=env[hook.API_KEY_ENV], secret=env[hook.SECRET_KEY_ENV]
            )
            assert [h["state"] for h in c.listHosts()["host"]] == ["Up", "Up"]
            assert hook.status()["endpoint_url"] == info["endpoint_url"]
            registered = json.loads((tmp_path / "labs" / "endpoints.json").read_text())
            assert registered[f"cloudstack:{info['endpoint_url']}"] == env
        finally:
            assert hook.down() is True
        assert hook.status() == {"running": False}
    finally:
        if old is None:
            os.environ.pop("SENDENSE_HOME", None)
        else:
            os.environ["SENDENSE_HOME"] = old
        shutil.rmtree(tmp_path, ignore_errors=True)
