// Sendense vSphere lab: VMs really run. PowerOnVM_Task boots QEMU (TCG unless KVM works) on the VM's
// current disk chain (the top VMDK of each disk: writes go to the running delta, whose allocation is the
// open change-tracking epoch), with its memory, CPUs and firmware; one QEMU per powered-on VM, a child of
// vcsim-lab that dies with it. Power off kills it, suspend pauses it (QMP stop), reset resets it; a
// snapshot of a running VM switches QEMU to the new delta live (QMP blockdev-snapshot-sync, mode existing),
// so the frozen file is never written again. A VMware Tools stand-in watches the serial console for the
// bootable guest's SENDENSE-GUEST-READY marker.

package simulator

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/vim25/types"
)

// LabPowerEnabled: power operations boot QEMU (vcsim-lab sets it once its inventory is made; the model's
// own powered-on VMs run without QEMU). LabAccel: "tcg" or "kvm".
var (
	LabPowerEnabled bool
	LabAccel        = "tcg"
)

const labReadyMarker = "SENDENSE-GUEST-READY"

var labModeValue = regexp.MustCompile(`^[a-z]{1,32}$`)

type labMachine struct {
	vm      string
	cmd     *exec.Cmd
	dir     string // private runtime dir: QMP socket, stderr, console (no serial port), nvram
	console string // the file the serial console goes to
	done    chan struct{}
	qmpMu   sync.Mutex
	qmp     net.Conn
	qmpIn   *bufio.Reader
	drives  map[int32]string // disk device key -> QEMU drive id
	// the console offset from which the ready marker counts (a reset starts a new boot)
	since int64
	ready bool
}

var labPower = struct {
	sync.Mutex
	machines map[string]*labMachine
}{machines: map[string]*labMachine{}}

// labSpawn starts processes from one OS thread that never exits: PR_SET_PDEATHSIG fires when the thread
// that forked the child exits, not the process, and Go may end idle threads.
var labSpawn = make(chan func())

func init() {
	go func() {
		runtime.LockOSThread()
		for f := range labSpawn {
			f()
		}
	}()
}

func labStart(cmd *exec.Cmd) error {
	errc := make(chan error)
	labSpawn <- func() { errc <- cmd.Start() }
	return <-errc
}

func labMachineOf(vm *VirtualMachine) *labMachine {
	labPower.Lock()
	defer labPower.Unlock()
	return labPower.machines[vm.Self.Value]
}

// qmpCmd runs one QMP command; its "return" or an error.
func (m *labMachine) qmpCmd(name string, args interface{}) (json.RawMessage, error) {
	m.qmpMu.Lock()
	defer m.qmpMu.Unlock()
	req := map[string]interface{}{"execute": name}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	_ = m.qmp.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := m.qmp.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %v", name, err)
	}
	for {
		line, err := m.qmpIn.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %v", name, err)
		}
		var r struct {
			Event  string          `json:"event"`
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, fmt.Errorf("qmp %s: %v", name, err)
		}
		if r.Event != "" {
			continue
		}
		if r.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s", name, r.Error.Desc)
		}
		return r.Return, nil
	}
}

func labQemuOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

type labDiskDev struct {
	disk *types.VirtualDisk
	ctrl types.BaseVirtualDevice
}

