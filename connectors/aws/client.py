"""boto3 clients for EC2 and the EBS direct APIs, and the one mapping of AWS errors to ours.

Credentials come from the standard AWS chain of the agent that runs the connector (environment,
AWS_PROFILE and ~/.aws, an instance or container role), never from the job spec. Throttling
(`RequestThrottledException`, `ThrottlingException`, `RequestLimitExceeded`) and 5xx answers are
retried by botocore's standard retry mode with backoff; what is left after that becomes a retryable
error, so that the activity's own retry policy takes over. Bad credentials, a missing permission or
an unknown resource are not retryable and say which call and resource failed, never a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from sendense import config
from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError

log = logging.getLogger(__name__)

RETRIES = {"mode": "standard", "max_attempts": 8}
POOL = 32  # connections per client: the copy runs up to 16 threads, each with a request in flight

CREDENTIAL_CODES = {
    "AuthFailure",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "InvalidSignatureException",
    "IncompleteSignature",
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
}
PERMISSION_CODES = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "OptInRequired"}
THROTTLE_CODES = {
    "RequestThrottledException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ServiceQuotaExceededException",
    "ConcurrentLimitExceededException",
}


_LOADER = botocore.loaders.create_loader()


class AccessDenied(SendenseError):
    """AWS refused the agent's credentials, or they lack a permission. Not retryable."""

    kind = "AccessDenied"


@dataclass(frozen=True)
class Aws:
    """Where and as whom to call AWS: a region and an optional endpoint (the lab's, or a VPC one)."""

    region: str
    endpoint_url: str | None = None

    def client(self, service: str, *, timeout: float | None = None) -> Any:
        """A client of `service`. With `timeout`: one attempt, no retry, connect and read each within
        `timeout` seconds (a question that must be answered in bounded time, e.g. a power state)."""
        # a session per client (sessions are not thread-safe, and each resolves the credential chain
        # afresh), sharing one loader: the service models are parsed once per process, not per
        # client (ec2: 138 -> 17 ms a client, ebs: 53 -> 9 ms)
        session = botocore.session.Session()
        session.register_component("data_loader", _LOADER)
        quick = {"mode": "standard", "total_max_attempts": 1}
        cfg = Config(
            retries=(RETRIES if timeout is None else quick),  # type: ignore[arg-type]
            max_pool_connections=POOL,
            connect_timeout=10 if timeout is None else timeout,
            read_timeout=60 if timeout is None else timeout,
            user_agent_extra="sendense",
        )
        # a lab on this machine registered its credentials for its endpoint (`sendense lab up`)
        lab = config.lab_env(self.endpoint_url) or {}
        return session.create_client(
            service,
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            config=cfg,
            aws_access_key_id=lab.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=lab.get("AWS_SECRET_ACCESS_KEY"),
        )

    def where(self) -> str:
        return f"{self.region}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def is_not_found(e: ClientError) -> bool:
    code = error_code(e)
    return code.endswith(".NotFound") or code in ("ResourceNotFoundException", "InvalidSnapshot.NotFound")


@contextmanager
def aws_call(aws: Aws, what: str) -> Iterator[None]:
    """Run AWS calls, mapping whatever escapes botocore's retries to one-line errors naming `what`
    (the call and resource, e.g. "ec2 DescribeInstances i-0abc")."""
    try:
        yield
    except ClientError as e:
        raise map_client_error(aws, what, e) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise AccessDenied(
            f"{what}: no AWS credentials found for this agent (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give it an instance role)"
        ) from None
    except NoRegionError:
        raise SendenseError(f"{what}: no AWS region given") from None
    except (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError) as e:
        raise ResourceUnavailable(f"{what}: cannot reach AWS in {aws.where()}: {type(e).__name__}") from None
    except BotoCoreError as e:
        raise ResourceUnavailable(f"{what}: {type(e).__name__}: {e}") from None


def map_client_error(aws: Aws, what: str, e: ClientError) -> SendenseError:
    code = error_code(e)
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    message = str(e.response.get("Error", {}).get("Message", "")).splitlines()[0][:200] if e.response else ""
    detail = f"{code}" + (f": {message}" if message else "")
    if code in CREDENTIAL_CODES:
        return AccessDenied(f"{what}: AWS rejected the agent's credentials in {aws.where()} ({code})")
    if code in PERMISSION_CODES:
        return AccessDenied(f"{what}: the agent's AWS identity lacks a permission ({detail})")
    if is_not_found(e) or code.endswith(".Malformed"):
        return ResourceNotFound(f"{what}: not found in {aws.where()} ({detail})")
    if code in THROTTLE_CODES or status >= 500 or code in ("InternalError", "InternalServerException"):
        return ResourceUnavailable(f"{what}: AWS is throttling or failing, retries exhausted ({detail})")
    return SendenseError(f"{what}: {detail}")
