"""`sendense certs agent` and the agent options of `sendense worker`: files made, one-line refusals."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509

SENDENSE = str(Path(sys.executable).with_name("sendense"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SENDENSE, *args], capture_output=True, text=True, timeout=60, env=env)


def test_certs_agent_makes_a_certificate_naming_the_host_id(tmp_path: Path) -> None:
    r = run("certs", "agent", str(tmp_path / "pki"), "--host-id", "site-a", "--address", "10.1.2.3", "--json")
    assert r.returncode == 0, r.stderr
    files = {Path(f).name for f in json.loads(r.stdout)["files"]}
    assert files == {"ca.pem", "ca-key.pem", "agent-site-a.pem", "agent-site-a-key.pem"}
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "agent-site-a.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["sendense://host/site-a"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    for f in files:
        assert stat.S_IMODE((tmp_path / "pki" / f).stat().st_mode) == 0o600
    # a second agent reuses the CA; the same one again is refused, nothing overwritten
    assert run("certs", "agent", str(tmp_path / "pki"), "--host-id", "site-b").returncode == 0
    again = run("certs", "agent", str(tmp_path / "pki"), "--host-id", "site-a")
    assert (
        again.returncode != 0
        and "already exists" in again.stderr
        and len(again.stderr.strip().splitlines()) == 1
    )
    bad = run("certs", "agent", str(tmp_path / "pki"), "--host-id", "bad/id")
    assert bad.returncode != 0 and "host id 'bad/id'" in bad.stderr


def test_worker_refuses_a_bad_role_or_data_address_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "SENDENSE_HOME": str(tmp_path), "SENDENSE_TEMPORAL": "127.0.0.1:1"}
    r = run("worker", "--role", "boss", env=env)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].endswith(
        "--role boss: one of all, host, control"
    )
    r = run("worker", "--role", "control", "--data-listen", "nowhere", env=env)
    assert r.returncode != 0
    assert "Temporal server at 127.0.0.1:1 is not reachable" in r.stderr  # (control: no data server)
