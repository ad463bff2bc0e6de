// Sendense vSphere lab: NFC uploads that keep their bytes.
//
// OvfManager.CreateImportSpec + ResourcePool.ImportVApp make the VM (its disks: empty thin VMDKs of the
// OVF's capacities, labCreateDisk) and an HttpNfcLease whose deviceUrl[].url takes an HTTP PUT/POST of a
// streamOptimized VMDK per disk. Stock vcsim copied the body to ioutil.Discard (a 0-byte disk). Here the
// upload is converted into the lab's thin monolithicSparse VMDK of the disk's capacity and replaces the
// disk's file: the disk reads exactly the uploaded image's bytes (zeros after the image's end when it is
// smaller than the OVF's capacity). HttpNfcLeaseAbort destroys the VM being imported, files included.

package simulator

import (
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"path"
	"path/filepath"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// labNfcUpload serves a PUT/POST to a lease's device URL (ServeNFC, patched http_nfc_lease.go). The lease
// is ready (ServeNFC answers 404 for a lease that was completed or aborted). 200 done; 400 the body is no
// VMDK or its capacity is larger than the disk's; 404 the lease's VM is gone; 500 anything else.
func labNfcUpload(w http.ResponseWriter, r *http.Request, lease *HttpNfcLease, name, file string) {
	fail := func(code int, format string, args ...interface{}) {
		msg := fmt.Sprintf(format, args...)
		log.Printf("sendense lab: nfc %s %s: %s", r.Method, name, msg)
		http.Error(w, msg, code)
	}
	defer r.Body.Close()
	vm, ok := Map.Get(lease.Info.Entity).(*VirtualMachine)
	if !ok {
		fail(http.StatusNotFound, "the lease's virtual machine %s is gone", lease.Info.Entity.Value)
		return
	}
	var disk *types.VirtualDisk
	for _, dev := range vm.Config.Hardware.Device {
		if d, ok := dev.(*types.VirtualDisk); ok {
			if b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && path.Base(b.FileName) == name {
				disk = d
				break
			}
		}
	}
	dir := filepath.Dir(file)
	up := filepath.Join(dir, ".nfc-"+name+".upload")
	defer os.Remove(up)
	f, err := os.Create(up)
	if err != nil {
		fail(http.StatusInternalServerError, "%v", err)
		return
	}
	n, err := io.Copy(f, r.Body)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		fail(http.StatusInternalServerError, "upload: %v", err)
		return
	}
	if disk == nil { // not a disk (an ISO image): the bytes as they came
		if err := os.Rename(up, file); err != nil {
			fail(http.StatusInternalServerError, "%v", err)
			return
		}
		log.Printf("sendense lab: nfc %s %s: %d bytes", r.Method, file, n)
		return
	}
	fileName := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName
	local := labLocal(vm, fileName)
	capacity := labDiskCapacity(disk)
	out, err := labQemuImg("info", "--output=json", labAlone(up)) // the upload's own parent hint is never followed
	if err != nil {
		fail(http.StatusBadRequest, "not a VMDK: %v", err)
		return
	}
	var info struct {
		Size int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		fail(http.StatusBadRequest, "not a VMDK: %v", err)
		return
	}
	if info.Size > capacity {
		fail(http.StatusBadRequest, "the image's capacity %d is larger than the disk's capacity %d (%s)", info.Size, capacity, fileName)
		return
	}
	made := filepath.Join(dir, ".nfc-"+name)
	defer os.Remove(made)
	if _, err := labQemuImg("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", made, fmt.Sprint(capacity)); err != nil {
		fail(http.StatusInternalServerError, "%v", err)
		return
	}
	if _, err := labQemuImg("convert", "-n", "--target-is-zero", "-O", "vmdk", labAlone(up), made); err != nil {
		fail(http.StatusBadRequest, "cannot read the image: %v", err)
		return
	}
	labCBT.Lock()
	err = os.Rename(made, local)
	labCBT.Unlock()
	if err != nil {
		fail(http.StatusInternalServerError, "%v", err)
		return
	}
	labRefreshLayouts(vm)
	log.Printf("sendense lab: nfc %s %s: %d bytes, a %d-byte image -> %s", r.Method, name, n, info.Size, fileName)
}

// labLeaseAbort: HttpNfcLeaseAbort as vSphere: the lease goes to state "error" (with the client's fault,
// else RequestCanceled), its URLs stop answering, and the VM being imported is destroyed with its files.
// Stock vcsim deleted the lease and kept the VM. Aborting a lease that is not "ready" is InvalidState.
func labLeaseAbort(ctx *Context, l *HttpNfcLease, req *types.HttpNfcLeaseAbort) soap.HasFault {
	body := new(methods.HttpNfcLeaseAbortBody)
	if l.State != types.HttpNfcLeaseStateReady {
		body.Fault_ = Fault("lease is "+string(l.State), &types.InvalidState{})
		return body
	}
	nfcLease.Delete(l.Self)
	if vm, ok := Map.Get(l.Info.Entity).(*VirtualMachine); ok {
		res := vm.DestroyTask(ctx, &types.Destroy_Task{This: vm.Self})
		if task, ok := Map.Get(res.(*methods.Destroy_TaskBody).Res.Returnval).(*Task); ok && task.Info.Error != nil {
			log.Printf("sendense lab: abort of %s: destroying %s: %#v", l.Self.Value, vm.Name, task.Info.Error.Fault)
		}
	}
	reason := req.Fault
	if reason == nil {
		reason = &types.LocalizedMethodFault{Fault: &types.RequestCanceled{}, LocalizedMessage: "the import was aborted"}
	}
	Map.Update(l, []types.PropertyChange{
		{Name: "state", Val: types.HttpNfcLeaseStateError},
		{Name: "error", Val: reason},
	})
	body.Res = new(types.HttpNfcLeaseAbortResponse)
	return body
}
