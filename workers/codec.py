"""Payload encryption: every payload the client and the workers send through Temporal (workflow and
activity inputs and results, signals, queries, updates, heartbeats, the workflow's summary, failure
messages) is sealed with AES-256-GCM before it leaves the process. The server and its database hold
ciphertext only; whoever reads the history without a key sees `binary/encrypted` payloads.

A sealed payload: metadata `encoding: binary/encrypted` and `encryption-key-id: <id>` (16 hex digits
of a SHA-256 of the key: it names the key, it does not reveal it); data = 12-byte nonce, then the
ciphertext of the original Payload message (its own metadata included) with the GCM tag; the key id
is the associated data, so a payload relabelled with another id fails authentication.

Keys rotate: a process seals with its current key (`SENDENSE_CODEC_KEY`, default
`SENDENSE_HOME/codec.key`) and opens payloads sealed with it or with any retired key
(`SENDENSE_CODEC_OLD_KEYS`). A payload sealed with a key it does not hold fails in one line naming
the key id. Payloads that are not sealed (histories written before encryption was turned on) are
passed through unchanged, so such jobs keep running: the codec gives confidentiality, not
authorization (that is mTLS to the server and each agent's own policy).

A key file holds 32 random bytes, mode 0600. Nothing here ever logs or prints a key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec

from sendense import config
from sendense.errors import SendenseError

log = logging.getLogger(__name__)

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEY_BYTES = 32
NONCE_BYTES = 12


class CodecError(SendenseError):
    """A payload key is missing or unusable, or a payload cannot be opened. One line, never a key."""

    kind = "CodecError"


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"sendense-payload-key\0" + key).hexdigest()[:16]


def read_key(path: Path, what: str = "SENDENSE_CODEC_KEY") -> bytes:
    """The key in `path` (exactly 32 bytes). Refused if missing, of another size, or writable by others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CodecError(
            f"payload key {path} ({what}) not found; the embedded stack makes one at `sendense up`, "
            "elsewhere make one with `sendense codec-key new PATH`"
        ) from None
    except OSError as e:
        raise CodecError(f"payload key {path} ({what}): {e.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CodecError(f"payload key {path} ({what}): not a regular file")
        if st.st_mode & 0o022:
            raise CodecError(
                f"payload key {path} ({what}) is writable by others (mode {st.st_mode & 0o777:04o}); "
                f"chmod 600 {path}"
            )
        data = fh.read(KEY_BYTES + 1)
    if len(data) != KEY_BYTES:
        raise CodecError(f"payload key {path} ({what}): must hold exactly {KEY_BYTES} bytes")
    if st.st_mode & 0o044:
        mode = st.st_mode & 0o777
        log.warning("payload key %s is readable by others (mode %04o); chmod 600 it", path, mode)
    return data


def new_key(path: Path) -> str:
    """Write a fresh random key to `path` (0600, created exclusively: never over an existing file or
    through a symlink); return its key id."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = os.urandom(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key_id(key)


def ensure_key(path: Path) -> str:
    """The key id of the key in `path`, made first if there is none."""
    try:
        return new_key(path)
    except FileExistsError:
        return key_id(read_key(path))


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM payload codec with key ids (see the module's docstring)."""

    def __init__(self, key: bytes, old_keys: Sequence[bytes] = ()) -> None:
        if len(key) != KEY_BYTES or any(len(k) != KEY_BYTES for k in old_keys):
            raise CodecError(f"payload keys must be {KEY_BYTES} bytes")
        self.key_id = key_id(key)
        self._keys = {key_id(k): AESGCM(k) for k in (*old_keys, key)}

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def seal(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.key_id].encrypt(nonce, payload.SerializeToString(), self.key_id.encode())
        return Payload(metadata={"encoding": ENCODING, KEY_ID: self.key_id.encode()}, data=nonce + sealed)

    def open(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # not sealed (written before encryption was on): as it is
        kid = payload.metadata.get(KEY_ID, b"").decode(errors="replace")[:64]
        aead = self._keys.get(kid)
        if aead is None:
            raise CodecError(
                f"payload encrypted with key id {kid or '(none)'}, which this process does not hold "
                f"(it holds {', '.join(self._keys)}); give it that key in SENDENSE_CODEC_OLD_KEYS"
            )
        if len(payload.data) < NONCE_BYTES + 16:
            raise CodecError(f"payload encrypted with key id {kid} is truncated")
        try:
            plain = aead.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], kid.encode())
        except InvalidTag:
            raise CodecError(f"payload encrypted with key id {kid} fails authentication (altered)") from None
        return Payload.FromString(plain)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.seal(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.open(p) for p in payloads]


def load_codec() -> EncryptionCodec:
    """The codec from the configured key files (sendense.config: SENDENSE_CODEC_KEY, _OLD_KEYS)."""
    old = [read_key(p, "SENDENSE_CODEC_OLD_KEYS") for p in config.codec_old_key_paths()]
    return EncryptionCodec(read_key(config.codec_key_path()), old)


def data_converter(codec: PayloadCodec | None) -> DataConverter:
    """The pydantic data converter with `codec`; failure messages and stack traces travel as an
    encoded payload too (in history a failure reads `Encoded failure`)."""
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
