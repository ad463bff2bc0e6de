"""Suite-wide rules. Tests marked `root` fail (never skip) when the suite is not run as root: the
README's setup runs as root, and a skip would hide a broken setup."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail(
            f"{item.nodeid} needs root (the lab libvirtd, setpriv to another user): run the suite as root, "
            "as scripts/test.sh and CI do",
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def agent_policy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The agents the tests run (in-process workers, the embedded stack's worker) serve every platform
    and endpoint, reading and writing under the temp directories the tests make their VMs and
    targets in. tests/sendense/test_policy.py and the e2e policy tests use narrower ones."""
    import tempfile

    import yaml

    base = tmp_path_factory.getbasetemp()
    p = base / "agent-policy.yaml"
    roots = sorted({str(base), tempfile.gettempdir()})
    p.write_text(
        yaml.safe_dump(
            {
                "platforms": ["kvm", "aws", "vsphere", "cloudstack", "memory"],
                "source_roots": roots,
                "target_roots": roots,
                "endpoints": ["*"],
                "hooks": ["/bin/true", "/bin/false"],
            }
        )
    )
    old = os.environ.get("SENDENSE_POLICY")
    os.environ["SENDENSE_POLICY"] = str(p)
    yield p
    if old is None:
        os.environ.pop("SENDENSE_POLICY", None)
    else:
        os.environ["SENDENSE_POLICY"] = old
