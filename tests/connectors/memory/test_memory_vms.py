"""VMs from points on the memory target (connectors/memory/vms.py), as the DR sagas' fault-injection
tests use them: every verb idempotent by name, every verb failing on request before or after its
effect, `destroy_vm(name)` leaving the store exactly as before the VM whatever happened, a point that
reads the same whatever its VMs wrote, and a boot decided by the first disk's content at once."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_kvm import sync_point

from connectors.memory.faults import EFFECT_VERBS, VM_VERBS, InjectedFault
from connectors.memory.source import MemorySourceConnector
from connectors.memory.spec import MemorySource, MemoryTarget
from connectors.memory.store import Store
from connectors.memory.target import MemoryTargetConnector
from connectors.memory.vms import MemoryVms
from sendense import platforms
from sendense.errors import InvalidSpec, ResourceNotFound, TargetError
from sendense.models import JobSpec, NetworkInfo, NicInfo, PlanDisk, VmPlan

KiB, MiB = 1 << 10, 1 << 20
READY = "SENDENSE-GUEST-READY"


@pytest.fixture(params=["memory", "files"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store.named(f"t-{uuid.uuid4().hex[:8]}") if request.param == "memory" else Store.at(tmp_path / "st")
    yield s
    Store.discard(s)


def _place(store: Store) -> dict[str, object]:
    return {"directory": Path(store.name)} if store.name.startswith("/") else {"store": store.name}


def target(store: Store, job: str = "j", job_id: str = "id1") -> MemoryTargetConnector:
    return MemoryTargetConnector(job, MemoryTarget(platform="memory", **_place(store)), job_id)  # type: ignore[arg-type]


def vms(store: Store, job: str = "j", job_id: str = "id1") -> MemoryVms:
    return MemoryVms(job, MemoryTarget(platform="memory", **_place(store)), job_id)  # type: ignore[arg-type]


def make_point(store: Store, point_id: str = "p1", *, ready: bool = True) -> MemoryTargetConnector:
    """A source VM (boot disk `root`, 2 MiB; `data`, 1 MiB) replicated into point `point_id` of job j."""
    if store.vm("src") is None:
        store.create_vm("src", {"root": 2 * MiB, "data": 1 * MiB})
    guest = store.guest("src")
    guest.write("root", 0, b"\xeb\x63\x90MBR\x00\x00" + b"memory guest loader" + b"\x00\x01short\x00")
    if ready:
        guest.write("root", 300 * KiB, f"\x00\x00{READY}\n".encode())
    guest.write("root", 1 * MiB + 4096, b"beyond the first MiB")  # never shows: not booted from
    guest.write("data", 0, b"the data disk's own text")
    src = MemorySourceConnector("j", MemorySource(platform="memory", vm="src", **_place(store)))  # type: ignore[arg-type]
    tgt = target(store)
    sync_point(src, tgt, point_id)
    return tgt


def point_bytes(store: Store, tgt: MemoryTargetConnector, point_id: str) -> dict[str, bytes]:
    p = tgt.get_point(point_id)
    with store.locked() as b:
        return {d.key: b.read(d.path, 0, d.size) for d in p.disks}


# ------------------------------------------------------------------------------ the whole cycle


def test_a_test_vm_boots_on_its_disk_content_and_destroy_leaves_nothing(store: Store) -> None:
    tgt = make_point(store)
    store.add_network("prod")
    v = vms(store)
    before, content = store.contents(), point_bytes(store, tgt, "p1")
    ref = v.create_vm(VmPlan(name="drill-1", point_id="p1"))
    assert (ref.name, ref.platform, ref.point_id, ref.mode, ref.state) == (
        "drill-1",
        "memory",
        "p1",
        "test",
        "stopped",
    )
    assert ref.vm_id.startswith("mem-")
    assert v.list_vms() == [ref]
    assert v.list_networks() == [
        NetworkInfo(name="prod", kind="bridge"),
        NetworkInfo(name="isolated-drill-1", kind="isolated", isolated=True),
    ]
    assert tgt.get_point("p1").holds == []  # a VM holds nothing: the caller does
    assert v.console("drill-1") == ""
    assert v.power_on("drill-1").state == "running"
    assert v.console("drill-1").splitlines() == [
        "memory VM drill-1: powered on from point p1 (test), booting disk root",
        "memory guest loader",
        READY,
    ]
    check = v.boot_check("drill-1", r"GUEST-READY$", timeout=600)
    assert check.ok and check.evidence == READY and check.via == "console" and check.seconds >= 0
    assert v.power_on("drill-1") == v.list_vms()[0]  # running already: nothing changes
    assert v.console("drill-1").count("powered on") == 1
    assert v.power_off("drill-1").state == "stopped"
    assert v.power_off("drill-1").state == "stopped"
    v.destroy_vm("drill-1")
    v.destroy_vm("drill-1")  # gone already: no error
    assert v.list_vms() == [] and v.list_networks() == [NetworkInfo(name="prod", kind="bridge")]
    assert store.contents() == before  # no disk, console, network or record left
    assert point_bytes(store, tgt, "p1") == content


def test_a_disk_without_text_halts_and_its_boot_check_fails_with_the_tail(store: Store) -> None:
    make_point(store)
    v = vms(store)
    v.create_vm(VmPlan(name="blank", point_id="p1", disks=[PlanDisk(key="data"), PlanDisk(key="root")]))
    v.write_disk("blank", "data", 0, bytes(64))  # the VM's own write: its boot disk has no text now
    v.power_on("blank")
    assert v.console("blank").splitlines()[1:] == ["memory VM blank: halted"]
    check = v.boot_check("blank", READY, timeout=600)
    assert not check.ok
    assert check.evidence == (
        f"no /{READY}/ on the console of memory VM blank; its tail: "
        "memory VM blank: powered on from point p1 (test), booting disk data | memory VM blank: halted"
    )


def test_the_boot_disk_follows_the_plans_boot_order(store: Store) -> None:
    make_point(store)
    v = vms(store)
    plan = VmPlan(
        name="b",
        point_id="p1",
        disks=[PlanDisk(key="root", boot_order=2), PlanDisk(key="data", boot_order=1)],
    )
    v.create_vm(plan)
    v.power_on("b")
    assert v.console("b").splitlines() == [
        "memory VM b: powered on from point p1 (test), booting disk data",
        "the data disk's own text",
    ]
    assert not v.boot_check("b", READY, 1).ok
    one = VmPlan(name="one", point_id="p1", disks=[PlanDisk(key="data")])
    v.create_vm(one)
    with pytest.raises(ResourceNotFound, match="^VM one: no disk root$"):
        v.read_disk("one", "root", 0, 1)  # only the disks the plan names


def test_a_boot_check_sees_only_the_last_boot_and_a_stopped_vm_is_not_ok(store: Store) -> None:
    make_point(store)
    v = vms(store)
    v.create_vm(VmPlan(name="vm1", point_id="p1"))
    check = v.boot_check("vm1", READY, 600)
    assert (
        not check.ok
        and check.evidence == "memory VM vm1 is not running (stopped); console: no console output"
    )
    assert check.via == "status"
    v.power_on("vm1")
    assert v.boot_check("vm1", READY, 600).ok
    v.power_off("vm1")
    check = v.boot_check("vm1", READY, 600)
    assert not check.ok and check.evidence == (
        "memory VM vm1 is not running (stopped); console: memory VM vm1: powered off"
    )
    v.write_disk("vm1", "root", 300 * KiB, bytes(32))  # the guest wiped its marker
    v.power_on("vm1")
    assert not v.boot_check("vm1", READY, 600).ok  # the first boot's READY does not count
    assert v.console("vm1").count(READY) == 1 and v.console("vm1").count("powered on") == 2
    with pytest.raises(InvalidSpec, match=r"^boot check pattern '\(': "):
        v.boot_check("vm1", "(", 1)
    for call in (
        lambda: v.boot_check("nope", READY, 1),
        lambda: v.console("nope"),
        lambda: v.power_on("nope"),
    ):
        with pytest.raises(ResourceNotFound, match=r"^VM nope: not found on job j \(memory store "):
            call()
    assert v.power_off("nope").state == "absent"


# ------------------------------------------------------------------------ idempotency, refusals


def test_create_is_idempotent_by_name_and_refuses_another_plan_in_one_line(store: Store) -> None:
    make_point(store)
    make_point(store, "p2")
    v = vms(store)
    first = v.create_vm(VmPlan(name="x", point_id="p1"))
    assert v.create_vm(VmPlan(name="x", point_id="p1")) == first  # the same VM, same id
    before = store.contents()
    with pytest.raises(InvalidSpec) as ei:
        v.create_vm(VmPlan(name="x", point_id="p2", cpus=2))
    assert str(ei.value) == (
        "VM x: exists on job j from another plan (differs in point_id, cpus); "
        "destroy it or choose another name"
    )
    assert store.contents() == before and v.list_vms() == [first]


def test_refusals_name_what_is_wrong_and_make_nothing(store: Store) -> None:
    tgt = make_point(store)
    v = vms(store)
    before = store.contents()
    with pytest.raises(ResourceNotFound, match="^job j: no recovery point p9$"):
        v.create_vm(VmPlan(name="x", point_id="p9"))
    with pytest.raises(InvalidSpec, match=r"^VM x: point p1 has no disk 'swap' \(its disks: root, data\)$"):
        v.create_vm(VmPlan(name="x", point_id="p1", disks=[PlanDisk(key="swap")]))
    with pytest.raises(InvalidSpec, match="^VM name 'X/..': lower-case"):
        v.destroy_vm("X/..")
    with pytest.raises(TargetError, match="holds the points of an earlier job j"):
        vms(store, job_id="another").create_vm(VmPlan(name="x", point_id="p1"))
    assert store.contents() == before
    v.create_vm(VmPlan(name="x", point_id="p1"))
    with pytest.raises(TargetError) as ei:
        tgt.destroy()
    assert str(ei.value) == (
        "purge of job j: nothing deleted: VMs made from its points exist: x (destroy them first)"
    )
    assert store.contents("target/j/points/") != []
    v.destroy_vm("x")
    tgt.destroy()
    assert store.contents("target/") == []


def test_production_vms_go_on_the_mapped_networks_of_the_store(store: Store) -> None:
    make_point(store)
    v = vms(store)
    nic = NicInfo(mac="52:54:00:00:00:01", network="lan")
    before = store.contents()
    with pytest.raises(InvalidSpec) as ei:
        v.create_vm(
            VmPlan(name="fo", point_id="p1", mode="production", nics=[nic], network_map={"lan": "prod"})
        )
    assert str(ei.value) == (
        f"VM fo: network_map maps 'lan' to network 'prod', which memory store {store.name} "
        "does not have (its networks: none)"
    )
    assert store.contents() == before
    store.add_network("prod")
    store.add_network("dmz")
    before = store.contents()
    with pytest.raises(
        InvalidSpec,
        match=r"^VM fo: network_map maps 'lan' to network 'nowhere', .*\(its networks: dmz, prod\)$",
    ):
        v.create_vm(
            VmPlan(name="fo", point_id="p1", mode="production", nics=[nic], network_map={"lan": "nowhere"})
        )
    with pytest.raises(
        InvalidSpec,
        match="^VM fo: NIC 52:54:00:00:00:01 is on source network 'lan', which network_map does not map$",
    ):
        v.create_vm(
            VmPlan(name="fo", point_id="p1", mode="production", nics=[nic], network_map={"wan": "dmz"})
        )
    assert store.contents() == before
    ref = v.create_vm(
        VmPlan(name="fo", point_id="p1", mode="production", nics=[nic], network_map={"lan": "prod"})
    )
    assert ref.mode == "production"
    assert v.list_networks() == [
        NetworkInfo(name="dmz", kind="bridge"),
        NetworkInfo(name="prod", kind="bridge"),
    ]
    with store.locked() as b:
        assert b.get("target/j/vms/fo")["nics"] == [{"mac": nic.mac, "network": "prod", "model": ""}]
    test_vm = v.create_vm(VmPlan(name="t", point_id="p1", nics=[nic], network_map={"lan": "nowhere"}))
    assert test_vm.mode == "test"  # a test VM ignores the map: its network is its own, isolated
    with store.locked() as b:
        assert b.get("target/j/vms/t")["nics"][0]["network"] == "isolated-t"
    v.power_on("fo")
    assert v.boot_check("fo", READY, 1).ok
    store.remove_network("dmz")
    assert [n.name for n in store.networks()] == ["prod"]


# --------------------------------------------------------------------------------- the point


def test_the_point_reads_the_same_whatever_its_vms_write(store: Store) -> None:
    tgt = make_point(store)
    v = vms(store)
    content = point_bytes(store, tgt, "p1")
    v.create_vm(VmPlan(name="w", point_id="p1"))
    v.power_on("w")
    for key, size in (("root", 2 * MiB), ("data", 1 * MiB)):
        v.write_disk("w", key, 0, b"\xff" * size)
        assert v.read_disk("w", key, size - 4, 4) == b"\xff" * 4
    assert point_bytes(store, tgt, "p1") == content
    v.create_vm(VmPlan(name="w2", point_id="p1"))  # a second VM from the point sees the point, not w
    assert v.read_disk("w2", "root", 300 * KiB + 2, len(READY)) == READY.encode()
    v.power_on("w2")
    assert v.boot_check("w2", READY, 1).ok
    tgt.prune(0)  # nothing held it (a VM holds nothing): gone; the VMs' disks are their own
    assert tgt.list_points() == [] and v.read_disk("w2", "data", 0, 8) == b"the data"
    for name in ("w", "w2"):
        v.destroy_vm(name)
    assert store.contents("target/j/vm") == []


def test_the_provisioner_is_the_memory_plugins_and_its_state_is_in_the_store(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_point(store)
    monkeypatch.setenv(platforms.DEVELOPER_PLATFORMS, "1")
    spec = JobSpec.model_validate(
        {
            "name": "j",
            "job_id": "id1",
            "source": {"platform": "memory", "vm": "src", **_place(store)},
            "target": {"platform": "memory", **_place(store)},
        }  # fmt: skip
    )
    made = platforms.vms_for(spec)
    assert isinstance(made, MemoryVms)
    made.create_vm(VmPlan(name="seen", point_id="p1"))
    assert [r.name for r in vms(store).list_vms()] == ["seen"]  # another connector over the store
    if store.name.startswith("/"):  # files: another process sees it, and powers it on
        code = (
            "import sys; from pathlib import Path; from connectors.memory.spec import MemoryTarget; "
            "from connectors.memory.vms import MemoryVms; "
            "spec = MemoryTarget(platform='memory', directory=Path(sys.argv[1])); "
            "MemoryVms('j', spec, 'id1').power_on('seen')"
        )
        root = Path(__file__).parents[3]
        subprocess.run([sys.executable, "-c", code, store.name], check=True, cwd=root)
        assert made.list_vms()[0].state == "running" and made.boot_check("seen", READY, 1).ok


# ------------------------------------------------------------------------------------- faults


def _in_state(v: MemoryVms, verb: str) -> None:
    """The VM `f` in the state the verb acts on."""
    if verb != "create_vm":
        v.create_vm(VmPlan(name="f", point_id="p1"))
    if verb in ("power_off", "boot_check", "destroy_vm"):
        v.power_on("f")


CALLS: dict[str, Callable[[MemoryVms], object]] = {
    "list_networks": lambda v: v.list_networks(),
    "create_vm": lambda v: v.create_vm(VmPlan(name="f", point_id="p1")),
    "power_on": lambda v: v.power_on("f"),
    "power_off": lambda v: v.power_off("f"),
    "boot_check": lambda v: v.boot_check("f", READY, 1),
    "console": lambda v: v.console("f"),
    "list_vms": lambda v: v.list_vms(),
    "destroy_vm": lambda v: v.destroy_vm("f"),
}

# what each mutating verb's effect is: the VM's state afterwards (None: no VM)
EFFECT = {"create_vm": "stopped", "power_on": "running", "power_off": "stopped", "destroy_vm": None}


def _state(v: MemoryVms) -> str | None:
    found = [r.state for r in v.list_vms() if r.name == "f"]
    return found[0] if found else None


@pytest.mark.parametrize("verb", VM_VERBS)
def test_a_fault_before_any_verb_changes_nothing_and_destroy_by_name_leaves_nothing(
    store: Store, verb: str
) -> None:
    make_point(store)
    v = vms(store)
    before = store.contents()
    _in_state(v, verb)
    state = _state(v)
    store.faults.fail(f"vms.{verb}", message=f"worker lost before {verb}")
    with pytest.raises(InjectedFault, match=f"^worker lost before {verb}$"):
        CALLS[verb](v)
    assert _state(v) == state  # nothing done
    CALLS[verb](v)  # once: the retry does it
    if verb in EFFECT:
        assert _state(v) == EFFECT[verb]
    v.destroy_vm("f")  # the saga's undo, by name
    assert store.contents() == before


@pytest.mark.parametrize("verb", EFFECT)
def test_a_fault_after_a_mutating_verb_keeps_its_effect_and_destroy_by_name_leaves_nothing(
    store: Store, verb: str
) -> None:
    make_point(store)
    v = vms(store)
    before = store.contents()
    _in_state(v, verb)
    store.faults.fail(f"vms.{verb}", after_effect=True)
    with pytest.raises(InjectedFault, match=rf"^injected fault: vms.{verb} \(call \d+, after its effect\)$"):
        CALLS[verb](v)
    assert _state(v) == EFFECT[verb]  # done, though its caller saw a failure
    CALLS[verb](v)  # the retry finds it done
    assert _state(v) == EFFECT[verb]
    if verb == "power_on":
        assert v.console("f").count("powered on") == 1 and v.boot_check("f", READY, 1).ok
    v.destroy_vm("f")
    assert store.contents() == before and v.list_vms() == []


def test_after_effect_faults_on_holds_and_what_refuses_them(store: Store) -> None:
    tgt = make_point(store)
    store.faults.fail("target.hold", after_effect=True)
    with pytest.raises(InjectedFault, match=r"^injected fault: target.hold \(call 1, after its effect\)$"):
        tgt.hold("p1", "drill-1", "drill")
    assert tgt.get_point("p1").holds == ["drill-1"]
    store.faults.fail("target.release", after_effect=True)
    with pytest.raises(InjectedFault):
        tgt.release("p1", "drill-1")
    assert tgt.get_point("p1").holds == []
    with pytest.raises(ValueError, match="after_effect: vms.console is not one of target.hold, "):
        store.faults.fail("vms.console", after_effect=True)
    power = {f"source.{v}" for v in ("pause_vm", "resume_vm", "power_off_vm", "power_on_vm")}
    failback = {"changes.snapshot_vm", "changes.release", "sink.rebase", "sink.cut_over"}
    assert set(EFFECT_VERBS) == {
        "target.hold",
        "target.release",
        *(f"vms.{v}" for v in EFFECT),
        *power,
        *failback,
    }


def test_a_verb_that_fails_by_itself_does_not_spend_an_after_effect_fault(store: Store) -> None:
    make_point(store)
    v = vms(store)
    store.faults.fail("vms.create_vm", after_effect=True)
    with pytest.raises(ResourceNotFound):
        v.create_vm(VmPlan(name="f", point_id="p9"))
    with pytest.raises(InjectedFault):
        v.create_vm(VmPlan(name="f", point_id="p1"))
    assert store.faults.pending == [] and _state(v) == "stopped"
