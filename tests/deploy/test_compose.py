"""docker-compose.yml (no Docker engine here to run it): what it publishes is bound to this host's
loopback only, and every client of the Temporal server (workers, host agent, UI, admin tools) speaks
mTLS with files `sendense certs make` and `sendense codec-key new` produce (issue 11)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tools import certs

ROOT = Path(__file__).resolve().parents[2]
TLS_DIR = "/etc/sendense/tls"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def made_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The file names `sendense certs make` (defaults) and `codec-key new` produce."""
    made = certs.make(tmp_path_factory.mktemp("secrets"))
    return {p.name for p in made.files} | {"codec.key"}


def env(svc: dict[str, Any]) -> dict[str, str]:
    e = svc.get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) for item in e)
    return {k: str(v) for k, v in e.items()}


def tls_files(values: list[str]) -> list[str]:
    return [v.removeprefix(TLS_DIR + "/") for v in values if v.startswith(TLS_DIR + "/")]


def test_every_published_port_is_on_loopback(compose: dict[str, Any]) -> None:
    published = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):  # long syntax
                assert port.get("host_ip") == "127.0.0.1", (name, port)
                published.append((name, port["published"]))
                continue
            parts = str(port).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name}: {port} is not bound to 127.0.0.1"
            published.append((name, int(parts[1])))
        if svc.get("network_mode") == "host":
            assert not svc.get("ports"), name  # (host network: nothing to publish)
    # exactly what the README's security model says: the frontend and the UI, nothing else
    assert sorted(published) == [("temporal", 7233), ("temporal-ui", 8080)]
    assert not compose["services"]["postgresql"].get("ports")


def test_server_requires_client_certificates(compose: dict[str, Any], made_files: set[str]) -> None:
    svc = compose["services"]["temporal"]
    e = env(svc)
    assert e["TEMPORAL_TLS_REQUIRE_CLIENT_AUTH"] == "true"
    for var in (
        "TEMPORAL_TLS_SERVER_CA_CERT", "TEMPORAL_TLS_SERVER_CERT", "TEMPORAL_TLS_SERVER_KEY",
        "TEMPORAL_TLS_FRONTEND_CERT", "TEMPORAL_TLS_FRONTEND_KEY", "TEMPORAL_TLS_CLIENT1_CA_CERT",
    ):  # fmt: skip
        assert e[var].startswith(TLS_DIR + "/") and e[var].removeprefix(TLS_DIR + "/") in made_files, var
    for var in ("TEMPORAL_TLS_INTERNODE_SERVER_NAME", "TEMPORAL_TLS_FRONTEND_SERVER_NAME"):
        assert e[var] in certs.DEFAULT_SERVER_NAMES  # a name the server certificate carries
    for var in (
        "TEMPORAL_TLS_INTERNODE_DISABLE_HOST_VERIFICATION",
        "TEMPORAL_TLS_FRONTEND_DISABLE_HOST_VERIFICATION",
    ):
        assert e.get(var, "false") == "false"
    # its own health check and the setup job are clients too: over mTLS
    hc = [a for a in svc["healthcheck"]["test"] if a.startswith("--tls-")]
    assert {a.split("=", 1)[0] for a in hc} == {
        "--tls-ca-path",
        "--tls-cert-path",
        "--tls-key-path",
        "--tls-server-name",
    }
    assert set(tls_files([a.split("=", 1)[1] for a in hc])) <= made_files
    setup = " ".join(compose["services"]["temporal-setup"]["command"])
    for flag in ("--tls-ca-path", "--tls-cert-path", "--tls-key-path", "--tls-server-name temporal"):
        assert flag in setup
    assert setup.count("$$T") >= 3  # every temporal call of the job carries the TLS flags


def test_ui_reaches_the_server_with_its_client_certificate(
    compose: dict[str, Any], made_files: set[str]
) -> None:
    e = env(compose["services"]["temporal-ui"])
    assert set(tls_files([e["TEMPORAL_TLS_CA"], e["TEMPORAL_TLS_CERT"], e["TEMPORAL_TLS_KEY"]])) <= made_files
    assert e["TEMPORAL_TLS_CERT"].endswith("/ui.pem") and e["TEMPORAL_TLS_ENABLE_HOST_VERIFICATION"] == "true"
    assert e["TEMPORAL_TLS_SERVER_NAME"] in certs.DEFAULT_SERVER_NAMES
    assert e["TEMPORAL_CODEC_ENDPOINT"].startswith("http://127.0.0.1:")  # the browser's own machine


@pytest.mark.parametrize("name", ["worker", "host-agent"])
def test_agents_use_mtls_and_the_payload_key(
    compose: dict[str, Any], made_files: set[str], name: str
) -> None:
    svc = compose["services"][name]
    e = {k: v.replace("${SENDENSE_AGENT_CERT:-worker}", "worker") for k, v in env(svc).items()}
    files = [e["SENDENSE_TLS_CA"], e["SENDENSE_TLS_CERT"], e["SENDENSE_TLS_KEY"], e["SENDENSE_CODEC_KEY"]]
    assert set(tls_files(files)) <= made_files and len(tls_files(files)) == 4
    assert e["SENDENSE_TLS_SERVER_NAME"] in certs.DEFAULT_SERVER_NAMES
    mounts = [m["target"] for m in svc["volumes"] if isinstance(m, dict)]
    assert TLS_DIR in mounts


def test_no_default_database_password(compose: dict[str, Any]) -> None:
    for name in ("postgresql", "temporal"):
        for k, v in env(compose["services"][name]).items():
            if "PASSWORD" in k or k.endswith("_PWD"):
                assert ":?" in v, (name, k, v)  # compose refuses to start without one


def test_secrets_directory_is_not_committed() -> None:
    assert "/deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()


def test_every_agent_in_the_compose_file_has_a_policy() -> None:
    """An agent without a policy does not start (sendense.policy): the control worker's ships here,
    valid; a host agent reads its host's own."""
    from pathlib import Path

    import yaml

    from sendense import policy

    services = yaml.safe_load(Path("docker-compose.yml").read_text())["services"]
    for name in ("worker", "host-agent"):
        assert services[name]["environment"]["SENDENSE_POLICY"].startswith("/etc/sendense/")
    control = policy.load(Path("deploy/policy/control.yaml"))
    assert control.platforms == ["aws"] and control.source_roots == [] and control.target_roots == []
