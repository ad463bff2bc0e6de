"""The AWS source's snapshot handle: which volume and device a disk's EBS snapshot was taken of."""

from __future__ import annotations

from sendense.models import Handle


class AwsDisk(Handle):
    volume_id: str
    device: str = ""
