"""Plant known bugs into the CloudStack lab one at a time and show which tests catch each.

    python labs/cloudstack/plant_bugs.py [BUG ...]      # all of BUGS when none is named

Each bug is a temporary textual edit of one lab file; the script runs the bug's test modules (the API
and client tests, fast; the VM tests for VM bugs: root, about a minute), prints the tests that failed
and restores the file with `git checkout` (so it refuses to run on an uncommitted lab file). Never
commit a planted bug.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

WT = str(Path(__file__).resolve().parents[2])
L = "labs/cloudstack/"
API = ["tests/labs/test_cloudstack_lab_api.py", "tests/connectors/cloudstack/test_cloudstack_client.py"]
VMS = ["tests/labs/test_cloudstack_lab_vms.py"]
# volume import (the CloudStack target's VMs from points stand on it): the lab's tests and the target's
IMPORTS = [
    "tests/labs/test_cloudstack_lab_imports.py",
    "tests/connectors/cloudstack/test_cloudstack_target.py",
]

# name: (file, text, replacement, test modules)
BUGS: dict[str, tuple[str, str, str, list[str]]] = {
    "sort-case-insensitively": (
        L + "signing.py",
        'names = sorted(k for k in params if k.lower() != "signature")',
        'names = sorted((k for k in params if k.lower() != "signature"), key=str.lower)',
        API,
    ),
    "encode-like-python-quote": (L + "signing.py", '.replace("~", "%7E")', "", API),
    "expiry-not-checked": (L + "signing.py", "if when < now:", "if False:", API),
    "far-expiry-accepted": (
        L + "signing.py",
        "if enforce_timestamps and when > now + MAX_AHEAD:",
        "if False:",
        API,
    ),
    "legacy-form-always-accepted": (L + "signing.py", "elif enforce_timestamps:", "elif False:", API),
    "failed-job-marked-success": (
        L + "cloud.py",
        "result, status, code = e.body(), 2, e.errorcode",
        "result, status, code = e.body(), 1, 0",
        API,
    ),
    "pending-job-shows-a-result": (L + "cloud.py", "if job.status != 0:", "if True:", API),
    "errors-answer-http-200": (
        L + "server.py",
        "return Answer(e.errorcode, wire.render(name, e.body()))",
        "return Answer(200, wire.render(name, e.body()))",
        API,
    ),
    "no-cserrorcode": (L + "wire.py", "if self.cserrorcode is not None:", "if False:", API),
    "empty-list-with-count": (
        L + "wire.py",
        'return {"count": len(items), item: items} if items else {}',
        'return {"count": len(items), item: items}',
        API,
    ),
    "delete-attached-volume": (
        L + "volumes.py",
        "    if vol.vm is not None:\n        raise invalid(NOT_ATTACHED)\n",
        "",
        API,
    ),
    "attach-an-attached-volume": (
        L + "volumes.py",
        "            if vol.vm is not None:\n                raise invalid(NOT_ATTACHED)\n",
        "",
        API,
    ),
    "page-ignored": (
        L + "cloud.py",
        'if size is None or "count" not in payload',
        "if True or size is None",
        API,
    ),
    # VMs (root)
    "pool-capacity-unchecked": (L + "storage.py", "if allocated + needed > pool.capacity:", "if False:", VMS),
    "forced-stop-leaves-the-domain": (
        L + "hosts.py",
        "            with suppress(Exception):\n                dom.destroy()\n",
        "            pass\n",
        VMS,
    ),
    "migrate-keeps-the-source-domain": (
        L + "vms.py",
        "        source.stop_domain(vm.instancename, True, 0)\n",
        "",
        VMS,
    ),
    "live-migration-not-done": (
        L + "vms.py",
        "                source.migrate_to(vm.instancename, target)\n",
        "                pass\n",
        VMS,
    ),
    "detach-leaves-the-disk-plugged": (
        L + "volumes.py",
        "            host.detach_disk(vm.instancename, vol.deviceid or 0, vol.file)\n",
        "            pass\n",
        VMS,
    ),
    "power-state-not-synced": (L + "commands.py", "    vms.sync_power(c)\n", "", VMS),
    "migrate-restarts-on-the-same-host": (L + "vms.py", "_boot(c, vm, target)", "_boot(c, vm, source)", VMS),
    "root-not-over-the-template": (
        L + "storage.py",
        'qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(target), str(vol.size))',
        'qemu_img("create", "-q", "-f", "qcow2", str(target), str(vol.size))',
        VMS,
    ),
    "expunge-keeps-the-root-file": (
        L + "vms.py",
        "                    if expunge:\n                        storage.remove(c.state, v)",
        '                    if expunge:\n                        v.state = "Destroy"',
        VMS,
    ),
    # volume import (imports.py)
    "import-accepts-a-backing-file": (
        L + "imports.py",
        'if found["details"].get("BACKING_FILE"):',
        "if False:",
        IMPORTS,
    ),
    "import-path-escapes-the-pool": (
        L + "imports.py",
        'if not path or "/" in path or path in (".", ".."):',
        "if not path:",
        IMPORTS,
    ),
    "import-a-managed-file-again": (L + "imports.py", "if _managed(c, pool, path):", "if False:", IMPORTS),
    "import-ignores-capacity": (
        L + "imports.py",
        "if allocated + size > pool.capacity:",
        "if False:",
        IMPORTS,
    ),
    "import-ignores-the-pool-state": (
        L + "imports.py",
        "            _available(pool)\n            if not path.strip():",
        "            if not path.strip():",
        IMPORTS,
    ),
    "imported-volume-allocated": (
        L + "imports.py",
        'Volume(vol_id, name, "DATADISK", size, state="Ready"',
        'Volume(vol_id, name, "DATADISK", size, state="Allocated"',
        IMPORTS,
    ),
    "volume-file-named-by-id": (
        L + "state.py",
        "return self.pool.path / (self.path or self.id) if self.pool is not None else None",
        "return self.pool.path / self.id if self.pool is not None else None",
        IMPORTS,
    ),
    "unmanage-deletes-the-file": (
        L + "imports.py",
        "c.state.volumes.pop(vol.id, None)  # the record goes, the file stays",
        "storage.remove(c.state, vol)",
        IMPORTS,
    ),
}


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in BUGS]
    if unknown:
        print(f"unknown bugs: {', '.join(unknown)} (known: {', '.join(BUGS)})")
        return 2
    files = sorted({BUGS[n][0] for n in names or BUGS})
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *files], cwd=WT, capture_output=True, text=True
    )
    if dirty.stdout.strip():
        print(f"commit or stash these first (the script restores them with git checkout):\n{dirty.stdout}")
        return 2
    missed = []
    for name in names or list(BUGS):
        caught = run_one(name)
        print(f"{name}: caught by {', '.join(caught) if caught else 'NOTHING'}", flush=True)
        if not caught:
            missed.append(name)
    return 1 if missed else 0


def run_one(name: str) -> list[str]:
    path, old, new, modules = BUGS[name]
    f = Path(WT) / path
    text = f.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{name}: the text to replace is not found exactly once in {path}")
    f.write_text(text.replace(old, new))
    try:
        p = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", *modules],
            cwd=WT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": WT},
        )
    finally:
        subprocess.run(["git", "checkout", "--", path], cwd=WT, check=True)
    return sorted(set(re.findall(r"^FAILED \S+::(\S+)", p.stdout, re.M)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
