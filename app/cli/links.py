"""`sendense link ...`: site links and their bandwidth governors (workflows.governor)."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Column, Table

from app.cli.output import JsonOpt, emit_json, out, run
from sendense.links import LinkSpec, LinkStatus, show_rate

link_app = typer.Typer(
    help="Site links: a bandwidth budget shared by the jobs that cross it, by priority.", no_args_is_help=True
)

RateOpt = typer.Option(
    None, "--rate", help="budget outside any window: 400Mbit, 50MB, 20MiB, bytes/s, unlimited"
)
TzOpt = typer.Option(None, "--tz", help="the windows' time zone (IANA, e.g. Europe/Berlin; default UTC)")
WindowOpt = typer.Option(
    None,
    "--window",
    help="START-END=RATE[@DAYS], e.g. 08:00-18:00=200Mbit@mon-fri, 22:00-06:00=unlimited (repeatable; "
    "the first that matches applies)",
)
WeightsOpt = typer.Option(None, "--weights", help="class weights, e.g. critical=50,normal=30,low=20")


async def _links() -> Any:
    from app.cli.link_client import Links

    return await Links.connect()


def _spec(
    base: dict[str, Any], rate: str | None, tz: str | None, windows: list[str] | None, weights: str | None
) -> LinkSpec:
    from app.cli.link_client import parse_weights, parse_window, validated

    data = dict(base)
    if rate is not None:
        data["rate"] = rate
    if tz is not None:
        data["timezone"] = tz
    if windows is not None:
        data["windows"] = [parse_window(w) for w in windows]
    if weights is not None:
        data["weights"] = {**(data.get("weights") or {}), **parse_weights(weights)}
    return validated(data, windows)


@link_app.command("create")
def link_create(
    name: str,
    rate: str = RateOpt,
    tz: str = TzOpt,
    window: list[str] = WindowOpt,
    weights: str = WeightsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Create a link (its governor starts on the control queue). Jobs name it in their spec's `link`."""

    async def go() -> LinkStatus:
        spec = _spec({"name": name}, rate, tz, window, weights)
        links = await _links()
        await links.create(spec)
        return await links.status(name)

    st = run(go)
    emit_json(st) if as_json else out.print(f"link {name} created; budget now {show_rate(st.budget)}")


@link_app.command("list")
def link_list(as_json: bool = JsonOpt) -> None:
    """The links, with their budget now and the copies crossing them."""

    async def go() -> list[LinkStatus]:
        return list(await (await _links()).list())

    links = run(go)
    if as_json:
        emit_json(links)
        return
    t = Table(Column("name", no_wrap=True), "budget now", "window", "rate", "time zone", "copies")
    for st in links:
        spec = LinkSpec.model_validate(st.spec)
        t.add_row(
            spec.name,
            show_rate(st.budget),
            st.window or "-",
            show_rate(spec.rate),
            spec.timezone,
            str(len(st.holders)),
        )
    out.print(t)


@link_app.command("status")
def link_status(name: str, as_json: bool = JsonOpt) -> None:
    """The link's budget now, and each copy crossing it: job, class, granted rate, share, measured rate."""

    async def go() -> LinkStatus:
        return await (await _links()).status(name)

    st = run(go)
    if as_json:
        emit_json(st)
        return
    spec = LinkSpec.model_validate(st.spec)
    out.print(
        f"link {spec.name}: budget now {show_rate(st.budget)}"
        + (f" (window {st.window})" if st.window else "")
    )
    w = spec.weights
    out.print(
        f"rate {show_rate(spec.rate)}, time zone {spec.timezone}, weights critical={w.critical} "
        f"normal={w.normal} low={w.low}"
    )
    for win in spec.windows:
        out.print(f"window {win.describe()}")
    if not st.holders:
        out.print("no copies cross it now")
        return
    t = Table(Column("job", no_wrap=True), "class", "granted", "share", "measured", "cap")
    for h in st.holders:
        t.add_row(
            h.job,
            h.priority,
            show_rate(h.rate),
            f"{h.share:.0%}" if h.share is not None else "-",
            show_rate(int(h.measured_rate)) if h.measured_rate is not None else "-",
            show_rate(h.cap) if h.cap else "-",
        )
    out.print(t)


@link_app.command("set")
def link_set(
    name: str,
    rate: str = RateOpt,
    tz: str = TzOpt,
    window: list[str] = WindowOpt,
    no_windows: bool = typer.Option(False, "--no-windows", help="remove every window"),
    weights: str = WeightsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Change a link; its copies get their new rates at their next renewal (within a second or two).
    `--window` replaces all the windows with those given."""
    from app.cli.output import fail

    if not any(v is not None for v in (rate, tz, window, weights)) and not no_windows:
        fail("give at least one of --rate, --tz, --window, --no-windows, --weights")
    if no_windows and window:
        fail("--window and --no-windows: one or the other")

    async def go() -> LinkStatus:
        links = await _links()
        current = (await links.spec(name)).model_dump(mode="json")
        spec = _spec(current, rate, tz, [] if no_windows else window, weights)
        return await links.set(spec)

    st = run(go)
    emit_json(st) if as_json else out.print(f"link {name}: budget now {show_rate(st.budget)}")


@link_app.command("delete")
def link_delete(name: str, as_json: bool = JsonOpt) -> None:
    """Delete a link (refused while copies cross it). Jobs that name it then copy at the floor rate."""

    async def go() -> None:
        await (await _links()).delete(name)

    run(go)
    emit_json({"deleted": name}) if as_json else out.print(f"link {name} deleted")
