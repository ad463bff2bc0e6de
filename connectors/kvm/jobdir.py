"""A job's directory on a KVM target, and the marker that says whose it is.

Every job directory holds `.sendense-job.json` (the job's name and unique id). It is checked before
every write, prune, export and destroy, so that a job never touches files it did not write:

- a job directory must be a real directory, not a symlink (two jobs would share one set of files);
- it must not lie inside another job's directory, nor be a directory that holds anything other than
  a job's files without a marker (an existing directory is never adopted);
- its marker must name this job and this job's id: a job re-created under a deleted job's name does
  not adopt the points the deleted job kept (it is refused, naming the directory).

Directories written before markers existed (jobs whose id is '') are adopted by a job of that name
whose id is '' too, when they hold nothing but a job's files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sendense.errors import InvalidSpec, TargetError

# Modes of what a job directory holds, set explicitly (never left to the umask): replicas are private.
PRIVATE_DIR, PRIVATE_RW, PRIVATE_RO = 0o700, 0o600, 0o400

MARKER = ".sendense-job.json"
# what a job directory may hold
JOB_ENTRIES = {"points", "disks", "holds", "vms", ".lock", ".points.lock", MARKER}


def read_marker(directory: Path) -> dict[str, str] | None:
    try:
        data = json.loads((directory / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"job": "?", "job_id": "?"}
    return {"job": str(data.get("job", "?")), "job_id": str(data.get("job_id", "?"))}


def _owner_above(directory: Path) -> tuple[Path, dict[str, str]] | None:
    """The job directory that contains `directory`, if any (symlinks resolved)."""
    for parent in directory.resolve().parents:
        marker = read_marker(parent)
        if marker is not None:
            return parent, marker
    return None


def check_place(directory: Path, job: str, job_id: str) -> None:
    """Why `directory` cannot be job `job`'s directory (InvalidSpec, one line), or nothing if it can.
    Reads only: nothing is created."""
    if directory.is_symlink():
        raise InvalidSpec(
            f"target.path: {directory} is a symlink; a job's directory must be a directory of its own"
        )
    above = _owner_above(directory)
    if above is not None:
        where, owner = above
        raise InvalidSpec(
            f"target.path: {directory} is inside the directory of job {owner['job']} ({where}); "
            "give each job a target path of its own"
        )
    if not directory.exists():
        return
    if not directory.is_dir():
        raise InvalidSpec(f"target.path: {directory} exists and is not a directory")
    marker = read_marker(directory)
    entries = {e.name for e in directory.iterdir()}
    if marker is None:
        if not entries - {".lock"}:
            return  # empty: ours to take
        if job_id == "" and entries <= JOB_ENTRIES:
            return  # written by this job before markers existed
        if entries <= JOB_ENTRIES:
            raise InvalidSpec(
                f"target.path: {directory} holds the recovery points of an earlier job named {job} "
                "(kept when it was deleted); remove that directory or give the job another name"
            )
        raise InvalidSpec(
            f"target.path: {directory} already exists and is not a sendense job directory; "
            "choose another target path or job name"
        )
    if marker["job"] != job:
        raise InvalidSpec(f"target.path: {directory} belongs to job {marker['job']}, not {job}")
    if marker["job_id"] != job_id:
        raise InvalidSpec(
            f"target.path: {directory} holds the recovery points of an earlier job named {job} "
            "(kept when it was deleted); remove that directory or give the job another name"
        )


def claim(directory: Path, job: str, job_id: str) -> None:
    """Check the place and write the marker if there is none yet; raises TargetError if the
    directory is not this job's (a running job whose directory was replaced under it)."""
    try:
        check_place(directory, job, job_id)
    except InvalidSpec as e:
        raise TargetError(e.message) from None
    if read_marker(directory) is not None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(PRIVATE_DIR)  # replicas are the VM's data: no one but the agent's user reads them
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"job": job, "job_id": job_id}) + "\n")
    os.replace(tmp, directory / MARKER)
