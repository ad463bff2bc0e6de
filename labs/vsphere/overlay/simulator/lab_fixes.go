package simulator

// Sendense lab: fixes of vcsim (govmomi 0.24.2) bugs, called from the one-line hooks in ../patches/*.patch.

import (
	"path"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// labSnapshotTask creates a RemoveSnapshot/RevertToSnapshot task whose entity is the snapshot's VM, as on
// vSphere. Stock vcsim reports the snapshot, which is not a ManagedEntity: pyvmomi fails to deserialize
// TaskInfo ("For "entity" expected type vim.ManagedEntity"), so pyVim's WaitForTask raises TypeError.
func labSnapshotTask(v *VirtualMachineSnapshot, name string, run func(*Task) (types.AnyType, types.BaseMethodFault)) *Task {
	vm := Map.Get(v.Vm).(*VirtualMachine)
	task := CreateTask(vm, name, run)
	task.Info.EntityName = vm.Name
	return task
}

// labDatastoreFile is the local path of a "[ds] path" file of vm. Stock RefreshStorageInfo stat'ed the
// "[ds] path" string itself, so every layoutEx file looked missing and was re-added with a new key; a
// snapshot's dataKey then named another file (the base disk), which removeSnapshotFiles deleted.
func labDatastoreFile(vm *VirtualMachine, p *object.DatastorePath) string {
	ds := vm.findDatastore(p.Datastore)
	if ds == nil {
		return p.String()
	}
	return path.Join(ds.Info.GetDatastoreInfo().Url, p.Path)
}

// labIsSnapshotFile: snapshot removal deletes only the snapshot's own files (.vmsn, .vmem), never a disk.
// vcsim makes no delta disks, so consolidation has nothing to merge: the VM keeps its base disk.
func labIsSnapshotFile(f types.VirtualMachineFileLayoutExFileInfo) bool {
	switch types.VirtualMachineFileLayoutExFileType(f.Type) {
	case types.VirtualMachineFileLayoutExFileTypeSnapshotData, types.VirtualMachineFileLayoutExFileTypeSnapshotMemory:
		return true
	}
	return false
}

// labNormalizeDiskCapacity makes capacityInBytes and capacityInKB agree (bytes win when both are set, as
// vSphere does); stock vcsim left capacityInBytes 0 on its default 1 MiB disks.
func labNormalizeDiskCapacity(d *types.VirtualDisk) {
	switch {
	case d.CapacityInBytes > 0:
		d.CapacityInKB = d.CapacityInBytes / 1024
	case d.CapacityInKB > 0:
		d.CapacityInBytes = d.CapacityInKB * 1024
	}
}

// labLeaseComplete: on vSphere a completed lease stays readable with state "done" (its entity imported);
// stock vcsim deleted it, so reading lease.state after HttpNfcLeaseComplete faulted ManagedObjectNotFound.
// Uploads to the lease's URLs stop; completing a lease that is not "ready" is InvalidState.
func labLeaseComplete(ctx *Context, l *HttpNfcLease) soap.HasFault {
	body := new(methods.HttpNfcLeaseCompleteBody)
	if l.State != types.HttpNfcLeaseStateReady {
		body.Fault_ = Fault("lease is "+string(l.State), &types.InvalidState{})
		return body
	}
	nfcLease.Delete(l.Self)
	Map.Update(l, []types.PropertyChange{
		{Name: "state", Val: types.HttpNfcLeaseStateDone},
		{Name: "transferProgress", Val: int32(100)},
	})
	body.Res = new(types.HttpNfcLeaseCompleteResponse)
	return body
}

// labRefOrNil: an untyped nil for a nil reference (removing the current snapshot when it is a root one:
// stock vcsim passed a typed nil pointer to Map.Update, which panicked and dropped the SOAP connection).
func labRefOrNil(ref *types.ManagedObjectReference) types.AnyType {
	if ref == nil {
		return nil
	}
	return *ref
}

// labHardwareVersion: the number of a "vmx-NN" virtual hardware version (0 when it is not one).
func labHardwareVersion(v string) int {
	n, err := strconv.Atoi(strings.TrimPrefix(v, "vmx-"))
	if err != nil || !strings.HasPrefix(v, "vmx-") {
		return 0
	}
	return n
}

// labSetCapability: capability.changeTrackingSupported as vSphere reports it: true from virtual hardware
// vmx-07 on, false before (stock vcsim left it unset). Called when a VM is created, reconfigured, upgraded.
func labSetCapability(vm *VirtualMachine) {
	vm.Capability.ChangeTrackingSupported = types.NewBool(labHardwareVersion(vm.Config.Version) >= 7)
}

// labTrackingUnsupported: the fault vSphere gives for enabling change tracking on hardware older than vmx-07.
func labTrackingUnsupported(vm *VirtualMachine, enable *bool) types.BaseMethodFault {
	if enable == nil || !*enable || labHardwareVersion(vm.Config.Version) >= 7 {
		return nil
	}
	return &types.NotSupported{RuntimeFault: types.RuntimeFault{MethodFault: types.MethodFault{
		FaultMessage: []types.LocalizableMessage{{Key: "msg.cbt.unsupported",
			Message: "change tracking needs virtual hardware vmx-07 or later, the VM has " + vm.Config.Version}},
	}}}
}

// labCreated is called by create once the spec is applied: the capability, and a VM of hardware older than
// vmx-07 cannot be created with change tracking on.
func labCreated(vm *VirtualMachine, spec *types.VirtualMachineConfigSpec) types.BaseMethodFault {
	labSetCapability(vm)
	return labTrackingUnsupported(vm, spec.ChangeTrackingEnabled)
}

// labSetExtraConfig applies one extraConfig OptionValue as vSphere does: a key already there gets the new
// value, an empty value ("" or unset) removes the key, a new key is added. Stock vcsim appended every
// OptionValue, so a key could appear several times and never be removed. A new slice is built, so a
// snapshot's config never shares the VM's.
func labSetExtraConfig(have []types.BaseOptionValue, c types.BaseOptionValue) []types.BaseOptionValue {
	val := c.GetOptionValue()
	remove := val.Value == nil
	if s, ok := val.Value.(string); ok && s == "" {
		remove = true
	}
	out := make([]types.BaseOptionValue, 0, len(have)+1)
	replaced := false
	for _, o := range have {
		if o.GetOptionValue().Key != val.Key {
			out = append(out, o)
			continue
		}
		if !remove && !replaced {
			out = append(out, &types.OptionValue{Key: val.Key, Value: val.Value})
			replaced = true
		}
	}
	if !remove && !replaced {
		out = append(out, &types.OptionValue{Key: val.Key, Value: val.Value})
	}
	return out
}

// labSetCustomValue: CustomFieldsManager.SetField replaces the entity's value for that key (stock vcsim
// appended another one); customValue and value stay alike.
func labSetCustomValue(values []types.BaseCustomFieldValue, v *types.CustomFieldStringValue) []types.BaseCustomFieldValue {
	out := make([]types.BaseCustomFieldValue, 0, len(values)+1)
	replaced := false
	for _, o := range values {
		if o.GetCustomFieldValue().Key == v.Key {
			if !replaced {
				out = append(out, v)
				replaced = true
			}
			continue
		}
		out = append(out, o)
	}
	if !replaced {
		out = append(out, v)
	}
	return out
}

// labConfigCopy: a deep copy of a VM's configuration (vcsim's snapshots shared the VM's config structs, so
// a later reconfigure changed the snapshot too).
func labConfigCopy(c *types.VirtualMachineConfigInfo) types.VirtualMachineConfigInfo {
	var out types.VirtualMachineConfigInfo
	deepCopy(c, &out)
	return out
}

// labRestoreConfig: RevertToSnapshot restores the VM's configuration as of the snapshot (devices, extraConfig,
// CPU, memory, change tracking, ...), as vSphere does; the inventory name stays, and custom field values
// (entity.customValue) are not part of the config. The disks are then put on new deltas (labReverted).
func labRestoreConfig(vm *VirtualMachine, snapshot *VirtualMachineSnapshot) {
	cfg := labConfigCopy(&snapshot.Config)
	cfg.Name = vm.Config.Name
	vm.Config = &cfg
	vm.Summary.Config.NumCpu = cfg.Hardware.NumCPU
	vm.Summary.Config.MemorySizeMB = cfg.Hardware.MemoryMB
	labSetCapability(vm)
}
