"""The product deployed on two sites (labs.sites.TwoSites), as its users deploy it.

    with TwoSites(rate="1gbit") as s:
        d = Deployment(s, tmp, rtt_ms=20).start()
        d.cli("job", "create", "-f", spec)          # the CLI in site B, mTLS to Temporal
        d.kill("a"); d.start_agent("a")             # SIGKILL an agent, start it again

- Site B (the DR site) runs the control plane: Temporal's dev server on B's loopback only, behind a
  TLS front (labs.sites.tlsfront, mutual TLS) on B's end of the link; and agent `site-b` (`sendense
  worker --role all`: workflows, and the target's host activities).
- Site A runs agent `site-a` (`--role host`): the source's host activities and its data server on A's
  end of the link (`--data-listen`), which B's agent reads through a delaying relay in B when
  `rtt_ms` > 0 (so the copy sees the round trip; see NOTES.md on what the relay models). B's agent
  serves data too (failback: A's agent pulls the failed-over VM's snapshots), through a relay in A.
- Both agents reach Temporal only through the front, with their agent certificates (the same files
  serve Temporal mTLS and the data connections between agents); the CLI uses the `admin` client
  certificate. All certificates come from `sendense certs make` / `sendense certs agent` (tools.certs).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from labs.sites.netns import LabError, TwoSites
from labs.sites.tlsfront import TlsFront
from sendense import config
from tools import certs

TEMPORAL_PORT = 7233  # on B's loopback
FRONT_PORT = 7234  # on B's end of the link
DATA_PORT = 7400  # agent A's data server
HOSTS = {"a": "site-a", "b": "site-b"}


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name}: not found beside {sys.executable} nor on PATH (scripts/install.sh)")
    return found


@dataclass
class Deployment:
    sites: TwoSites
    root: Path
    rtt_ms: float = 0.0
    roots: dict[str, list[str]] = field(default_factory=dict)  # policy: source_roots, target_roots
    agent_env: dict[str, str] = field(default_factory=dict)
    site_env: dict[str, dict[str, str]] = field(default_factory=dict)  # one agent's own (site -> env)
    # an agent given another host's certificate (site -> host id whose certificate it presents): tests
    cert_of: dict[str, str] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=lambda: ["kvm"])  # what the agents' policies allow
    cli_env: dict[str, str] = field(default_factory=dict)  # the operator's (e.g. a cloud's keys)
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    relay_port: int | None = field(default=None, init=False)  # A's data server, as B reaches it
    relay_port_b: int | None = field(default=None, init=False)  # B's (failback: A pulls from B)

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    def home(self, site: str) -> Path:
        return self.root / f"home-{site}"

    def start(self) -> Deployment:
        s = self.sites
        self.root.mkdir(parents=True, exist_ok=True)
        certs.make(self.pki, server_names=["temporal", s.addr["b"]], clients=["admin"])
        for site, host in HOSTS.items():
            certs.agent(self.pki, host, [s.addr[site]])
        for host in set(self.cert_of.values()) - set(HOSTS.values()):
            certs.agent(self.pki, host, [])
        sa = [a for n, k in config.SEARCH_ATTRIBUTES.items() for a in ("--search-attribute", f"{n}={k}")]
        s.popen(
            "b",
            [_bin("temporal"), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(TEMPORAL_PORT),
             "--headless", "--db-filename", str(self.root / "temporal.db"), "--log-level", "warn", *sa],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        s.wait_port("b", "127.0.0.1", TEMPORAL_PORT, timeout=90)
        TlsFront(s, "b", (s.addr["b"], FRONT_PORT), ("127.0.0.1", TEMPORAL_PORT), self.pki, mtls=True).start()
        key = self.root / "codec.key"
        subprocess.run([_bin("sendense"), "codec-key", "new", str(key)], check=True, capture_output=True)
        if self.rtt_ms > 0:  # each agent reaches the other's data server through a relay in its site
            _, self.relay_port = s.relay("b", (s.addr["a"], DATA_PORT), self.rtt_ms)
            _, self.relay_port_b = s.relay("a", (s.addr["b"], DATA_PORT), self.rtt_ms)
        for site in HOSTS:
            self.home(site).mkdir(mode=0o700, exist_ok=True)
            (self.home(site) / "policy.yaml").write_text(
                yaml.safe_dump({"platforms": self.platforms, **{k: list(v) for k, v in self.roots.items()}})
            )
        self.start_agent("a")
        self.start_agent("b")
        return self

    def env(self, site: str | None = None) -> dict[str, str]:
        """The environment of an agent (site) or of the CLI (None), all in site B's view of Temporal."""
        p = self.pki
        env = {
            **TwoSites.env(),
            "SENDENSE_TEMPORAL": f"{self.sites.addr['b']}:{FRONT_PORT}",
            "SENDENSE_TLS_CA": str(p / "ca.pem"),
            "SENDENSE_TLS_SERVER_NAME": "temporal",
            "SENDENSE_CODEC_KEY": str(self.root / "codec.key"),
        }
        if site is None:
            env.update(
                SENDENSE_HOME=str(self.root / "home-cli"),
                SENDENSE_TLS_CERT=str(p / "admin.pem"),
                SENDENSE_TLS_KEY=str(p / "admin-key.pem"),
                SENDENSE_HOST_ID=HOSTS["b"],
            )
            return env | self.cli_env
        host = HOSTS[site]
        cert = self.cert_of.get(site, host)
        env.update(
            SENDENSE_HOME=str(self.home(site)),
            SENDENSE_HOST_ID=host,
            SENDENSE_POLICY=str(self.home(site) / "policy.yaml"),
            SENDENSE_TLS_CERT=str(p / f"agent-{cert}.pem"),
            SENDENSE_TLS_KEY=str(p / f"agent-{cert}-key.pem"),
            SENDENSE_AGENT_CERT=str(p / f"agent-{cert}.pem"),
            SENDENSE_AGENT_KEY=str(p / f"agent-{cert}-key.pem"),
            SENDENSE_AGENT_CA=str(p / "ca.pem"),
            **self.agent_env,
            **self.site_env.get(site, {}),
        )
        return env

    def start_agent(self, site: str) -> subprocess.Popen[bytes]:
        argv = [_bin("sendense"), "worker", "--role", "host" if site == "a" else "all"]
        argv += ["--data-listen", f"{self.sites.addr[site]}:{DATA_PORT}"]
        relay = self.relay_port if site == "a" else self.relay_port_b
        if relay is not None:  # the other agent reaches it through the relay (the round trip)
            argv += ["--data-advertise", f"127.0.0.1:{relay}"]
        log = open(self.root / f"agent-{site}.log", "ab")  # noqa: SIM115 - the process keeps it
        p = self.sites.popen(site, argv, env=self.env(site), stdout=log, stderr=subprocess.STDOUT)
        self.agents[site] = p
        time.sleep(0.5)
        if p.poll() is not None:
            raise LabError(f"agent {site} exited at once: {self.log_tail(site)}")
        return p

    def kill(self, site: str) -> None:
        p = self.agents.pop(site)
        p.kill()
        p.wait(timeout=10)

    def log_tail(self, site: str, lines: int = 5) -> str:
        try:
            text = (self.root / f"agent-{site}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The CLI in site B (the operator's console at the DR site)."""
        r = self.sites.run("b", [_bin("sendense"), *args], env=self.env(None), timeout=timeout)
        if check and r.returncode != 0:
            raise LabError(
                f"sendense {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()} "
                f"[agent a: {self.log_tail('a')}] [agent b: {self.log_tail('b')}]"
            )
        return r

    def json(self, *args: str, timeout: float = 300) -> Any:
        import json

        return json.loads(self.cli(*args, "--json", timeout=timeout).stdout)

    def wait_point(self, job: str, count: int = 1, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.json("job", "status", job)
            if st["syncs"] >= count and st["state"] != "syncing":
                return dict(st)
            if time.monotonic() > deadline:
                raise LabError(
                    f"job {job} did not reach {count} syncs: {st} [agent a: {self.log_tail('a')}] "
                    f"[agent b: {self.log_tail('b')}]"
                )
            time.sleep(0.5)

    def link_bytes(self, site: str = "a") -> int:
        """Bytes site `site` sent on the link (its veth end's tx counter)."""
        r = self.sites.run(site, ["cat", f"/sys/class/net/{self.sites.dev[site]}/statistics/tx_bytes"])
        return int(r.stdout.strip())

    def tokens(self, job: str) -> list[dict[str, Any]]:
        """The target agent's resume tokens of a job's running copies."""
        import json

        out = []
        for p in (self.home("b") / "work" / job / "tokens").glob("*.json"):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                pass
        return out


__all__ = ["DATA_PORT", "HOSTS", "Deployment"]
