"""Errors shared by the core and the connectors.

Every error carries whether retrying can help. One adapter at the activity boundary
(`activities.errors`) maps them to Temporal failures; nothing else needs to know about Temporal.
Messages are one line, name the field or resource at fault, and never contain a secret.
"""

from __future__ import annotations


class SendenseError(Exception):
    """Base error. `retryable` tells the activity adapter whether Temporal should retry."""

    retryable: bool = False
    kind: str = "SendenseError"

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.kind


class InvalidSpec(SendenseError):
    """The job spec (or a setting) is wrong: a field is unknown, missing or out of range."""

    kind = "InvalidSpec"


class NotAllowed(SendenseError):
    """This agent's policy does not allow what a job asks: a path outside its roots, a platform or an
    endpoint it does not serve (sendense.policy). Retrying cannot help; the operator changes the spec or
    the agent's policy."""

    kind = "NotAllowed"


class ResourceNotFound(SendenseError):
    """A VM, disk, socket or point named by the user does not exist."""

    kind = "ResourceNotFound"


class ResourceUnavailable(SendenseError):
    """A resource exists but cannot be used right now (locked image, busy socket). Retryable."""

    kind = "ResourceUnavailable"
    retryable = True


class VmNotStartable(SendenseError):
    """The product cannot start this source VM (one known only by its disks, or a VM process the product
    did not start: how it is started is the operator's command line). Not a failure of the verb: the
    disks are current, and the operator starts the VM. A failback tells it apart from a failure by this
    class (its `kind`), never by the message."""

    kind = "VmNotStartable"


class NotWhileRunning(SendenseError):
    """The verb cannot act on the VM while it runs (a platform that reads a VM's changes only while it
    is stopped): the failback then cuts over at once (VM off, one reverse sync). Told apart
    by its `kind`, never by the message."""

    kind = "NotWhileRunning"
    retryable = False


class ChangeTrackingLost(SendenseError):
    """The source's change tracking (bitmap, CBT, change id) is gone or inconsistent.

    Never fatal: the sync falls back to a digest-compare resync.
    """

    kind = "ChangeTrackingLost"


class SnapshotInconsistent(SendenseError):
    """The source changed under a snapshot that had to be stable. Retrying the step cannot help: the
    workflow fails the sync and takes a new snapshot at once (a few times in a row, then it waits)."""

    kind = "SnapshotInconsistent"
    retryable = False


class TargetError(SendenseError):
    """The target refused a write or a commit (disk full, permissions). Permanent unless said otherwise."""

    kind = "TargetError"


class DataPathError(SendenseError):
    """An I/O error while moving data. Retryable: the copy resumes from its last token."""

    kind = "DataPathError"
    retryable = True


class ServerUnreachable(SendenseError):
    """The Temporal server cannot be reached."""

    kind = "ServerUnreachable"
