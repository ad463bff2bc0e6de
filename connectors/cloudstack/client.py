"""The project's own CloudStack API client: signed requests, async jobs, and the one mapping of
CloudStack's errors to ours.

Signing is what ApiServer.verifyRequest checks: the parameters sorted by name case-sensitively, values
encoded as Java's URLEncoder does (`~` as `%7E`, space as `%20`), the string lowercased, HMAC-SHA1
under the secret key, base64; always `signatureVersion=3` with `expires` a few minutes ahead (under
the 15 minutes a server enforcing timestamps allows). Requests are POSTs (a server enforcing
`enforce.post.requests.and.timestamps` wants them for state-changing commands), `response=json`.

Retries: an answer of 429 (API limit) or 502/503/504 (a proxy or a restarting server: the command did
not run) is retried with backoff for every command; a 500 or a broken connection only for read-only
commands (list*, query*, get*), since a mutating command may have run. CloudStack's own error codes
(430-432, 530-537) are answers, not transient faults, and are not retried here.

Errors are one line naming the call and the resource (`what`, e.g. "attachVolume volume data-1 to VM
web-1"), with CloudStack's code and text, never a key: 401 -> AccessDenied; 431 naming an id that
does not exist -> ResourceNotFound; 429/5xx left after the retries and 534 (resource unavailable)
-> ResourceUnavailable (retryable); anything else -> CloudStackApiError (not retryable), which keeps
`errorcode`, `cserrorcode` and `errortext`. A failed async job (jobstatus 2) maps the same way from
its jobresult.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sendense import config
from sendense.errors import ResourceNotFound, ResourceUnavailable, SendenseError

log = logging.getLogger(__name__)

RETRY_STATUSES_ALWAYS = {429, 502, 503, 504}
READ_ONLY = ("list", "query", "get")
MAX_BACKOFF = 30.0


class AccessDenied(SendenseError):
    """CloudStack refused the agent's API key or the request's signature. Not retryable."""

    kind = "AccessDenied"


class CloudStackApiError(SendenseError):
    """CloudStack answered a command (or its async job) with an error. Not retryable."""

    kind = "CloudStackApiError"

    def __init__(self, message: str, *, errorcode: int, cserrorcode: int | None, errortext: str) -> None:
        super().__init__(message)
        self.errorcode, self.cserrorcode, self.errortext = errorcode, cserrorcode, errortext


def java_urlencode(value: str) -> str:
    return urllib.parse.quote(value, safe="-_.*").replace("~", "%7E")


def signature(secret: str, params: Mapping[str, str]) -> str:
    text = "&".join(f"{k}={java_urlencode(params[k])}" for k in sorted(params) if k.lower() != "signature")
    digest = hmac.new(secret.encode(), text.lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value)
    return str(value)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class CloudStackClient:
    """Calls one management server's API (`url`, e.g. https://cloud.example/client/api) as one user."""

    def __init__(
        self,
        url: str,
        api_key: str,
        secret_key: str,
        *,
        timeout: float = 60.0,
        poll_interval: float = 2.0,
        job_timeout: float = 3600.0,
        retries: int = 6,
        backoff: float = 0.5,
        expires_in: timedelta = timedelta(minutes=5),
    ) -> None:
        if not api_key or not secret_key:
            raise AccessDenied(f"CloudStack at {url}: no API key or secret key given")
        self.url = url
        self._key, self._secret = api_key, secret_key
        self.timeout, self.poll_interval, self.job_timeout = timeout, poll_interval, job_timeout
        self.retries, self.backoff, self.expires_in = retries, backoff, expires_in

    def __repr__(self) -> str:  # never the keys
        return f"CloudStackClient({self.url})"

    @classmethod
    def from_env(cls, url: str, api_key_env: str, secret_key_env: str, **kw: Any) -> CloudStackClient:
        """Keys from the agent's environment by name, else from a lab on this machine that registered
        them for `url` (`sendense lab up`)."""
        lab = config.lab_env(f"cloudstack:{url}") or {}
        key = os.environ.get(api_key_env) or lab.get(api_key_env, "")
        secret = os.environ.get(secret_key_env) or lab.get(secret_key_env, "")
        if not key or not secret:
            raise AccessDenied(
                f"CloudStack at {url}: set {api_key_env} and {secret_key_env} in the agent's environment"
            )
        return cls(url, key, secret, **kw)

    # ------------------------------------------------------------------ calls

    def call(self, command: str, what: str = "", **params: Any) -> dict[str, Any]:
        """One command's answer (the object under `<command>response`); for an async command, what it
        answers at once (`jobid`, and `id` for a create)."""
        what = what or command
        attempt = 0
        while True:
            attempt += 1
            try:
                status, body = self._send(command, params)
            except OSError as e:  # refused, reset, timed out
                if command.startswith(READ_ONLY) and attempt <= self.retries:
                    self._sleep(attempt)
                    continue
                raise ResourceUnavailable(
                    f"{what}: cannot reach CloudStack at {self.url}: {_one_line(str(e), 120)}"
                ) from None
            retry = status in RETRY_STATUSES_ALWAYS or (
                status >= 500 and status < 530 and command.startswith(READ_ONLY)
            )
            if retry and attempt <= self.retries:
                log.info("%s: CloudStack answered %d, retrying (%d/%d)", what, status, attempt, self.retries)
                self._sleep(attempt)
                continue
            value = self._unwrap(what, status, body)
            if status != 200:
                raise self._error(what, status, value)
            return value

    def job(self, command: str, what: str = "", **params: Any) -> dict[str, Any]:
        """Run an async command to its end: the job's result (e.g. {"virtualmachine": {...}})."""
        what = what or command
        answer = self.call(command, what, **params)
        if "jobid" not in answer:
            raise SendenseError(f"{what}: CloudStack answered without a jobid (is {command} async?)")
        return self.wait(str(answer["jobid"]), what)

    def wait(self, jobid: str, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.job_timeout
        while True:
            job = self.call("queryAsyncJobResult", f"{what} (job {jobid})", jobid=jobid)
            status = int(job.get("jobstatus", 0))
            if status == 1:
                result: dict[str, Any] = job.get("jobresult") or {}
                return result
            if status == 2:
                res = job.get("jobresult") or {}
                code = int(res.get("errorcode") or job.get("jobresultcode") or 530)
                raise self._error(f"{what} (async job {jobid})", code, res)
            if time.monotonic() > deadline:
                raise ResourceUnavailable(
                    f"{what}: async job {jobid} still pending after {self.job_timeout:.0f} s"
                )
            time.sleep(self.poll_interval)

    def list(
        self, command: str, item: str, what: str = "", page_size: int = 500, **params: Any
    ) -> list[dict[str, Any]]:
        """Every item of a list command, page by page."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            answer = self.call(command, what, page=page, pagesize=page_size, **params)
            items = answer.get(item) or []
            out.extend(items)
            if len(items) < page_size or len(out) >= int(answer.get("count", 0)):
                return out
            page += 1

    # ------------------------------------------------------------------ wire

    def _send(self, command: str, params: Mapping[str, Any]) -> tuple[int, bytes]:
        p = {k: _text(v) for k, v in params.items() if v is not None}
        expires = datetime.now(UTC) + self.expires_in
        p |= {"command": command, "response": "json", "apiKey": self._key, "signatureVersion": "3",
              "expires": expires.strftime("%Y-%m-%dT%H:%M:%S+0000")}  # fmt: skip
        p["signature"] = signature(self._secret, p)
        data = urllib.parse.urlencode(p, quote_via=urllib.parse.quote).encode()
        req = urllib.request.Request(self.url, data=data, method="POST")
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read() or b"")

    def _unwrap(self, what: str, status: int, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
            [value] = data.values()
        except (ValueError, AttributeError, TypeError):
            if status in RETRY_STATUSES_ALWAYS or status >= 500:
                raise ResourceUnavailable(
                    f"{what}: CloudStack at {self.url} answered HTTP {status}"
                ) from None
            raise SendenseError(
                f"{what}: CloudStack at {self.url} answered HTTP {status} without a JSON answer"
            ) from None
        return value if isinstance(value, dict) else {}

    def _error(self, what: str, status: int, err: Mapping[str, Any]) -> SendenseError:
        code = int(err.get("errorcode") or status)
        cscode = err.get("cserrorcode")
        text = _one_line(str(err.get("errortext") or f"HTTP {status}"))
        message = f"{what}: CloudStack {code}: {text}"
        if code == 401:
            return AccessDenied(
                f"{what}: CloudStack at {self.url} refused the API key or the request's signature "
                "(401; check the keys and this machine's clock)"
            )
        if code == 431 and "due to invalid value" in text and "entity does not exist" in text:
            return ResourceNotFound(message)
        if code in RETRY_STATUSES_ALWAYS or 500 <= code < 530 or code == 534:
            return ResourceUnavailable(message)
        return CloudStackApiError(
            message, errorcode=code, cserrorcode=None if cscode is None else int(cscode), errortext=text
        )

    def _sleep(self, attempt: int) -> None:
        delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
        time.sleep(delay * (0.5 + random.random() / 2))
