"""`sendense lab`: the stand-ins for platforms that cannot run on this machine, in the background.

`lab up` starts every platform's lab (its plug-in names a hook: sendense.platforms, Platform.lab) and
says, per platform, what a job spec needs to reach it; agents on this machine reach a lab at once (the
hook registers its credentials for its endpoint). `lab down` stops them. `lab instance` and `lab write`
are the AWS lab's own: an instance to replicate, and writes to a volume as its guest would; `lab vm`
is the vSphere lab's: a VM to replicate.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from sendense.errors import SendenseError

lab_app = typer.Typer(
    help="Platform labs (stand-ins that speak the real APIs) on this machine.", no_args_is_help=True
)


MAX_WRITE = 1 << 30  # `lab write` holds the bytes in memory

# A lab's env values whose names say they are secret are printed only with --show-secrets.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|PRIVATE|CREDENTIAL", re.IGNORECASE)
SHOW_SECRETS_HINT = "hidden; add --show-secrets to print them"
ShowSecrets = typer.Option(
    False, "--show-secrets", help="print the lab's secrets (its credentials) too; hidden otherwise"
)


def _redacted(info: dict[str, Any], show: bool) -> dict[str, Any]:
    """Each lab's description with the values of its secret env variables set to null and named in
    `hidden` (unless `show`)."""
    if show:
        return info
    out: dict[str, Any] = {}
    for name, lab in info.items():
        env: dict[str, Any] = (lab.get("env") if isinstance(lab, dict) else None) or {}
        secret = sorted(k for k in env if SECRET_NAME.search(k))
        if secret:
            lab = {**lab, "env": {k: (None if k in secret else v) for k, v in env.items()}}
            lab["hidden"] = secret
            lab["hidden_note"] = f"{', '.join(secret)}: {SHOW_SECRETS_HINT}"
        out[name] = lab
    return out


def _hooks() -> dict[str, Any]:
    """Platform name -> its lab hook module (sendense.platforms: Platform.lab), for those with a lab."""
    import importlib

    from sendense import platforms

    dev = platforms.developer_platforms()  # a developer-only platform's lab only for developers
    return {
        p.name: importlib.import_module(p.lab)
        for p in platforms.load_all()
        if p.lab and (dev or not p.developer_only)
    }


def _notes() -> dict[str, dict[str, Any]]:
    """What the platforms without a lab say instead (KVM runs for real here)."""
    from sendense import platforms

    return {
        p.name: {"note": p.lab_note}
        for p in platforms.load_all()
        if not p.lab and p.lab_note and not p.developer_only
    }


def _errors(hook: Any) -> tuple[type[Exception], ...]:
    return tuple(getattr(hook, "ERRORS", (SendenseError,)))


@lab_app.command("up")
def lab_up(
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    port: int = typer.Option(0, help="the lab's port, for a single lab (0: any free one)"),
    show_secrets: bool = ShowSecrets,
) -> None:
    """Start the labs in the background (already running: just describe them). Agents on this machine
    reach them at once; the output says what a job spec needs (and, with --show-secrets, the
    credentials an agent elsewhere needs)."""
    from app.cli.output import emit_json, fail, out

    info: dict[str, Any] = {}
    for name, hook in _hooks().items():
        try:
            info[name] = hook.up(port=port)
        except _errors(hook) as e:
            fail(f"{name} lab: {e}")
    info = _redacted(info | _notes(), show_secrets)
    if as_json:
        emit_json(info)
        return
    for name, lab in info.items():
        if "endpoint_url" in lab:
            where = f" (region {lab['region']})" if "region" in lab else ""
            out.print(
                f"{name} lab: {lab['endpoint_url']}{where}; agents on this machine reach it as they are",
                highlight=False,
            )
            _print_env(lab, show_secrets)
            for h in lab.get("hosts") or []:  # a cloud of hypervisor hosts: an agent on each
                env = " ".join(f"{k}={v}" for k, v in h["agent_env"].items())
                out.print(f"  host {h['name']}'s agent: {env}", highlight=False, soft_wrap=True)
        else:
            out.print(f"{name}: {lab.get('note', '')}", highlight=False)


def _print_env(lab: dict[str, Any], show: bool) -> None:
    from app.cli.output import out

    env = lab.get("env") or {}
    if show:
        out.print(
            f"  an agent elsewhere needs: {' '.join(f'{k}={v}' for k, v in env.items())}", highlight=False
        )
    else:
        out.print(f"  an agent elsewhere needs: {' '.join(f'{k}=...' for k in env)}", highlight=False)
        if lab.get("hidden"):
            out.print(f"  ({lab['hidden_note']})", highlight=False)


@lab_app.command("down")
def lab_down(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Stop the labs (their state is gone with them)."""
    from app.cli.output import emit_json, fail, out

    stopped: dict[str, bool] = {}
    for name, hook in _hooks().items():
        try:
            stopped[name] = hook.down()
        except _errors(hook) as e:
            fail(f"{name} lab: {e}")
    if as_json:
        emit_json({name: {"stopped": s} for name, s in stopped.items()})
    else:
        for name, s in stopped.items():
            out.print(f"{name} lab: stopped" if s else f"{name} lab: was not running")


