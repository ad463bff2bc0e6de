// Sendense vSphere lab: real disk bytes for vcsim.
//
// Every VM disk is a real VMDK (monolithicSparse, thin) in its datastore directory, made and changed with
// qemu-img (QEMU reads and writes VMDK backing chains; checked: see NOTES.md). A snapshot freezes the
// current file and puts a delta "<disk>-00000N.vmdk" on top (labSnapshotTaken); removing snapshots
// commits deltas into their parents (labConsolidate); reverting discards the current delta and starts a
// new one off the snapshot's file (labReverted). GET /sendense-lab/disk tells a data-path stand-in (the
// VDDK stand-in) which local file holds a disk's bytes.

package simulator

import (
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

// LabDefaultDiskKB is the capacity of the default inventory VMs' disks (vcsim-lab -disk-mib).
var LabDefaultDiskKB int64 = 1024

// labTrackingBlock: vSphere's change tracking granularity; changed areas are rounded out to it.
const labTrackingBlock = 64 << 10

func labQemuImg(args ...string) (string, error) {
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("qemu-img %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func labCannotFault(file string, err error) types.BaseMethodFault {
	log.Printf("sendense lab: %s: %v", file, err)
	return &types.FileFault{File: file}
}

// labLocal is the local path of a "[ds] dir/file" datastore path of vm.
func labLocal(vm *VirtualMachine, name string) string {
	p, fault := parseDatastorePath(name)
	if fault != nil {
		return name
	}
	return labDatastoreFile(vm, p)
}

func labParentName(b *types.VirtualDiskFlatVer2BackingInfo) string {
	if b.Parent != nil {
		return b.Parent.FileName
	}
	return ""
}

// labAlone: a qemu filename that opens one VMDK file without its backing file.
func labAlone(local string) string {
	spec, _ := json.Marshal(map[string]interface{}{
		"driver": "vmdk", "backing": nil, "read-only": true, "force-share": true, // QEMU may run the VM
		"file": map[string]string{"driver": "file", "filename": local},
	})
	return "json:" + string(spec)
}

// labAllocated: the allocated areas of one disk file alone (its backing file is not opened), rounded out
// to the tracking block and merged.
func labAllocated(local string) ([]labExtent, error) {
	out, err := labQemuImg("map", "--output=json", labAlone(local))
	if err != nil {
		return nil, err
	}
	var entries []struct {
		Start   int64 `json:"start"`
		Length  int64 `json:"length"`
		Present bool  `json:"present"`
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		return nil, fmt.Errorf("qemu-img map: %v", err)
	}
	var xs []labExtent
	for _, e := range entries {
		if !e.Present || e.Length <= 0 {
			continue
		}
		start := e.Start / labTrackingBlock * labTrackingBlock
		end := (e.Start + e.Length + labTrackingBlock - 1) / labTrackingBlock * labTrackingBlock
		xs = append(xs, labExtent{start, end - start})
	}
	return labMerge(xs), nil
}

// labCreateDisk replaces vcsim's empty placeholder files (vdmCreateVirtualDisk) for a VM disk device:
// fileOperation create makes a thin VMDK of the disk's capacity, replace makes it anew, none attaches an
// existing file. Called from configureDevice (patched virtual_machine.go).
func labCreateDisk(vm *VirtualMachine, dc *Datacenter, op types.VirtualDeviceConfigSpecFileOperation, disk *types.VirtualDisk, name string) types.BaseMethodFault {
	local, fault := Map.FileManager().resolve(&dc.Self, name)
	if fault != nil {
		return fault
	}
	_, statErr := os.Stat(local)
	switch op {
	case types.VirtualDeviceConfigSpecFileOperationCreate, types.VirtualDeviceConfigSpecFileOperationReplace:
		if statErr == nil && op == types.VirtualDeviceConfigSpecFileOperationCreate {
			return &types.FileAlreadyExists{FileFault: types.FileFault{File: name}}
		}
		_ = os.Remove(local)
		size := labDiskCapacity(disk)
		if size <= 0 {
			size = LabDefaultDiskKB * 1024
			disk.CapacityInBytes = size
			labNormalizeDiskCapacity(disk)
		}
		if err := os.MkdirAll(path.Dir(local), 0o700); err != nil {
			return labCannotFault(name, err)
		}
		if _, err := labQemuImg("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", local, fmt.Sprint(size)); err != nil {
			return labCannotFault(name, err)
		}
	default:
		if statErr != nil {
			return &types.FileNotFound{FileFault: types.FileFault{File: name}}
		}
	}
	labCBT.Lock()
	defer labCBT.Unlock()
	d := labVM(vm.Self.Value).disk(disk.Key)
	if _, known := d.parents[name]; !known {
		parent := ""
		if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
			parent = labParentName(b)
		}
		d.parents[name] = parent
	}
	return nil
}

// labDiskFileNames: the layoutEx files of a disk: one monolithicSparse VMDK (stock vcsim listed a
// descriptor and a "-flat" extent).
func labDiskFileNames(name string) []string { return []string{name} }

var labDeltaSuffix = regexp.MustCompile(`-[0-9]{6}$`)

// labNewDelta makes "<disk>-00000N.vmdk" (next free N in the directory) backed by frozen and makes it the
// VM's current file of the disk (caller holds labCBT).
func labNewDelta(vm *VirtualMachine, d *labDiskCBT, disk *types.VirtualDisk, frozen string) types.BaseMethodFault {
	return labNewDeltaLive(vm, d, disk, frozen, false)
}

// labNewDeltaLive: labNewDelta; live: the VM's QEMU holds frozen (locked), so the delta is made without
// opening it (labCreateDeltaOf).
func labNewDeltaLive(vm *VirtualMachine, d *labDiskCBT, disk *types.VirtualDisk, frozen string, live bool) types.BaseMethodFault {
	dir, base := path.Split(frozen) // "[ds] vm/", "disk.vmdk"
	stem := labDeltaSuffix.ReplaceAllString(strings.TrimSuffix(base, ".vmdk"), "")
	var name string
	for n := 1; ; n++ {
		name = fmt.Sprintf("%s%s-%06d.vmdk", dir, stem, n)
		if _, used := d.parents[name]; used {
			continue
		}
		if _, err := os.Stat(labLocal(vm, name)); err == nil {
			continue
		}
		break
	}
	if live {
		if err := labCreateDeltaOf(labLocal(vm, name), labBackingRef(vm, name, frozen), labLocal(vm, frozen), labDiskCapacity(disk)); err != nil {
			return labCannotFault(name, err)
		}
	} else if _, err := labQemuImg("create", "-q", "-f", "vmdk", "-b", labBackingRef(vm, name, frozen), "-F", "vmdk", labLocal(vm, name)); err != nil {
		return labCannotFault(name, err)
	}
	d.parents[name] = frozen
	b := *disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	b.FileName = name
	b.ChangeId = ""
	b.Parent = labChain(d, frozen, &b)
	disk.Backing = &b
	return nil
}

// labBackingRef: how a file names its backing: relative when both are in one directory (as vSphere's
// parentFileNameHint), else the absolute local path.
func labBackingRef(vm *VirtualMachine, child, parent string) string {
	cl, pl := labLocal(vm, child), labLocal(vm, parent)
	if filepath.Dir(cl) == filepath.Dir(pl) {
		return filepath.Base(pl)
	}
	return pl
}

// labChain: a fresh backing chain for file (its parents from the record), modelled on tmpl.
func labChain(d *labDiskCBT, file string, tmpl *types.VirtualDiskFlatVer2BackingInfo) *types.VirtualDiskFlatVer2BackingInfo {
	if file == "" {
		return nil
	}
	b := *tmpl
	b.FileName = file
	b.ChangeId = ""
	b.Parent = labChain(d, d.parents[file], tmpl)
	return &b
}

// labDisksOf: the VM's current disks and every remaining snapshot's disks, by device key.
func labDisksOf(vm *VirtualMachine) map[int32][]*types.VirtualDisk {
	out := map[int32][]*types.VirtualDisk{}
	add := func(devs []types.BaseVirtualDevice) {
		for _, dev := range devs {
			if disk, ok := dev.(*types.VirtualDisk); ok {
				if _, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					out[disk.Key] = append(out[disk.Key], disk)
				}
			}
		}
	}
	add(vm.Config.Hardware.Device)
	if vm.Snapshot != nil {
		for _, ref := range allSnapshotsInTree(vm.Snapshot.RootSnapshotList) {
			if s, ok := Map.Get(ref).(*VirtualMachineSnapshot); ok {
				add(s.Config.Hardware.Device)
			}
		}
	}
	return out
}

