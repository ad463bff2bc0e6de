"""VMware vSphere (vCenter or ESXi) through pyvmomi: a VM as a replication source (Changed Block
Tracking, VM snapshots, bytes through nbdkit's vddk plugin)."""
