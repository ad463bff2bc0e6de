"""The CloudStack lab's API through a real CloudStack client (PyPI `cs`): signatures checked as
ApiServer.verifyRequest checks them, JSON answers and CloudStack's error shapes and HTTP statuses,
async jobs through queryAsyncJobResult, volume and VM records, faults. Hosts without libvirtd here
(no VM runs): tests/labs/test_cloudstack_lab_vms.py runs VMs."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from cs import CloudStack, CloudStackApiException

from labs.cloudstack import signing
from labs.cloudstack.server import LabServer
from labs.cloudstack.state import GIB, LabConfig

JOB_CMD = "org.apache.cloudstack.api.command.admin.volume.CreateVolumeCmdByAdmin"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabServer]:
    root = Path(tempfile.mkdtemp(prefix="cslab-api-"))
    server = LabServer(root, LabConfig(libvirt=False, pool_capacity_gib=4)).start()
    yield server
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean(lab: LabServer) -> Iterator[None]:
    yield
    lab.cloud.faults.clear()
    lab.cloud.config.enforce_timestamps = True
    lab.cloud.config.job_delay = 0.0


def client(lab: LabServer, **kw: Any) -> CloudStack:
    kw.setdefault("key", lab.info["api_key"])
    kw.setdefault("secret", lab.info["secret_key"])
    return CloudStack(endpoint=lab.url, poll_interval=0.02, job_timeout=30, **kw)


@pytest.fixture
def cs(lab: LabServer) -> CloudStack:
    return client(lab)


def error_of(e: pytest.ExceptionInfo[CloudStackApiException]) -> tuple[int, dict[str, Any]]:
    return e.value.response.status_code, e.value.error


def refused(call: Any) -> dict[str, Any]:
    with pytest.raises(CloudStackApiException) as e:
        call()
    status, err = error_of(e)
    assert status == 401 and err["errorcode"] == 401 and "cserrorcode" not in err
    assert err["errortext"] == "unable to verify user credentials and/or request signature"
    return err


def raw(lab: LabServer, params: dict[str, str], secret: str | None = None) -> requests.Response:
    """A request signed with the lab's own (Java-faithful) signer, sent as given."""
    p = {"apiKey": lab.info["api_key"], "response": "json", **params}
    p["signature"] = signing.sign(secret or lab.info["secret_key"], p)
    return requests.get(lab.url, params=p, timeout=10)


def zone(lab: LabServer) -> str:
    return str(lab.info["zoneid"])


def named(cs: CloudStack, command: str, item: str, name: str, **kw: Any) -> dict[str, Any]:
    [found] = [x for x in getattr(cs, command)(**kw)[item] if x["name"] == name]
    return found


# ------------------------------------------------------------------ signatures


