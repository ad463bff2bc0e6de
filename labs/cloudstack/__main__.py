"""Command line: `python -m labs.cloudstack serve --dir DIR [--host H] [--port P]` (DIR/config.json, if
there, says what the lab is made of: labs/cloudstack/state.py LabConfig)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from labs.cloudstack.server import serve


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m labs.cloudstack", description="The CloudStack lab.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the lab server in the foreground until SIGTERM")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(args.dir, args.host, args.port)


if __name__ == "__main__":
    main()
