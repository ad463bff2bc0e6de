"""Directories only the agent's user can enter: the home of its state, a job's work directory, the
directories its NBD sockets are made in. What is inside them (replicas' records, resume tokens,
sockets that serve a VM's disks) is reachable by nobody else, whatever its own mode says."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sendense import config
from sendense.errors import NotAllowed


def private_dir(path: Path, what: str = "directory") -> Path:
    """`path` as a directory of this user's only (0700): made if missing, tightened if it is ours and
    others could enter it. A symlink, a non-directory or another user's directory in its place (a
    shared /tmp lets anyone make one first) is refused in one line, never used."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise NotAllowed(f"{what} {path} is {kind}: refusing to use it")
    if st.st_uid != os.geteuid():
        raise NotAllowed(f"{what} {path} belongs to another user (uid {st.st_uid}): refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def work_dir(job: str) -> Path:
    """The job's records on this agent (resume tokens, sockets, scratch files, exports): 0700 all the way."""
    home = private_dir(config.home(), "SENDENSE_HOME")
    return private_dir(private_dir(home / "work", "work directory") / job, "work directory")


def write_atomic(path: Path, text: str) -> None:
    """Replace `path`'s content at once: a reader sees the old or the new text, never a torn one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