// labQemuArgs: the QEMU command line of vm's current configuration.
func labQemuArgs(vm *VirtualMachine, m *labMachine) ([]string, types.BaseMethodFault) {
	mem := int64(vm.Config.Hardware.MemoryMB)
	if mem <= 0 {
		mem = 64
	}
	cpus := vm.Config.Hardware.NumCPU
	if cpus <= 0 {
		cpus = 1
	}
	args := []string{
		"-accel", LabAccel, "-machine", "pc", "-nodefaults", "-display", "none", "-S",
		"-name", "vcsim-lab:" + vm.Self.Value,
		"-m", fmt.Sprint(mem), "-smp", fmt.Sprint(cpus),
		"-qmp", "unix:" + filepath.Join(m.dir, "qmp.sock") + ",server=on,wait=off",
	}
	if vm.Config.Firmware == string(types.GuestOsDescriptorFirmwareTypeEfi) {
		vars := filepath.Join(m.dir, "nvram.fd")
		src, err := os.ReadFile("/usr/share/OVMF/OVMF_VARS_4M.fd")
		if err == nil {
			err = os.WriteFile(vars, src, 0o600)
		}
		if err != nil {
			return nil, labCannotFault("OVMF", err)
		}
		args = append(args,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
			"-drive", "if=pflash,format=raw,unit=1,file="+labQemuOpt(vars))
	}
	// serial console: the first serial port with a file backing, else a private file (the tools stand-in
	// reads it either way)
	m.console = filepath.Join(m.dir, "console.log")
	devices := object2devices(vm)
	for _, dev := range devices {
		if sp, ok := dev.(*types.VirtualSerialPort); ok {
			if b, ok := sp.Backing.(*types.VirtualSerialPortFileBackingInfo); ok {
				local := labLocal(vm, b.FileName)
				if err := os.MkdirAll(filepath.Dir(local), 0o700); err != nil {
					return nil, labCannotFault(b.FileName, err)
				}
				m.console = local
				break
			}
		}
	}
	args = append(args, "-chardev", "file,id=com1,path="+labQemuOpt(m.console), "-serial", "chardev:com1")
	for _, opt := range vm.Config.ExtraConfig {
		if o := opt.GetOptionValue(); o.Key == "guestinfo.sendense.mode" {
			if s, ok := o.Value.(string); ok && labModeValue.MatchString(s) {
				args = append(args, "-fw_cfg", "name=opt/sendense/mode,string="+s)
			}
		}
	}
	// disks in controller/unit order; SCSI controllers (pvscsi, LSI, BusLogic) are presented as
	// virtio-scsi (the lab guest's driver), IDE on the PC's IDE buses, SATA on AHCI, NVMe as NVMe
	ctrls := map[int32]types.BaseVirtualDevice{}
	for _, dev := range devices {
		ctrls[dev.GetVirtualDevice().Key] = dev
	}
	var disks []labDiskDev
	for _, dev := range devices {
		if disk, ok := dev.(*types.VirtualDisk); ok {
			if _, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				disks = append(disks, labDiskDev{disk, ctrls[disk.ControllerKey]})
			}
		}
	}
	sort.Slice(disks, func(i, j int) bool {
		a, b := disks[i].disk, disks[j].disk
		if a.ControllerKey != b.ControllerKey {
			return a.ControllerKey < b.ControllerKey
		}
		return labUnit(a) < labUnit(b)
	})
	made := map[int32]string{}
	m.drives = map[int32]string{}
	for i, d := range disks {
		b := d.disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		local, err := filepath.Abs(labLocal(vm, b.FileName))
		if err != nil {
			return nil, labCannotFault(b.FileName, err)
		}
		id := fmt.Sprintf("disk%d", d.disk.Key)
		m.drives[d.disk.Key] = id
		args = append(args, "-drive", fmt.Sprintf("if=none,id=%s,format=vmdk,cache=writeback,file=%s", id, labQemuOpt(local)))
		unit := labUnit(d.disk)
		var dev string
		switch c := d.ctrl.(type) {
		case types.BaseVirtualSCSIController:
			bus := c.GetVirtualSCSIController().BusNumber
			name := fmt.Sprintf("scsi%d", bus)
			if made[d.disk.ControllerKey] == "" {
				made[d.disk.ControllerKey] = name
				args = append(args, "-device", "virtio-scsi-pci,id="+name)
			}
			dev = fmt.Sprintf("scsi-hd,drive=%s,bus=%s.0,channel=0,scsi-id=%d,lun=0", id, name, unit)
		case *types.VirtualIDEController:
			dev = fmt.Sprintf("ide-hd,drive=%s,bus=ide.%d,unit=%d", id, c.BusNumber, unit)
		case *types.VirtualAHCIController:
			name := fmt.Sprintf("sata%d", c.BusNumber)
			if made[d.disk.ControllerKey] == "" {
				made[d.disk.ControllerKey] = name
				args = append(args, "-device", "ahci,id="+name)
			}
			dev = fmt.Sprintf("ide-hd,drive=%s,bus=%s.%d", id, name, unit)
		case *types.VirtualNVMEController:
			dev = fmt.Sprintf("nvme,drive=%s,serial=vm%sd%d", id, vm.Self.Value, d.disk.Key)
		default:
			dev = "virtio-blk-pci,drive=" + id
		}
		args = append(args, "-device", fmt.Sprintf("%s,bootindex=%d", dev, i))
	}
	return args, nil
}

func labUnit(d *types.VirtualDisk) int32 {
	if d.UnitNumber != nil {
		return *d.UnitNumber
	}
	return 0
}

func object2devices(vm *VirtualMachine) []types.BaseVirtualDevice { return vm.Config.Hardware.Device }

