"""Opaque block and page tokens, as EBS hands them out: signed, scoped and expiring.

A token carries a block index and an expiry, authenticated by an HMAC (key random per lab run) over the
token's use: the operation (`block`, `ListSnapshotBlocks`, `ListChangedBlocks`), the snapshot it was
issued for and, for ListChangedBlocks pages, the first snapshot. Like AWS's, tokens are fresh on every
listing (a random nonce), stay valid until their expiry across later listings, and say nothing a client
can compare: whether a block changed between two snapshots is what ListChangedBlocks answers, never
token equality. Encoded as unpadded URL-safe base64 (AWS's tokens use `-` and `_` too).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

_VERSION = 0x02
_BODY = struct.Struct(">B8sIQ")  # version, nonce, index, expiry (ms since the epoch)
_MAC_LEN = 20


class TokenSigner:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or os.urandom(32)

    def _mac(self, body: bytes, scope: str) -> bytes:
        return hmac.new(self._key, body + b"\x00" + scope.encode(), hashlib.sha256).digest()[:_MAC_LEN]

    def issue(self, scope: str, index: int, expiry: float) -> str:
        body = _BODY.pack(_VERSION, os.urandom(8), index, int(expiry * 1000))
        return base64.urlsafe_b64encode(body + self._mac(body, scope)).decode().rstrip("=")

    def open(self, token: str, scope: str, now: float) -> int | None:
        """The block index the token carries, or None if it is malformed, foreign to `scope` or expired."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _BODY.size + _MAC_LEN:
            return None
        body, mac = raw[: _BODY.size], raw[_BODY.size :]
        if not hmac.compare_digest(mac, self._mac(body, scope)):
            return None
        version, _nonce, index, expiry_ms = _BODY.unpack(body)
        if version != _VERSION or now * 1000 >= expiry_ms:
            return None
        return int(index)


def block_scope(snapshot_id: str) -> str:
    return f"block\x00{snapshot_id}"


def page_scope(operation: str, second_id: str, first_id: str = "") -> str:
    return f"{operation}\x00{first_id}\x00{second_id}"
