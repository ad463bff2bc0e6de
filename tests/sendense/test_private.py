"""Private directories (sendense.private): 0700, ours, never a symlink or another user's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sendense.errors import NotAllowed
from sendense.private import private_dir


def test_made_0700_and_tightened_when_ours(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        d = private_dir(tmp_path / "a" / "b", "work directory")
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o700
    d.chmod(0o755)
    private_dir(d)
    assert d.stat().st_mode & 0o777 == 0o700


def test_a_symlink_or_a_file_in_its_place_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NotAllowed, match=r"^socket directory .*link is a symlink: refusing to use it$"):
        private_dir(tmp_path / "link", "socket directory")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotAllowed, match="is not a directory"):
        private_dir(tmp_path / "file")


@pytest.mark.root
def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    """A shared /tmp lets anyone make the directory first: it would then own the sockets inside."""
    d = tmp_path / "sendense-qemu-nbd"
    d.mkdir(mode=0o777)
    os.chown(d, 65534, 65534)  # nobody
    with pytest.raises(NotAllowed, match=r"belongs to another user \(uid 65534\): refusing to use it"):
        private_dir(d, "NBD socket directory")