def test_a_good_v3_request_answers_json_under_the_commands_response_name(
    lab: LabServer, cs: CloudStack
) -> None:
    r = raw(
        lab,
        {
            "command": "listZones",
            "signatureVersion": "3",
            "expires": (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json; charset=UTF-8"
    body = r.json()
    assert list(body) == ["listzonesresponse"] and body["listzonesresponse"]["count"] == 1
    assert cs.listZones()["zone"][0] == body["listzonesresponse"]["zone"][0]
    assert cs.listZones()["zone"][0]["name"] == lab.info["zone"]


def test_an_expired_request_is_refused(lab: LabServer) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S%z")
    refused(lambda: client(lab).listZones(signatureVersion="3", expires=past))
    lab.cloud.config.enforce_timestamps = False  # expiry is checked whatever the enforcement
    refused(lambda: client(lab).listZones(signatureVersion="3", expires=past))
    soon = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S%z")
    assert client(lab).listZones(signatureVersion="3", expires=soon)["count"] == 1


def test_expires_more_than_15_minutes_ahead_is_refused_when_timestamps_are_enforced(lab: LabServer) -> None:
    far = client(lab, expiration=timedelta(minutes=16))
    err = refused(far.listZones)
    assert list(err) == ["uuidList", "errorcode", "errortext"]
    assert client(lab, expiration=timedelta(minutes=14)).listZones()["count"] == 1
    lab.cloud.config.enforce_timestamps = False  # enforce.post.requests.and.timestamps=false
    assert far.listZones()["count"] == 1


def test_the_legacy_unversioned_form_is_accepted_unless_timestamps_are_enforced(lab: LabServer) -> None:
    legacy = client(lab, expiration=-1)  # cs then sends neither signatureVersion nor expires
    refused(legacy.listZones)
    lab.cloud.config.enforce_timestamps = False
    assert legacy.listZones()["count"] == 1
    r = raw(lab, {"command": "listZones"})
    assert r.status_code == 200 and r.json()["listzonesresponse"]["count"] == 1
    assert raw(lab, {"command": "listZones"}, secret="not-the-secret").status_code == 401
    refused(lambda: legacy.listZones(signatureVersion="3"))  # version 3 without expires


def test_a_wrong_secret_or_an_unknown_key_is_refused(lab: LabServer) -> None:
    refused(client(lab, secret=lab.info["secret_key"][:-1] + "x").listZones)
    refused(client(lab, key="nokey").listZones)
    refused(client(lab, secret="").listZones)  # unsigned


def test_parameters_are_sorted_case_sensitively_before_signing(lab: LabServer, cs: CloudStack) -> None:
    """Java sorts `zoneName` before `zoneid` ('N' < 'i'); a case-insensitive sort would not."""
    assert cs.listPods(zoneName="x", zoneid=zone(lab))["count"] == 1
    assert cs.listPods(apiKeyNote="x", apia="y")["count"] == 1


def test_values_are_encoded_as_javas_urlencoder_does(lab: LabServer, cs: CloudStack) -> None:
    """Spaces, `*`, `+`, `/` and non-ASCII sign alike; a `~` is `%7E` to Java, which `cs` (Python's quote)
    leaves as it is: its requests with a `~` are refused, as real CloudStack refuses them."""
    assert cs.listVolumes(keyword="a b*+/é,=&") == {}
    refused(lambda: cs.listVolumes(keyword="a~b"))
    lab.cloud.config.enforce_timestamps = False
    r = raw(lab, {"command": "listVolumes", "keyword": "a~b"})
    assert r.status_code == 200 and r.json() == {"listvolumesresponse": {}}


def test_post_is_signed_like_get(lab: LabServer) -> None:
    assert client(lab, method="post").listZones()["count"] == 1


# ------------------------------------------------------------------ errors


def test_an_unknown_command_is_a_401_under_errorresponse(lab: LabServer) -> None:
    r = raw(lab, {"command": "listUnicorns"})
    assert r.status_code == 401
    assert r.json() == {
        "errorresponse": {
            "uuidList": [],
            "errorcode": 401,
            "errortext": "unable to verify user credentials and/or request signature",
        }
    }


def test_a_missing_or_unknown_parameter_is_a_431(lab: LabServer, cs: CloudStack) -> None:
    with pytest.raises(CloudStackApiException) as e:
        cs.deployVirtualMachine(
            serviceofferingid=named(cs, "listServiceOfferings", "serviceoffering", "lab-small")["id"],
            templateid=cs.listTemplates(templatefilter="all")["template"][0]["id"],
        )
    assert error_of(e) == (
        431,
        {
            "uuidList": [],
            "errorcode": 431,
            "cserrorcode": 9999,
            "errortext": "Unable to execute API command deployvirtualmachine due to missing parameter zoneid",
        },
    )
    with pytest.raises(CloudStackApiException) as e:
        cs.listTemplates()
    assert error_of(e)[0] == 431 and "missing parameter templatefilter" in error_of(e)[1]["errortext"]
    for call in (
        lambda: cs.listVolumes(id="6a3f1d0e-0000-4000-8000-000000000000"),
        lambda: cs.startVirtualMachine(id="nope"),
        lambda: cs.queryAsyncJobResult(jobid="nope"),
        lambda: cs.listVirtualMachines(hostid="nope"),
    ):
        with pytest.raises(CloudStackApiException) as e:
            call()
        status, err = error_of(e)
        assert status == 431 and err["cserrorcode"] == 9999 and "due to invalid value" in err["errortext"]


def test_injected_throttling_and_server_errors_have_cloudstacks_shape(lab: LabServer, cs: CloudStack) -> None:
    lab.cloud.faults.inject("listZones", 429)
    lab.cloud.faults.inject("listZones", 503, after=1)
    with pytest.raises(CloudStackApiException) as e:
        cs.listZones()
    assert error_of(e)[0] == 429 and error_of(e)[1]["cserrorcode"] == 4545
    assert cs.listZones()["count"] == 1  # `after=1`: this one passes
    with pytest.raises(CloudStackApiException) as e:
        cs.listZones()
    assert error_of(e)[0] == 503 and error_of(e)[1]["errorcode"] == 503
    assert cs.listZones()["count"] == 1
    assert lab.cloud.faults.stats()["listZones"] >= 4


# ------------------------------------------------------------------ inventory


def test_the_inventory_lists_with_counts(lab: LabServer, cs: CloudStack) -> None:
    z = zone(lab)
    assert cs.listPods(zoneid=z)["pod"][0]["zoneid"] == z
    [cluster] = cs.listClusters(zoneid=z)["cluster"]
    assert cluster["hypervisortype"] == "KVM"
    hosts = cs.listHosts(zoneid=z, type="Routing")
    assert hosts["count"] == 2 and [h["name"] for h in hosts["host"]] == ["cs-lab-host-1", "cs-lab-host-2"]
    assert {h["state"] for h in hosts["host"]} == {"Disconnected"}  # no libvirtd in this module
    assert all(h["clusterid"] == cluster["id"] and h["hypervisor"] == "KVM" for h in hosts["host"])
    [pool] = cs.listStoragePools(zoneid=z)["storagepool"]
    assert Path(pool["path"]).is_dir() and pool["disksizetotal"] == 4 * GIB and pool["state"] == "Up"
    offerings = cs.listServiceOfferings()
    assert offerings["count"] == 3
    small = named(cs, "listServiceOfferings", "serviceoffering", "lab-small")
    assert (small["cpunumber"], small["memory"]) == (1, 256)
    custom = named(cs, "listDiskOfferings", "diskoffering", "lab-custom")
    assert (
        custom["iscustomized"] is True
        and named(cs, "listDiskOfferings", "diskoffering", "lab-5gb")["disksize"] == 5
    )
    [template] = cs.listTemplates(templatefilter="executable", zoneid=z)["template"]
    assert template["format"] == "QCOW2" and template["isready"] and template["name"] == "sendense-guest"
    nets = cs.listNetworks(zoneid=z)["network"]
    assert sorted(n["type"] for n in nets) == ["Isolated", "Shared"]
    assert cs.listNetworks(type="Shared")["count"] == 1
    assert cs.listServiceOfferings(name="no-such") == {}  # CloudStack leaves count out when empty


# ------------------------------------------------------------------ async jobs and volumes


def test_an_async_job_is_pending_then_succeeds_with_its_result(lab: LabServer, cs: CloudStack) -> None:
    lab.cloud.config.job_delay = 0.5
    offering = named(cs, "listDiskOfferings", "diskoffering", "lab-custom")
    answer = cs.createVolume(zoneid=zone(lab), diskofferingid=offering["id"], size=2, name="pending")
    assert set(answer) == {"id", "jobid"}
    job = cs.queryAsyncJobResult(jobid=answer["jobid"])
    assert (job["jobstatus"], job["jobresultcode"], job["cmd"]) == (0, 0, JOB_CMD) and "jobresult" not in job
    done = cs._jobresult(answer["jobid"])  # cs's own polling of queryAsyncJobResult
    assert done["volume"]["id"] == answer["id"] and done["volume"]["state"] == "Allocated"
    job = cs.queryAsyncJobResult(jobid=answer["jobid"])
    assert job["jobstatus"] == 1 and job["jobinstanceid"] == answer["id"] and job["jobresulttype"] == "object"
    assert cs.listAsyncJobs()["count"] >= 1


def test_a_failing_async_job_has_status_2_and_the_error_in_its_result(lab: LabServer, cs: CloudStack) -> None:
    lab.cloud.faults.inject("createVolume", 530, job=True, text="the lab made this job fail")
    offering = named(cs, "listDiskOfferings", "diskoffering", "lab-1gb")
    answer = cs.createVolume(zoneid=zone(lab), diskofferingid=offering["id"], name="doomed")
    with pytest.raises(CloudStackApiException) as e:
        cs._jobresult(answer["jobid"])
    assert e.value.args[0] == "Job failure"
    assert e.value.error == {
        "uuidList": [],
        "errorcode": 530,
        "cserrorcode": 4250,
        "errortext": "the lab made this job fail",
    }
    job = cs.queryAsyncJobResult(jobid=answer["jobid"])
    assert (job["jobstatus"], job["jobresultcode"]) == (2, 530)


def test_volumes_are_allocated_until_needed_sized_by_offering_and_deleted(
    lab: LabServer, cs: CloudStack
) -> None:
    z = zone(lab)
    custom = named(cs, "listDiskOfferings", "diskoffering", "lab-custom")
    one = named(cs, "listDiskOfferings", "diskoffering", "lab-1gb")
    vol = cs.createVolume(zoneid=z, diskofferingid=custom["id"], size=3, name="data-a", fetch_result=True)[
        "volume"
    ]
    assert (vol["state"], vol["size"], vol["type"]) == ("Allocated", 3 * GIB, "DATADISK")
    assert "path" not in vol and "storageid" not in vol and "virtualmachineid" not in vol
    with pytest.raises(CloudStackApiException) as e:
        cs.createVolume(zoneid=z, diskofferingid=custom["id"], name="nosize")
    assert error_of(e)[1]["errortext"] == "This disk offering requires a custom size specified"
    assert error_of(e)[1]["cserrorcode"] == 4350
    with pytest.raises(CloudStackApiException) as e:
        cs.createVolume(zoneid=z, diskofferingid=one["id"], size=2, name="badsize")
    assert error_of(e)[0] == 431
    with pytest.raises(CloudStackApiException) as e:
        cs.resizeVolume(id=vol["id"], size=1, fetch_result=True)
    assert "would shrink the volume" in e.value.error["errortext"] and e.value.error["errorcode"] == 431
    grown = cs.resizeVolume(id=vol["id"], size=5, fetch_result=True)["volume"]
    assert grown["size"] == 5 * GIB
    [listed] = cs.listVolumes(id=vol["id"])["volume"]
    assert listed["size"] == 5 * GIB
    assert cs.deleteVolume(id=vol["id"]) == {"success": True}
    with pytest.raises(CloudStackApiException) as e:
        cs.listVolumes(id=vol["id"])
    assert error_of(e)[0] == 431


def test_a_vm_deployed_stopped_has_an_allocated_root_that_can_be_swapped(
    lab: LabServer, cs: CloudStack
) -> None:
    """The seed's failover flow: deploy with startvm=false, detach and delete the new ROOT, attach a
    volume at deviceid 0 (it becomes the ROOT), data volumes after it."""
    z = zone(lab)
    small = named(cs, "listServiceOfferings", "serviceoffering", "lab-small")
    [template] = cs.listTemplates(templatefilter="all")["template"]
    shared = named(cs, "listNetworks", "network", "lab-shared")
    vm = cs.deployVirtualMachine(
        zoneid=z,
        serviceofferingid=small["id"],
        templateid=template["id"],
        name="swap",
        startvm=False,
        networkids=shared["id"],
        fetch_result=True,
    )["virtualmachine"]
    assert vm["state"] == "Stopped" and "hostid" not in vm and vm["instancename"].startswith("i-2-")
    assert vm["instancename"].endswith("-VM") and vm["templateid"] == template["id"]
    assert vm["serviceofferingid"] == small["id"] and vm["ostypeid"] == template["ostypeid"]
    [nic] = vm["nic"]
    assert nic["networkid"] == shared["id"] and nic["macaddress"].startswith("02:00:") and nic["isdefault"]
    [root] = cs.listVolumes(virtualmachineid=vm["id"])["volume"]
    assert (root["type"], root["deviceid"], root["state"], root["size"]) == (
        "ROOT",
        0,
        "Allocated",
        template["size"],
    )
    with pytest.raises(CloudStackApiException) as e:
        cs.deleteVolume(id=root["id"])
    assert error_of(e) == (
        431,
        {
            "uuidList": [],
            "errorcode": 431,
            "cserrorcode": 4350,
            "errortext": "Please specify a volume that is not attached to any VM.",
        },
    )
    detached = cs.detachVolume(id=root["id"], fetch_result=True)["volume"]
    assert "virtualmachineid" not in detached
    cs.deleteVolume(id=root["id"])
    custom = named(cs, "listDiskOfferings", "diskoffering", "lab-custom")
    replica = cs.createVolume(
        zoneid=z, diskofferingid=custom["id"], size=1, name="replica-root", fetch_result=True
    )["volume"]
    data = cs.createVolume(
        zoneid=z, diskofferingid=custom["id"], size=1, name="replica-data", fetch_result=True
    )["volume"]
    assert (
        cs.attachVolume(id=replica["id"], virtualmachineid=vm["id"], deviceid=0, fetch_result=True)["volume"][
            "type"
        ]
        == "ROOT"
    )
    with pytest.raises(CloudStackApiException) as e:  # deviceid 0 is taken now
        cs.attachVolume(id=data["id"], virtualmachineid=vm["id"], deviceid=0, fetch_result=True)
    assert (
        e.value.error["errorcode"] == 431
        and e.value.error["errortext"] == "Vm already has root volume attached to it"
    )
    with pytest.raises(CloudStackApiException) as e:  # already attached
        cs.attachVolume(id=replica["id"], virtualmachineid=vm["id"], fetch_result=True)
    assert e.value.error["errortext"] == "Please specify a volume that is not attached to any VM."
    attached = cs.attachVolume(id=data["id"], virtualmachineid=vm["id"], fetch_result=True)["volume"]
    assert (attached["deviceid"], attached["type"], attached["vmname"]) == (1, "DATADISK", "swap")
    vols = cs.listVolumes(virtualmachineid=vm["id"])["volume"]
    assert [(v["name"], v["deviceid"]) for v in vols] == [("replica-root", 0), ("replica-data", 1)]
    with pytest.raises(CloudStackApiException) as e:
        cs.migrateVirtualMachine(virtualmachineid=vm["id"], fetch_result=True)
    assert e.value.error["errortext"] == f"VM is not Running, unable to migrate the vm {vm['instancename']}"
    gone = cs.destroyVirtualMachine(id=vm["id"], expunge=True, fetch_result=True)["virtualmachine"]
    assert gone["state"] == "Destroyed"
    assert cs.listVirtualMachines(name="swap") == {}
    with pytest.raises(CloudStackApiException):
        cs.listVolumes(id=replica["id"])  # the ROOT went with the VM
    [kept] = cs.listVolumes(id=data["id"])["volume"]
    assert "virtualmachineid" not in kept  # data volumes are detached and kept


def test_no_host_up_is_insufficient_capacity(lab: LabServer, cs: CloudStack) -> None:
    small = named(cs, "listServiceOfferings", "serviceoffering", "lab-small")
    [template] = cs.listTemplates(templatefilter="all")["template"]
    answer = cs.deployVirtualMachine(
        zoneid=zone(lab), serviceofferingid=small["id"], templateid=template["id"], name="nohost"
    )
    with pytest.raises(CloudStackApiException) as e:
        cs._jobresult(answer["jobid"])
    assert e.value.error["errorcode"] == 533 and e.value.error["cserrorcode"] == 4335
    assert e.value.error["errortext"].startswith("Unable to create a deployment for VM instance")
    [vm] = cs.listVirtualMachines(id=answer["id"])["virtualmachine"]
    assert vm["state"] == "Error"


def test_lab_control_reports_and_injects(lab: LabServer) -> None:
    base = lab.url.rsplit("/client/api", 1)[0]
    assert requests.get(base + "/_lab/health", timeout=5).json()["ok"] is True
    hosts = requests.get(base + "/_lab/hosts", timeout=5).json()
    assert [h["uri"] for h in hosts] == [None, None]
    r = requests.post(
        base + "/_lab/faults", data=json.dumps({"command": "listZones", "errorcode": 429}), timeout=5
    )
    assert r.status_code == 200 and raw_status(lab, "listZones") == 429
    assert requests.get(base + "/_lab/nothing", timeout=5).status_code == 404


def raw_status(lab: LabServer, command: str) -> int:
    exp = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S%z")
    return raw(lab, {"command": command, "signatureVersion": "3", "expires": exp}).status_code


def test_the_lab_runs_as_a_process_found_again_by_its_directory(tmp_path: Path) -> None:
    from labs.cloudstack.lab import CloudStackLab, CloudStackLabError

    lab = CloudStackLab(tmp_path / "lab", LabConfig(libvirt=False)).start()
    try:
        assert (lab.lab_json.stat().st_mode & 0o777) == 0o600
        found = CloudStackLab.attach(tmp_path / "lab")
        assert found.url == lab.url and found.running
        c = CloudStack(endpoint=found.url, key=found.info["api_key"], secret=found.info["secret_key"])
        assert c.listZones()["zone"][0]["id"] == found.info["zoneid"]
        assert found.control("GET", "/_lab/health")["pid"] == lab.proc.pid  # type: ignore[union-attr]
    finally:
        lab.stop()
    assert not lab.lab_json.exists()
    with pytest.raises(CloudStackLabError, match="no CloudStack lab is running from"):
        CloudStackLab.attach(tmp_path / "lab")
