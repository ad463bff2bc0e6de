"""A qcow2 image's backing chain and external data file, walked from the headers alone, and the
`--image-opts` that make QEMU open exactly the files that were checked, with explicit formats.

A user's image names other files: a backing file (any path, or a `json:`/`nbd:` pseudo-filename
QEMU would parse) and an external data file. QEMU follows them when it opens the image, so an image
backed by a root-only host file (`/etc/shadow` as a raw backing) gave its reader that file's bytes.
Here nothing is handed to QEMU until every file it would open has been checked by the caller's
`allow` (the agent's allowed source roots), each resolved as QEMU resolves it (a backing name
relative to the directory of the image naming it) and then through symlinks (realpath). Only plain
file paths are followed; backing formats are qcow2 or raw, taken from the header's backing format
extension or, without one, from the file's magic (read by us, after the check). QEMU then opens the
chain through `image_json`: every level's file, format and data file given explicitly, and the last
qcow2 level told it has no backing, so neither a header rewritten after the check nor QEMU's format
probing can bring in another file.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sendense.errors import InvalidSpec
from tools.qcow2 import BadImage, open_image, read_qcow2_header, sniff_format

MAX_CHAIN = 256  # levels; a loop is refused on its own


@dataclass(frozen=True)
class Level:
    path: Path  # the file QEMU is told to open: resolved through symlinks
    fmt: str  # "qcow2" or "raw"
    device: bool = False  # a block device (QEMU's host_device driver)
    data_file: Path | None = None  # a qcow2 level's external data file, resolved
    data_device: bool = False


Allow = Callable[[Path, str], None]  # (resolved path, what it is) -> raises when outside the roots


class ChainRefused(InvalidSpec):
    """The chain names something that is never followed; the message starts with the caller's label."""


def _has_protocol(name: str) -> bool:
    """QEMU's path_has_protocol: a ':' before any '/' makes `json:{...}`, `nbd:...`, `file:...`."""
    return name[: len(name.split("/", 1)[0])].find(":") >= 0


def _is_device(path: Path) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def walk_chain(image: Path, allow: Allow, label: str, *, backing: bool = True) -> list[Level]:
    """The levels QEMU would open for qcow2 `image`, top first, each checked by `allow` before it
    is read. `label` is how errors name the image (a spec field and its path). `backing=False`:
    the top level alone (what a bitmap change opens)."""
    top = Path(os.path.realpath(image))
    allow(top, label.removesuffix(f": {image}"))  # (the check names the path itself)
    given, fmt, real = image, "qcow2", top  # given: the name QEMU resolves relative names against
    levels: list[Level] = []
    seen = {real}
    while True:
        if fmt == "raw":
            levels.append(Level(real, "raw", _is_device(real)))
            return levels
        where = label if given == image else f"{label}: backing file {given}"
        try:
            h = read_qcow2_header(real)
        except BadImage as e:
            raise ChainRefused(f"{where}: qcow2 header: {e.reason}") from None
        data_file, data_device = None, False
        if h.has_data_file:
            if not h.data_file:
                raise ChainRefused(f"{where}: has an external data file but its header does not name it")
            if not os.path.isabs(h.data_file):
                raise ChainRefused(
                    f"{where}: external data file {h.data_file!r} is a relative name (QEMU takes it from its "
                    "own working directory): make it absolute with qemu-img amend -o data_file=PATH"
                )
            data_file = Path(os.path.realpath(h.data_file))
            allow(data_file, f"{where}: external data file")
            data_device = _checked_file(data_file, f"{where}: external data file {data_file}")
        levels.append(Level(real, "qcow2", _is_device(real), data_file, data_device))
        if not backing or h.backing is None:
            return levels
        name = h.backing
        if _has_protocol(name):
            raise ChainRefused(
                f"{where}: backing file {name[:80]!r} is not a plain file path (a protocol or json: name "
                "is never followed)"
            )
        given = Path(name) if os.path.isabs(name) else given.parent / name  # QEMU's path_combine
        real = Path(os.path.realpath(given))
        allow(real, f"{where}: backing file")
        _checked_file(real, f"{where}: backing file {given}")
        if real in seen:
            raise ChainRefused(f"{where}: backing file {given} loops back into the chain")
        if len(levels) >= MAX_CHAIN:
            raise ChainRefused(f"{label}: backing chain is longer than {MAX_CHAIN} images")
        seen.add(real)
        fmt = h.backing_format or sniff_format(real)
        if fmt not in ("qcow2", "raw"):
            raise ChainRefused(
                f"{where}: backing file {given} is {fmt}: only qcow2 and raw backing files are followed"
            )


def _checked_file(path: Path, what: str) -> bool:
    """Whether `path` is a block device; refuses a missing file, a FIFO, a directory..."""
    try:
        os.close(open_image(path))
    except FileNotFoundError:
        raise ChainRefused(f"{what}: not found") from None
    except BadImage as e:
        raise ChainRefused(f"{what}: {e.reason}") from None
    except OSError as e:
        raise ChainRefused(f"{what}: {e.strerror or e}") from None
    return _is_device(path)


def _file(path: Path, device: bool) -> dict[str, Any]:
    return {"driver": "host_device" if device else "file", "filename": str(path)}


def image_json(levels: list[Level]) -> str:
    """A `json:` filename for qemu-nbd / qemu-img (no --format: the driver is in it) that opens
    exactly `levels` (from `walk_chain`), the last qcow2 level with no backing."""
    nodes: list[dict[str, Any]] = []
    for lv in levels:
        node: dict[str, Any] = {"driver": lv.fmt, "file": _file(lv.path, lv.device)}
        if lv.data_file is not None:
            node["data-file"] = _file(lv.data_file, lv.data_device)
        if lv.fmt == "qcow2":
            node["backing"] = None  # replaced by the next level's node, if there is one
        if nodes:
            nodes[-1]["backing"] = node
        nodes.append(node)
    return "json:" + json.dumps(nodes[0], separators=(",", ":"))
