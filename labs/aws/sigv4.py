"""Verify AWS Signature Version 4 on an incoming request, as AWS does, against the lab's one key pair.

The canonical request is rebuilt from what arrived on the wire: the raw path (URI-encoded again, as for
every service but S3), the query string (decoded, re-encoded and sorted), the headers the client listed
in SignedHeaders and the payload hash (the `x-amz-content-sha256` header when present, which must then
match the body unless it is `UNSIGNED-PAYLOAD`; otherwise the SHA-256 of the body).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

from botocore.utils import normalize_url_path

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)/"
    r"(?P<service>[^/,\s]+)/aws4_request,\s*SignedHeaders=(?P<headers>[^,\s]+),\s*Signature=(?P<sig>[0-9a-f]+)$"
)
UNSIGNED = "UNSIGNED-PAYLOAD"
MAX_SKEW = datetime.timedelta(minutes=15)


@dataclass(frozen=True)
class Credential:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str | None) -> Credential | None:
    if not value:
        return None
    m = _AUTH.match(value.strip())
    if m is None:
        return None
    headers = tuple(m["headers"].split(";"))
    return Credential(m["key"], m["date"], m["region"], m["service"], headers, m["sig"])


def _canonical_query(raw_query: str) -> str:
    pairs = []
    for part in raw_query.split("&") if raw_query else []:
        key, _, value = part.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _signing_key(secret: str, cred: Credential) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (cred.date, cred.region, cred.service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


class SignatureError(Exception):
    """The request's signature does not verify; `expired` when its timestamp is too far from now."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def verify(
    cred: Credential,
    secret: str,
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    body_sha256_hex: str,
) -> None:
    """Raise SignatureError unless the request was signed with `secret` (headers: lower-case names)."""
    amz_date = headers.get("x-amz-date", "")
    try:
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        raise SignatureError("the request has no valid X-Amz-Date header") from None
    now = datetime.datetime.now(datetime.UTC)
    if abs(now - when) > MAX_SKEW or not amz_date.startswith(cred.date):
        raise SignatureError(
            f"Signature expired: {amz_date} is now earlier or later than 15 min", expired=True
        )
    payload = headers.get("x-amz-content-sha256") or body_sha256_hex
    if payload != UNSIGNED and payload != body_sha256_hex:
        raise SignatureError("The provided 'x-amz-content-sha256' header does not match what was computed.")
    lines = []
    for name in cred.signed_headers:
        if name not in headers:
            raise SignatureError(f"signed header {name!r} is missing from the request")
        lines.append(f"{name}:{' '.join(headers[name].split())}")
    canonical = "\n".join(
        [
            method.upper(),
            quote(normalize_url_path(raw_path), safe="/~"),
            _canonical_query(raw_query),
            "\n".join(lines) + "\n",
            ";".join(cred.signed_headers),
            payload,
        ]
    )
    scope = f"{cred.date}/{cred.region}/{cred.service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    expected = hmac.new(_signing_key(secret, cred), to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, cred.signature):
        raise SignatureError(
            "The request signature we calculated does not match the signature you provided. Check your AWS "
            "Secret Access Key and signing method. Consult the service documentation for details."
        )