// labConsolidate is called once snapshots were removed (RemoveSnapshot_Task, RemoveAllSnapshots_Task):
// files nothing needs any more are deleted, and a file that is neither the VM's current file nor a
// snapshot's and has exactly one child gets that child committed into it (vSphere's consolidation: the
// bytes of every remaining snapshot and of the VM stay the same; the base disk stays). changeIds stay.
func labConsolidate(vm *VirtualMachine) types.BaseMethodFault {
	if m := labMachineOf(vm); m != nil {
		// the VM runs: merges of its running delta are done live (QMP block-commit); any other merge is
		// left for power-off: the snapshots are gone from the tree, the files stay
		// (runtime.consolidationNeeded)
		if fault, done := labConsolidateLive(vm, m); done {
			if fault == nil && vm.Runtime.ConsolidationNeeded != nil && *vm.Runtime.ConsolidationNeeded {
				labMarkConsolidation(vm, false)
			}
			return fault
		}
		labMarkConsolidation(vm, true)
		labRefreshLayouts(vm)
		return nil
	}
	if vm.Runtime.ConsolidationNeeded != nil && *vm.Runtime.ConsolidationNeeded {
		labMarkConsolidation(vm, false)
	}
	return labConsolidateFiles(vm)
}

// labConsolidateFiles: labConsolidate's work on a VM that does not run.
func labConsolidateFiles(vm *VirtualMachine) types.BaseMethodFault {
	labCBT.Lock()
	defer labCBT.Unlock()
	rec := labVM(vm.Self.Value)
	pinned := labPinned(vm) // files another VM's chain uses (linked clones) stay as they are
	var fault types.BaseMethodFault
	for key, disks := range labDisksOf(vm) {
		d := rec.disk(key)
		roots := map[string]bool{}
		for _, disk := range disks {
			roots[disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName] = true
		}
		labPinnedRoots(d, roots, pinned)
		reachable := map[string]bool{}
		for f := range roots {
			for ; f != "" && !reachable[f]; f = d.parents[f] {
				reachable[f] = true
			}
		}
		for f := range d.parents {
			if !reachable[f] {
				if err := os.Remove(labLocal(vm, f)); err != nil && !os.IsNotExist(err) {
					log.Printf("sendense lab: %s: %v", f, err)
				}
				delete(d.parents, f)
			}
		}
		current := ""
		for _, dev := range vm.Config.Hardware.Device {
			if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == key {
				if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					current = b.FileName
				}
			}
		}
		remade := false
		for fault == nil {
			parent, child := labMergeable(d, roots, pinned)
			if child == "" {
				break
			}
			// the running delta (the open epoch's file, only before it was merged: the file it went into
			// holds sealed data too, whose allocation is no change): remember what the epoch has so far
			if child == current && !remade {
				open, err := d.labOpenChanges(labLocal(vm, child))
				if err != nil {
					fault = labCannotFault(child, err)
					break
				}
				d.carry = open
			}
			if _, err := labQemuImg("commit", "-q", "-d", "-f", "vmdk", labLocal(vm, child)); err != nil {
				fault = labCannotFault(child, err)
				break
			}
			if child == current {
				// the running delta is now merged into sealed data: the VM goes on a fresh empty delta
				// below, so every write of the open epoch lands in a file whose allocation the lab sees
				current, remade = parent, true
			}
			for g, p := range d.parents {
				if p != child {
					continue
				}
				if err := labSetParent(labLocal(vm, g), labBackingRef(vm, g, parent), labLocal(vm, parent)); err != nil {
					fault = labCannotFault(g, err)
				}
				d.parents[g] = parent
			}
			for _, disk := range disks {
				if b := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); b.FileName == child {
					nb := *b
					nb.FileName = parent
					disk.Backing = &nb
				}
			}
			if roots[child] {
				roots[parent] = true
			}
			delete(roots, child)
			delete(d.parents, child)
			_ = os.Remove(labLocal(vm, child))
		}
		if remade && fault == nil {
			for _, dev := range vm.Config.Hardware.Device {
				if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == key {
					fault = labNewDelta(vm, d, disk, current)
				}
			}
		}
		for _, disk := range disks { // fresh parent chains, as the record now has them
			b := *disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			b.Parent = labChain(d, d.parents[b.FileName], &b)
			disk.Backing = &b
		}
	}
	labRefreshLayouts(vm)
	return fault
}

