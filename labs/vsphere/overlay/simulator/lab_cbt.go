// Sendense vSphere lab: changed block tracking for vcsim.
//
// This file is added to a GOPATH overlay of Debian's govmomi simulator package (see labs/vsphere/build.sh):
// Go only lets methods be added to simulator.VirtualMachine from inside its own package, and embedding
// the type from another package breaks property access and snapshots (see NOTES.md).
//
// The lab keeps a change record per VM disk: writes the lab is told about (POST /sendense-lab/write) go to
// the disk's open epoch; each snapshot seals the epoch, gives it the next sequence number and stamps the
// snapshot's disk backings with changeId "<ctk uuid>/<seq>" as real vSphere does.
// QueryChangedDiskAreas answers from that record and pages like vSphere with a small per-reply extent
// limit (SENDENSE_VCSIM_CBT_MAX_EXTENTS, default 2) so that paging bugs in a client show.

package simulator

import (
	"crypto/rand"
	"fmt"
	"net/http"
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

type labEpoch struct {
	seq     int
	extents []labExtent
}

type labDiskCBT struct {
	ctk     string // "52 d2 ... xx-xx ... xx", fixed for the life of the tracking
	seq     int    // last sealed epoch
	pending []labExtent
	epochs  []labEpoch
}

type labVMCBT struct {
	disks   map[int32]*labDiskCBT
	snapSeq map[string]map[int32]int // snapshot moref value -> device key -> seq sealed by it
}

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
		d = &labDiskCBT{ctk: labNewCtk()}
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

// labSnapshotTaken is called by CreateSnapshotTask (patched virtual_machine.go) once the snapshot exists:
// it seals every disk's open epoch and gives the snapshot its own copies of the disks, whose backings
// carry the new changeId (the snapshot's config shared the VM's device structs before).
func labSnapshotTaken(vm *VirtualMachine, snapshot *VirtualMachineSnapshot) {
	labCBT.Lock()
	defer labCBT.Unlock()
	rec := labVM(vm.Self.Value)
	seqs := map[int32]int{}
	devices := make([]types.BaseVirtualDevice, 0, len(snapshot.Config.Hardware.Device))
	for _, dev := range snapshot.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			devices = append(devices, dev)
			continue
		}
		d := rec.disk(disk.Key)
		d.seq++
		d.epochs = append(d.epochs, labEpoch{seq: d.seq, extents: d.pending})
		d.pending = nil
		seqs[disk.Key] = d.seq

		copied := *disk
		if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
			bc := *b
			if snapshot.Config.ChangeTrackingEnabled != nil && *snapshot.Config.ChangeTrackingEnabled {
				bc.ChangeId = fmt.Sprintf("%s/%d", d.ctk, d.seq)
			} else {
				bc.ChangeId = ""
			}
			copied.Backing = &bc
		}
		devices = append(devices, &copied)
	}
	snapshot.Config.Hardware.Device = devices
	rec.snapSeq[snapshot.Self.Value] = seqs
}

// labRecordWrite notes that [offset, offset+length) of a VM disk changed since the last snapshot.
func labRecordWrite(vmRef string, key int32, offset, length int64) {
	labCBT.Lock()
	defer labCBT.Unlock()
	d := labVM(vmRef).disk(key)
	d.pending = append(d.pending, labExtent{offset, length})
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
	var from int
	var fault soap.HasFault
	switch {
	case !ok:
		fault = labFileFault("the lab has no change record for this snapshot")
	case req.ChangeId == "*":
		from = 0
	default:
		i := strings.LastIndex(req.ChangeId, "/")
		seq, err := strconv.Atoi(req.ChangeId[i+1:])
		if i < 0 || err != nil || req.ChangeId[:i] != d.ctk || seq > snapSeq || seq < 0 {
			fault = labFileFault(fmt.Sprintf("changeId %q is not valid for this disk", req.ChangeId))
		}
		from = seq
	}
	var changed []labExtent
	if fault == nil {
		for _, e := range d.epochs {
			if e.seq > from && e.seq <= snapSeq {
				changed = append(changed, e.extents...)
			}
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

// LabHandleWrite serves POST /sendense-lab/write?vm=MOREF&key=DEVICEKEY&offset=N&length=N: the lab's own
// control endpoint (the guest/data path will call labRecordWrite directly later).
func LabHandleWrite(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	q := r.URL.Query()
	key, err1 := strconv.ParseInt(q.Get("key"), 10, 32)
	off, err2 := strconv.ParseInt(q.Get("offset"), 10, 64)
	n, err3 := strconv.ParseInt(q.Get("length"), 10, 64)
	if q.Get("vm") == "" || err1 != nil || err2 != nil || err3 != nil || off < 0 || n <= 0 {
		http.Error(w, "need vm, key, offset, length", http.StatusBadRequest)
		return
	}
	labRecordWrite(q.Get("vm"), int32(key), off, n)
	w.WriteHeader(http.StatusNoContent)
}
