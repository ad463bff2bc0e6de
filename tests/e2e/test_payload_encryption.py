"""Payload encryption end to end (issue 11): jobs created through the CLI on the embedded stack with
its real worker; their histories, read by a client without the key, hold ciphertext only (the spec,
a distinctive path, an AWS endpoint, failure messages); with the key they decode."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import subprocess
import uuid
from pathlib import Path

import yaml
from helpers_kvm import MiB, make_qcow2, qemu_io
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from app import stack
from app.cli.client import Jobs
from sendense.errors import SendenseError
from sendense.spec import load_spec
from tests.e2e.conftest import Cli
from tests.workers.test_codec import all_payloads
from workers import codec


def base64_decoded(text: str) -> list[bytes]:
    """Every base64 string in `text`, decoded (how the CLI prints payload bytes it cannot decode)."""
    out = []
    for m in re.findall(r'"([A-Za-z0-9+/]{8,}={0,2})"', text):
        with contextlib.suppress(binascii.Error, ValueError):
            out.append(base64.b64decode(m, validate=True))
    return out


def test_history_holds_ciphertext_only(e2e_stack: Cli, tmp_path: Path) -> None:
    cli = e2e_stack
    marker = uuid.uuid4().hex[:12]
    vm_dir = tmp_path / f"vm-{marker}"
    vm_dir.mkdir()
    disk = make_qcow2(vm_dir / "root.qcow2", 8 * MiB)
    qemu_io(disk, "write -P 0x5a 0 1M")
    kvm_spec = tmp_path / "kvm.yaml"
    kvm_spec.write_text(
        yaml.safe_dump(
            {
                "name": "e2e-sealed-kvm",
                "source": {"platform": "kvm", "disks": [str(disk)]},
                "target": {"platform": "kvm", "path": str(tmp_path / f"replicas-{marker}")},
                "schedule": {"interval": "1h"},
            }
        )
    )
    endpoint = f"http://ep-{marker}.invalid:9"
    aws_spec = tmp_path / "aws.yaml"
    aws_spec.write_text(
        yaml.safe_dump(
            {
                "name": "e2e-sealed-aws",
                "source": {
                    "platform": "aws",
                    "instance_id": "i-0123456789abcdef0",
                    "region": "eu-west-1",
                    "endpoint_url": endpoint,
                },
                "target": {"platform": "kvm", "path": str(tmp_path / "aws-replicas")},
                "schedule": {"interval": "1h"},
            }
        )
    )
    cli.run("job", "create", "-f", str(kvm_spec))
    cli.wait_point("e2e-sealed-kvm", 1)

    async def check() -> None:
        jobs = await Jobs.connect()  # the CLI's client: with the stack's key
        # through the SDK, as a service would (the CLI would refuse it first: no AWS credentials here)
        await jobs.create(load_spec(aws_spec))
        with contextlib.suppress(SendenseError):
            await jobs.wait_started("e2e-sealed-aws", timeout=20)  # fails: nothing answers there
        address = jobs.client.service_client.config.target_host
        blind = await Client.connect(address, data_converter=pydantic_data_converter)
        decoded_texts = []
        for name in ("e2e-sealed-kvm", "e2e-sealed-aws"):
            history = await blind.get_workflow_handle(f"job-{name}").fetch_history()
            raw = history.to_json()  # (payload data in it is base64: the wire bytes are checked too)
            wire = b"".join(ev.SerializeToString() for ev in history.events)
            assert marker not in raw and endpoint not in raw, name
            assert marker.encode() not in wire and endpoint.encode() not in wire, name
            # (patch markers: the SDK's core writes the ids of workflow.patched() changes itself)
            events = [
                ev for ev in history.events if ev.marker_recorded_event_attributes.marker_name != "core_patch"
            ]
            payloads = [p for ev in events for p in all_payloads(ev)]
            # search attributes stay readable (the server indexes them): job name, platforms, VM
            # name, state, and nothing else (no path, no endpoint: the raw check above)
            indexed = [p for p in payloads if "type" in p.metadata]
            assert {p.metadata["type"] for p in indexed} <= {b"Keyword", b"KeywordList"}, name
            payloads = [p for p in payloads if "type" not in p.metadata]
            assert len(payloads) >= 3, name
            unsealed = [
                (p.metadata, p.data[:80]) for p in payloads if p.metadata["encoding"] != codec.ENCODING
            ]
            assert not unsealed, (name, unsealed)
            # with the key: the same history decodes, and it did hold the spec
            opened: list[Payload] = await jobs.client.data_converter.payload_codec.decode(payloads)  # type: ignore[union-attr]
            decoded_texts += [p.data.decode(errors="replace") for p in opened]
        assert any(f"vm-{marker}" in t for t in decoded_texts)
        assert any(endpoint in t for t in decoded_texts)

        # the Temporal CLI, a real client of the codec server protocol (as the web UI is)
        info = json.loads((cli.state / "stack.json").read_text())
        show = [stack.temporal_binary(), "workflow", "show", "--address", info["address"]]
        show += ["-w", "job-e2e-sealed-kvm", "-o", "json"]
        blind_show = subprocess.run(show, capture_output=True, text=True, timeout=60, check=True).stdout
        assert f"vm-{marker}" not in blind_show
        assert not any(f"vm-{marker}".encode() in b for b in base64_decoded(blind_show))
        assert any(b == codec.ENCODING for b in base64_decoded(blind_show))
        decoded = subprocess.run(
            [*show, "--codec-endpoint", info["codec_url"]],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert any(f"vm-{marker}".encode() in b for b in base64_decoded(decoded)) or f"vm-{marker}" in decoded

        for name in ("e2e-sealed-kvm", "e2e-sealed-aws"):
            with contextlib.suppress(RPCError):
                await jobs.handle(name).terminate("test cleanup")

    asyncio.run(check())
