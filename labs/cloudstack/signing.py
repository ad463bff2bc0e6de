"""CloudStack's request signature, checked as the management server checks it (ApiServer.verifyRequest).

- The parameters as received, `signature` left out (its name compared case-insensitively), are sorted
  by name case-sensitively (Java's String order: upper case before lower case), each written
  `name=URLEncoder.encode(value, UTF-8)` with `+` turned into `%20`, joined with `&`; the whole string
  is lowercased and signed with HMAC-SHA1 under the user's secret key; the signature is its base64.
  Java's URLEncoder leaves only `A-Za-z0-9 . - * _` alone: `~` becomes `%7E` (Python's `quote` keeps
  `~`, so a client built on it fails against real CloudStack for values holding a `~`).
- `signatureVersion=3` requires `expires` (ISO-8601 with an offset, as DateUtil.parseTZDateString
  reads it): refused once past; with `enforce.post.requests.and.timestamps` on, also when more than
  15 minutes ahead, and a request without version 3 is refused. Without it, the legacy unversioned
  form (no `expires`) is accepted.
Every refusal is the same 401 to the client; the reason is for the lab's log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

MAX_AHEAD = timedelta(minutes=15)


class SignatureRefused(Exception):
    """The request's signature, key or expiry is not accepted (the reason is for the log)."""


def java_urlencode(value: str) -> str:
    """java.net.URLEncoder.encode(value, "UTF-8").replaceAll("\\+", "%20")."""
    return quote(value, safe="-_.*").replace("~", "%7E")


def canonical(params: Mapping[str, str]) -> str:
    """The string that is signed (already lowercased)."""
    names = sorted(k for k in params if k.lower() != "signature")
    return "&".join(f"{k}={java_urlencode(params[k])}" for k in names).lower()


def sign(secret: str, params: Mapping[str, str]) -> str:
    digest = hmac.new(secret.encode(), canonical(params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def parse_expires(text: str) -> datetime:
    """ISO-8601 with an offset (`+0000`, `+00:00`, `Z`), or the legacy `...'Z'+0000`."""
    legacy = text[:19] + text[20:] if len(text) > 20 and text[19] == "Z" and text[20] in "+-" else text
    try:
        when = datetime.fromisoformat(legacy)
    except ValueError as e:
        raise SignatureRefused(f"expires {text!r} is not a date") from e
    if when.tzinfo is None:
        raise SignatureRefused(f"expires {text!r} has no time zone")
    return when


def verify(
    params: Mapping[str, str],
    secrets: Mapping[str, str],
    *,
    enforce_timestamps: bool,
    now: datetime | None = None,
) -> str:
    """The API key of a correctly signed request; raises SignatureRefused otherwise."""
    lower = {k.lower(): k for k in params}
    signature = params.get(lower.get("signature", ""), None)
    api_key = params.get(lower.get("apikey", ""), None)
    if signature is None or api_key is None:
        raise SignatureRefused("missing signature or apiKey")
    version = params.get(lower.get("signatureversion", ""), None)
    expires = params.get(lower.get("expires", ""), None)
    now = now or datetime.now(UTC)
    if version == "3":
        if expires is None:
            raise SignatureRefused("signatureVersion 3 without expires")
        when = parse_expires(expires)
        if when < now:
            raise SignatureRefused(f"request expired at {expires}")
        if enforce_timestamps and when > now + MAX_AHEAD:
            raise SignatureRefused(f"expires {expires} is more than 15 minutes ahead")
    elif enforce_timestamps:
        raise SignatureRefused("signatureVersion 3 with expires is enforced")
    secret = secrets.get(api_key)
    if secret is None:
        raise SignatureRefused("the apiKey does not map to a user")
    if not hmac.compare_digest(signature.encode(), sign(secret, params).encode()):
        raise SignatureRefused("the signature does not match")
    return api_key
