"""The payload codec (workers/codec.py) with real AES-256-GCM: sealed payloads, key ids and rotation,
key files, and a client/worker pair whose history holds ciphertext only."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from app import stack
from workers import codec
from workers.codec import CodecError, EncryptionCodec


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode())


def test_sealed_payload_hides_data_and_metadata_and_opens_again() -> None:
    c = EncryptionCodec(os.urandom(32))
    p = plain("s3cr3t-endpoint http://10.1.2.3:9000")
    sealed = c.seal(p)
    assert sealed.metadata["encoding"] == codec.ENCODING
    assert sealed.metadata[codec.KEY_ID] == c.key_id.encode()
    assert set(sealed.metadata) == {"encoding", codec.KEY_ID}  # json/plain is inside, not beside
    assert b"s3cr3t" not in sealed.SerializeToString() and b"json/plain" not in sealed.SerializeToString()
    assert c.open(sealed) == p
    assert c.seal(p).data != sealed.data  # a fresh nonce each time


def test_rotation_old_keys_open_new_key_seals() -> None:
    old, new = os.urandom(32), os.urandom(32)
    before = EncryptionCodec(old)
    sealed_before = before.seal(plain("a"))
    after = EncryptionCodec(new, old_keys=[old])
    assert after.key_id == codec.key_id(new) != before.key_id
    assert after.open(sealed_before) == plain("a")
    assert after.seal(plain("b")).metadata[codec.KEY_ID] == after.key_id.encode()
    # the old process cannot read what the new key sealed: one line naming the key id, never a key
    with pytest.raises(CodecError) as exc:
        before.open(after.seal(plain("b")))
    msg = str(exc.value)
    assert "\n" not in msg and f"key id {after.key_id}" in msg and "SENDENSE_CODEC_OLD_KEYS" in msg
    assert new.hex() not in msg and old.hex() not in msg


def test_altered_or_relabelled_payload_fails_authentication() -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    c = EncryptionCodec(k1, old_keys=[k2])
    sealed = c.seal(plain("x"))
    flipped = Payload()
    flipped.CopyFrom(sealed)
    flipped.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(CodecError, match="fails authentication"):
        c.open(flipped)
    relabelled = Payload()
    relabelled.CopyFrom(sealed)
    relabelled.metadata[codec.KEY_ID] = codec.key_id(k2).encode()  # the key id is the associated data
    with pytest.raises(CodecError, match="fails authentication"):
        c.open(relabelled)


def test_unsealed_payloads_pass_through() -> None:
    """Histories written before encryption was on still replay."""
    c = EncryptionCodec(os.urandom(32))
    assert c.open(plain("old")) == plain("old")


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "codec.key"
    kid = codec.new_key(path)
    assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_size == 32
    assert codec.key_id(codec.read_key(path)) == kid == codec.ensure_key(path)
    with pytest.raises(FileExistsError):
        codec.new_key(path)  # never over an existing key
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        codec.new_key(link)  # nor through a symlink
    assert not (tmp_path / "elsewhere").exists()

    with pytest.raises(CodecError, match=r"not found.*sendense codec-key new"):
        codec.read_key(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(CodecError, match="exactly 32 bytes"):
        codec.read_key(short)
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o666)
    with pytest.raises(CodecError, match="writable by others.*chmod 600"):
        codec.read_key(loose)


def test_load_codec_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path))
    monkeypatch.delenv("SENDENSE_CODEC_KEY", raising=False)
    old = tmp_path / "old.key"
    old_id = codec.new_key(old)
    monkeypatch.setenv("SENDENSE_CODEC_OLD_KEYS", str(old))
    with pytest.raises(CodecError, match=str(tmp_path / "codec.key")):
        codec.load_codec()
    kid = codec.new_key(tmp_path / "codec.key")  # the default place: SENDENSE_HOME/codec.key
    c = codec.load_codec()
    assert c.key_id == kid and set(c.key_ids) == {kid, old_id}
    other = tmp_path / "other.key"
    other_id = codec.new_key(other)
    monkeypatch.setenv("SENDENSE_CODEC_KEY", str(other))
    assert codec.load_codec().key_id == other_id


# --------------------------------------------------------------------- through a real server


@activity.defn
async def echo_secret(text: str) -> str:
    if text.startswith("fail:"):
        raise ApplicationError(f"cannot reach {text}", non_retryable=True)
    return f"seen {text}"


@workflow.defn
class EchoWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(
            echo_secret, text, start_to_close_timeout=timedelta(seconds=30)
        )


def all_payloads(msg: object) -> list[Payload]:
    """Every Payload message anywhere inside a protobuf message."""
    found: list[Payload] = []
    if isinstance(msg, Payload):
        return [msg]
    for field, value in msg.ListFields():  # type: ignore[attr-defined]
        if field.message_type is None:
            continue
        if field.is_repeated:
            items = value.values() if hasattr(value, "values") and callable(value.values) else value
            for v in items:
                if hasattr(v, "ListFields"):
                    found += all_payloads(v)
        else:
            found += all_payloads(value)
    return found


async def test_history_holds_ciphertext_only_and_failures_too() -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    key = os.urandom(32)
    conv = codec.data_converter(EncryptionCodec(key))
    async with await WorkflowEnvironment.start_local(
        data_converter=conv, dev_server_existing_path=stack.temporal_binary()
    ) as env:
        client = env.client
        queue = f"q-{uuid.uuid4().hex}"
        async with Worker(
            client,
            task_queue=queue,
            workflows=[EchoWorkflow],
            activities=[echo_secret],
            workflow_runner=UnsandboxedWorkflowRunner(),  # (defined in a test module)
        ):
            ok = await client.execute_workflow(
                EchoWorkflow.run, marker, id=f"ok-{uuid.uuid4().hex}", task_queue=queue
            )
            assert ok == f"seen {marker}"
            with pytest.raises(WorkflowFailureError) as exc:
                await client.execute_workflow(
                    EchoWorkflow.run, f"fail:{marker}", id=f"bad-{uuid.uuid4().hex}", task_queue=queue
                )
            assert marker in str(exc.value.cause.cause)  # the client decrypts the failure message

        plain_client = await Client.connect(
            client.service_client.config.target_host, data_converter=pydantic_data_converter
        )
        for wf in [wf async for wf in plain_client.list_workflows()]:
            history = await plain_client.get_workflow_handle(wf.id).fetch_history()
            raw = history.to_json()  # (payload data in it is base64: the wire bytes are checked too)
            wire = b"".join(ev.SerializeToString() for ev in history.events)
            assert marker not in raw and marker.encode() not in wire
            payloads = [p for ev in history.events for p in all_payloads(ev)]
            assert payloads, wf.id
            assert all(p.metadata["encoding"] == codec.ENCODING for p in payloads), wf.id
            assert "Encoded failure" in raw or wf.id.startswith("ok-")
