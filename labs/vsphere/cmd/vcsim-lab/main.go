// vcsim-lab: govmomi's vCenter simulator (Debian's package) with the Sendense lab's extensions
// (labs/vsphere/overlay). Prints "VCSIM_DATASTORE=<name> <local dir>" per datastore, then
// "VCSIM_URL=https://user:pass@127.0.0.1:PORT/sdk" once it listens.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address (port 0: a free port)")
	hosts := flag.Int("standalone-host", 1, "standalone hosts")
	vms := flag.Int("vm", 2, "VMs per host/cluster")
	user := flag.String("username", "user", "the only user SOAP Login and the lab endpoints accept")
	pass := flag.String("password", "pass", "its password")
	diskMiB := flag.Int64("disk-mib", 1, "capacity of the default inventory VMs' disks, MiB (thin VMDKs)")
	boot := flag.Bool("qemu", true, "power operations run QEMU on the VM's disks (false: state changes only)")
	accel := flag.String("accel", "tcg", "QEMU accelerator of the VMs (tcg or kvm)")
	flag.Parse()
	simulator.LabDefaultDiskKB = *diskMiB * 1024

	model := simulator.VPX()
	model.Host = *hosts
	model.Machine = *vms
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim-lab: %v", err)
	}
	// the model's own VMs were powered on without QEMU; from here power operations run it
	simulator.LabPowerEnabled = *boot
	simulator.LabAccel = *accel
	// an explicit user: vcsim's default accepts any non-empty user/password
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	model.Service.TLS = new(tls.Config)
	model.Service.RegisterEndpoints = true
	model.Service.HandleFunc("/sendense-lab/disk", simulator.LabDiskHandler(model.Service.Listen.User))
	model.Service.HandleFunc("/sendense-lab/ctk-reset", simulator.LabCtkResetHandler(model.Service.Listen.User))

	for _, e := range simulator.Map.All("Datastore") { // where the disk files live (the lab removes them)
		ds := e.(*simulator.Datastore)
		fmt.Printf("VCSIM_DATASTORE=%s %s\n", ds.Name, ds.Info.GetDatastoreInfo().Url)
	}

	s := model.Service.NewServer()
	fmt.Printf("VCSIM_URL=%s\n", s.URL)
	os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	simulator.LabPowerShutdown()
	s.Close()
	model.Remove()
}
