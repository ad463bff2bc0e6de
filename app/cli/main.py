"""The `sendense` command line: the stack and the demo here; jobs, points and labs in their modules."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from app.cli.agents import agent_app
from app.cli.drill import drill_app
from app.cli.failback import failback
from app.cli.failover import failover
from app.cli.jobs import job_app
from app.cli.lab import lab_app
from app.cli.links import link_app
from app.cli.output import JsonOpt, debugging, describe_error, emit_json, error_line, fail, one_line, out
from app.cli.plan import plan_app
from app.cli.points import point_app
from sendense import config
from sendense.errors import SendenseError

if TYPE_CHECKING:
    from tools.certs import Made

app = typer.Typer(help="Sendense Replication: block-level VM replication on Temporal.", no_args_is_help=True)
app.add_typer(job_app, name="job")
app.add_typer(point_app, name="point")
app.add_typer(lab_app, name="lab")
app.add_typer(drill_app, name="drill")
app.command("failover")(failover)
app.command("failback")(failback)
app.add_typer(plan_app, name="plan")
app.add_typer(link_app, name="link")
app.add_typer(agent_app, name="agent")

# ------------------------------------------------------------------------------- stack


@app.command()
def up(
    port: int = typer.Option(7233, min=1, max=65535, help="Temporal frontend port"),
    ui_port: int = typer.Option(8233, min=1, max=65535, help="Temporal web UI port"),
    codec_port: int = typer.Option(
        0, min=0, max=65535, help="port of the codec server the web UI asks (0: any free port)"
    ),
    state_dir: Path = typer.Option(None, help="state directory (default $SENDENSE_HOME or ~/.sendense)"),
    as_json: bool = JsonOpt,
) -> None:
    """Start the embedded stack: Temporal dev server (with web UI), a worker and the codec server,
    in the background, on 127.0.0.1 only. Makes the payload key (STATE/codec.key) if there is none."""
    from app import stack

    try:
        info = stack.up(state_dir or config.home(), port=port, ui_port=ui_port, codec_port=codec_port)
    except SendenseError as e:
        fail(e.message)
    data = info.to_dict()
    if as_json:
        emit_json(data)
    else:
        out.print(
            f"Temporal at {data.get('address')}, web UI {data.get('ui_url')}, "
            f"worker pid {data.get('worker_pid')}, codec server {data.get('codec_url')}"
        )


@app.command()
def down(state_dir: Path = typer.Option(None, help="state directory"), as_json: bool = JsonOpt) -> None:
    """Stop the embedded stack."""
    from app import stack

    was = stack.down(state_dir or config.home())
    if as_json:
        emit_json({"stopped": was})
    else:
        out.print("stopped" if was else "nothing was running")


@app.command()
def status(state_dir: Path = typer.Option(None, help="state directory"), as_json: bool = JsonOpt) -> None:
    """Report the embedded stack."""
    from app import stack

    st = stack.status(state_dir or config.home())
    if as_json:
        emit_json(st)
        return
    for k, v in st.items():
        out.print(f"{k:>16}: {v}")


@app.command()
def worker(
    role: str = typer.Option(
        "all",
        help="host: this host's disks and platforms (queue host-<id>); control: the workflows; all: both",
    ),
    host_id: str = typer.Option(None, help="this host's id (default $SENDENSE_HOST_ID, else the machine id)"),
    data_listen: str = typer.Option(
        None,
        help="host:port to serve source disks to other agents on, over mutual TLS ($SENDENSE_DATA_LISTEN)",
    ),
    data_advertise: str = typer.Option(
        None, help="host:port other agents reach it at, if not --data-listen ($SENDENSE_DATA_ADVERTISE)"
    ),
) -> None:
    """Run an agent in the foreground. Temporal (TLS/mTLS) from SENDENSE_TEMPORAL and SENDENSE_TLS_*;
    the agent's certificate for data between agents from SENDENSE_AGENT_CERT/KEY/CA
    (`sendense certs agent`)."""
    from workers.worker import ROLES, main

    if role not in ROLES:
        fail(f"--role {role}: one of {', '.join(ROLES)}")
    for var, value in (
        ("SENDENSE_HOST_ID", host_id),
        ("SENDENSE_DATA_LISTEN", data_listen),
        ("SENDENSE_DATA_ADVERTISE", data_advertise),
    ):
        if value is not None:
            os.environ[var] = value
    main(role)


# ------------------------------------------------------------------------------- payload keys

codec_key_app = typer.Typer(help="The payload encryption key (workers/codec.py).", no_args_is_help=True)
app.add_typer(codec_key_app, name="codec-key")


@codec_key_app.command("new")
def codec_key_new(
    path: Path = typer.Argument(..., help="file to create (0600; never over an existing file)"),
    as_json: bool = JsonOpt,
) -> None:
    """Make a new payload key (32 random bytes). To rotate: make one, give every worker and client
    the new one as SENDENSE_CODEC_KEY and the old one in SENDENSE_CODEC_OLD_KEYS."""
    from workers.codec import new_key

    try:
        kid = new_key(path)
    except FileExistsError:
        fail(f"{path}: already exists (a key is never overwritten)")
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    if as_json:
        emit_json({"path": str(path), "key_id": kid})
    else:
        out.print(f"payload key {path} (key id {kid})")


@app.command("codec-server")
def codec_server(
    host: str = typer.Option("127.0.0.1", help="address to listen on (not loopback: needs --token-file)"),
    port: int = typer.Option(8234, min=1, max=65535),
    ui_origin: list[str] = typer.Option(
        [], "--ui-origin", help="web UI origin allowed by CORS (default: the embedded stack's UI)"
    ),
    token_file: Path = typer.Option(None, help="require `Authorization: Bearer <this file's token>`"),
) -> None:
    """Serve Temporal's remote codec protocol (POST /encode, /decode) with this machine's payload
    keys, so that the web UI and `temporal --codec-endpoint` show decrypted payloads. In the
    foreground; answers only this user's processes on loopback."""
    from app.codec_server import CodecHTTPServer, default_origins, read_token
    from workers.codec import CodecError, load_codec

    try:
        server = CodecHTTPServer(
            (host, port),
            load_codec(),
            ui_origin or default_origins(config.temporal_config().ui_url),
            token=read_token(token_file) if token_file else None,
        )
    except CodecError as e:
        fail(e.message)
    except OSError as e:
        fail(f"codec server on {host}:{port}: {e.strerror}")
    out.print(f"codec server at {server.url} (key id {server.codec.key_id}); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------------------- certificates

certs_app = typer.Typer(help="Certificates for mutual TLS with the Temporal server.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")


@certs_app.command("make")
def certs_make(
    directory: Path = typer.Argument(..., help="where the files go (0700; each file 0600)"),
    server_name: list[str] = typer.Option(
        [], "--server-name", help="a name the server is reached by (default: temporal, localhost, 127.0.0.1)"
    ),
    client: list[str] = typer.Option(
        [], "--client", help="a client certificate to make (default for a new CA: worker, ui, admin)"
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Make a private CA, the Temporal server's certificate and client certificates (mTLS) in DIR.
    An existing CA in DIR is reused (to add clients); no file is ever overwritten."""
    from tools.certs import DEFAULT_SERVER_NAMES, make

    try:
        made = make(directory, server_name or DEFAULT_SERVER_NAMES, client or None)
    except SendenseError as e:
        fail(e.message)
    except OSError as e:
        fail(f"{directory}: {e.strerror}")
    if not made.files and not as_json:
        out.print(f"{directory}: nothing to make (add --client NAME)", highlight=False)
    _print_made(made, as_json)


def _print_made(made: Made, as_json: bool) -> None:
    if as_json:
        emit_json({"dir": str(made.dir), "ca_reused": made.ca_reused, "files": [str(f) for f in made.files]})
        return
    for f in made.files:
        out.print(f"made {f}", highlight=False)


@certs_app.command("agent")
def certs_agent(
    directory: Path = typer.Argument(..., help="the CA's directory (0700; a CA is made if it has none)"),
    host_id: str = typer.Option(..., "--host-id", help="the agent's host id (SENDENSE_HOST_ID)"),
    address: list[str] = typer.Option(
        [], "--address", help="an IP or DNS name other agents reach it at (repeatable)"
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Make an agent's certificate for data between agents (and Temporal mTLS): DIR/agent-<id>.pem and
    agent-<id>-key.pem, naming sendense://host/<id>, which peers check. Give the agent the files as
    SENDENSE_AGENT_CERT, SENDENSE_AGENT_KEY and SENDENSE_AGENT_CA=DIR/ca.pem."""
    from tools.certs import agent

    try:
        made = agent(directory, host_id, address)
    except SendenseError as e:
        fail(e.message)
    except OSError as e:
        fail(f"{directory}: {e.strerror}")
    _print_made(made, as_json)


# ------------------------------------------------------------------------------- demo


@app.command()
def demo(
    state_dir: Path = typer.Option(None, help="state directory"),
    port: int = typer.Option(7233, min=1, max=65535),
    ui_port: int = typer.Option(8233, min=1, max=65535),
    incrementals: int = typer.Option(3, min=0, max=1000, help="incremental syncs while the guest writes"),
    clean: bool = typer.Option(False, "--clean", help="delete the demo job and stop the guest VM"),
) -> None:
    """Run the whole product on this machine: stack, a Linux guest writing files, a job, syncs, points."""
    from app.cli.demo import clean_demo, run_demo

    try:
        if clean:
            clean_demo(out, state_dir or config.home())
        else:
            run_demo(out, state_dir or config.home(), port, ui_port, incrementals)
    except SendenseError as e:
        fail(e.message)


def main() -> None:
    """Entry point. Exits with os._exit after flushing: the Temporal client's native runtime threads
    can crash CPython's interpreter finalization (PyGILState_Release) after a successful command."""
    code = cli(sys.argv[1:])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`sendense job list --json | head -1`): nothing more to say
            pass
    os._exit(code)


def cli(args: list[str]) -> int:
    """Run one command; return its exit code. Whatever goes wrong ends as one line on stderr and a
    non-zero code, never a traceback (SENDENSE_DEBUG=1 shows them), usage errors included.
    Libraries' warnings are not the user's business (Debian's python3-openssl, reached through
    botocore, warns about DSA on every AWS call): shown only with SENDENSE_DEBUG=1."""
    if not debugging():
        warnings.simplefilter("ignore")
    try:
        rv = app(args, prog_name="sendense", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        error_line("interrupted")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        if _usage_error(e):
            return int(getattr(e, "exit_code", 2))
        if debugging():
            import traceback

            traceback.print_exc()
        error_line(describe_error(e))
        return 1


def _usage_error(e: Exception) -> bool:
    """A usage error of the command line parser (typer's own click): said in one line with a hint.
    Recognised by its shape, as typer vendors click under a private name."""
    fmt, code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
    if not callable(fmt) or not isinstance(code, int):
        return False
    msg = one_line(str(fmt()))
    if msg:  # (no message: the parser printed the help itself, as for `sendense job`)
        ctx = getattr(e, "ctx", None)
        path = getattr(ctx, "command_path", "")
        error_line(msg + (f" (see `{path} --help`)" if path else ""))
    return True


if __name__ == "__main__":
    main()
