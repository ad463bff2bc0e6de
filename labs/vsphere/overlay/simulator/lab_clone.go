// Sendense vSphere lab: clones (CloneVM_Task) with real disks, linked clones from a snapshot, files shared
// between VMs, and standard portgroups that make Network objects (HostNetworkSystem.AddPortGroup).
//
// Stock vcsim's CloneVMTask ignored spec.snapshot and diskMoveType, made empty disks and cleared the
// source VM's own disk backings in place (disk.Backing.FileName = "" on the shared device struct).

package simulator

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// labCloneVMTask replaces vcsim's CloneVMTask (patched virtual_machine.go).
func labCloneVMTask(ctx *Context, vm *VirtualMachine, req *types.CloneVM_Task) soap.HasFault {
	task := CreateTask(vm, "cloneVm", func(t *Task) (types.AnyType, types.BaseMethodFault) {
		return labClone(ctx, vm, req)
	})
	return &methods.CloneVM_TaskBody{Res: &types.CloneVM_TaskResponse{Returnval: task.Run()}}
}

// labCloneDisk: one disk of the clone: the source file it starts from (the snapshot's frozen file, or the
// current top file for a full clone of the current state) and the clone's own file.
type labCloneDisk struct {
	key       int32
	src, file string
}

func labClone(ctx *Context, vm *VirtualMachine, req *types.CloneVM_Task) (types.AnyType, types.BaseMethodFault) {
	spec := req.Spec
	pool := spec.Location.Pool
	if pool == nil && !vm.Config.Template {
		pool = vm.ResourcePool
	}
	if pool == nil {
		return nil, &types.InvalidArgument{InvalidProperty: "spec.location.pool"}
	}
	folder, ok := asFolderMO(Map.Get(req.Folder))
	if !ok {
		return nil, &types.InvalidArgument{InvalidProperty: "folder"}
	}
	if req.Name == "" {
		return nil, &types.InvalidArgument{InvalidProperty: "name"}
	}
	if obj := Map.FindByName(req.Name, folder.ChildEntity); obj != nil {
		return nil, &types.DuplicateName{Name: req.Name, Object: obj.Reference()}
	}

	// what the clone is made of: the snapshot's config, or the VM's current one
	var snapshot *VirtualMachineSnapshot
	srcConfig := vm.Config
	if spec.Snapshot != nil {
		s, ok := Map.Get(*spec.Snapshot).(*VirtualMachineSnapshot)
		if !ok || s.Vm != vm.Self {
			return nil, &types.InvalidArgument{InvalidProperty: "spec.snapshot"}
		}
		snapshot = s
		srcConfig = &s.Config
	}
	linked := snapshot != nil && spec.Location.DiskMoveType == string(types.VirtualMachineRelocateDiskMoveOptionsCreateNewChildDiskBacking)
	cfg := labConfigCopy(srcConfig) // never touch the source's structs

	// the clone's directory on its datastore (vSphere: "<name>", "<name>_1", ... when taken)
	dsName := ""
	if p, fault := parseDatastorePath(vm.Config.Files.VmPathName); fault == nil {
		dsName = p.Datastore
	}
	if ref := spec.Location.Datastore; ref != nil {
		ds, ok := Map.Get(*ref).(*Datastore)
		if !ok {
			return nil, &types.InvalidArgument{InvalidProperty: "spec.location.datastore"}
		}
		dsName = ds.Name
	}
	var dir string
	for i := 0; ; i++ {
		dir = req.Name
		if i > 0 {
			dir = fmt.Sprintf("%s_%d", req.Name, i)
		}
		if _, err := os.Stat(labLocal(vm, fmt.Sprintf("[%s] %s", dsName, dir))); os.IsNotExist(err) {
			break
		}
		if i > 100 {
			return nil, &types.FileAlreadyExists{FileFault: types.FileFault{File: dir}}
		}
	}
	dirPath := fmt.Sprintf("[%s] %s", dsName, dir)
	if err := os.MkdirAll(labLocal(vm, dirPath), 0o700); err != nil {
		return nil, labCannotFault(dirPath, err)
	}
	cleanup := true
	defer func() {
		if cleanup {
			_ = os.RemoveAll(labLocal(vm, dirPath))
		}
	}()

	// the disk files: a delta on the snapshot's frozen file (linked), or a full copy of the chain
	labCBT.Lock()
	var disks []labCloneDisk
	srcRec := labVM(vm.Self.Value)
	chains := map[int32]map[string]string{} // key -> the source's chain below the clone's file
	n := 0
	for _, dev := range cfg.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		stem := req.Name
		if n > 0 {
			stem = fmt.Sprintf("%s_%d", req.Name, n)
		}
		n++
		cd := labCloneDisk{key: disk.Key, src: b.FileName}
		var err error
		if linked {
			cd.file = fmt.Sprintf("%s/%s-000001.vmdk", dirPath, stem)
			chain := map[string]string{}
			d := srcRec.disk(disk.Key)
			for f := b.FileName; f != ""; f = d.parents[f] {
				if _, seen := chain[f]; seen {
					break
				}
				chain[f] = d.parents[f]
			}
			chains[disk.Key] = chain
			local := labLocal(vm, cd.file)
			// made without opening the frozen file (the source may run: its QEMU holds the chain)
			err = labCreateDeltaOf(local, labAbs(labLocal(vm, b.FileName)), labLocal(vm, b.FileName), labDiskCapacity(disk))
		} else {
			cd.file = fmt.Sprintf("%s/%s.vmdk", dirPath, stem)
			// a full copy of the chain's bytes (force-share: the source may run)
			_, err = labQemuImg("convert", "-U", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=monolithicSparse",
				labLocal(vm, b.FileName), labLocal(vm, cd.file))
		}
		if err != nil {
			labCBT.Unlock()
			return nil, labCannotFault(cd.file, err)
		}
		disks = append(disks, cd)
	}
	labCBT.Unlock()

	// the clone: vcsim's CreateVM with the snapshot's config (devices other than vcsim's defaults; disks
	// attach the files made above)
	create := types.VirtualMachineConfigSpec{
		Name:                  req.Name,
		GuestId:               cfg.GuestId,
		Version:               cfg.Version,
		Annotation:            cfg.Annotation,
		Firmware:              cfg.Firmware,
		ChangeTrackingEnabled: cfg.ChangeTrackingEnabled,
		NumCPUs:               cfg.Hardware.NumCPU,
		NumCoresPerSocket:     cfg.Hardware.NumCoresPerSocket,
		MemoryMB:              int64(cfg.Hardware.MemoryMB),
		VirtualICH7MPresent:   cfg.Hardware.VirtualICH7MPresent,
		VirtualSMCPresent:     cfg.Hardware.VirtualSMCPresent,
		ExtraConfig:           cfg.ExtraConfig,
		BootOptions:           cfg.BootOptions,
		Files:                 &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("%s/%s.vmx", dirPath, req.Name)},
	}
	defaults := object.VirtualDeviceList(esx.VirtualDevice)
	devices := object.VirtualDeviceList(cfg.Hardware.Device)
	for _, dev := range cfg.Hardware.Device {
		if defaults.Find(devices.Name(dev)) != nil {
			continue // vcsim's CreateVM adds its default devices itself
		}
		if disk, ok := dev.(*types.VirtualDisk); ok {
			for _, cd := range disks {
				if cd.key != disk.Key {
					continue
				}
				b := *disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
				b.FileName = cd.file
				b.ChangeId = ""
				b.Parent = nil
				if linked {
					b.Parent = labChain(&labDiskCBT{parents: chains[disk.Key]}, cd.src, &b)
				}
				b.Uuid = ""
				disk.Backing = &b
			}
		}
		create.DeviceChange = append(create.DeviceChange, &types.VirtualDeviceConfigSpec{
			Operation: types.VirtualDeviceConfigSpecOperationAdd,
			Device:    dev,
		})
	}
	res := Map.Get(req.Folder).(vmFolder).CreateVMTask(ctx, &types.CreateVM_Task{
		This:   folder.Self,
		Config: create,
		Pool:   *pool,
		Host:   labHostOr(spec.Location.Host, vm.Runtime.Host),
	})
	ctask := Map.Get(res.(*methods.CreateVM_TaskBody).Res.Returnval).(*Task)
	if ctask.Info.Error != nil {
		return nil, ctask.Info.Error.Fault
	}
	cleanup = false
	ref := ctask.Info.Result.(types.ManagedObjectReference)
	clone := Map.Get(ref).(*VirtualMachine)

	// the clone's change record: its own ctk per disk; its chain (the source's files below its delta, which
	// the source's consolidation then keeps: labPinned); a first epoch = what the chain it starts from has
	labCBT.Lock()
	rec := labVM(clone.Self.Value)
	var fault types.BaseMethodFault
	for _, dev := range clone.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		for _, cd := range disks {
			if cd.file != b.FileName {
				continue
			}
			d := rec.disk(disk.Key)
			d.parents = map[string]string{cd.file: ""}
			var start []labExtent
			if linked {
				d.parents[cd.file] = cd.src
				for f, p := range chains[cd.key] {
					d.parents[f] = p
					xs, err := labAllocated(labLocal(vm, f))
					if err != nil && fault == nil {
						fault = labCannotFault(f, err)
					}
					start = append(start, xs...)
				}
			} else {
				xs, err := labAllocated(labLocal(vm, cd.file))
				if err != nil && fault == nil {
					fault = labCannotFault(cd.file, err)
				}
				start = xs
			}
			d.seq = 1
			d.ctkSince = 2 // "<ctk>/1" was never handed out
			d.open = 1
			d.epochs[1] = &labEpoch{seq: 1, extents: labMerge(start)}
			nb := *b
			nb.Parent = labChain(d, d.parents[cd.file], &nb)
			disk.Backing = &nb
		}
	}
	labRefreshLayouts(clone)
	labCBT.Unlock()
	if fault != nil {
		return nil, fault
	}

	// spec.config, applied as a reconfigure
	if c := spec.Config; c != nil {
		cs := *c
		cs.Name, cs.Files = "", nil
		if fault := labReconfigure(clone, &cs); fault != nil {
			return nil, fault
		}
		if fault := clone.configure(&cs); fault != nil {
			return nil, fault
		}
		labSetCapability(clone)
	}
	if spec.Template {
		_ = clone.MarkAsTemplate(&types.MarkAsTemplate{This: clone.Self})
	}
	if spec.PowerOn {
		pres := clone.PowerOnVMTask(ctx, &types.PowerOnVM_Task{This: clone.Self})
		if ptask, ok := Map.Get(pres.(*methods.PowerOnVM_TaskBody).Res.Returnval).(*Task); ok && ptask.Info.Error != nil {
			return nil, ptask.Info.Error.Fault
		}
	}
	ctx.postEvent(&types.VmClonedEvent{VmCloneEvent: types.VmCloneEvent{VmEvent: clone.event()}, SourceVm: *vm.event().Vm})
	return ref, nil
}

