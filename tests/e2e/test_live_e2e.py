"""End to end with a running VM: the lab VM over QMP, a workload writing during syncs, and the demo."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import yaml
from helpers_kvm import MiB

from labs.kvm.vm import LabVm, Workload
from tests.e2e.conftest import SENDENSE, Cli, free_port
from tools.boot import GuestVm


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True).returncode == 0


def test_running_vm_replicates_while_it_writes(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    with tempfile.TemporaryDirectory(prefix="sdlive", dir="/tmp") as short:
        vm = LabVm(Path(short), [48 * MiB, 24 * MiB], shadow=True).start()
        try:
            vm.write(0, 0, 0x11, 8 * MiB)
            vm.write(1, 4 * MiB, 0x22, 2 * MiB)
            spec = tmp_path / "live.yaml"
            spec.write_text(
                yaml.safe_dump(
                    {
                        "name": "e2e-live",
                        "source": {"platform": "kvm", "qmp": str(vm.qmp_path)},
                        "target": {"platform": "kvm", "path": str(tmp_path / "rep")},
                        "schedule": {"interval": "1h"},
                    }
                )
            )
            # the workload writes during the full sync and the incrementals: nothing may be lost
            load = Workload(vm, rate=200.0, zero_fraction=0.2, seed=3).start()
            cli.json("job", "create", "-f", str(spec))
            cli.wait_point("e2e-live", 1)
            kinds = [cli.json("job", "sync-now", "e2e-live", "--wait")["kind"] for _ in range(2)]
            load.stop()
            assert load.writes > 0 and kinds == ["incremental", "incremental"]
            # quiet now: the next point must equal what the guest wrote, byte for byte
            refs = [vm.snapshot_shadow(i, tmp_path / f"ref{i}.raw") for i in range(2)]
            last = cli.json("job", "sync-now", "e2e-live", "--wait")
            out = cli.json(
                "point",
                "export",
                "e2e-live",
                "--point",
                last["point_id"],
                "--format",
                "raw",
                "--output",
                str(tmp_path / "x"),
            )
            files = {f["disk"]: Path(f["path"]) for f in out["files"]}
            assert same(files["disk0"], refs[0]) and same(files["disk1"], refs[1])
            assert len(cli.json("point", "list", "e2e-live")) == 4
            cli.json("job", "delete", "e2e-live")
        finally:
            vm.kill()


def test_quickstart_demo_runs(tmp_path: Path) -> None:
    """The README's first command ends in `sendense demo`: run it small, on its own stack."""
    with tempfile.TemporaryDirectory(prefix="sddemo", dir="/tmp") as state:
        env = dict(os.environ, SENDENSE_HOME=state, SENDENSE_HOST_ID=f"demo{free_port()}")
        env.pop("SENDENSE_TEMPORAL", None)
        env.pop("SENDENSE_POLICY", None)  # as a new user: the agent policy is the starter `up` writes
        args = ["demo", "--port", str(free_port()), "--ui-port", str(free_port())]
        try:
            p = subprocess.run(
                [SENDENSE, *args, "--incrementals", "1"],
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
            )
            assert p.returncode == 0, p.stderr + p.stdout
            assert "(full)" in p.stdout and "(incremental)" in p.stdout
            assert "recovery points of job demo" in p.stdout and "/workflows/job-demo" in p.stdout
            # the guest is a real OS: its filesystem on the newest point is checked, with its sequence
            text = " ".join(p.stdout.split())  # (the console wraps long lines)
            assert "filesystem is clean after journal replay" in text, p.stdout
            assert re.search(r"holding workload sequence \d+", text), p.stdout
            assert (Path(state) / "policy.yaml").stat().st_mode & 0o777 == 0o600
            clean = subprocess.run(
                [SENDENSE, "demo", "--clean"], capture_output=True, text=True, env=env, timeout=120
            )
            assert clean.returncode == 0, clean.stderr
        finally:
            subprocess.run([SENDENSE, "down"], capture_output=True, env=env, timeout=60)
            GuestVm.stop_detached(Path(state) / "lab")
