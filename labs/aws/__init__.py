"""The AWS lab: a local stand-in for EC2 and the EBS direct APIs that boto3 talks to over HTTP.

Run it
------
    python -m labs.aws serve --dir DIR [--host 127.0.0.1] [--port 0] [--snapshot-delay 0.3]
    python -m labs.aws write --dir DIR VOLUME_ID OFFSET (--file F | --pattern BYTE --length N)
    python -m labs.aws read  --dir DIR VOLUME_ID OFFSET LENGTH --out F

or from Python::

    with AwsLab(root) as lab:                       # start(detached=False) ... stop()
        ec2, ebs = lab.client("ec2"), lab.client("ebs")
        inst = lab.make_instance("web", [8, 2])     # root /dev/xvda 8 GiB, data /dev/sdf 2 GiB
        lab.write(inst.volumes[0][1], 4096, b"the guest writes")
        guest = lab.make_guest_instance("g1")       # the bootable guest on its root volume: it boots

One server process (werkzeug, threaded, loopback only) serves EC2 (moto, in-process), the six EBS direct
APIs (the lab's own) and `/_lab/...` control endpoints (see `labs.aws.control`). Requests are routed by
the SigV4 credential scope's service. DIR holds `lab.json` (endpoint_url, region, access_key_id,
secret_access_key, account_id, pid; mode 0600, written once the server listens, removed when it stops),
`credentials.json` (the lab's key pair, generated at the first start and kept; 0600), `lab.log` (when
started by `AwsLab`) and `blocks/` (block content). Metadata lives in memory: the lab's state does not
survive a restart (blocks/ is wiped at start); only the key pair does. Region us-east-1, account
123456789012 (requests signed for another region are refused).

Credentials: every AWS request must be SigV4-signed with the lab's key pair, and the signature is
verified (payload hash included). Another access key id: EC2 `AuthFailure` (401), EBS
`UnrecognizedClientException` (403). The right key with a wrong secret: EC2 `AuthFailure` (401), EBS
`InvalidSignatureException` (403). A timestamp more than 15 minutes off: EC2 `RequestExpired`, EBS
`InvalidSignatureException`. The secret is never logged.

Semantics (AWS's; where the lab had to choose, AWS's observed behaviour decided - see "Evidence")
---------------------------------------------------------------------------------------------------
Volumes and guest writes
- Every EC2 volume (CreateVolume, RunInstances, make_instance) has data: zeros until written; a volume
  created from a snapshot has exactly that snapshot's data. CreateVolume/RunInstances from a snapshot
  that is not completed fail with `IncorrectState` ("Snapshot is in invalid state - pending"), and a size
  below the snapshot's with `InvalidParameterValue`. ModifyVolume grows volumes (never shrinks).
- The guest writes with `POST /_lab/volumes/{id}/write?offset=N` (`AwsLab.write`): any offset and length;
  past the volume's end is a 400 naming the volume size; an unknown volume is a 404. `GET .../read`
  (`AwsLab.read`) returns the volume's bytes. Each volume tracks which 512 KiB blocks were ever written
  (`GET /_lab/volumes/{id}`, `AwsLab.written_blocks`); a write of zeros counts as a write.
Snapshots of volumes (EC2 CreateSnapshot, CreateSnapshots, CopySnapshot)
- A snapshot holds the volume exactly as it was at the call: later writes do not leak in. CreateSnapshots
  takes all the instance's volumes at one instant (guest writes wait for the whole call).
- State `pending` for the snapshot delay (`--snapshot-delay`, default 0.3 s), then `completed` (Progress
  0% then 100%, CompletionTime, FullSnapshotSizeInBytes). Clients must wait (the `snapshot_completed`
  waiter or polling DescribeSnapshots).
- A snapshot lists the blocks ever written on its volume (and those inherited from the snapshot the
  volume was created from). Change is tracked by writes, not content: a block rewritten with identical
  bytes since the volume's previous snapshot is changed.
- Lineage: successive snapshots of a volume are one lineage; a volume created from snapshot S continues
  S's lineage; StartSnapshot with ParentSnapshotId P continues P's. Snapshots of other lineages are
  unrelated for ListChangedBlocks.
- DeleteSnapshot frees the snapshot; blocks other snapshots share stay readable through them (a child
  is fully readable after its parent is deleted). A snapshot a registered image maps cannot be deleted
  (`InvalidSnapshot.InUse`).
EBS direct APIs (BlockSize 524288 everywhere)
- StartSnapshot: VolumeSize 1..65536 GiB; ParentSnapshotId must exist (else 404 ResourceNotFound
  SNAPSHOT_NOT_FOUND), be completed (else ValidationException INVALID_SNAPSHOT_ID "Source snapshot (...)
  is not complete.") and not be larger than VolumeSize; Timeout 10..4320 minutes (default 60); Tags and
  Description. ClientToken (boto3 always sends one): the same token and parameters return the original
  answer, other parameters `ConflictException` (409). Answer 201 Status pending. The snapshot is an EC2
  snapshot too: VolumeId `vol-ffffffff`, the tags, VolumeSize; DescribeSnapshots (tag filters),
  CreateTags, DeleteSnapshot, CreateVolume, RegisterImage all see it.
- PutSnapshotBlock: only while the snapshot is open (after CompleteSnapshot: ValidationException
  INVALID_SNAPSHOT_ID "Snapshot is already completed"); BlockIndex < VolumeSize * 2048 (else INVALID_BLOCK
  "... beyond the volume size extent"); the body exactly 524288 bytes and x-amz-Data-Length 524288 (else
  ValidationException: INVALID_BLOCK "Block data length N is not valid", or INVALID_PARAMETER_VALUE
  "Failed to read block data" for a short body); x-amz-Checksum (base64 SHA-256) and
  x-amz-Checksum-Algorithm SHA256 required. A checksum that does not match the body is refused the way
  AWS refuses it: 403 `InvalidSignatureException` ("The value passed in as x-amz-Checksum does not match
  the computed checksum ..."). Rewriting an index in the same snapshot replaces it (and counts once).
  Blocks not written are inherited from the parent. Every write resets the Timeout.
- CompleteSnapshot: answers 202 Status `pending`: sealing is asynchronous, the EC2 state turns
  `completed` after the snapshot delay. ChangedBlocksCount must equal the distinct indexes written (zero
  blocks and identical rewrites included). The optional checksum needs all three of Checksum,
  ChecksumAlgorithm SHA256 and ChecksumAggregationMethod LINEAR (else ValidationException "Invalid
  parameter combination ..."); LINEAR is the SHA-256 of the concatenated *raw 32-byte* SHA-256 digests of
  the written blocks in ascending index order, base64 (not of their base64 text). A wrong checksum: the
  snapshot turns `error` (StateMessage "Checksum mismatch for snapshot"). A wrong count: as on AWS the
  snapshot stays `pending` (waiting for blocks that never come) until its Timeout, then `error`. Calling
  it again answers the current status. Unknown id: 404 SNAPSHOT_NOT_FOUND.
- ListSnapshotBlocks / ListChangedBlocks / GetSnapshotBlock read completed snapshots only: a pending or
  failed snapshot answers 404 ResourceNotFoundException SNAPSHOT_NOT_FOUND, as AWS does.
- Listings: MaxResults 100..10000 (default 10000; else ValidationException), StartingBlockIndex, NextToken
  (opaque, overrides StartingBlockIndex; a bad one: ValidationException INVALID_PAGE_TOKEN), absent on the
  last page; VolumeSize, BlockSize, ExpiryTime (about 6.8 days ahead; now for an empty list).
- ListChangedBlocks needs both FirstSnapshotId and SecondSnapshotId (AWS: ValidationException
  INVALID_SNAPSHOT_ID "First snapshot should not be empty or null"; to list all blocks of one snapshot use
  ListSnapshotBlocks). Snapshots of one lineage only (else UNRELATED_SNAPSHOTS). A block is listed when it
  differs (was written) between the two: FirstBlockToken is absent when the first snapshot does not hold
  the block, SecondBlockToken when the second does not. Any two snapshots of a lineage compare (older
  first is the usual; reversed or sibling pairs work, symmetrically). Pages cover the union of both
  snapshots' blocks before unchanged ones are dropped: a page may be short or empty while NextToken is
  present - follow NextToken to the end. An empty, final answer carries no VolumeSize, BlockSize or
  ExpiryTime (as AWS).
- Block tokens are fresh on every listing (never compare tokens to detect change), valid until
  ExpiryTime across later listings, and scoped to the snapshot and index they were listed for:
  GetSnapshotBlock with another snapshot's token, another index's token or a made-up one is
  ValidationException INVALID_BLOCK_TOKEN. GetSnapshotBlock returns the 524288 bytes with x-amz-Data-Length,
  x-amz-Checksum (base64 SHA-256) and x-amz-Checksum-Algorithm SHA256.
- Errors are rest-json as AWS sends them: `x-amzn-ErrorType: <Code>:<namespace>`, body `{"Message",
  "Reason"}` for the service's errors, `{"message"}` for validation, authentication and checksum errors;
  status per the model (Validation 400, ResourceNotFound 404, AccessDenied 403, Conflict 409,
  RequestThrottled 400, InternalServer 500).
Images and instances
- RegisterImage with BlockDeviceMappings naming completed lab snapshots (RootDeviceName required and
  mapped to a snapshot; a size below a snapshot's is refused; names are unique) makes an EBS-backed AMI.
  RunInstances of it creates, per mapping, a volume from the snapshot (VolumeSize or the snapshot's size)
  attached at the device, with RunInstances' own mappings applied on top; DescribeInstances shows them.
- Instances really run (`labs.aws.machines`, `labs.aws.ec2_instances`): each running instance is a QEMU
  VM (TCG here; 1 vCPU, 256 MiB whatever the type) that boots through its root volume's own boot
  sectors, with every volume as a virtio disk served from the lab's block maps over NBD: guest writes
  land in the volume as they happen (a snapshot of a running instance holds them, crash-consistent).
  StopInstances kills the VM, StartInstances boots a new one (LaunchTime updated), RebootInstances
  restarts it, TerminateInstances kills it before its volumes go; a VM the guest powers off or resets
  leaves the instance stopped (`Client.InstanceInitiatedShutdown`). Every VM dies with the lab.
  `set_instance_state_delay(seconds)` makes the transitions take time, as EC2's do: `stopping` (the VM
  still runs and writes) then `stopped`, `pending` (the VM boots) then `running`; StopInstances with
  Force=True ends a `stopping` at once; StartInstances of a `stopping` instance is
  IncorrectInstanceState. Stopping a stopped instance or starting a running one changes nothing.
- GetConsoleOutput: the serial console (SeaBIOS's messages included), base64 on the wire (boto3 decodes
  it), the most recent 64 KiB, afresh at each start. A volume that does not boot still launches; its
  console says why ("No bootable device.").
- DescribeInstanceStatus: `ok`/`ok` while the VM runs; instance status `impaired` (reachability failed)
  once its console shows it cannot boot (no bootable device, a kernel panic).
- AttachVolume / DetachVolume (a failback's cutover swaps an instance's volumes): EC2 detaches a root
  volume only from a stopped instance (else `IncorrectState` "Unable to detach root volume ..."); a
  volume attached already is `VolumeInUse`, a device the instance uses already `InvalidParameterValue`
  ("Attachment point ... is already in use"). A volume keeps its lineage wherever it is attached.
- RunInstances honours ClientToken: the same token and parameters answer the original reservation
  (whatever its state since), other parameters `IdempotentParameterMismatch`.
- `make_instance(name, disks_gib)` runs an instance of the lab's base image (`aws-lab-base`, root device
  /dev/xvda) in the default VPC's subnet: the root volume at /dev/xvda, data volumes at /dev/sdf,
  /dev/sdg, ... (up to /dev/sdp), all zeros, DeleteOnTermination, tag Name=name; its VM finds nothing to
  boot. `make_instance(..., image=PATH)` puts a disk image file on the root volume (an AMI
  `aws-lab-<stem>-<digest>` of it is registered once), `make_guest_instance(name)` the bootable guest
  (`labs.guest`): its console shows SENDENSE-GUEST-READY a few seconds after the start.
Faults, counts and time
- `inject(operation, error, count)` fails the next `count` calls of an EBS or EC2 operation with `error`
  in the protocol's format and AWS's status (EBS throttling 400, EC2 RequestLimitExceeded 503, internal
  errors 500; a `status` overrides); with `lost=True` the call is carried out and only its answer is
  the error. `stats()` counts every authenticated call per operation, failed
  ones included. `advance_clock(seconds)` moves the lab clock that snapshot delays, StartSnapshot
  timeouts and token expiry use. `set_capture_pause(s)` makes each volume capture of CreateSnapshot(s)
  take s seconds (to test that writes wait).

Not emulated: encryption and KMS (Encrypted=true is refused), snapshot sharing, other regions and
accounts, persistence across restarts, request-rate throttling (inject it), and the short delay AWS
sometimes shows between a snapshot turning completed in EC2 and its blocks becoming readable. Instances
have no network (security groups and subnets are records only), volumes attached or detached while an
instance runs reach its VM at the next start, and a guest reboot stops the instance (QEMU runs with
-no-reboot, so a guest that panics in a loop costs nothing).

moto's behaviours the lab replaces (see `labs.aws.ec2_bridge`): volumes and snapshots had no data;
snapshots were completed at once; RegisterImage ignored everything but the name (and invented a 15 GiB
snapshot); RunInstances ignored the image's mappings and ClientToken, and ran nothing; GetConsoleOutput
answered a fixed text and DescribeInstanceStatus always ok; CreateVolume accepted pending snapshots and any
size; ModifyVolume shrank; moto's EBS direct APIs are not used at all. moto's default AMIs are not loaded.

Evidence: the EBS behaviours above that the brief left open or stated otherwise (checksum mismatch as
InvalidSignatureException, LINEAR over raw digests, asynchronous completion, wrong counts staying
pending, pending snapshots reading as not found, FirstSnapshotId required, per-listing tokens, empty
pages) follow AWS's API reference and published captures of real EBS responses (boto3 against
us-east-1), e.g. radkawar/stackd testdata/aws/ebs/blocks*.json, and awslabs/coldsnap's LINEAR checksum.
"""

from labs.aws.lab import AwsLab, AwsLabError, LabInstance

__all__ = ["AwsLab", "AwsLabError", "LabInstance"]