// labPowerOn boots QEMU for vm (or resumes its paused QEMU); caller holds the VM's lock.
func labPowerOn(vm *VirtualMachine) types.BaseMethodFault {
	if m := labMachineOf(vm); m != nil {
		if _, err := m.qmpCmd("cont", nil); err != nil {
			return labCannotFault(vm.Name, err)
		}
		labSetTools(vm, m.ready)
		return nil
	}
	dir, err := os.MkdirTemp("", "vcsim-lab-vm-")
	if err != nil {
		return labCannotFault(vm.Name, err)
	}
	m := &labMachine{vm: vm.Self.Value, dir: dir, done: make(chan struct{})}
	labCBT.Lock()
	args, fault := labQemuArgs(vm, m)
	labCBT.Unlock()
	if fault != nil {
		_ = os.RemoveAll(dir)
		return fault
	}
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		_ = os.RemoveAll(dir)
		return labCannotFault(vm.Name, err)
	}
	cmd := exec.Command("qemu-system-x86_64", args...)
	cmd.Stdout, cmd.Stderr = stderr, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := labStart(cmd); err != nil {
		stderr.Close()
		_ = os.RemoveAll(dir)
		return labCannotFault(vm.Name, err)
	}
	stderr.Close()
	m.cmd = cmd
	go func() { _ = cmd.Wait(); close(m.done) }()
	fail := func(err error) types.BaseMethodFault {
		_ = cmd.Process.Kill()
		<-m.done
		out, _ := os.ReadFile(filepath.Join(dir, "stderr"))
		_ = os.RemoveAll(dir)
		log.Printf("sendense lab: qemu for %s: %v: %s", vm.Name, err, strings.TrimSpace(string(out)))
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			msg = err.Error()
		}
		return &types.GenericVmConfigFault{VmConfigFault: types.VmConfigFault{}, Reason: "qemu: " + msg}
	}
	sock := filepath.Join(dir, "qmp.sock")
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			m.qmp, m.qmpIn = c, bufio.NewReader(c)
			break
		}
		select {
		case <-m.done:
			return fail(fmt.Errorf("exited"))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("no QMP socket"))
		}
	}
	if _, err := m.qmpIn.ReadBytes('\n'); err != nil { // greeting
		return fail(err)
	}
	for _, c := range []string{"qmp_capabilities", "cont"} {
		if _, err := m.qmpCmd(c, nil); err != nil {
			return fail(err)
		}
	}
	labPower.Lock()
	labPower.machines[vm.Self.Value] = m
	labPower.Unlock()
	labSetTools(vm, false)
	go labWatchTools(vm, m)
	return nil
}

// labKill ends vm's QEMU hard and waits until it is gone; no machine: nothing to do.
func labKill(vm *VirtualMachine) {
	labPower.Lock()
	m := labPower.machines[vm.Self.Value]
	delete(labPower.machines, vm.Self.Value)
	labPower.Unlock()
	if m == nil {
		return
	}
	_ = m.cmd.Process.Kill()
	select {
	case <-m.done:
	case <-time.After(30 * time.Second):
		log.Printf("sendense lab: qemu of %s did not exit", vm.Name)
	}
	if m.qmp != nil {
		m.qmp.Close()
	}
	_ = os.RemoveAll(m.dir)
}

// labPowerChange is called by the power tasks before the state changes (the state is the one asked for).
func labPowerChange(vm *VirtualMachine, to types.VirtualMachinePowerState) types.BaseMethodFault {
	if !LabPowerEnabled {
		return nil
	}
	switch to {
	case types.VirtualMachinePowerStatePoweredOn:
		return labPowerOn(vm)
	case types.VirtualMachinePowerStatePoweredOff:
		labKill(vm)
		labSetTools(vm, false)
		return labConsolidatePending(vm)
	case types.VirtualMachinePowerStateSuspended:
		if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
			return &types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOn, ExistingState: vm.Runtime.PowerState}
		}
		if m := labMachineOf(vm); m != nil {
			if _, err := m.qmpCmd("stop", nil); err != nil {
				return labCannotFault(vm.Name, err)
			}
		}
		labSetTools(vm, false)
	}
	return nil
}

// labReset: ResetVM_Task of a powered-on VM resets its QEMU (a new boot: the tools stand-in waits for a
// new ready marker). true when the lab handled it.
func labReset(vm *VirtualMachine) bool {
	m := labMachineOf(vm)
	if m == nil || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		return false
	}
	labPower.Lock()
	if st, err := os.Stat(m.console); err == nil {
		m.since = st.Size()
	}
	m.ready = false
	labPower.Unlock()
	labSetTools(vm, false)
	if _, err := m.qmpCmd("system_reset", nil); err != nil {
		log.Printf("sendense lab: reset %s: %v", vm.Name, err)
	}
	return true
}

