"""Suite-wide rules. Tests marked `root` fail (never skip) when the suite is not run as root: the
README's setup runs as root, and a skip would hide a broken setup."""

from __future__ import annotations

import os

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail(
            f"{item.nodeid} needs root (the lab libvirtd, setpriv to another user): run the suite as root, "
            "as scripts/test.sh and CI do",
            pytrace=False,
        )