// labMergeable: a (parent, child) pair where parent is no root and child is its only child, neither pinned
// (used by another VM's chain: a linked clone's parent is never merged into another file nor merged into).
func labMergeable(d *labDiskCBT, roots, pinned map[string]bool) (string, string) {
	children := map[string][]string{}
	for f, p := range d.parents {
		if p != "" {
			children[p] = append(children[p], f)
		}
	}
	names := make([]string, 0, len(children))
	for p := range children {
		names = append(names, p)
	}
	sort.Strings(names)
	for _, p := range names {
		if !roots[p] && !pinned[p] && len(children[p]) == 1 && !pinned[children[p][0]] {
			return p, children[p][0]
		}
	}
	return "", ""
}

// labReverted is called by RevertToSnapshotTask once the snapshot is current: per disk, the current
// delta is discarded and a new delta off the snapshot's frozen file becomes current; the open epoch
// continues the snapshot's lineage.
func labReverted(vm *VirtualMachine, snapshot *VirtualMachineSnapshot) types.BaseMethodFault {
	labPowerOffForRevert(vm)
	labRestoreConfig(vm, snapshot)
	Map.Update(vm, []types.PropertyChange{{Name: "config", Val: vm.Config}})
	// the discarded state's delta goes first (the VM's disks are the snapshot's frozen files for a
	// moment): a revert frees the space an unwanted delta holds before it makes the new one, so it
	// works on a full datastore too
	if f := labConsolidateFiles(vm); f != nil {
		return f
	}
	labCBT.Lock()
	rec := labVM(vm.Self.Value)
	frozen := map[int32]string{}
	for _, dev := range snapshot.Config.Hardware.Device {
		if disk, ok := dev.(*types.VirtualDisk); ok {
			if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				frozen[disk.Key] = b.FileName
			}
		}
	}
	var fault types.BaseMethodFault
	for _, dev := range vm.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok || frozen[disk.Key] == "" {
			continue
		}
		d := rec.disk(disk.Key)
		d.labResetOpen() // the open epoch is the new delta's allocation again
		if f := labNewDelta(vm, d, disk, frozen[disk.Key]); f != nil && fault == nil {
			fault = f
		}
		d.open = rec.snapSeq[snapshot.Self.Value][disk.Key]
	}
	labCBT.Unlock()
	if f := labConsolidate(vm); fault == nil { // deletes the old current delta (nothing needs it now)
		fault = f
	}
	return fault
}