func labHostOr(a, b *types.ManagedObjectReference) *types.ManagedObjectReference {
	if a != nil {
		return a
	}
	return b
}

func labAbs(p string) string {
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// labPinned: the files other VMs' disk chains use (a linked clone's parents; for the clone, its source's
// files), which vm's consolidation never deletes, merges into another file or merges another file into
// (caller holds labCBT).
func labPinned(vm *VirtualMachine) map[string]bool {
	out := map[string]bool{}
	for ref, rec := range labCBT.vms {
		if ref == vm.Self.Value {
			continue
		}
		for _, d := range rec.disks {
			for f, p := range d.parents {
				out[f] = true
				if p != "" {
					out[p] = true
				}
			}
		}
	}
	return out
}

// labPinnedRoots adds the pinned files of a disk's record to roots (so they are kept and never merged into).
func labPinnedRoots(d *labDiskCBT, roots, pinned map[string]bool) {
	for f := range d.parents {
		if pinned[f] {
			roots[f] = true
		}
	}
}

// labDestroyShared: Destroy_Task of a VM whose directory holds a file another VM's disk chain uses (a
// linked clone's parent) is refused (vSphere deletes the files it can and keeps those; the lab does not
// do partial deletes). Otherwise the VM's change record is dropped (its files are about to be deleted, so
// they must not stay pinned).
func labDestroyShared(vm *VirtualMachine) types.BaseMethodFault {
	labCBT.Lock()
	defer labCBT.Unlock()
	dir := labAbs(labLocal(vm, vm.Config.Files.LogDirectory))
	if p, fault := parseDatastorePath(vm.Config.Files.VmPathName); fault == nil && vm.Config.Files.LogDirectory == "" {
		dir = labAbs(path.Dir(labDatastoreFile(vm, p)))
	}
	for ref, rec := range labCBT.vms {
		if ref == vm.Self.Value {
			continue
		}
		for _, d := range rec.disks {
			for f := range d.parents {
				if strings.HasPrefix(labAbs(labLocal(vm, f)), dir+"/") {
					name := ref
					if other, ok := Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: ref}).(*VirtualMachine); ok {
						name = other.Name
					}
					return &types.ResourceInUse{Type: "VirtualMachine", Name: fmt.Sprintf("%s (uses %s)", name, f)}
				}
			}
		}
	}
	delete(labCBT.vms, vm.Self.Value)
	return nil
}