// labDestroyFault: Destroy_Task of a powered-on VM faults InvalidPowerState, as on vSphere; a suspended
// VM's QEMU is ended.
func labDestroyFault(vm *VirtualMachine) types.BaseMethodFault {
	if vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn {
		return &types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOff, ExistingState: vm.Runtime.PowerState}
	}
	if fault := labDestroyShared(vm); fault != nil { // a linked clone uses files in its directory
		return fault
	}
	labKill(vm)
	return nil
}

// labSetTools sets the VMware Tools stand-in's state (caller holds the VM's lock or is the watcher
// holding it).
func labSetTools(vm *VirtualMachine, running bool) {
	status := string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
	tools := types.VirtualMachineToolsStatusToolsNotRunning
	beat := types.ManagedEntityStatusGray
	if running {
		status = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
		tools = types.VirtualMachineToolsStatusToolsOk
		beat = types.ManagedEntityStatusGreen
	}
	changes := []types.PropertyChange{
		{Name: "guest.toolsRunningStatus", Val: status},
		{Name: "guest.toolsStatus", Val: tools},
		{Name: "guestHeartbeatStatus", Val: beat},
		{Name: "summary.quickStats.guestHeartbeatStatus", Val: beat},
	}
	if vm.Guest == nil {
		vm.Guest = &types.GuestInfo{}
	}
	if vm.Summary.Guest != nil {
		changes = append(changes,
			types.PropertyChange{Name: "summary.guest.toolsRunningStatus", Val: status},
			types.PropertyChange{Name: "summary.guest.toolsStatus", Val: tools})
	}
	Map.Update(vm, changes)
}

// labWatchTools: the tools stand-in. Heartbeat green once the console (from the current boot's offset)
// has the ready marker while the VM runs; it stops with the machine.
func labWatchTools(vm *VirtualMachine, m *labMachine) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-m.done:
			return
		case <-tick.C:
		}
		labPower.Lock()
		current, since, ready := labPower.machines[m.vm] == m, m.since, m.ready
		labPower.Unlock()
		if !current {
			return
		}
		if ready {
			continue
		}
		f, err := os.Open(m.console)
		if err != nil {
			continue
		}
		buf := make([]byte, 1<<20)
		n, _ := f.ReadAt(buf, since)
		f.Close()
		if !bytes.Contains(buf[:n], []byte(labReadyMarker)) {
			continue
		}
		Map.WithLock(vm, func() {
			labPower.Lock()
			ok := labPower.machines[m.vm] == m && m.since == since
			if ok {
				m.ready = true
			}
			labPower.Unlock()
			if ok && vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn {
				labSetTools(vm, true)
			}
		})
	}
}

// labLiveSnapshot: the first half of a snapshot of a running (or suspended) VM: pause QEMU so nothing is
// written while the deltas are made. Returns the function that switches QEMU to the new deltas (one QMP
// transaction, mode existing: the lab made the files) and resumes it; nil when vm has no QEMU.
func labLivePause(vm *VirtualMachine) (*labMachine, bool, error) {
	m := labMachineOf(vm)
	if m == nil {
		return nil, false, nil
	}
	var st struct {
		Running bool `json:"running"`
	}
	raw, err := m.qmpCmd("query-status", nil)
	if err == nil {
		err = json.Unmarshal(raw, &st)
	}
	if err != nil {
		return nil, false, err
	}
	if st.Running {
		if _, err := m.qmpCmd("stop", nil); err != nil {
			return nil, false, err
		}
	}
	return m, st.Running, nil
}

// labLiveSwitch points QEMU's drives at the new deltas (key -> local path) in one transaction.
func labLiveSwitch(m *labMachine, deltas map[int32]string) error {
	var actions []map[string]interface{}
	for key, local := range deltas {
		id, ok := m.drives[key]
		if !ok { // added while running (no hot-add in the lab): QEMU does not write it, nothing to switch
			continue
		}
		abs, _ := filepath.Abs(local)
		actions = append(actions, map[string]interface{}{
			"type": "blockdev-snapshot-sync",
			"data": map[string]interface{}{"device": id, "snapshot-file": abs, "format": "vmdk", "mode": "existing"},
		})
	}
	if len(actions) == 0 {
		return nil
	}
	_, err := m.qmpCmd("transaction", map[string]interface{}{"actions": actions})
	return err
}