// labRefreshLayouts: layoutEx after the disk files changed: disk chains of the VM and of each snapshot,
// file sizes, deleted files dropped.
func labRefreshLayouts(vm *VirtualMachine) {
	var kept []types.VirtualMachineFileLayoutExFileInfo
	for _, f := range vm.LayoutEx.File {
		t := types.VirtualMachineFileLayoutExFileType(f.Type)
		if t == types.VirtualMachineFileLayoutExFileTypeDiskDescriptor || t == types.VirtualMachineFileLayoutExFileTypeDiskExtent {
			st, err := os.Stat(labLocal(vm, f.Name))
			if err != nil {
				continue
			}
			f.Size, f.UniqueSize = st.Size(), st.Size()
		}
		kept = append(kept, f)
	}
	vm.LayoutEx.File = kept
	_ = vm.updateDiskLayouts()
	for i, sl := range vm.LayoutEx.Snapshot {
		s, ok := Map.Get(sl.Key).(*VirtualMachineSnapshot)
		if !ok {
			continue
		}
		var disks []types.VirtualMachineFileLayoutExDiskLayout
		for _, dev := range s.Config.Hardware.Device {
			disk, ok := dev.(*types.VirtualDisk)
			if !ok {
				continue
			}
			b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			layout := types.VirtualMachineFileLayoutExDiskLayout{Key: disk.Key}
			for ; ok && b != nil; b = b.Parent {
				p, fault := parseDatastorePath(b.FileName)
				if fault != nil {
					break
				}
				var size int64
				if st, err := os.Stat(labLocal(vm, b.FileName)); err == nil {
					size = st.Size()
				}
				layout.Chain = append([]types.VirtualMachineFileLayoutExDiskUnit{{FileKey: []int32{vm.addFileLayoutEx(*p, size)}}}, layout.Chain...)
			}
			disks = append(disks, layout)
		}
		vm.LayoutEx.Snapshot[i].Disk = disks
	}
}

