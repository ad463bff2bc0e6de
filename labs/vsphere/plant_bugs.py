"""Plant known bugs into vcsim-lab one at a time and show which tests catch each (labs/vsphere/NOTES.md).

    python labs/vsphere/plant_bugs.py [BUG ...]      # all of BUGS when none is named

Each bug is a temporary textual edit of an overlay Go file; the script builds that variant into its own
cache (SENDENSE_VCSIM_BUGS_CACHE, default /tmp/vcsim-lab-bugs, so the normal cache keeps its binary), runs
tests/labs/test_vsphere_lab_disks.py, test_vsphere_lab_smoke.py and test_vsphere_lab_config.py against it
(other modules for the power, clone, extend and NFC bugs: MODULES)
(SENDENSE_VCSIM_BIN), prints the failing tests and restores the file with `git checkout` (so it refuses
to run on an uncommitted overlay). Never commit a planted bug. ~20 s per bug (the build dominates).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

WT = str(Path(__file__).resolve().parents[2])
SIM = "labs/vsphere/overlay/simulator/"
POWER = SIM + "lab_power.go"
CLONE = SIM + "lab_clone.go"
EXTEND = SIM + "lab_extend.go"
NFC = SIM + "lab_nfc.go"
BUGS = {
    # power and boot (tests/labs/test_vsphere_lab_power.py)
    "snapshot-no-live-switch": (
        POWER,
        '_, err := m.qmpCmd("transaction", map[string]interface{}{"actions": actions})',
        '_, err := m.qmpCmd("query-status", nil)',
    ),
    "tools-green-before-marker": (
        POWER,
        "if !bytes.Contains(buf[:n], []byte(labReadyMarker)) {",
        "if false && !bytes.Contains(buf[:n], []byte(labReadyMarker)) {",
    ),
    "power-off-keeps-qemu": (
        POWER,
        "\t_ = m.cmd.Process.Kill()\n\tselect {\n\tcase <-m.done:\n\tcase <-time.After(30 * time.Second):",
        "\tselect {\n\tcase <-m.done:\n\tcase <-time.After(1 * time.Second):",
    ),
    "no-pdeathsig": (
        POWER,
        "cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}",
        "cmd.SysProcAttr = &syscall.SysProcAttr{}",
    ),
    "destroy-running-allowed": (
        POWER,
        "if vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn {\n"
        "\t\treturn &types.InvalidPowerState",
        "if false {\n\t\treturn &types.InvalidPowerState",
    ),
    "power-on-ignores-qemu-failure": (
        POWER,
        'return &types.GenericVmConfigFault{VmConfigFault: types.VmConfigFault{}, Reason: "qemu: " + msg}',
        "return nil",
    ),
    "reset-keeps-tools-green": (
        POWER,
        "\tm.ready = false\n\tlabPower.Unlock()\n\tlabSetTools(vm, false)\n",
        "\tlabPower.Unlock()\n",
    ),
    "live-delta-without-parent-cid": (
        POWER,
        "return labSetParent(local, hint, parentLocal)",
        "return nil",
    ),
    "removal-merges-under-running-qemu": (
        SIM + "lab_disks.go",
        "\tif m := labMachineOf(vm); m != nil {\n\t\t// the VM runs",
        "\tif m := labMachineOf(vm); m != nil && false {\n\t\t// the VM runs",
    ),
    "live-consolidation-off": (
        SIM + "lab_disks.go",
        "if fault, done := labConsolidateLive(vm, m); done {",
        "if fault, done := types.BaseMethodFault(nil), m == nil; done {",
    ),
    "live-commit-drops-carry": (POWER, "\t\tp.d.carry = open\n", "\t\t_ = open\n"),
    "live-commit-no-fresh-delta": (
        POWER,
        "\t\tif fault := labNewDeltaLive(vm, p.d, p.disk, p.base, true); fault != nil {",
        "\t\tif fault := types.BaseMethodFault(nil); fault != nil {",
    ),
    "paging-one-byte-short": (
        SIM + "lab_cbt.go",
        "length = last.Start + last.Length - req.StartOffset\n",
        "length = last.Start + last.Length - req.StartOffset - 1\n",
    ),
    "paging-limit-off-by-one": (SIM + "lab_cbt.go", "if len(areas) == max {", "if len(areas) == max+1 {"),
    "changes-not-rounded": (
        SIM + "lab_disks.go",
        "start := e.Start / labTrackingBlock * labTrackingBlock\n"
        "\t\tend := (e.Start + e.Length + labTrackingBlock - 1) / labTrackingBlock * labTrackingBlock",
        "start := e.Start\n\t\tend := e.Start + e.Length",
    ),
    "epoch-reads-through-backing": (
        SIM + "lab_disks.go",
        '"driver": "vmdk", "backing": nil,',
        '"driver": "vmdk",',
    ),
    "consolidate-drops-child-data": (
        SIM + "lab_disks.go",
        'if _, err := labQemuImg("commit", "-q", "-d", "-f", "vmdk", labLocal(vm, child)); err != nil {',
        'if _, err := labQemuImg("info", labLocal(vm, child)); err != nil {',
    ),
    "consolidate-wrong-direction": (
        SIM + "lab_disks.go",
        "if !roots[p] && len(children[p]) == 1 {",
        "if roots[p] && len(children[p]) == 1 {",
    ),
    "revert-keeps-delta": (
        SIM + "lab_disks.go",
        "if f := labNewDelta(vm, d, disk, frozen[disk.Key]); f != nil && fault == nil {",
        "if f := types.BaseMethodFault(nil); f != nil && fault == nil {",
    ),
    "endpoint-ignores-auth": (
        SIM + "lab_disks.go",
        "u, p, ok := r.BasicAuth()",
        "u, p, ok := user.Username(), wantPass, true",
    ),
    "endpoint-snapshot-writable": (
        SIM + "lab_disks.go",
        '"writable":    snapRef == "" && vm.Runtime',
        '"writable":    vm.Runtime',
    ),
    "reset-keeps-ctk": (
        SIM + "lab_cbt.go",
        "if spec.ChangeTrackingEnabled == nil || *spec.ChangeTrackingEnabled || !was {",
        "if true || spec.ChangeTrackingEnabled == nil || *spec.ChangeTrackingEnabled || !was {",
    ),
    "revert-lineage-ignores-other-branch": (
        SIM + "lab_cbt.go",
        "\tfor _, s := range fromSide {\n\t\tout = append(out, d.epochs[s].extents...)",
        "\tfor _, s := range fromSide[:0] {\n\t\tout = append(out, d.epochs[s].extents...)",
    ),
    "removal-forgets-change-record": (
        SIM + "lab_disks.go",
        "\t\td := rec.disk(key)\n\t\troots := map[string]bool{}",
        "\t\td := rec.disk(key)\n\t\td.epochs = map[int]*labEpoch{}\n\t\troots := map[string]bool{}",
    ),
    "merge-forgets-open-epoch": (
        SIM + "lab_disks.go",
        "\t\t\t\td.carry = open\n",
        "\t\t\t\t_ = open\n",
    ),
    # (1) identical rewrites / the fresh delta after merging the running delta
    "no-fresh-delta-after-merge": (
        SIM + "lab_disks.go",
        "if remade && fault == nil {",
        "if false && remade && fault == nil {",
    ),
    "carry-counts-merged-file": (
        SIM + "lab_disks.go",
        "if child == current && !remade {",
        "if child == current {",
    ),
    "open-epoch-ignores-carry": (
        SIM + "lab_disks.go",
        "return labMerge(append(append([]labExtent(nil), d.carry...), now...)), nil",
        "return labMerge(now), nil",
    ),
    # (2) per-disk ctk reset
    "ctk-reset-resets-every-disk": (
        SIM + "lab_cbt.go",
        "labVM(vm.Self.Value).disk(int32(key)).labResetDisk()",
        "for _, d := range labVM(vm.Self.Value).disks {\n\t\t\td.labResetDisk()\n\t\t}",
    ),
    "ctk-reset-unknown-key-ok": (SIM + "lab_cbt.go", "if !found {", "if false && !found {"),
    # (3) extraConfig / SetField
    "extra-config-appends": (
        SIM + "lab_fixes.go",
        "\tval := c.GetOptionValue()\n\tremove := val.Value == nil\n",
        "\tif true {\n\t\treturn append(have, c)\n\t}\n"
        "\tval := c.GetOptionValue()\n\tremove := val.Value == nil\n",
    ),
    "extra-config-empty-kept": (SIM + "lab_fixes.go", 'ok && s == "" {', 'ok && s == "never" {'),
    "set-field-appends": (
        SIM + "lab_fixes.go",
        "if o.GetCustomFieldValue().Key == v.Key {",
        "if false && o.GetCustomFieldValue().Key == v.Key {",
    ),
    # (4) changeTrackingSupported
    "tracking-supported-on-any-hardware": (
        SIM + "lab_fixes.go",
        "types.NewBool(labHardwareVersion(vm.Config.Version) >= 7)",
        "types.NewBool(labHardwareVersion(vm.Config.Version) >= 0)",
    ),
    "old-hardware-enables-tracking": (
        SIM + "lab_fixes.go",
        "!*enable || labHardwareVersion(vm.Config.Version) >= 7 {",
        "!*enable || labHardwareVersion(vm.Config.Version) >= 0 {",
    ),
    # (5) revert restores the config
    "revert-keeps-current-config": (
        SIM + "lab_fixes.go",
        "cfg := labConfigCopy(&snapshot.Config)",
        "cfg := labConfigCopy(vm.Config)",
    ),
    "snapshot-shares-config": (
        SIM + "lab_cbt.go",
        "snapshot.Config = labConfigCopy(vm.Config)",
        "snapshot.Config = *vm.Config",
    ),
    "snapshot-names-the-new-delta": (
        SIM + "lab_cbt.go",
        "\t\tcopied := *disk\n\t\tbc := *b\n",
        "\t\tif fault == nil {\n\t\t\tfault = labNewDelta(vm, d, disk, frozen)\n\t\t}\n"
        "\t\tb = disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)\n\t\tcopied := *disk\n\t\tbc := *b\n",
    ),
    # linked clones and portgroups (tests/labs/test_vsphere_lab_clone.py)
    "clone-shares-source-devices": (
        CLONE,
        "cfg := labConfigCopy(srcConfig) // never touch the source's structs",
        "cfg := *srcConfig",
    ),
    "clone-from-current-not-snapshot": (CLONE, "\t\tsrcConfig = &s.Config\n", "\t\t_ = s.Config\n"),
    "consolidation-ignores-clones": (
        CLONE,
        '\t\t\t\tout[f] = true\n\t\t\t\tif p != "" {',
        '\t\t\t\t_ = f\n\t\t\t\tif false && p != "" {',
    ),
    "destroy-deletes-clones-parent-files": (
        CLONE,
        'if strings.HasPrefix(labAbs(labLocal(vm, f)), dir+"/") {',
        'if false && strings.HasPrefix(labAbs(labLocal(vm, f)), dir+"/") {',
    ),
    "clone-delta-without-parent": (
        CLONE,
        "labCreateDeltaOf(local, labAbs(labLocal(vm, b.FileName)),",
        'labCreateDeltaOf(local, "",',
    ),
    "clone-ignores-config-spec": (
        CLONE,
        "if c := spec.Config; c != nil {",
        "if c := spec.Config; c != nil && false {",
    ),
    "clone-shares-ctk": (
        CLONE,
        '\t\t\td.parents = map[string]string{cd.file: ""}\n',
        '\t\t\td.parents = map[string]string{cd.file: ""}\n\t\t\td.ctk = srcRec.disk(disk.Key).ctk\n',
    ),
    "clone-epoch-only-own-delta": (
        CLONE,
        "d.epochs[1] = &labEpoch{seq: 1, extents: labMerge(start)}",
        "d.epochs[1] = &labEpoch{seq: 1, extents: nil}",
    ),
    "portgroup-remove-in-use-allowed": (
        CLONE,
        "if b.DeviceName == c.PgName || (network != nil",
        "if false && b.DeviceName == c.PgName || false && (network != nil",
    ),
    "portgroup-not-in-host-network": (
        CLONE,
        "if FindReference(h.Network, network.Self) == nil {",
        "if false && FindReference(h.Network, network.Self) == nil {",
    ),
    # growing a disk (tests/labs/test_vsphere_lab_extend.py)
    "grow-keeps-old-size-in-delta": (
        EXTEND,
        "\t\tif fault := labNewDelta(vm, d, disk, base); fault != nil {",
        "\t\td.parents[top] = base\n"
        '\t\t_, _ = labQemuImg("create", "-q", "-f", "vmdk", "-b", labBackingRef(vm, top, base),'
        ' "-F", "vmdk", labLocal(vm, top), fmt.Sprint(have))\n'
        "\t\tnb.FileName = top\n\t\tnb.Parent = labChain(d, base, &nb)\n"
        "\t\tif fault := types.BaseMethodFault(nil); fault != nil {",
    ),
    "grow-allowed-with-snapshots": (
        EXTEND,
        "if vm.Snapshot != nil && len(vm.Snapshot.RootSnapshotList) > 0 {",
        "if false {",
    ),
    "grow-loses-data": (
        EXTEND,
        '"convert", "-n", "--target-is-zero", "-f", "vmdk", "-O", "vmdk", labLocal(vm, top), tmp)',
        '"info", tmp)',
    ),
    "grow-shrink-allowed": (EXTEND, "\t\tif size < have {", "\t\tif false {"),
    "grow-forgets-open-epoch": (EXTEND, "\td.carry = open\n", "\t_ = open\n"),
    "grow-ignores-linked-clones": (EXTEND, "\t\tif pinned[f] {", "\t\tif false && pinned[f] {"),
    "grow-config-only": (
        EXTEND,
        "if fault := labGrowDisk(vm, disk, have, size, withParents); fault != nil {",
        "if fault := types.BaseMethodFault(nil); fault != nil {",
    ),
    # NFC uploads (tests/labs/test_vsphere_lab_nfc.py)
    "nfc-upload-discarded": (NFC, "\terr = os.Rename(made, local)\n", "\terr = nil\n\t_ = local\n"),
    "nfc-abort-keeps-vm": (
        NFC,
        "if vm, ok := Map.Get(l.Info.Entity).(*VirtualMachine); ok {",
        "if vm, ok := Map.Get(l.Info.Entity).(*VirtualMachine); ok && false {",
    ),
    "nfc-wrong-disk-order": (NFC, "path.Base(b.FileName) == name {", "path.Base(b.FileName) != name {"),
    "nfc-image-size-not-capacity": (NFC, "made, fmt.Sprint(capacity))", "made, fmt.Sprint(info.Size))"),
}

POWER_BUGS = {n for n, (p, _, _) in BUGS.items() if p == POWER} | {
    "removal-merges-under-running-qemu",
    "live-consolidation-off",
}


CLONE_BUGS = {n for n, (p, _, _) in BUGS.items() if p == CLONE}
EXTEND_BUGS = {n for n, (p, _, _) in BUGS.items() if p == EXTEND}
NFC_BUGS = {n for n, (p, _, _) in BUGS.items() if p == NFC}
BASE_MODULES = [
    "tests/labs/test_vsphere_lab_disks.py",
    "tests/labs/test_vsphere_lab_smoke.py",
    "tests/labs/test_vsphere_lab_config.py",
]
MODULES = {
    n: (
        ["tests/labs/test_vsphere_lab_disks.py", "tests/labs/test_vsphere_lab_clone.py"]
        if n in CLONE_BUGS
        else ["tests/labs/test_vsphere_lab_extend.py", "tests/labs/test_vsphere_lab_disks.py"]
        if n in EXTEND_BUGS
        else ["tests/labs/test_vsphere_lab_nfc.py", "tests/labs/test_vsphere_lab_smoke.py"]
        if n in NFC_BUGS
        else [*BASE_MODULES, *(["tests/labs/test_vsphere_lab_power.py"] if n in POWER_BUGS else [])]
    )
    for n in BUGS
}


def main(names: list[str]) -> int:
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "labs/vsphere/overlay"],
        cwd=WT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if dirty:
        print(
            "labs/vsphere/overlay has uncommitted changes; commit them first "
            "(planted bugs are undone with git checkout)"
        )
        return 2
    for name in names or list(BUGS):
        run_one(name)
    return 0


def run_one(name: str) -> None:
    path, old, new = BUGS[name]
    full = os.path.join(WT, path)
    src = Path(full).read_text()
    assert src.count(old) == 1, (name, src.count(old))
    Path(full).write_text(src.replace(old, new))
    try:
        env = {
            **os.environ,
            "SENDENSE_VCSIM_CACHE": os.environ.get("SENDENSE_VCSIM_BUGS_CACHE", "/tmp/vcsim-lab-bugs"),
        }
        b = subprocess.run(["bash", "labs/vsphere/build.sh"], cwd=WT, env=env, capture_output=True, text=True)
        if b.returncode:
            print(name, "BUILD FAILED", b.stderr[-800:])
            return
        env["SENDENSE_VCSIM_BIN"] = b.stdout.strip().splitlines()[-1]
        t = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-o",
                "addopts=-rf",
                *MODULES[name],
            ],
            cwd=WT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        sections = re.split(r"^_+ (test\S+) _+$", t.stdout, flags=re.M)[1:]
        summary = t.stdout.strip().splitlines()[-1]
        print(f"{name}: {summary}")
        for test, body in zip(sections[::2], sections[1::2], strict=True):
            why = next((line[1:].strip() for line in body.splitlines() if line.startswith("E ")), "")
            print("   ", test, "--", why[:150])
    finally:
        subprocess.run(["git", "checkout", "--", path], cwd=WT, check=True)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
