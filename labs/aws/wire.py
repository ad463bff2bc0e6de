"""HTTP responses and AWS error bodies in the two protocols the lab speaks.

EBS (rest-json): the error code in the `x-amzn-ErrorType` header (suffixed with a namespace after `:`,
as AWS sends it and botocore strips), a JSON body with `Message` and `Reason` for the service's modeled
errors, or only a lower-case `message` for errors raised before the service runs (request validation,
authentication, checksum verification) - both exactly as observed from AWS.

EC2 (query protocol): an XML `<Response><Errors><Error>` document with `Code` and `Message`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

# HTTP status of an error code when injected as a fault or raised by the lab
STATUS_OF = {
    "ValidationException": 400,
    "RequestThrottledException": 400,
    "ThrottlingException": 400,
    "ConcurrentLimitExceededException": 400,
    "ServiceQuotaExceededException": 402,
    "AccessDeniedException": 403,
    "InvalidSignatureException": 403,
    "UnrecognizedClientException": 403,
    "MissingAuthenticationTokenException": 403,
    "ResourceNotFoundException": 404,
    "ConflictException": 409,
    "InternalServerException": 500,
    "ServiceUnavailableException": 503,
    "RequestLimitExceeded": 503,
    "InternalError": 500,
    "InternalFailure": 500,
    "ServiceUnavailable": 503,
    "Unavailable": 503,
    "AuthFailure": 401,
}

_SERVICE_NS = "http://internal.amazon.com/coral/com.amazon.zeppelindataservice/"
_CORAL_NS = "http://internal.amazon.com/coral/com.amazon.coral.service/"
_VALIDATE_NS = "http://internal.amazon.com/coral/com.amazon.coral.validate/"


@dataclass
class Response:
    status: int
    body: bytes | Iterable[bytes] = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


def content_length(environ: dict[str, Any]) -> int | None:
    """The request's Content-Length, or None when it is not a byte count (a negative one would make
    `wsgi.input.read` read until the client closes)."""
    raw = str(environ.get("CONTENT_LENGTH") or "0").strip()
    return int(raw) if raw.isdigit() else None


def request_id() -> str:
    return str(uuid.uuid4())


def json_response(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(payload).encode()
    hdrs = [("Content-Type", "application/json"), ("x-amzn-RequestId", request_id())]
    return Response(status, body, hdrs + (headers or []))


class EbsError(Exception):
    """An EBS error response. `layer` is "service" (Message + Reason), "coral" (authentication and
    checksum, lower-case message) or "validate" (model constraint violations, lower-case message)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        status: int | None = None,
        layer: str = "service",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.status = status if status is not None else STATUS_OF.get(code, 400)
        self.layer = layer

    def response(self) -> Response:
        ns = {"service": _SERVICE_NS, "coral": _CORAL_NS, "validate": _VALIDATE_NS}[self.layer]
        payload: dict[str, str] = {}
        if self.layer == "service":
            payload["Message"] = self.message
            if self.reason:
                payload["Reason"] = self.reason
        else:
            payload["message"] = self.message
        return json_response(self.status, payload, [("x-amzn-ErrorType", f"{self.code}:{ns}")])


def invalid(reason: str, message: str) -> EbsError:
    return EbsError("ValidationException", message, reason=reason)


def constraint(message: str) -> EbsError:
    """A model constraint violation, worded as AWS's request validation words it."""
    return EbsError("ValidationException", f"1 validation error detected: {message}", layer="validate")


def not_found(snapshot_id: str) -> EbsError:
    return EbsError(
        "ResourceNotFoundException",
        f"The snapshot '{snapshot_id}' does not exist.",
        reason="SNAPSHOT_NOT_FOUND",
    )


def ec2_error(code: str, message: str, status: int | None = None) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
        f"</Errors><RequestID>{request_id()}</RequestID></Response>"
    ).encode()
    return Response(status or STATUS_OF.get(code, 400), body, [("Content-Type", "text/xml;charset=UTF-8")])
