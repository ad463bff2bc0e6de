// Sendense vSphere lab: changed block tracking for vcsim.
//
// This file is added to a GOPATH overlay of Debian's govmomi simulator package (see labs/vsphere/build.sh):
// Go only lets methods be added to simulator.VirtualMachine from inside its own package, and embedding
// the type from another package breaks property access and snapshots (see NOTES.md).
//
// The lab keeps a change record per VM disk, derived from the data: each snapshot seals an epoch (the
// allocated areas of the disk file it froze, rounded out to the 64 KiB tracking block), gives it the next
// sequence number and stamps the snapshot's disk backings with changeId "<ctk uuid>/<seq>" as vSphere does.
// QueryChangedDiskAreas answers from that record and pages like vSphere with a small per-reply extent
// limit (SENDENSE_VCSIM_CBT_MAX_EXTENTS, default 2) so that paging bugs in a client show.

package simulator

import (
	"crypto/rand"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type labExtent struct{ start, length int64 }

// labEpoch: the changes sealed by one snapshot, i.e. the allocated areas of the disk file that was current
// until that snapshot froze it. parent is the epoch the file's own backing was sealed with (0: a base
// disk), so that after a revert the record follows the branch the snapshot is on.
type labEpoch struct {
	seq, parent int
	extents     []labExtent
}

type labDiskCBT struct {
	ctk      string // "52 d2 ... xx-xx ... xx"; a new one when tracking is reset (disabled then enabled)
	ctkSince int    // changeIds of ctk with a lower seq were never handed out: FileFault
	seq      int    // last sealed epoch
	open     int    // the epoch the current (open) disk file's backing was sealed with
	epochs   map[int]*labEpoch
	// every live file of the disk (datastore path "[ds] dir/f.vmdk") -> its backing file ("" for the base)
	parents map[string]string
	// The open epoch's extents from running deltas that consolidation merged into their parent (the VM
	// then got a fresh delta); nil after a snapshot or revert.
	carry []labExtent
}

type labVMCBT struct {
	disks   map[int32]*labDiskCBT
	snapSeq map[string]map[int32]int // snapshot moref value -> device key -> seq sealed by it
}

// labCBT guards the lab's record and the disk files (qemu-img runs under it).
var labCBT = struct {
	sync.Mutex
	vms map[string]*labVMCBT
}{vms: map[string]*labVMCBT{}}

func labMaxExtents() int {
	if v, err := strconv.Atoi(os.Getenv("SENDENSE_VCSIM_CBT_MAX_EXTENTS")); err == nil && v > 0 {
		return v
	}
	return 2
}

func labNewCtk() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[0] = 0x52
	h := make([]string, 16)
	for i := range b {
		h[i] = fmt.Sprintf("%02x", b[i])
	}
	return strings.Join(h[:8], " ") + "-" + strings.Join(h[8:], " ")
}

// labVM returns the record of a VM (caller holds labCBT).
func labVM(ref string) *labVMCBT {
	v := labCBT.vms[ref]
	if v == nil {
		v = &labVMCBT{disks: map[int32]*labDiskCBT{}, snapSeq: map[string]map[int32]int{}}
		labCBT.vms[ref] = v
	}
	return v
}

func (v *labVMCBT) disk(key int32) *labDiskCBT {
	d := v.disks[key]
	if d == nil {
		d = &labDiskCBT{ctk: labNewCtk(), ctkSince: 1, epochs: map[int]*labEpoch{}, parents: map[string]string{}}
		v.disks[key] = d
	}
	return d
}

func labDiskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// labSnapshotTaken is called by CreateSnapshotTask (patched virtual_machine.go) once the snapshot exists.
// Per disk, as vSphere does: the file that was current is frozen and becomes the snapshot's; its
// allocated areas (that file alone, without its backing) are sealed as the next epoch; a new delta
// "<disk>-00000N.vmdk" backed by it becomes the VM's current disk. The snapshot gets its own copies of the
// disks (its config is a deep copy; vcsim's shared the VM's device structs), with changeId "<ctk>/<seq>" when
// change tracking is on.
func labSnapshotTaken(vm *VirtualMachine, snapshot *VirtualMachineSnapshot) types.BaseMethodFault {
	snapshot.Config = labConfigCopy(vm.Config) // the snapshot's own config, restored by a revert
	// a running VM: QEMU paused while the deltas are made, then switched to them live and resumed
	machine, resume, err := labLivePause(vm)
	if err != nil {
		return labCannotFault(vm.Name, err)
	}
	live := map[int32]string{}
	if machine != nil {
		defer func() {
			if resume {
				if _, err := machine.qmpCmd("cont", nil); err != nil {
					log.Printf("sendense lab: resume %s: %v", vm.Name, err)
				}
			}
		}()
	}
	labCBT.Lock()
	defer labCBT.Unlock()
	rec := labVM(vm.Self.Value)
	seqs := map[int32]int{}
	devices := make([]types.BaseVirtualDevice, 0, len(snapshot.Config.Hardware.Device))
	tracking := snapshot.Config.ChangeTrackingEnabled != nil && *snapshot.Config.ChangeTrackingEnabled
	var fault types.BaseMethodFault
	for _, dev := range snapshot.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		b, ok2 := dev.GetVirtualDevice().Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || !ok2 || fault != nil {
			devices = append(devices, dev)
			continue
		}
		d := rec.disk(disk.Key)
		frozen := b.FileName
		if _, known := d.parents[frozen]; !known {
			d.parents[frozen] = labParentName(b)
		}
		extents, err := d.labOpenChanges(labLocal(vm, frozen))
		if err != nil {
			fault = labCannotFault(frozen, err)
		}
		d.labResetOpen()
		d.seq++
		d.epochs[d.seq] = &labEpoch{seq: d.seq, parent: d.open, extents: extents}
		d.open = d.seq
		seqs[disk.Key] = d.seq

		copied := *disk
		bc := *b
		bc.ChangeId = ""
		if tracking {
			bc.ChangeId = fmt.Sprintf("%s/%d", d.ctk, d.seq)
		}
		copied.Backing = &bc
		devices = append(devices, &copied)

		for _, vdev := range vm.Config.Hardware.Device { // the VM's own device (the snapshot has a copy)
			if vdisk, ok := vdev.(*types.VirtualDisk); ok && vdisk.Key == disk.Key && fault == nil {
				fault = labNewDeltaLive(vm, d, vdisk, frozen, machine != nil)
				if fault == nil && machine != nil {
					live[disk.Key] = labLocal(vm, vdisk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName)
				}
			}
		}
	}
	if machine != nil && fault == nil {
		if err := labLiveSwitch(machine, live); err != nil {
			fault = labCannotFault(vm.Name, err)
		}
	}
	snapshot.Config.Hardware.Device = devices
	rec.snapSeq[snapshot.Self.Value] = seqs
	labRefreshLayouts(vm)
	return fault
}

// labReconfigure is called by ReconfigVMTask before the spec is applied: turning change tracking off
// resets it (vSphere: disable then enable, or a power failure), so every changeId handed out before is
// refused with FileFault from then on.
// Enabling it on virtual hardware older than vmx-07 is refused (NotSupported). A disk edited to a larger
// capacity is grown (labGrowDisks).
func labReconfigure(vm *VirtualMachine, spec *types.VirtualMachineConfigSpec) types.BaseMethodFault {
	if fault := labTrackingUnsupported(vm, spec.ChangeTrackingEnabled); fault != nil {
		return fault
	}
	if fault := labGrowDisks(vm, spec); fault != nil { // a disk edited to a larger capacity (lab_extend.go)
		return fault
	}
	was := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	if spec.ChangeTrackingEnabled == nil || *spec.ChangeTrackingEnabled || !was {
		return nil
	}
	labCBT.Lock()
	defer labCBT.Unlock()
	for _, d := range labVM(vm.Self.Value).disks {
		d.labResetDisk()
	}
	return nil
}

// labResetDisk gives one disk a new ctk (caller holds labCBT): every changeId of it handed out before is
// FileFault from then on; the other disks keep theirs.
func (d *labDiskCBT) labResetDisk() {
	d.ctk = labNewCtk()
	d.ctkSince = d.seq + 1
}

// LabCtkResetHandler serves POST /sendense-lab/ctk-reset?vm=MOREF&key=DEVICEKEY: that disk alone loses its
// change tracking, as on vSphere when its -ctk.vmdk is lost or corrupted (HTTP Basic auth as
// /sendense-lab/disk). 204 done; 404 unknown VM or no disk with that key in the VM's current config;
// 400 bad parameters; 405 not POST.
func LabCtkResetHandler(user *url.Userinfo) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !labAuthorized(w, r, user) {
			return
		}
		if r.Method != http.MethodPost {
			labReply(w, http.StatusMethodNotAllowed, map[string]string{"error": "POST only"})
			return
		}
		q := r.URL.Query()
		key, err := strconv.ParseInt(q.Get("key"), 10, 32)
		if q.Get("vm") == "" || err != nil {
			labReply(w, http.StatusBadRequest, map[string]string{"error": "need vm and an integer key"})
			return
		}
		vm, ok := Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: q.Get("vm")}).(*VirtualMachine)
		if !ok {
			labReply(w, http.StatusNotFound, map[string]string{"error": "unknown VM " + q.Get("vm")})
			return
		}
		found := false
		for _, dev := range vm.Config.Hardware.Device {
			if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == int32(key) {
				found = true
			}
		}
		if !found {
			labReply(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("no disk with key %d in %s", key, q.Get("vm"))})
			return
		}
		labCBT.Lock()
		labVM(vm.Self.Value).disk(int32(key)).labResetDisk()
		labCBT.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}
}

// labLineage: the epochs a snapshot's disk state is made of, newest first (seq, its parent, ...).
func (d *labDiskCBT) labLineage(seq int) []int {
	var out []int
	for seq > 0 {
		out = append(out, seq)
		e := d.epochs[seq]
		if e == nil {
			break
		}
		seq = e.parent
	}
	return out
}

