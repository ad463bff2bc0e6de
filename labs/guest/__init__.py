"""The bootable guest: a real Linux disk for demos, drills and crash-consistency checks (build.py),
booted under QEMU with its serial console watched (boot.py), and checked offline (fscheck.py)."""