// labCreateDeltaOf makes local a delta VMDK backed by parentLocal (hint: how it names it) without opening
// the parent (QEMU holds its lock while the VM runs): an empty sparse VMDK whose descriptor gets the
// parent's CID and name, what `qemu-img create -b` writes.
func labCreateDeltaOf(local, hint, parentLocal string, size int64) error {
	if _, err := labQemuImg("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", local, fmt.Sprint(size)); err != nil {
		return err
	}
	desc, off, area, err := labDescriptor(local)
	if err != nil {
		return err
	}
	if !strings.Contains(desc, "parentFileNameHint=") {
		desc = strings.Replace(desc, "createType=\"monolithicSparse\"\n", "createType=\"monolithicSparse\"\nparentFileNameHint=\"\"\n", 1)
	}
	if int64(len(desc)) > area {
		return fmt.Errorf("%s: descriptor too large", local)
	}
	f, err := os.OpenFile(local, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	buf := make([]byte, area)
	copy(buf, desc)
	if _, err := f.WriteAt(buf, off); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return labSetParent(local, hint, parentLocal)
}

// labConsolidatePending: removals on a running VM leave the files (runtime.consolidationNeeded); they are
// consolidated once it is powered off.
func labConsolidatePending(vm *VirtualMachine) types.BaseMethodFault {
	if vm.Runtime.ConsolidationNeeded == nil || !*vm.Runtime.ConsolidationNeeded {
		return nil
	}
	labMarkConsolidation(vm, false)
	return labConsolidateFiles(vm)
}

func labMarkConsolidation(vm *VirtualMachine, needed bool) {
	vm.Runtime.ConsolidationNeeded = types.NewBool(needed)
	vm.Summary.Runtime.ConsolidationNeeded = types.NewBool(needed)
	Map.Update(vm, []types.PropertyChange{{Name: "runtime", Val: vm.Runtime}, {Name: "summary.runtime", Val: vm.Summary.Runtime}})
}

// LabPowerShutdown ends every QEMU (vcsim-lab's exit; the pdeathsig would too).
func LabPowerShutdown() {
	labPower.Lock()
	var ms []*labMachine
	for _, m := range labPower.machines {
		ms = append(ms, m)
	}
	labPower.machines = map[string]*labMachine{}
	labPower.Unlock()
	for _, m := range ms {
		_ = m.cmd.Process.Kill()
		<-m.done
		_ = os.RemoveAll(m.dir)
	}
}

// labPowerOffForRevert: reverting a running or suspended VM to a snapshot (the lab's have no memory)
// powers it off, as vSphere does for a snapshot taken without memory.
func labPowerOffForRevert(vm *VirtualMachine) {
	if vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOff {
		return
	}
	labKill(vm)
	labSetTools(vm, false)
	off := types.VirtualMachinePowerStatePoweredOff
	Map.Update(vm, []types.PropertyChange{
		{Name: "runtime.powerState", Val: off},
		{Name: "summary.runtime.powerState", Val: off},
	})
}

// labLivePlan: what consolidation does to one disk of a running VM: files nothing needs (deleted; never in
// QEMU's chain), and the active commit of the running delta (top) down into base (merged: top and the
// intermediate files, each a non-root with one child).
type labLivePlan struct {
	d      *labDiskCBT
	disk   *types.VirtualDisk
	drop   []string
	top    string
	base   string
	merged []string
}

// labConsolidateLive: consolidation of a running VM when every merge it needs is of the running delta
// (the backup cycle: snapshot, read, remove): QEMU paused, QMP block-commit of the active layer into the
// file it goes into (job-complete pivots QEMU onto it), the open epoch carried, a fresh delta made and
// switched to live (as the offline path does), QEMU resumed. ok false: a merge of a file QEMU only reads
// would be needed (its overlay's VMDK descriptor would have to change under QEMU): left for power-off.
func labConsolidateLive(vm *VirtualMachine, m *labMachine) (types.BaseMethodFault, bool) {
	labCBT.Lock()
	rec := labVM(vm.Self.Value)
	pinned := labPinned(vm) // files another VM's chain uses (linked clones) stay as they are
	var plans []*labLivePlan
	for key, disks := range labDisksOf(vm) {
		d := rec.disk(key)
		var cur *types.VirtualDisk
		for _, dev := range vm.Config.Hardware.Device {
			if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == key {
				cur = disk
			}
		}
		if cur == nil {
			labCBT.Unlock()
			return nil, false
		}
		top := cur.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName
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
		sim := &labDiskCBT{parents: map[string]string{}}
		p := &labLivePlan{d: d, disk: cur, top: top}
		for f, parent := range d.parents {
			if reachable[f] {
				sim.parents[f] = parent
			} else {
				p.drop = append(p.drop, f)
			}
		}
		current := top
		for {
			parent, child := labMergeable(sim, roots, pinned)
			if child == "" {
				break
			}
			if child != current {
				labCBT.Unlock()
				return nil, false
			}
			p.merged = append(p.merged, child)
			if roots[child] {
				roots[parent] = true
			}
			delete(roots, child)
			delete(sim.parents, child)
			current = parent
		}
		p.base = current
		plans = append(plans, p)
	}
	labCBT.Unlock()

	_, resume, err := labLivePause(vm)
	if err != nil {
		return labCannotFault(vm.Name, err), true
	}
	if resume {
		defer func() {
			if _, err := m.qmpCmd("cont", nil); err != nil {
				log.Printf("sendense lab: resume %s: %v", vm.Name, err)
			}
		}()
	}
	labCBT.Lock()
	defer labCBT.Unlock()
	live := map[int32]string{}
	for _, p := range plans {
		for _, f := range p.drop {
			if err := os.Remove(labLocal(vm, f)); err != nil && !os.IsNotExist(err) {
				log.Printf("sendense lab: %s: %v", f, err)
			}
			delete(p.d.parents, f)
		}
		if len(p.merged) == 0 {
			continue
		}
		open, err := p.d.labOpenChanges(labLocal(vm, p.top))
		if err != nil {
			return labCannotFault(p.top, err), true
		}
		if err := labActiveCommit(m, m.drives[p.disk.Key], labLocal(vm, p.base)); err != nil {
			return labCannotFault(p.top, err), true
		}
		p.d.carry = open
		for _, f := range p.merged {
			delete(p.d.parents, f)
			_ = os.Remove(labLocal(vm, f))
		}
		b := *p.disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		b.FileName = p.base
		p.disk.Backing = &b
		if fault := labNewDeltaLive(vm, p.d, p.disk, p.base, true); fault != nil {
			return fault, true
		}
		live[p.disk.Key] = labLocal(vm, p.disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName)
	}
	if err := labLiveSwitch(m, live); err != nil {
		return labCannotFault(vm.Name, err), true
	}
	for key, disks := range labDisksOf(vm) { // fresh parent chains, as the record now has them
		d := rec.disk(key)
		for _, disk := range disks {
			b := *disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			b.Parent = labChain(d, d.parents[b.FileName], &b)
			disk.Backing = &b
		}
	}
	labRefreshLayouts(vm)
	return nil, true
}

// labActiveCommit: QMP block-commit of drive's active layer (and what lies between) into base, run to
// the pivot: QEMU then writes base. Waits for the job (the VM is paused: it converges at once).
func labActiveCommit(m *labMachine, drive, baseLocal string) error {
	abs, _ := filepath.Abs(baseLocal)
	job := "commit-" + drive
	if _, err := m.qmpCmd("block-commit", map[string]interface{}{"job-id": job, "device": drive, "base": abs}); err != nil {
		return err
	}
	deadline := time.Now().Add(5 * time.Minute)
	completed := false
	for time.Now().Before(deadline) {
		raw, err := m.qmpCmd("query-block-jobs", nil)
		if err != nil {
			return err
		}
		var jobs []struct {
			Device string `json:"device"`
			Ready  bool   `json:"ready"`
		}
		if err := json.Unmarshal(raw, &jobs); err != nil {
			return err
		}
		found := false
		for _, j := range jobs {
			if j.Device != job {
				continue
			}
			found = true
			if j.Ready && !completed {
				if _, err := m.qmpCmd("block-job-complete", map[string]interface{}{"device": job}); err != nil {
					return err
				}
				completed = true
			}
		}
		if !found {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	raw, err := m.qmpCmd("query-block", nil)
	if err != nil {
		return err
	}
	var devs []struct {
		Device   string `json:"device"`
		Inserted *struct {
			File string `json:"file"`
		} `json:"inserted"`
	}
	if err := json.Unmarshal(raw, &devs); err != nil {
		return err
	}
	for _, d := range devs {
		if d.Device == drive && d.Inserted != nil && d.Inserted.File == abs {
			return nil
		}
	}
	return fmt.Errorf("block-commit of %s into %s did not pivot", drive, abs)
}
