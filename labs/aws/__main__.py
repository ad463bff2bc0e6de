"""Command line: `python -m labs.aws serve|write|read ...` (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from labs.aws.lab import AwsLab, AwsLabError

CHUNK = 64 << 20  # the CLI writes and reads in pieces of this size: memory stays bounded


def _byte(text: str) -> int:
    value = int(text, 0)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{text} is not a byte value (0..255)")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs.aws", description="The AWS lab (EC2 + EBS direct APIs).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the lab server in the foreground until SIGTERM")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--snapshot-delay", type=float, default=0.3, help="seconds a snapshot stays pending")
    w = sub.add_parser("write", help="write to a volume as its guest would")
    w.add_argument("--dir", type=Path, required=True)
    w.add_argument("volume_id")
    w.add_argument("offset", type=int)
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path)
    src.add_argument("--pattern", type=_byte, help="a byte value repeated --length times")
    w.add_argument("--length", type=int)
    r = sub.add_parser("read", help="read a volume's bytes into a file")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("volume_id")
    r.add_argument("offset", type=int)
    r.add_argument("length", type=int)
    r.add_argument("--out", type=Path, required=True)
    return p


def _write(lab: AwsLab, args: argparse.Namespace) -> None:
    offset = args.offset
    if args.file is not None:
        with open(args.file, "rb") as f:
            while chunk := f.read(CHUNK):
                lab.write(args.volume_id, offset, chunk)
                offset += len(chunk)
        return
    if args.length is None or args.length < 0:
        raise AwsLabError("--pattern needs --length N (bytes)")
    remaining = args.length
    while remaining > 0:
        n = min(CHUNK, remaining)
        lab.write(args.volume_id, offset, bytes([args.pattern]) * n)
        offset += n
        remaining -= n


def _read(lab: AwsLab, args: argparse.Namespace) -> None:
    with open(args.out, "wb") as f:
        done = 0
        while done < args.length:
            n = min(CHUNK, args.length - done)
            f.write(lab.read(args.volume_id, args.offset + done, n))
            done += n


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from labs.aws.server import serve

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        serve(args.dir, args.host, args.port, args.snapshot_delay)
        return 0
    try:
        lab = AwsLab.attach(args.dir)
        if args.command == "write":
            _write(lab, args)
        else:
            _read(lab, args)
    except (AwsLabError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
