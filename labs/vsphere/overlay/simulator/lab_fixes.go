package simulator

// Sendense lab: fixes of vcsim (govmomi 0.24.2) bugs, called from the one-line hooks in ../patches/*.patch.

import (
	"path"

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
