"""Fixtures of the KVM VM tests (test_kvm_vms*.py); the other KVM tests do not use them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_vms import Site, make_site, qemu_processes

from labs.guest.build import build


@pytest.fixture
def no_vm_leaks(tmp_path: Path) -> Iterator[None]:
    """Fails a test that leaves a QEMU of its own running, and kills it: a daemonized VM would
    otherwise outlive the test run."""
    yield
    leaked = qemu_processes(tmp_path)
    for p in leaked:
        p.kill()
    assert not leaked, f"QEMU left running: {[p.pid for p in leaked]}"


@pytest.fixture(scope="session")
def guest_image() -> Path:
    return build()  # cached by scripts/install.sh


@pytest.fixture
def vm_site(tmp_path: Path, guest_image: Path) -> Iterator[Site]:
    s = make_site(tmp_path, guest_image)
    yield s
    shutil.rmtree(s.run, ignore_errors=True)
