"""What a running failed-over VM changed since its point, at a reverse snapshot from a later base: what
changed since the point a moment before, united with what the snapshot says changed since its base
(connectors.cloudstack.vm_changes.united)."""

from __future__ import annotations

from connectors.cloudstack.vm_changes import united
from sendense.datapath.extents import Extent

K = 64 << 10


def test_the_snapshots_own_changes_win_where_they_overlap_and_the_rest_keeps_its_kind() -> None:
    earlier = [Extent(0, 4 * K), Extent(8 * K, 2 * K, zero=True), Extent(20 * K, K)]
    now = [Extent(K, K, zero=True), Extent(9 * K, 3 * K), Extent(30 * K, K)]
    assert united(earlier, now) == [
        Extent(0, K),
        Extent(K, K, zero=True),
        Extent(2 * K, 2 * K),
        Extent(8 * K, K, zero=True),
        Extent(9 * K, 3 * K),
        Extent(20 * K, K),
        Extent(30 * K, K),
    ]


def test_either_side_empty() -> None:
    assert united([], [Extent(K, K)]) == [Extent(K, K)]
    assert united([Extent(K, K), Extent(2 * K, K)], []) == [Extent(K, 2 * K)]
    assert united([Extent(0, 8 * K)], [Extent(0, 8 * K, zero=True)]) == [Extent(0, 8 * K, zero=True)]
