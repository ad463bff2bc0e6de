"""`sendense link` against the real dev server and the stack's worker: create, list, status, set,
delete, bad input refused in one line naming the option; a KVM job on a link copies at its grant,
`job status` and `link status` show its rate and share while it copies, and `job settings --priority`
moves its running copy to another class within seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from helpers_kvm import MiB, make_qcow2, qemu_io

from tests.e2e.conftest import Cli
from tests.e2e.test_cli_errors import one_line_error


def test_link_commands_and_their_errors(e2e_stack: Cli) -> None:
    cli = e2e_stack
    st = cli.json("link", "create", "wan1", "--rate", "400Mbit", "--tz", "Europe/Berlin",
                  "--window", "08:00-18:00=200Mbit@mon-fri", "--weights", "critical=60")  # fmt: skip
    assert st["spec"]["rate"] == 50_000_000 and st["spec"]["weights"] == {
        "critical": 60,
        "normal": 30,
        "low": 20,
    }
    assert st["budget"] in (25_000_000, 50_000_000) and st["holders"] == []
    assert [s["spec"]["name"] for s in cli.json("link", "list")] == ["wan1"]
    human = cli.run("link", "status", "wan1").stdout
    assert "window 08:00-18:00=200 Mbit/s mon,tue,wed,thu,fri" in human and "no copies cross it now" in human

    st = cli.json("link", "set", "wan1", "--rate", "unlimited", "--no-windows")
    assert (st["spec"]["rate"], st["spec"]["windows"], st["budget"]) == (None, [], None)
    assert st["spec"]["timezone"] == "Europe/Berlin"  # what was not given stays

    for args, message in [
        (("create", "wan1", "--rate", "1Gbit"), "NAME: link 'wan1' already exists"),
        (("create", "wan2", "--rate", "fast"), "--rate: not a rate"),
        (("create", "wan2", "--tz", "Mars/Olympus"), "--tz: not an IANA time zone"),
        (
            ("create", "wan2", "--window", "25:00-06:00=1Mbit"),
            "--window 25:00-06:00=1Mbit: start: not a time of day",
        ),
        (("create", "wan2", "--window", "08:00=1Mbit"), "--window 08:00=1Mbit: START-END=RATE[@DAYS]"),
        (("create", "wan2", "--weights", "urgent=5"), "--weights: urgent: unknown field"),
        (("create", "WAN!"), "NAME: must be 1-63 chars"),
        (("set", "wan1"), "give at least one of --rate"),
        (("set", "nowhere", "--rate", "1Gbit"), "link nowhere: not found"),
        (("status", "nowhere"), "link nowhere: not found"),
    ]:
        msg = one_line_error(cli.run("link", *args, check=False))
        assert msg.startswith(message), (args, msg)
    assert cli.json("link", "delete", "wan1") == {"deleted": "wan1"}
    assert cli.json("link", "list") == []


@pytest.mark.slow
def test_a_job_on_a_link_copies_at_its_share_and_moves_class(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    cli.run("link", "create", "wan3", "--rate", "40Mbit")  # 5 MB/s
    disk = make_qcow2(tmp_path / "d.qcow2", 96 * MiB)
    qemu_io(disk, "write -P 0x5a 0 64M")
    spec = tmp_path / "j.yaml"
    data = {
        "name": "onlink",
        "source": {"platform": "kvm", "disks": [str(disk)]},
        "target": {"platform": "kvm", "path": str(tmp_path / "rep")},
        "schedule": {"interval": "1h"},
        "link": "wan-typo",
        "priority": "low",
    }
    spec.write_text(yaml.safe_dump(data))
    msg = one_line_error(cli.run("job", "create", "-f", str(spec), check=False))
    assert msg == f"{spec}: link: no link 'wan-typo' (sendense link create)"
    spec.write_text(yaml.safe_dump({**data, "link": "wan3"}))
    t0 = time.monotonic()
    cli.run("job", "create", "-f", str(spec), "--no-wait")

    # while it copies: one copy, the whole budget, its class; then another class within seconds
    deadline = time.monotonic() + 30
    while True:
        st = cli.json("job", "status", "onlink")
        if st["link_share"] and st["link_share"]["copies"]:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.3)
    assert (st["link"], st["priority"]) == ("wan3", "low")
    assert (st["link_share"]["rate"], st["link_share"]["share"]) == (5_000_000, 1.0)
    assert (
        "link: wan3, priority low: granted 40 Mbit/s, 100% of the link"
        in cli.run("job", "status", "onlink").stdout
    )
    ls = cli.json("link", "status", "wan3")
    assert [(h["job"], h["priority"], h["rate"]) for h in ls["holders"]] == [("onlink", "low", 5_000_000)]

    cli.run("job", "settings", "onlink", "--priority", "critical")
    moved = time.monotonic()
    while cli.json("link", "status", "wan3")["holders"][0]["priority"] != "critical":
        assert time.monotonic() - moved < 5, "the running copy did not move class within 5 s"
        time.sleep(0.2)
    time.sleep(5)  # (the measured rate averages the last 5 s of reports)
    h = cli.json("link", "status", "wan3")["holders"][0]
    assert h["measured_rate"] is not None and 4_500_000 <= h["measured_rate"] <= 5_500_000, h

    st = cli.wait_point("onlink", 1, timeout=60)
    took = time.monotonic() - t0
    # 64 MiB at 5 MB/s: 13.4 s; not faster
    assert took >= 12.5, took
    assert st["last_sync"]["bytes_written"] == 64 * MiB
    assert cli.json("link", "status", "wan3")["holders"] == []  # released at the copy's end
    cli.run("job", "delete", "onlink", "--purge")
    cli.run("link", "delete", "wan3")
