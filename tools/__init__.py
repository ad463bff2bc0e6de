"""Wrappers shared by connectors and labs: qemu-img, qemu-nbd, QMP, QEMU boots, processes. Public names only;
they import the core and nothing above it."""