// labNicNetwork: the Network a NIC's VirtualEthernetCardNetworkBackingInfo names (network moref, else
// deviceName). Stock vcsim looked the name up only and panicked (nil Reference()) on an unknown one.
func labNicNetwork(dc *Datacenter, b *types.VirtualEthernetCardNetworkBackingInfo) (types.ManagedObjectReference, types.BaseMethodFault) {
	if b.Network != nil {
		for _, ref := range dc.Network {
			if ref == *b.Network {
				if e, ok := Map.Get(ref).(mo.Entity); ok {
					if b.DeviceName == "" {
						b.DeviceName = e.Entity().Name
					}
					return ref, nil
				}
			}
		}
	}
	if e := Map.FindByName(b.DeviceName, dc.Network); e != nil {
		return e.Reference(), nil
	}
	return types.ManagedObjectReference{}, &types.InvalidDeviceBacking{}
}

// labAddPortGroup: HostNetworkSystem.AddPortGroup. A standard portgroup is a Network managed object in the
// datacenter's network folder, listed in host.network, shared by every host with a portgroup of that name
// (stock vcsim faulted DuplicateName on the second host and never listed it in host.network).
func labAddPortGroup(ctx *Context, s *HostNetworkSystem, c *types.AddPortGroup) soap.HasFault {
	r := &methods.AddPortGroupBody{}
	if c.Portgrp.Name == "" {
		r.Fault_ = Fault("", &types.InvalidArgument{InvalidProperty: "portgrp.name"})
		return r
	}
	var vswitch *types.HostVirtualSwitch
	for i := range s.NetworkInfo.Vswitch {
		if s.NetworkInfo.Vswitch[i].Name == c.Portgrp.VswitchName {
			vswitch = &s.NetworkInfo.Vswitch[i]
		}
	}
	if vswitch == nil {
		r.Fault_ = Fault("", &types.NotFound{})
		return r
	}
	for _, pg := range s.NetworkInfo.Portgroup {
		if pg.Spec.Name == c.Portgrp.Name {
			r.Fault_ = Fault("", &types.AlreadyExists{Name: c.Portgrp.Name})
			return r
		}
	}
	folder := s.folder()
	var network *mo.Network
	if obj := Map.FindByName(c.Portgrp.Name, folder.ChildEntity); obj != nil {
		n, ok := obj.(*mo.Network)
		if !ok {
			r.Fault_ = Fault("", &types.DuplicateName{Name: c.Portgrp.Name, Object: obj.Reference()})
			return r
		}
		network = n
	} else {
		network = &mo.Network{}
		network.Name = c.Portgrp.Name
		network.Entity().Name = network.Name
		folderPutChild(ctx, &folder.Folder, network)
	}
	host := s.Host.Self
	ctx.WithLock(network, func() {
		if FindReference(network.Host, host) == nil {
			network.Host = append(append([]types.ManagedObjectReference(nil), network.Host...), host)
		}
	})
	if h, ok := Map.Get(host).(*HostSystem); ok {
		ctx.WithLock(h, func() {
			if FindReference(h.Network, network.Self) == nil {
				nets := append(append([]types.ManagedObjectReference(nil), h.Network...), network.Self)
				Map.Update(h, []types.PropertyChange{{Name: "network", Val: nets}})
			}
		})
	}
	vswitch.Portgroup = append(vswitch.Portgroup, c.Portgrp.Name)
	s.NetworkInfo.Portgroup = append(s.NetworkInfo.Portgroup, types.HostPortGroup{
		Key:  "key-vim.host.PortGroup-" + c.Portgrp.Name,
		Spec: c.Portgrp,
	})
	r.Res = &types.AddPortGroupResponse{}
	return r
}