// labChangedSince: the extents of the epochs between changeId seq `from` and snapshot seq `to`: the
// epochs of `to`'s lineage after `from`; when `from` is on another branch (a revert happened in between),
// also `from`'s own epochs back to the common ancestor (a superset: false positives are allowed, misses
// not).
func (d *labDiskCBT) labChangedSince(from, to int) []labExtent {
	onTo := map[int]bool{}
	for _, s := range d.labLineage(to) {
		onTo[s] = true
	}
	lca := 0
	var fromSide []int
	for _, s := range d.labLineage(from) {
		if onTo[s] {
			lca = s
			break
		}
		fromSide = append(fromSide, s)
	}
	var out []labExtent
	for _, s := range d.labLineage(to) {
		if s == lca {
			break
		}
		out = append(out, d.epochs[s].extents...)
	}
	for _, s := range fromSide {
		out = append(out, d.epochs[s].extents...)
	}
	return out
}

func labMerge(in []labExtent) []labExtent {
	xs := append([]labExtent(nil), in...)
	sort.Slice(xs, func(i, j int) bool { return xs[i].start < xs[j].start })
	var out []labExtent
	for _, x := range xs {
		if x.length <= 0 {
			continue
		}
		if n := len(out); n > 0 && x.start <= out[n-1].start+out[n-1].length {
			end := x.start + x.length
			if end > out[n-1].start+out[n-1].length {
				out[n-1].length = end - out[n-1].start
			}
			continue
		}
		out = append(out, x)
	}
	return out
}

func labFileFault(msg string) soap.HasFault {
	return &methods.QueryChangedDiskAreasBody{Fault_: Fault(msg, &types.FileFault{File: msg})}
}

func labInvalidArgument(msg, prop string) soap.HasFault {
	return &methods.QueryChangedDiskAreasBody{Fault_: Fault(msg, &types.InvalidArgument{InvalidProperty: prop})}
}

// QueryChangedDiskAreas answers from the lab's change record, paged as vSphere pages.
func (vm *VirtualMachine) QueryChangedDiskAreas(ctx *Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	if req.Snapshot == nil {
		return labInvalidArgument("the lab needs a snapshot for QueryChangedDiskAreas", "snapshot")
	}
	snap, ok := Map.Get(*req.Snapshot).(*VirtualMachineSnapshot)
	if !ok || snap.Vm != vm.Self {
		return labInvalidArgument(fmt.Sprintf("snapshot %s is not a snapshot of %s", req.Snapshot.Value, vm.Self.Value), "snapshot")
	}
	var disk *types.VirtualDisk
	for _, dev := range snap.Config.Hardware.Device {
		if d, ok := dev.(*types.VirtualDisk); ok && d.Key == req.DeviceKey {
			disk = d
		}
	}
	if disk == nil {
		return labInvalidArgument(fmt.Sprintf("no disk with device key %d in snapshot %s", req.DeviceKey, req.Snapshot.Value), "deviceKey")
	}
	if snap.Config.ChangeTrackingEnabled == nil || !*snap.Config.ChangeTrackingEnabled {
		return labFileFault("change tracking was not enabled when the snapshot was taken")
	}
	capacity := labDiskCapacity(disk)
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		return labInvalidArgument(fmt.Sprintf("startOffset %d outside the disk (capacity %d)", req.StartOffset, capacity), "startOffset")
	}

	labCBT.Lock()
	rec := labVM(vm.Self.Value)
	d := rec.disk(disk.Key)
	snapSeq, ok := rec.snapSeq[snap.Self.Value][disk.Key]
	var changed []labExtent
	var fault soap.HasFault
	switch {
	case !ok:
		fault = labFileFault("the lab has no change record for this snapshot")
	case req.ChangeId == "*":
		changed = d.labChangedSince(0, snapSeq)
	default:
		i := strings.LastIndex(req.ChangeId, "/")
		seq, err := strconv.Atoi(req.ChangeId[i+1:])
		if i < 0 || err != nil || req.ChangeId[:i] != d.ctk || seq > snapSeq || seq < d.ctkSince || d.epochs[seq] == nil {
			fault = labFileFault(fmt.Sprintf("changeId %q is not valid for this disk", req.ChangeId))
		} else {
			changed = d.labChangedSince(seq, snapSeq)
		}
	}
	labCBT.Unlock()
	if fault != nil {
		return fault
	}

	// clip to [startOffset, capacity) and page
	var areas []types.DiskChangeExtent
	length := capacity - req.StartOffset
	max := labMaxExtents()
	for _, x := range labMerge(changed) {
		start, end := x.start, x.start+x.length
		if end <= req.StartOffset || start >= capacity {
			continue
		}
		if start < req.StartOffset {
			start = req.StartOffset
		}
		if end > capacity {
			end = capacity
		}
		if len(areas) == max {
			last := areas[len(areas)-1]
			length = last.Start + last.Length - req.StartOffset
			break
		}
		areas = append(areas, types.DiskChangeExtent{Start: start, Length: end - start})
	}

	return &methods.QueryChangedDiskAreasBody{
		Res: &types.QueryChangedDiskAreasResponse{
			Returnval: types.DiskChangeInfo{StartOffset: req.StartOffset, Length: length, ChangedArea: areas},
		},
	}
}
