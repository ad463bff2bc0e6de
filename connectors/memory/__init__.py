"""The memory platform: a source and a target whose disks live in process memory or in plain files.

For developers and tests only (`developer_only`: a user's spec may name it only with
SENDENSE_DEVELOPER_PLATFORMS=1). It implements the connector protocols exactly, with no hypervisor or
cloud behind them, so that workflow and contract tests run the real activities and data path in
milliseconds, and can inject a fault at any verb:

- `store`: where disks and records live: a named store in process memory (activities of one worker
  process share it), or plain files under a directory (processes share it); VMs and guest-like I/O
  (write, zero, discard, resize) for tests; change tracking recorded at every guest write.
- `faults`: the test API that makes the Nth call of a verb fail (once or always, retryable or not,
  before or after its effect), or a copy die after N bytes. Never reachable from a spec.
- `source`: snapshots as frozen copies, change ids, exact changed extents, tracking lost.
- `target`: pending replicas and immutable points, prune, holds, export, destroy.
- `vms`: VMs made from points (test: isolated network; production: the store's networks), whose
  "boot" is decided by their first disk's content (`vm_state`); faults before or after each verb.
"""
