"""The project's CloudStack client against the CloudStack lab: signatures the lab (as ApiServer does)
accepts, async jobs polled to their end, retries only where a command cannot have run twice, and
CloudStack's errors as one-line errors of ours that name the call and never a key."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from connectors.cloudstack.client import AccessDenied, CloudStackApiError, CloudStackClient, signature
from labs.cloudstack import signing
from labs.cloudstack.server import LabServer
from labs.cloudstack.state import GIB, LabConfig
from sendense import config
from sendense.errors import ResourceNotFound, ResourceUnavailable


@pytest.fixture(scope="module")
def lab() -> Iterator[LabServer]:
    root = Path(tempfile.mkdtemp(prefix="cslab-client-"))
    server = LabServer(root, LabConfig(libvirt=False)).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean(lab: LabServer) -> Iterator[None]:
    lab.cloud.faults.clear()
    lab.cloud.faults.reset_stats()
    yield
    lab.cloud.faults.clear()
    lab.cloud.config.job_delay = 0.0


def client(lab: LabServer, **kw: object) -> CloudStackClient:
    kw.setdefault("poll_interval", 0.02)
    kw.setdefault("backoff", 0.01)
    return CloudStackClient(lab.url, lab.info["api_key"], lab.info["secret_key"], **kw)  # type: ignore[arg-type]


def custom_offering(c: CloudStackClient) -> str:
    [o] = c.call("listDiskOfferings", name="lab-custom")["diskoffering"]
    return str(o["id"])


def test_its_signature_is_the_labs_and_javas() -> None:
    params = {"command": "listVolumes", "apiKey": "K", "keyword": "a~b c*é", "zoneName": "z", "zoneid": "1"}
    assert signature("s3cret", params) == signing.sign("s3cret", params)


def test_signed_v3_posts_are_accepted_with_timestamps_enforced_and_a_tilde_too(lab: LabServer) -> None:
    c = client(lab)
    assert lab.cloud.config.enforce_timestamps
    assert c.call("listZones")["zone"][0]["name"] == "lab-zone-1"
    assert c.call("listVolumes", keyword="a~b") == {}  # `cs` is refused here (Python's quote keeps '~')
    assert "secret" not in repr(c) and lab.info["secret_key"] not in repr(c)


def test_an_async_job_is_polled_to_its_result(lab: LabServer) -> None:
    lab.cloud.config.job_delay = 0.3
    c = client(lab)
    t0 = time.monotonic()
    vol = c.job(
        "createVolume",
        "createVolume data-x",
        zoneid=lab.info["zoneid"],
        diskofferingid=custom_offering(c),
        size=2,
        name="data-x",
    )["volume"]
    assert time.monotonic() - t0 >= 0.3 and vol["size"] == 2 * GIB
    assert lab.cloud.faults.stats()["queryAsyncJobResult"] >= 2


def test_throttling_and_gateway_errors_are_retried_for_any_command(lab: LabServer) -> None:
    c = client(lab)
    off = custom_offering(c)
    lab.cloud.faults.reset_stats()
    lab.cloud.faults.inject("createVolume", 429)
    lab.cloud.faults.inject("createVolume", 503)
    answer = c.call("createVolume", zoneid=lab.info["zoneid"], diskofferingid=off, size=1, name="retried")
    assert set(answer) == {"id", "jobid"} and lab.cloud.faults.stats()["createVolume"] == 3
    assert [v["name"] for v in c.call("listVolumes", name="retried")["volume"]] == ["retried"]  # made once


def test_a_500_is_retried_for_a_list_but_not_for_a_mutating_command(lab: LabServer) -> None:
    c = client(lab)
    lab.cloud.faults.inject("listZones", 500)
    assert c.call("listZones")["count"] == 1 and lab.cloud.faults.stats()["listZones"] == 2
    lab.cloud.faults.inject("createVolume", 500)
    with pytest.raises(ResourceUnavailable) as e:
        c.call(
            "createVolume",
            "createVolume data-y",
            zoneid=lab.info["zoneid"],
            diskofferingid=custom_offering(c),
            size=1,
        )
    assert lab.cloud.faults.stats()["createVolume"] == 1 and e.value.retryable
    assert str(e.value).startswith("createVolume data-y: CloudStack 500: ")


def test_retries_end_in_a_retryable_one_line_error(lab: LabServer) -> None:
    lab.cloud.faults.inject("listHosts", 429, count=10)
    with pytest.raises(ResourceUnavailable) as e:
        client(lab, retries=2).call("listHosts", "listHosts in lab-zone-1")
    assert lab.cloud.faults.stats()["listHosts"] == 3
    assert str(e.value) == (
        "listHosts in lab-zone-1: CloudStack 429: The given user has reached his/her account api limit, "
        "please retry after 1000 ms."
    )


def test_cloudstacks_own_errors_are_not_retried(lab: LabServer) -> None:
    lab.cloud.faults.inject("listZones", 530, text="something broke\nin two lines")
    with pytest.raises(CloudStackApiError) as e:
        client(lab).call("listZones")
    assert lab.cloud.faults.stats()["listZones"] == 1
    assert (e.value.errorcode, e.value.cserrorcode, e.value.retryable) == (530, 4250, False)
    assert str(e.value) == "listZones: CloudStack 530: something broke in two lines"


def test_a_bad_secret_is_access_denied_without_the_keys(lab: LabServer) -> None:
    bad = CloudStackClient(lab.url, lab.info["api_key"], "wrong-secret", backoff=0.01)
    with pytest.raises(AccessDenied) as e:
        bad.call("listZones", "listZones (the agent's check)")
    msg = str(e.value)
    assert "401" in msg and msg.startswith("listZones (the agent's check): CloudStack at http://127.0.0.1:")
    assert lab.info["api_key"] not in msg and "wrong-secret" not in msg and "\n" not in msg
    assert not e.value.retryable


def test_an_unknown_id_is_not_found_and_a_wrong_state_is_an_api_error(lab: LabServer) -> None:
    c = client(lab)
    with pytest.raises(ResourceNotFound) as nf:
        c.call("listVolumes", "listVolumes volume 6a3f1d0e", id="6a3f1d0e-0000-4000-8000-000000000000")
    assert str(nf.value).startswith(
        "listVolumes volume 6a3f1d0e: CloudStack 431: Unable to execute API command"
    )
    vol = c.job(
        "createVolume", zoneid=lab.info["zoneid"], diskofferingid=custom_offering(c), size=1, name="small"
    )
    with pytest.raises(CloudStackApiError) as e:
        c.job("resizeVolume", "resizeVolume small to 0 GiB", id=vol["volume"]["id"], size=0, shrinkok=False)
    assert (e.value.errorcode, e.value.cserrorcode) == (431, 4350)
    assert str(e.value).startswith("resizeVolume small to 0 GiB (async job ")
    assert "would shrink the volume" in str(e.value)


def test_a_failed_job_maps_its_jobresult(lab: LabServer) -> None:
    c = client(lab)
    lab.cloud.faults.inject("createVolume", 533, job=True, text="no room")
    with pytest.raises(CloudStackApiError) as e:
        c.job(
            "createVolume",
            "createVolume big",
            zoneid=lab.info["zoneid"],
            diskofferingid=custom_offering(c),
            size=1,
        )
    assert (e.value.errorcode, e.value.cserrorcode) == (533, 4335) and str(e.value).endswith(
        "CloudStack 533: no room"
    )
    lab.cloud.faults.inject("createVolume", 534, job=True, text="host down")
    with pytest.raises(ResourceUnavailable):
        c.job("createVolume", zoneid=lab.info["zoneid"], diskofferingid=custom_offering(c), size=1)


def test_a_job_that_outlasts_its_timeout_is_unavailable(lab: LabServer) -> None:
    lab.cloud.config.job_delay = 1.0
    c = client(lab, job_timeout=0.2)
    with pytest.raises(
        ResourceUnavailable, match=r"^createVolume slow: async job \S+ still pending after 0 s$"
    ):
        c.job(
            "createVolume",
            "createVolume slow",
            zoneid=lab.info["zoneid"],
            diskofferingid=custom_offering(c),
            size=1,
        )


def test_lists_are_read_page_by_page(lab: LabServer) -> None:
    c = client(lab)
    lab.cloud.faults.reset_stats()
    offerings = c.list("listServiceOfferings", "serviceoffering", page_size=2)
    assert [o["name"] for o in offerings] == ["lab-small", "lab-medium", "lab-huge"]
    assert lab.cloud.faults.stats()["listServiceOfferings"] == 2


def test_an_unreachable_server_is_retried_for_reads_then_unavailable() -> None:
    c = CloudStackClient("http://127.0.0.1:9/client/api", "k", "s", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(
        ResourceUnavailable, match=r"^listZones: cannot reach CloudStack at http://127.0.0.1:9/client/api"
    ):
        c.call("listZones")


def test_keys_come_from_the_environment_or_a_local_labs_registration(
    lab: LabServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENDENSE_HOME", str(tmp_path))
    with pytest.raises(AccessDenied, match="set CS_KEY and CS_SECRET in the agent's environment"):
        CloudStackClient.from_env(lab.url, "CS_KEY", "CS_SECRET")
    config.register_lab(
        f"cloudstack:{lab.url}", {"CS_KEY": lab.info["api_key"], "CS_SECRET": lab.info["secret_key"]}
    )
    assert CloudStackClient.from_env(lab.url, "CS_KEY", "CS_SECRET").call("listZones")["count"] == 1
    monkeypatch.setenv("CS_SECRET", "from-the-environment")
    with pytest.raises(AccessDenied):
        CloudStackClient.from_env(lab.url, "CS_KEY", "CS_SECRET", backoff=0.01).call("listZones")
    assert os.environ["CS_SECRET"] == "from-the-environment"


def test_expires_is_kept_under_the_15_minutes_a_strict_server_allows(lab: LabServer) -> None:
    with pytest.raises(AccessDenied):
        client(lab, expires_in=timedelta(minutes=20)).call("listZones")