// labRemovePortGroup: HostNetworkSystem.RemovePortGroup. ResourceInUse while a VM's NIC (on this host)
// uses it, as vSphere; the Network object goes once no host has the portgroup (stock vcsim removed it
// always, and panicked when it was not in the folder).
func labRemovePortGroup(ctx *Context, s *HostNetworkSystem, c *types.RemovePortGroup) soap.HasFault {
	r := &methods.RemovePortGroupBody{}
	idx := -1
	for i, pg := range s.NetworkInfo.Portgroup {
		if pg.Spec.Name == c.PgName {
			idx = i
		}
	}
	if idx < 0 {
		r.Fault_ = Fault("", &types.NotFound{})
		return r
	}
	folder := s.folder()
	e := Map.FindByName(c.PgName, folder.ChildEntity)
	network, _ := e.(*mo.Network)
	host := s.Host.Self
	for _, obj := range Map.All("VirtualMachine") {
		vm, ok := obj.(*VirtualMachine)
		if !ok || vm.Config == nil || vm.Runtime.Host == nil || *vm.Runtime.Host != host {
			continue
		}
		for _, dev := range vm.Config.Hardware.Device {
			nic, ok := dev.(types.BaseVirtualEthernetCard)
			if !ok {
				continue
			}
			b, ok := nic.GetVirtualEthernetCard().Backing.(*types.VirtualEthernetCardNetworkBackingInfo)
			if !ok {
				continue
			}
			if b.DeviceName == c.PgName || (network != nil && b.Network != nil && *b.Network == network.Self) {
				r.Fault_ = Fault(fmt.Sprintf("The resource '%s' is in use.", c.PgName), &types.ResourceInUse{Type: "Network", Name: c.PgName})
				return r
			}
		}
	}
	for i := range s.NetworkInfo.Vswitch {
		v := &s.NetworkInfo.Vswitch[i]
		var kept []string
		for _, pg := range v.Portgroup {
			if pg != c.PgName {
				kept = append(kept, pg)
			}
		}
		v.Portgroup = kept
	}
	s.NetworkInfo.Portgroup = append(append([]types.HostPortGroup(nil), s.NetworkInfo.Portgroup[:idx]...), s.NetworkInfo.Portgroup[idx+1:]...)
	if network != nil {
		if h, ok := Map.Get(host).(*HostSystem); ok {
			ctx.WithLock(h, func() {
				var nets []types.ManagedObjectReference
				for _, n := range h.Network {
					if n != network.Self {
						nets = append(nets, n)
					}
				}
				Map.Update(h, []types.PropertyChange{{Name: "network", Val: nets}})
			})
		}
		var hosts []types.ManagedObjectReference
		for _, h := range network.Host {
			if h != host {
				hosts = append(hosts, h)
			}
		}
		network.Host = hosts
		if len(hosts) == 0 {
			folderRemoveChild(ctx, &folder.Folder, network.Reference())
		}
	}
	r.Res = &types.RemovePortGroupResponse{}
	return r
}
