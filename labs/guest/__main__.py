"""python -m labs.guest build|path: build the bootable guest (cached) and print its path."""

from __future__ import annotations

import sys

from labs.guest.build import GuestBuildError, build


def main(argv: list[str]) -> int:
    if argv[:1] not in (["build"], ["path"]):
        print("usage: python -m labs.guest build", file=sys.stderr)
        return 2
    try:
        print(build())
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
