"""Replication jobs end to end on the real dev server: stopped-VM KVM source -> KVM target."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import yaml
from helpers_kvm import MiB, make_qcow2, qemu_io, to_raw

from app import stack
from tests.e2e.conftest import Cli


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True).returncode == 0


def write_spec(path: Path, name: str, disks: list[Path], target: Path, **extra: object) -> Path:
    spec = {
        "name": name,
        "source": {"platform": "kvm", "disks": [str(d) for d in disks]},
        "target": {"platform": "kvm", "path": str(target)},
        "schedule": {"interval": "1h"},
        "retention": {"points": 10},
    }
    spec.update(extra)
    path.write_text(yaml.safe_dump(spec))
    return path


def source_bitmaps(disk: Path) -> list[str]:
    """The job bitmaps (`sendense.e2e-...`) that `qemu-img info` shows on a source disk."""
    out = subprocess.run(["qemu-img", "info", "-U", str(disk)], capture_output=True, text=True, check=True)
    names = [
        line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.strip().startswith("name:")
    ]
    return [n for n in names if n.startswith("sendense.e2e-")]


def export_raw(cli: Cli, job: str, point: str, out: Path) -> dict[str, Path]:
    res = cli.json("point", "export", job, "--point", point, "--format", "raw", "--output", str(out))
    return {f["disk"]: Path(f["path"]) for f in res["files"]}


def test_full_then_incremental_bit_exact_and_points_immutable(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    d0 = make_qcow2(tmp_path / "root.qcow2", 64 * MiB)
    d1 = make_qcow2(tmp_path / "data.qcow2", 32 * MiB)
    qemu_io(d0, "write -P 0x11 0 8M", "write -P 0x12 40M 3M")
    qemu_io(d1, "write -P 0x21 1M 2M")
    ref0 = [to_raw(d0, tmp_path / "r0-0.raw"), to_raw(d1, tmp_path / "r0-1.raw")]
    spec = write_spec(tmp_path / "job.yaml", "e2e-basic", [d0, d1], tmp_path / "replicas")
    cli.json("job", "create", "-f", str(spec))
    st = cli.wait_point("e2e-basic", 1)
    assert st["last_sync"]["kind"] == "full"
    assert st["last_sync"]["bytes_written"] == (8 + 3 + 2) * MiB
    p1 = st["last_point"]

    # incremental: three 64 KiB-aligned writes, one zero write over data
    qemu_io(d0, "write -P 0x31 1M 128k", "write -z 40M 1M")
    qemu_io(d1, "write -P 0x41 20M 64k")
    ref1 = [to_raw(d0, tmp_path / "r1-0.raw"), to_raw(d1, tmp_path / "r1-1.raw")]
    r = cli.json("job", "sync-now", "e2e-basic", "--wait")
    assert r["kind"] == "incremental"
    assert r["bytes_written"] == 128 * 1024 + 64 * 1024
    assert r["bytes_zeroed"] == 1 * MiB
    assert {"point_id", "kind", "bytes_read", "bytes_written", "bytes_zeroed", "seconds"} <= r.keys()
    p2 = r["point_id"]

    points = cli.json("point", "list", "e2e-basic")
    assert [p["point_id"] for p in points] == [p2, p1]
    assert all("created_at" in p for p in points)

    for point, refs in ((p1, ref0), (p2, ref1)):
        files = export_raw(cli, "e2e-basic", point, tmp_path / f"x-{point}")
        assert same(files["disk0"], refs[0]) and same(files["disk1"], refs[1])

    # a later sync leaves older points' bytes unchanged; exports in every format
    qemu_io(d0, "write -P 0x51 2M 64k")
    cli.json("job", "sync-now", "e2e-basic", "--wait")
    files = export_raw(cli, "e2e-basic", p1, tmp_path / "again")
    assert same(files["disk0"], ref0[0]) and same(files["disk1"], ref0[1])
    for fmt in ("qcow2", "vmdk", "vhdx"):
        res = cli.json(
            "point", "export", "e2e-basic", "--point", p2, "--format", fmt, "--output", str(tmp_path / fmt)
        )
        assert same(Path(res["files"][0]["path"]), ref1[0])

    status = cli.json("job", "status", "e2e-basic")
    assert status["syncs"] == 3 and status["failures"] == 0 and status["rpo_lag_seconds"] is not None

    # retention: lowered on the running job, applied with the next commit; the newest points survive
    assert cli.json("job", "settings", "e2e-basic", "--retention", "2")["retention_points"] == 2
    ref3 = to_raw(d0, tmp_path / "r3-0.raw")
    p4 = cli.json("job", "sync-now", "e2e-basic", "--wait")["point_id"]
    kept = [p["point_id"] for p in cli.json("point", "list", "e2e-basic")]
    assert len(kept) == 2 and kept[0] == p4
    files = export_raw(cli, "e2e-basic", p4, tmp_path / "x4")
    assert same(files["disk0"], ref3) and same(files["disk1"], ref1[1])
    assert "e2e-basic" in [j["name"] for j in cli.json("job", "list")]
    assert all(source_bitmaps(d) for d in (d0, d1))
    assert (cli.state / "work" / "e2e-basic").is_dir()
    cli.json("job", "delete", "e2e-basic")
    assert "e2e-basic" not in [j["name"] for j in cli.json("job", "list")]
    # the job's change tracking is gone from the source with it
    assert [source_bitmaps(d) for d in (d0, d1)] == [[], []]
    assert not (cli.state / "work" / "e2e-basic").exists()


def test_lost_bitmap_leads_to_correct_resync(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    d0 = make_qcow2(tmp_path / "d.qcow2", 32 * MiB)
    qemu_io(d0, "write -P 0x11 0 4M")
    cli.json("job", "create", "-f", str(write_spec(tmp_path / "j.yaml", "e2e-lost", [d0], tmp_path / "rep")))
    cli.wait_point("e2e-lost", 1)
    # the bitmap disappears (e.g. the image was copied elsewhere) and the disk changes
    out = subprocess.run(["qemu-img", "info", "-U", str(d0)], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("name:")]
    for n in names:
        subprocess.run(["qemu-img", "bitmap", "--remove", str(d0), n], check=True)
    qemu_io(d0, "write -P 0x77 1M 64k", "write -P 0x78 10M 128k")
    ref = to_raw(d0, tmp_path / "ref.raw")
    r = cli.json("job", "sync-now", "e2e-lost", "--wait")
    assert r["kind"] == "resync"
    assert r["bytes_written"] == 192 * 1024, "resync writes only the blocks that differ"
    assert "missing" in (r["resync_reason"] or "")
    st = cli.json("job", "status", "e2e-lost")
    assert st["resyncs"] == 1 and "missing" in st["last_resync_reason"]
    files = export_raw(cli, "e2e-lost", r["point_id"], tmp_path / "x")
    assert same(files["disk0"], ref)
    # and tracking is back: the next sync is incremental again
    qemu_io(d0, "write -P 0x79 3M 64k")
    assert cli.json("job", "sync-now", "e2e-lost", "--wait")["kind"] == "incremental"
    cli.json("job", "delete", "e2e-lost", "--purge")
    assert not (tmp_path / "rep" / "e2e-lost").exists()


def test_worker_killed_mid_copy_resumes_bit_exact(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    d0 = make_qcow2(tmp_path / "big.qcow2", 256 * MiB)
    qemu_io(d0, "write -P 0x5a 0 160M")
    ref = to_raw(d0, tmp_path / "ref.raw")
    tuning = {
        "bandwidth_limit": 24 * MiB,
        "checkpoint_bytes": 8 * MiB,
        "heartbeat_timeout": "4s",
        "connections": 2,
    }
    spec = write_spec(tmp_path / "j.yaml", "e2e-kill", [d0], tmp_path / "rep", tuning=tuning)
    cli.json("job", "create", "-f", str(spec))
    # wait until the copy has heartbeated some progress, then kill the worker hard
    from tests.e2e.helpers_temporal import copy_progress, copy_results

    deadline = time.monotonic() + 60
    while True:
        tok = copy_progress("e2e-kill")
        if tok and tok["offset"] >= 24 * MiB:
            break
        assert time.monotonic() < deadline, "copy made no progress"
        time.sleep(0.2)
    stack.restart_worker(cli.state, signal.SIGKILL)
    st = cli.wait_point("e2e-kill", 1, timeout=180)
    assert st["last_sync"]["kind"] == "full" and st["failures"] == 0
    results = copy_results("e2e-kill")
    assert len(results) == 1
    res = results[0]
    resumed = res["resumed_from"]
    assert resumed >= tok["offset"], "the retry resumed from the heartbeated token"
    assert resumed < 160 * MiB
    # the stats carried over plus the resumed part add up to exactly the data: nothing lost
    assert res["stats"]["bytes_written"] == 160 * MiB
    files = export_raw(cli, "e2e-kill", st["last_point"], tmp_path / "x")
    assert same(files["disk0"], ref)
    cli.json("job", "delete", "e2e-kill")


def test_bad_specs_fail_with_one_line_errors(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    d0 = make_qcow2(tmp_path / "ok.qcow2", 16 * MiB)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * MiB)

    def err(spec: dict) -> str:
        f = tmp_path / "bad.yaml"
        f.write_text(yaml.safe_dump(spec))
        p = cli.run("job", "create", "-f", str(f), check=False)
        assert p.returncode != 0, p.stdout
        lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
        assert len(lines) == 1, p.stderr
        return lines[0]

    base = {
        "name": "bad",
        "source": {"platform": "kvm", "disks": [str(d0)]},
        "target": {"platform": "kvm", "path": str(tmp_path / "r")},
    }
    assert "source.colour: unknown field" in err({**base, "source": {**base["source"], "colour": "red"}})
    assert "source.disks[0]" in err(
        {**base, "source": {"platform": "kvm", "disks": [str(tmp_path / "nope.qcow2")]}}
    )
    assert "not qcow2" in err({**base, "source": {"platform": "kvm", "disks": [str(raw)]}})
    assert "target: field required" in err({"name": "bad", "source": base["source"]})
    assert "source.qmp: QMP socket" in err(
        {**base, "source": {"platform": "kvm", "qmp": str(tmp_path / "no.sock")}}
    )
    assert "schedule.interval" in err({**base, "schedule": {"interval": "often"}})
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({**base, "name": "e2e-dup", "schedule": {"interval": "1h"}}))
    cli.json("job", "create", "-f", str(ok))
    p = cli.run("job", "create", "-f", str(ok), check=False)
    assert p.returncode != 0 and "already exists" in p.stderr
    p = cli.run("job", "status", "no-such-job", check=False)
    assert p.returncode != 0 and "no-such-job" in p.stderr
    cli.wait_point("e2e-dup")
    cli.json("job", "delete", "e2e-dup")  # its point is kept
    # issue 9 item 10: a new job under the deleted job's name does not adopt its kept points
    p = cli.run("job", "create", "-f", str(ok), check=False)
    assert p.returncode != 0 and "earlier job named e2e-dup" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert (tmp_path / "r" / "e2e-dup" / "points").is_dir()


def test_cli_without_server_says_how_to_start_it(tmp_path: Path) -> None:
    import os

    from tests.e2e.conftest import SENDENSE, free_port

    env = dict(os.environ, SENDENSE_HOME=str(tmp_path), SENDENSE_TEMPORAL=f"127.0.0.1:{free_port()}")
    p = subprocess.run([SENDENSE, "job", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode != 0
    assert "not reachable" in p.stderr and "sendense up" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
