// vcsim-lab: govmomi's vCenter simulator (Debian's package) with the Sendense lab's extensions
// (labs/vsphere/overlay). Prints "VCSIM_URL=https://user:pass@127.0.0.1:PORT/sdk" once it listens.
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
	flag.Parse()

	model := simulator.VPX()
	model.Host = *hosts
	model.Machine = *vms
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim-lab: %v", err)
	}
	model.Service.Listen = &url.URL{Host: *listen}
	model.Service.TLS = new(tls.Config)
	model.Service.RegisterEndpoints = true
	model.Service.HandleFunc("/sendense-lab/write", simulator.LabHandleWrite)

	s := model.Service.NewServer()
	fmt.Printf("VCSIM_URL=%s\n", s.URL)
	os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	s.Close()
	model.Remove()
}
