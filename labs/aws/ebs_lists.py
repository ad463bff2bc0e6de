"""ListSnapshotBlocks and ListChangedBlocks: block listings with tokens and pagination.

Pages hold at most MaxResults (100..10000, default 10000) indexes in ascending order; NextToken is absent
on the last page and, when given, overrides StartingBlockIndex. ListChangedBlocks pages over the union of
both snapshots' blocks *before* dropping the unchanged ones, so a page may be short or even empty while
NextToken is present (AWS documents that a page can hold fewer blocks than MaxResults or none): a client
must follow NextToken until it is absent. Block tokens and ExpiryTime are fresh per listing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from labs.aws.blockstore import BLOCK_SIZE
from labs.aws.state import LabState, Snapshot
from labs.aws.tokens import block_scope, page_scope
from labs.aws.wire import Response, invalid, json_response

TOKEN_LIFETIME = 585_000.0  # seconds, as AWS advertises in ExpiryTime (6.8 days)


def _page(
    state: LabState, indexes: list[int], q: Mapping[str, str], scope: str
) -> tuple[list[int], int, float, str | None]:
    """This page's indexes, the page size, the expiry and the next page's token."""
    limit = int(q.get("maxResults") or 10000)
    token = q.get("pageToken")
    if token:
        start = state.signer.open(token, scope, state.now())
        if start is None:
            raise invalid("INVALID_PAGE_TOKEN", f"The pagination token {token} is invalid.")
    else:
        start = int(q.get("startingBlockIndex") or 0)
    indexes = [i for i in indexes if i >= start]
    now = state.now()
    expiry = now + TOKEN_LIFETIME if indexes else now
    next_token = None
    if len(indexes) > limit:
        next_token = state.signer.issue(scope, indexes[limit], expiry)
        indexes = indexes[:limit]
    return indexes, limit, expiry, next_token


def list_snapshot_blocks(state: LabState, snap: Snapshot, q: Mapping[str, str]) -> Response:
    with state.lock:
        indexes = sorted(snap.blocks)
    indexes, _, expiry, next_token = _page(
        state, indexes, q, page_scope("ListSnapshotBlocks", snap.snapshot_id)
    )
    scope = block_scope(snap.snapshot_id)
    out: dict[str, Any] = {
        "BlockSize": BLOCK_SIZE,
        "Blocks": [{"BlockIndex": i, "BlockToken": state.signer.issue(scope, i, expiry)} for i in indexes],
        "ExpiryTime": expiry,
        "VolumeSize": snap.size_gib,
    }
    if next_token:
        out["NextToken"] = next_token
    return json_response(200, out)


def list_changed_blocks(state: LabState, first: Snapshot, second: Snapshot, q: Mapping[str, str]) -> Response:
    if first.lineage != second.lineage:
        raise invalid(
            "UNRELATED_SNAPSHOTS",
            f"The snapshots {first.snapshot_id} and {second.snapshot_id} are not related "
            "(not of one volume or snapshot lineage).",
        )
    with state.lock:
        a, b = dict(first.blocks), dict(second.blocks)
    scope = page_scope("ListChangedBlocks", second.snapshot_id, first.snapshot_id)
    indexes, _, expiry, next_token = _page(state, sorted(a.keys() | b.keys()), q, scope)
    first_scope, second_scope = block_scope(first.snapshot_id), block_scope(second.snapshot_id)
    changed = []
    for i in indexes:
        left, right = a.get(i), b.get(i)
        if left is not None and right is not None and left.version == right.version:
            continue
        row: dict[str, Any] = {"BlockIndex": i}
        if left is not None:
            row["FirstBlockToken"] = state.signer.issue(first_scope, i, expiry)
        if right is not None:
            row["SecondBlockToken"] = state.signer.issue(second_scope, i, expiry)
        changed.append(row)
    out: dict[str, Any] = {"ChangedBlocks": changed}
    if changed or next_token:  # AWS leaves these out of an empty, final answer
        out.update(BlockSize=BLOCK_SIZE, ExpiryTime=expiry, VolumeSize=second.size_gib)
    if next_token:
        out["NextToken"] = next_token
    return json_response(200, out)
