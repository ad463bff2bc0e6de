"""The CloudStack lab: a management-server stand-in speaking CloudStack's signed query API on loopback
(`/client/api`), whose KVM hosts and VMs are real.

- Wire (server.py, signing.py, wire.py): GET or POST, `response=json`; the signature checked as
  ApiServer.verifyRequest checks it (case-sensitive sort, Java URL encoding, lowercased, HMAC-SHA1),
  `signatureVersion=3` with `expires` (refused when past; with `enforce_timestamps`, the lab's default
  and CloudStack's `enforce.post.requests.and.timestamps=true`, also when more than 15 minutes ahead,
  and the legacy unversioned form refused; off, the legacy form is accepted). Answers
  `{"<command>response": {...}}`, lists with `count` (or `{}` when empty), `page`/`pagesize`; errors
  with HTTP status = errorcode and CloudStack's cserrorcode.
- Async commands (cloud.py) answer `jobid` (and `id` for creates); queryAsyncJobResult gives jobstatus
  0 / 1 with jobresult / 2 with jobresult {errorcode, cserrorcode, errortext}; listAsyncJobs.
- Inventory (state.py): one zone, pod and cluster, lab hosts (hosts.py: a private libvirtd each, root),
  one primary storage pool (a directory with a capacity), service and disk offerings, the bootable
  guest (labs/guest) as a QCOW2 template, an isolated and a shared network.
- VMs (vms.py) run as transient libvirt domains named by their instancename on their host's libvirtd;
  migrateVirtualMachine moves a running VM live (libvirt migrate3 between the hosts' libvirtds, the
  same volume files; `live_migration=False`: a cold destroy-and-start on the other host).
  Volumes (volumes.py, storage.py) are qcow2 files on the pool, ROOTs over the template's copy.
- Faults (faults.py) and the /_lab control endpoints (server.py) for tests; `plant_bugs.py` shows which
  tests catch which lab bug. `hook.py` serves `sendense lab up/down/status`; lab.py runs the server
  as a process (`python -m labs.cloudstack serve --dir DIR`).

Not modelled: XML answers, accounts, projects, domains and roles (one admin key pair), snapshots,
templates registered by users, the upload path, security groups and real guest networking (a NIC is
user networking), HA.
"""
