"""The vSphere lab's hook for `sendense lab up/down/status` (named by the vSphere platform's plug-in).

`up` starts vcsim-lab in the background (its own session: it outlives the CLI) with a fresh random
password, keeps what reaching it takes in SENDENSE_HOME/labs/vsphere/lab.json (0600), and registers,
for its endpoint (`vsphere:127.0.0.1:PORT`), the login and the VDDK stand-in an agent on this machine
uses (sendense.config.register_lab): a running agent reaches it at once. `down` stops it and forgets
them. `vm` makes a VM in it whose first disk holds the bootable guest (labs/guest).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from labs.vsphere import VsphereLab, VsphereLabError, build
from sendense import config
from sendense.errors import SendenseError
from sendense.private import private_dir

ERRORS: tuple[type[Exception], ...] = (SendenseError, VsphereLabError)
STANDIN = Path(__file__).with_name("vddk_standin.py")
DATACENTER, DATASTORE = "DC0", "LocalDS_0"


def lab_dir() -> Path:
    return config.home() / "labs" / "vsphere"


def _state_file() -> Path:
    return lab_dir() / "lab.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def attach() -> VsphereLab | None:
    """The running vSphere lab of this SENDENSE_HOME, or None."""
    try:
        st = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None
    if not _alive(int(st.get("pid", 0))):
        return None
    lab = VsphereLab()
    lab._set_url(st["url"])  # (the URL holds the lab's own login: the file is the user's only)
    lab.datastores = {k: Path(v) for k, v in st.get("datastores", {}).items()}
    return lab


def endpoint(lab: VsphereLab) -> str:
    return f"vsphere:{lab.host}:{lab.port}"


def env(lab: VsphereLab) -> dict[str, str]:
    """What an agent needs to reach the lab: its login and the VDDK stand-in (the lab's data path)."""
    return {
        "SENDENSE_VSPHERE_USER": lab.user,
        "SENDENSE_VSPHERE_PASSWORD": lab.password,
        "SENDENSE_VDDK_PLUGIN": str(STANDIN),
    }


def describe(lab: VsphereLab) -> dict[str, Any]:
    place = {"platform": "vsphere", "server": f"{lab.host}:{lab.port}", "thumbprint": lab.thumbprint}
    return {
        "running": True,
        "endpoint_url": f"https://{lab.host}:{lab.port}/sdk",
        "env": env(lab),
        "source": {**place, "vm": "NAME"},
        "target": {**place, "datacenter": DATACENTER, "datastore": DATASTORE},
        "dir": str(lab_dir()),
        "note": "agents on this machine (sendense up, sendense worker) reach it as they are; an agent "
        "elsewhere needs the env; make a VM with `sendense lab vm NAME`",
    }


def up(port: int = 0) -> dict[str, Any]:
    lab = attach()
    if lab is None:
        lab = _start(port)
    config.register_lab(endpoint(lab), env(lab))
    return describe(lab)


def _start(port: int, timeout: float = 30.0) -> VsphereLab:
    d = private_dir(lab_dir(), "vSphere lab directory")
    out = d / "vcsim.out"
    password = secrets.token_urlsafe(18)
    cmd = [build(), "-l", f"127.0.0.1:{port}", "-vm", "1", "-username", "sendense", "-password", password]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    url, stores = "", {}
    while not url:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            text = out.read_text(errors="replace").strip().splitlines()
            raise VsphereLabError(f"vcsim-lab did not start: {text[-1] if text else 'no output'}")
        for line in out.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key == "VCSIM_DATASTORE":
                name, _, local = value.partition(" ")
                stores[name] = local
            elif key == "VCSIM_URL":
                url = value.strip()
        time.sleep(0.05)
    state = {"pid": proc.pid, "url": url, "datastores": stores}
    fd = os.open(_state_file(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    lab = attach()
    if lab is None:
        raise VsphereLabError("vcsim-lab exited right after it started")
    return lab


def down() -> bool:
    lab = attach()
    try:
        st = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return False
    pid = int(st.get("pid", 0))
    if lab is not None:
        config.unregister_lab(endpoint(lab))
    running = _alive(pid)
    if running:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for local in st.get("datastores", {}).values():
        shutil.rmtree(local, ignore_errors=True)
    _state_file().unlink(missing_ok=True)
    return running


def status() -> dict[str, Any]:
    lab = attach()
    return describe(lab) if lab is not None else {"running": False}


def make_vm(name: str, disk_mib: list[int], blank: bool = False) -> dict[str, Any]:
    """A powered-off VM with thin disks of these sizes; the first holds the bootable guest unless
    `blank`. What a job spec's source needs to name it."""
    lab = attach()
    if lab is None:
        raise VsphereLabError("the vSphere lab is not running: start it with `sendense lab up`")
    sizes = [m << 20 for m in disk_mib]
    if not blank:
        from labs.guest.build import build as guest
        from tools.qemu import image_info

        image = guest()
        need = int(image_info(image)["virtual-size"])
        if sizes[0] < need:
            raise VsphereLabError(f"--disk-mib: the first disk holds the guest: at least {need >> 20} MiB")
    moref = lab.make_vm(name, sizes)
    if not blank:
        lab.write_guest(moref)  # and memoryMB 256: PowerOnVM_Task boots it (QEMU under vcsim-lab)
    return {"vm": name, "moref": moref, "disks_mib": disk_mib, "guest": not blank}