func labReply(w http.ResponseWriter, code int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// labAuthorized checks HTTP Basic auth against the credentials SOAP Login accepts; it answers 401 itself.
func labAuthorized(w http.ResponseWriter, r *http.Request, user *url.Userinfo) bool {
	wantPass, _ := user.Password()
	u, p, ok := r.BasicAuth()
	if !ok || subtle.ConstantTimeCompare([]byte(u), []byte(user.Username())) != 1 ||
		subtle.ConstantTimeCompare([]byte(p), []byte(wantPass)) != 1 {
		w.Header().Set("WWW-Authenticate", `Basic realm="vcsim-lab"`)
		labReply(w, http.StatusUnauthorized, map[string]string{"error": "bad or missing credentials"})
		return false
	}
	return true
}

// LabDiskHandler serves GET /sendense-lab/disk?vm=MOREF&snapshot=MOREF-or-empty&file=[ds]%20path: which
// local file holds the bytes of a disk, for the lab's data-path stand-in. HTTP Basic auth with the
// user/password SOAP Login accepts. 200 {"path","format","capacity","writable","disk_key","power_state"};
// 401 bad credentials; 404 {"error"} unknown VM/snapshot/file; 400 missing parameters.
func LabDiskHandler(user *url.Userinfo) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		reply := func(code int, v interface{}) { labReply(w, code, v) }
		if !labAuthorized(w, r, user) {
			return
		}
		if r.Method != http.MethodGet {
			reply(http.StatusMethodNotAllowed, map[string]string{"error": "GET only"})
			return
		}
		q := r.URL.Query()
		vmRef, snapRef, file := q.Get("vm"), q.Get("snapshot"), q.Get("file")
		if vmRef == "" || file == "" {
			reply(http.StatusBadRequest, map[string]string{"error": "need vm and file (snapshot optional)"})
			return
		}
		vm, ok := Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef}).(*VirtualMachine)
		if !ok {
			reply(http.StatusNotFound, map[string]string{"error": "unknown VM " + vmRef})
			return
		}
		labCBT.Lock()
		defer labCBT.Unlock()
		devices := vm.Config.Hardware.Device
		if snapRef != "" {
			s, ok := Map.Get(types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: snapRef}).(*VirtualMachineSnapshot)
			if !ok || s.Vm != vm.Self {
				reply(http.StatusNotFound, map[string]string{"error": fmt.Sprintf("snapshot %s is not a snapshot of %s", snapRef, vmRef)})
				return
			}
			devices = s.Config.Hardware.Device
		}
		for _, dev := range devices {
			disk, ok := dev.(*types.VirtualDisk)
			if !ok {
				continue
			}
			b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok || b.FileName != file {
				continue
			}
			local := labLocal(vm, file)
			if abs, err := filepath.Abs(local); err == nil {
				local = abs
			}
			reply(http.StatusOK, map[string]interface{}{
				"path":        local,
				"format":      "vmdk",
				"capacity":    labDiskCapacity(disk),
				"writable":    snapRef == "" && vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOff,
				"disk_key":    disk.Key,
				"power_state": string(vm.Runtime.PowerState),
			})
			return
		}
		where := "the current config of " + vmRef
		if snapRef != "" {
			where = "snapshot " + snapRef
		}
		reply(http.StatusNotFound, map[string]string{"error": fmt.Sprintf("%s is not a disk of %s", file, where)})
	}
}

