"""CloudStack's JSON answers and errors as the management server writes them (`response=json`).

A command's answer is `{"<command lowercased>response": {...}}` with HTTP 200; a list answer holds
`count` and the list under the item's name, or is `{}` when nothing matches (CloudStack leaves both
out). An error is `{"<command>response": {"uuidList": [], "errorcode": N, "cserrorcode": M,
"errortext": "..."}}` with HTTP status N (ApiErrorCode), `cserrorcode` the exception's code
(CSExceptionErrorCode) where the server has one: a refused signature has none, and answers under
`errorresponse` when the command is unknown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CONTENT_TYPE = "application/json; charset=UTF-8"

# ApiErrorCode
UNAUTHORIZED = 401
METHOD_NOT_ALLOWED = 405
API_LIMIT_EXCEED = 429
PARAM_ERROR = 431
UNSUPPORTED_ACTION_ERROR = 432
INTERNAL_ERROR = 530
INSUFFICIENT_CAPACITY_ERROR = 533
RESOURCE_UNAVAILABLE_ERROR = 534
RESOURCE_ALLOCATION_ERROR = 535
RESOURCE_IN_USE_ERROR = 536

# CSExceptionErrorCode
CS_CLOUD_RUNTIME = 4250
CS_INSUFFICIENT_SERVER_CAPACITY = 4335
CS_INSUFFICIENT_STORAGE_CAPACITY = 4340
CS_INVALID_PARAMETER_VALUE = 4350
CS_RESOURCE_ALLOCATION = 4370
CS_RESOURCE_UNAVAILABLE = 4380
CS_REQUEST_LIMIT = 4545
CS_SERVER_API = 9999  # a ServerApiException of its own (missing or malformed parameters)

UNVERIFIED = "unable to verify user credentials and/or request signature"


@dataclass
class ApiError(Exception):
    errorcode: int
    errortext: str
    cserrorcode: int | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uuidList": [], "errorcode": self.errorcode}
        if self.cserrorcode is not None:
            out["cserrorcode"] = self.cserrorcode
        out["errortext"] = self.errortext
        return out

    def __str__(self) -> str:
        return f"{self.errorcode} {self.errortext}"


def invalid(text: str) -> ApiError:
    """InvalidParameterValueException: 431 / 4350."""
    return ApiError(PARAM_ERROR, text, CS_INVALID_PARAMETER_VALUE)


def missing(command: str, name: str) -> ApiError:
    return ApiError(
        PARAM_ERROR,
        f"Unable to execute API command {command.lower()} due to missing parameter {name}",
        CS_SERVER_API,
    )


def bad_value(command: str, name: str, value: str) -> ApiError:
    return ApiError(
        PARAM_ERROR,
        f"Unable to execute API command {command.lower()} due to invalid value. Invalid parameter "
        f"{name} value={value} due to incorrect long value format, or entity does not exist or due to "
        "incorrect parameter annotation for the field in api cmd class.",
        CS_SERVER_API,
    )


def response_name(command: str | None, known: bool) -> str:
    return f"{command.lower()}response" if command and known else "errorresponse"


def render(name: str, payload: dict[str, Any]) -> bytes:
    return json.dumps({name: payload}).encode()


def list_payload(item: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"count": len(items), item: items} if items else {}
