"""Connect to Temporal with TLS and describe a namespace; prints `OK <namespace>` or one error line.

    python -m labs.sites.temporal_probe HOST:PORT --ca CA.pem [--cert C.pem --key K.pem] [--domain temporal]

Run inside a site (TwoSites.run) to show what that site can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path


async def probe(target: str, ca: Path, cert: Path | None, key: Path | None, domain: str, ns: str) -> str:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client
    from temporalio.service import TLSConfig

    tls = TLSConfig(
        server_root_ca_cert=ca.read_bytes(),
        domain=domain,
        client_cert=cert.read_bytes() if cert else None,
        client_private_key=key.read_bytes() if key else None,
    )
    client = await asyncio.wait_for(Client.connect(target, namespace=ns, tls=tls), timeout=15)
    await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=ns))
    return f"OK {ns}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--domain", default="temporal")
    p.add_argument("--namespace", default="default")
    a = p.parse_args()
    try:
        print(asyncio.run(probe(a.target, a.ca, a.cert, a.key, a.domain, a.namespace)))
    except Exception as e:  # one line, whatever failed
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"FAIL {a.target}: {type(e).__name__}: {msg[:300]}", flush=True)
        os._exit(1)  # not sys.exit: the Rust runtime's teardown after a failed connect can abort


if __name__ == "__main__":
    main()