// labBaseFirst orders each layoutEx disk chain base disk first, the running delta last (as vCenter
// reports it; stock vcsim listed the top file first).
func labBaseFirst(disks []types.VirtualMachineFileLayoutExDiskLayout) []types.VirtualMachineFileLayoutExDiskLayout {
	for _, d := range disks {
		for i, j := 0, len(d.Chain)-1; i < j; i, j = i+1, j-1 {
			d.Chain[i], d.Chain[j] = d.Chain[j], d.Chain[i]
		}
	}
	return disks
}

// labSetParent points a monolithicSparse VMDK at another backing file: its embedded descriptor's
// parentFileNameHint and parentCID (QEMU refuses to read through a parent whose CID differs; it gives a
// file a new CID when it first writes to it, so a commit into the parent changes it). QEMU cannot do this
// itself: `qemu-img rebase -u` on VMDK is "Operation not supported".
func labSetParent(local, hint, parentLocal string) error {
	parentDesc, _, _, err := labDescriptor(parentLocal)
	if err != nil {
		return err
	}
	cid := regexp.MustCompile(`(?m)^CID=([0-9a-fA-F]+)`).FindStringSubmatch(parentDesc)
	if cid == nil {
		return fmt.Errorf("%s: no CID in its descriptor", parentLocal)
	}
	desc, off, size, err := labDescriptor(local)
	if err != nil {
		return err
	}
	desc = regexp.MustCompile(`(?m)^parentCID=.*$`).ReplaceAllLiteralString(desc, "parentCID="+cid[1])
	desc = regexp.MustCompile(`(?m)^parentFileNameHint=.*$`).ReplaceAllLiteralString(desc, fmt.Sprintf("parentFileNameHint=%q", hint))
	if int64(len(desc)) > size {
		return fmt.Errorf("%s: the new descriptor does not fit (%d > %d bytes)", local, len(desc), size)
	}
	f, err := os.OpenFile(local, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	buf := make([]byte, size)
	copy(buf, desc)
	if _, err := f.WriteAt(buf, off); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// labDescriptor reads the descriptor embedded in a monolithicSparse VMDK: its text, offset, area size.
func labDescriptor(local string) (string, int64, int64, error) {
	f, err := os.Open(local)
	if err != nil {
		return "", 0, 0, err
	}
	defer f.Close()
	hdr := make([]byte, 44)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		return "", 0, 0, err
	}
	if string(hdr[:4]) != "KDMV" {
		return "", 0, 0, fmt.Errorf("%s: not a sparse VMDK", local)
	}
	off := int64(binary.LittleEndian.Uint64(hdr[28:36])) * 512
	size := int64(binary.LittleEndian.Uint64(hdr[36:44])) * 512
	if off <= 0 || size <= 0 || size > 1<<20 {
		return "", 0, 0, fmt.Errorf("%s: no embedded descriptor", local)
	}
	buf := make([]byte, size)
	if _, err := f.ReadAt(buf, off); err != nil {
		return "", 0, 0, err
	}
	if i := bytes.IndexByte(buf, 0); i >= 0 {
		buf = buf[:i]
	}
	return string(buf), off, size, nil
}

// labOpenChanges: the open epoch of a disk whose current file is local: what earlier running deltas of
// the epoch had when consolidation merged them (carry) + the current file's allocation. The VM never
// writes into a file holding sealed data (a fresh delta follows every merge of the running delta), so
// every write of the epoch, identical bytes too, is an allocated grain of one of those files.
func (d *labDiskCBT) labOpenChanges(local string) ([]labExtent, error) {
	now, err := labAllocated(local)
	if err != nil {
		return nil, err
	}
	return labMerge(append(append([]labExtent(nil), d.carry...), now...)), nil
}

func (d *labDiskCBT) labResetOpen() {
	d.carry = nil
}
