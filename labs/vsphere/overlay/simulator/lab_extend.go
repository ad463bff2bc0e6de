// Sendense vSphere lab: growing a VM disk (ReconfigVM_Task, deviceChange operation "edit" of a VirtualDisk
// with a larger capacityInBytes / capacityInKB).
//
// vSphere extends a disk only when it has no parents: with snapshots (or a linked clone's delta) the
// reconfigure fails with InvalidDeviceOperation "Invalid operation for device '0'. Disks with parents cannot
// be expanded."; a smaller capacity is refused. QEMU cannot resize a VMDK (`qemu-img resize`: "Image format
// driver does not support resize"), so the lab makes the disk anew: the current chain (base + the fresh
// delta the lab leaves after a consolidation) is converted into a new base file of the new size (same
// name, thin: holes stay holes), the old delta is deleted and the VM is put on a fresh empty delta of the
// new size, so every file of the chain has the new capacity. The change record goes on: the open epoch
// so far (every grain written since the last snapshot) is carried, the changeIds stay valid, the grown
// region is no change (it reads zeros) until something writes it.

package simulator

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/vmware/govmomi/vim25/types"
)

func labDeviceFault(fault types.BaseMethodFault, key, msg string) types.BaseMethodFault {
	fault.GetMethodFault().FaultMessage = []types.LocalizableMessage{{Key: key, Message: msg}}
	return fault
}

// labGrowDisks is called by labReconfigure before the spec is applied: every "edit" of a VirtualDisk
// whose capacity differs from the disk's is checked and, when allowed, the disk file is grown. The spec's
// device then carries the new backing and both capacity fields agree.
func labGrowDisks(vm *VirtualMachine, spec *types.VirtualMachineConfigSpec) types.BaseMethodFault {
	for i, change := range spec.DeviceChange {
		dspec := change.GetVirtualDeviceConfigSpec()
		want, ok := dspec.Device.(*types.VirtualDisk)
		if !ok || dspec.Operation != types.VirtualDeviceConfigSpecOperationEdit {
			continue
		}
		var disk *types.VirtualDisk
		for _, dev := range vm.Config.Hardware.Device {
			if d, ok := dev.(*types.VirtualDisk); ok && d.Key == want.Key {
				disk = d
			}
		}
		if disk == nil {
			continue // vcsim's edit answers an unknown key
		}
		have := labDiskCapacity(disk)
		// pyvmomi's usual form is the config's device with one of the two fields changed: the changed one
		// counts (bytes when both changed)
		size := have
		switch {
		case want.CapacityInBytes > 0 && want.CapacityInBytes != have:
			size = want.CapacityInBytes
		case want.CapacityInKB > 0 && want.CapacityInKB*1024 != have:
			size = want.CapacityInKB * 1024
		}
		want.CapacityInBytes, want.CapacityInKB = size, size/1024
		if size == have {
			continue
		}
		index := int32(i)
		if size < have {
			return labDeviceFault(&types.InvalidDeviceSpec{DeviceIndex: index, InvalidVmConfig: types.InvalidVmConfig{Property: "capacityInBytes"}},
				"msg.disk.noShrink", fmt.Sprintf("Invalid configuration for device '%d'. The disk cannot be shrunk (%d < %d bytes).", i, size, have))
		}
		if size%512 != 0 {
			return labDeviceFault(&types.InvalidDeviceSpec{DeviceIndex: index, InvalidVmConfig: types.InvalidVmConfig{Property: "capacityInBytes"}},
				"msg.disk.badSize", fmt.Sprintf("Invalid configuration for device '%d'. The capacity %d is not a multiple of 512 bytes.", i, size))
		}
		withParents := func(why string) types.BaseMethodFault {
			return labDeviceFault(&types.InvalidDeviceOperation{InvalidDeviceSpec: types.InvalidDeviceSpec{DeviceIndex: index}, BadOp: dspec.Operation},
				"msg.disk.hasParents", fmt.Sprintf("Invalid operation for device '%d'. Disks with parents cannot be expanded (%s).", i, why))
		}
		if vm.Snapshot != nil && len(vm.Snapshot.RootSnapshotList) > 0 {
			return withParents("the virtual machine has snapshots")
		}
		if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
			// vSphere hot-extends a SCSI disk without snapshots; QEMU's vmdk driver cannot resize
			return labDeviceFault(&types.NotSupported{},
				"msg.lab.hotExtend", fmt.Sprintf("the lab cannot extend a disk of a %s virtual machine (QEMU cannot resize a VMDK): power it off first", vm.Runtime.PowerState))
		}
		if fault := labGrowDisk(vm, disk, have, size, withParents); fault != nil {
			return fault
		}
		want.Backing = disk.Backing
	}
	return nil
}

// labGrowDisk makes the disk's chain one base file of the new size (the same bytes, holes kept) with the VM
// on a fresh delta over it when it ran on a delta before.
func labGrowDisk(vm *VirtualMachine, disk *types.VirtualDisk, have, size int64, withParents func(string) types.BaseMethodFault) types.BaseMethodFault {
	labCBT.Lock()
	defer labCBT.Unlock()
	b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	if !ok {
		return withParents("not a flat disk")
	}
	d := labVM(vm.Self.Value).disk(disk.Key)
	pinned := labPinned(vm)
	top := b.FileName
	var chain []string // top first
	for f := top; f != ""; f = d.parents[f] {
		if pinned[f] {
			return withParents(f + " is shared with a linked clone")
		}
		chain = append(chain, f)
	}
	base := chain[len(chain)-1]
	// the open epoch so far: every write since the last snapshot, whatever file it is in now
	open, err := d.labOpenChanges(labLocal(vm, top))
	if err != nil {
		return labCannotFault(top, err)
	}
	baseLocal := labLocal(vm, base)
	tmp := filepath.Join(filepath.Dir(baseLocal), ".grow-"+filepath.Base(baseLocal))
	_ = os.Remove(tmp)
	if _, err := labQemuImg("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", tmp, fmt.Sprint(size)); err != nil {
		return labCannotFault(base, err)
	}
	if _, err := labQemuImg("convert", "-n", "--target-is-zero", "-f", "vmdk", "-O", "vmdk", labLocal(vm, top), tmp); err != nil {
		_ = os.Remove(tmp)
		return labCannotFault(top, err)
	}
	for _, f := range chain[:len(chain)-1] {
		_ = os.Remove(labLocal(vm, f))
		delete(d.parents, f)
	}
	if err := os.Rename(tmp, baseLocal); err != nil {
		return labCannotFault(base, err)
	}
	d.parents[base] = ""
	d.carry = open
	disk.CapacityInBytes, disk.CapacityInKB = size, size/1024
	nb := *b
	nb.FileName = base
	nb.Parent = nil
	disk.Backing = &nb
	if top != base {
		// sealed epochs' data is in the base now: the VM writes into a fresh delta, as after a consolidation
		if fault := labNewDelta(vm, d, disk, base); fault != nil {
			return fault
		}
	}
	labRefreshLayouts(vm)
	log.Printf("sendense lab: %s: disk %d grown from %d to %d bytes, now on %s", vm.Name, disk.Key, have, size, disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName)
	return nil
}
