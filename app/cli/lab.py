"""`sendense lab`: the stand-ins for platforms that cannot run on this machine, in the background.

`lab up` starts them (today: AWS, EC2 and the EBS direct APIs on loopback) and says, per platform,
what a job spec and the agent need to reach them; `lab down` stops them; `lab write` writes to a lab
volume as its guest would. KVM needs no lab: it runs for real here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sendense import config
from sendense.errors import SendenseError

lab_app = typer.Typer(
    help="Platform labs (stand-ins that speak the real APIs) on this machine.", no_args_is_help=True
)


MAX_WRITE = 1 << 30  # `lab write` holds the bytes in memory


def lab_dir(platform: str) -> Path:
    return config.home() / "labs" / platform


def describe(lab: Any) -> dict[str, Any]:
    """What a job spec and the agent's environment need to reach the AWS lab."""
    return {
        "endpoint_url": lab.endpoint_url,
        "region": lab.region,
        "env": lab.env(),
        "source": {"platform": "aws", "region": lab.region, "endpoint_url": lab.endpoint_url},
        "target": {"platform": "aws", "region": lab.region, "endpoint_url": lab.endpoint_url},
        "dir": str(lab_dir("aws")),
        "note": "export the env for `sendense up`/`sendense worker` (the agent's AWS credential chain); "
        "make an instance with `sendense lab instance NAME --disk-gib 8 --disk-gib 2`",
    }


def _kvm() -> dict[str, Any]:
    return {"note": "KVM runs for real here: source.disks (stopped VM), source.qmp or source.libvirt; no lab"}


def _attach() -> Any:
    """The running AWS lab of this SENDENSE_HOME, or None."""
    from labs.aws import AwsLab
    from labs.aws.lab import AwsLabError

    try:
        return AwsLab.attach(lab_dir("aws"))
    except AwsLabError:
        return None


def _errors() -> tuple[type[Exception], ...]:
    from labs.aws.lab import AwsLabError

    return (SendenseError, AwsLabError)


@lab_app.command("up")
def lab_up(
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    port: int = typer.Option(0, help="AWS lab port (0: any free one)"),
) -> None:
    """Start the labs in the background (already running: just describe them)."""
    from app.cli.output import emit_json, fail, out
    from labs.aws import AwsLab

    try:
        lab = _attach()
        if lab is None or not lab.running:
            lab = AwsLab(lab_dir("aws"), port=port).start(detached=True)
    except _errors() as e:
        fail(str(e))
    info = {"aws": describe(lab), "kvm": _kvm()}
    if as_json:
        emit_json(info)
        return
    out.print(f"aws lab: {lab.endpoint_url} (region {lab.region}); for the agent's environment:")
    for k, v in lab.env().items():
        out.print(f"  export {k}={v}", highlight=False)
    out.print("kvm: runs for real here, no lab")


@lab_app.command("down")
def lab_down(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Stop the labs (their state is gone with them)."""
    from app.cli.output import emit_json, fail, out

    try:
        lab = _attach()
        stopped = lab is not None
        if lab is not None:
            lab.stop()
    except _errors() as e:
        fail(str(e))
    if as_json:
        emit_json({"aws": {"stopped": stopped}})
    else:
        out.print("aws lab: stopped" if stopped else "aws lab: was not running")


@lab_app.command("status")
def lab_status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Which labs run, and how to reach them."""
    from app.cli.output import emit_json, out

    lab = _attach()
    running = lab is not None and lab.running
    if as_json:
        emit_json(
            {"aws": describe(lab) | {"running": True} if running else {"running": False}, "kvm": _kvm()}
        )
    else:
        out.print(f"aws lab: {lab.endpoint_url}" if running else "aws lab: not running")


def _running_lab() -> Any:
    from app.cli.output import fail

    lab = _attach()
    if lab is None or not lab.running:
        fail("the AWS lab is not running: start it with `sendense lab up`")
    return lab


@lab_app.command("instance")
def lab_instance(
    name: str,
    disk_gib: list[int] = typer.Option([8], "--disk-gib", help="volume sizes in GiB, the root volume first"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Create an EC2 instance with EBS volumes in the AWS lab (a source to replicate)."""
    from app.cli.output import emit_json, fail, out

    if not all(1 <= g <= 16384 for g in disk_gib):  # EBS volumes are 1 GiB to 16 TiB
        fail(f"--disk-gib: sizes are 1 to 16384 GiB, not {disk_gib}")
    lab = _running_lab()
    try:
        inst = lab.make_instance(name, list(disk_gib))
    except _errors() as e:
        fail(str(e))
    vols = [{"device": d, "volume_id": v, "size_gib": s} for d, v, s in inst.volumes]
    if as_json:
        emit_json({"instance_id": inst.instance_id, "volumes": vols})
        return
    out.print(f"instance {inst.instance_id}")
    for v in vols:
        out.print(f"  {v['device']}: {v['volume_id']} ({v['size_gib']} GiB)")


@lab_app.command("write")
def lab_write(
    volume_id: str,
    offset: int = typer.Argument(..., min=0, help="byte offset"),
    file: Path = typer.Option(None, "--file", help="write this file's bytes"),
    pattern: int = typer.Option(None, "--pattern", help="write this byte value (0-255) ..."),
    length: int = typer.Option(None, "--length", help="... this many times"),
) -> None:
    """Write to an AWS lab volume as its guest would (later snapshots see it, earlier ones do not)."""
    from app.cli.output import fail, out

    if (file is None) == (pattern is None):
        fail("give --file, or --pattern with --length")
    if file is not None:
        if not file.is_file():
            fail(f"--file {file}: not found")
        if file.stat().st_size > MAX_WRITE:
            fail(f"--file {file}: larger than {MAX_WRITE} bytes; write it in parts")
        data = file.read_bytes()
    else:
        if length is None or not 0 < length <= MAX_WRITE or not 0 <= pattern <= 255:
            fail(f"--pattern needs a byte value 0-255 and a --length of 1 to {MAX_WRITE} bytes")
        data = bytes([pattern]) * length
    lab = _running_lab()
    try:
        lab.write(volume_id, offset, data)
    except _errors() as e:
        fail(str(e))
    out.print(f"wrote {len(data)} bytes to {volume_id} at {offset}")