@lab_app.command("status")
def lab_status(
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    show_secrets: bool = ShowSecrets,
) -> None:
    """Which labs run, and how to reach them."""
    from app.cli.output import emit_json, out

    info = _redacted({name: hook.status() for name, hook in _hooks().items()} | _notes(), show_secrets)
    if as_json:
        emit_json(info)
        return
    for name, lab in info.items():
        if "running" in lab:
            if not lab["running"]:
                out.print(f"{name} lab: not running")
                continue
            out.print(f"{name} lab: {lab['endpoint_url']}", highlight=False)
            if show_secrets or lab.get("hidden"):
                _print_env(lab, show_secrets)


def _running_lab() -> Any:
    """The running AWS lab (for `lab instance` and `lab write`, which are the AWS lab's own)."""
    from app.cli.output import fail
    from labs.aws import hook

    lab = hook.attach()
    if lab is None:
        fail("the AWS lab is not running: start it with `sendense lab up`")
    return lab


@lab_app.command("instance")
def lab_instance(
    name: str,
    disk_gib: list[int] = typer.Option([1], "--disk-gib", help="volume sizes in GiB, the root volume first"),
    blank: bool = typer.Option(
        False, "--blank", help="all volumes empty (default: the root volume holds the bootable guest)"
    ),
    workload: bool = typer.Option(
        False, "--workload", help="the guest runs its filesystem workload (files and a sequence counter)"
    ),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Create a running EC2 instance with EBS volumes in the AWS lab (a source to replicate). Its root
    volume holds the bootable guest (a small Linux, built once), so the instance really boots: its
    console (GetConsoleOutput) shows SENDENSE-GUEST-READY a few seconds after the start (with
    --workload: SENDENSE-GUEST-SEQ N as it writes)."""
    from app.cli.output import emit_json, fail, out

    if not all(1 <= g <= 16384 for g in disk_gib):  # EBS volumes are 1 GiB to 16 TiB
        fail(f"--disk-gib: sizes are 1 to 16384 GiB, not {disk_gib}")
    lab = _running_lab()
    try:
        if blank:
            inst = lab.make_instance(name, list(disk_gib))
        else:
            from labs.guest.build import build, workload_image

            inst = lab.make_instance(name, list(disk_gib), image=workload_image() if workload else build())
    except _aws_errors() as e:
        fail(str(e))
    vols = [{"device": d, "volume_id": v, "size_gib": s} for d, v, s in inst.volumes]
    if as_json:
        emit_json({"instance_id": inst.instance_id, "volumes": vols, "guest": not blank})
        return
    out.print(f"instance {inst.instance_id}" + ("" if blank else " (root volume: the bootable guest)"))
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
    except _aws_errors() as e:
        fail(str(e))
    out.print(f"wrote {len(data)} bytes to {volume_id} at {offset}")


def _aws_errors() -> tuple[type[Exception], ...]:
    from labs.aws import hook

    return hook.ERRORS


@lab_app.command("vm")
def lab_vm(
    name: str,
    disk_mib: list[int] = typer.Option([256], "--disk-mib", help="disk sizes in MiB, the boot disk first"),
    blank: bool = typer.Option(False, "--blank", help="all disks empty (default: the first holds the guest)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Create a powered-off VM in the vSphere lab (a source to replicate), with thin disks on its
    datastore and change tracking on; its first disk holds the bootable guest (a small Linux)."""
    from app.cli.output import emit_json, fail, out

    if not all(1 <= m <= 1 << 20 for m in disk_mib):
        fail(f"--disk-mib: sizes are 1 to {1 << 20} MiB, not {disk_mib}")
    from labs.vsphere import hook

    try:
        made = hook.make_vm(name, list(disk_mib), blank=blank)
    except hook.ERRORS as e:
        fail(str(e))
    if as_json:
        emit_json(made)
        return
    out.print(f"VM {name} ({made['moref']})" + ("" if blank else " (first disk: the bootable guest)"))
