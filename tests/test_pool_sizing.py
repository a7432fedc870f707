"""How many empty-workspace sandboxes the warm pool keeps: pool.size, grown toward recent
demand, never above pool.max_size."""

from __future__ import annotations

import pytest

from critique_local.runs.pool import wanted_empty


@pytest.mark.parametrize(("size", "max_size", "demand", "wanted"), [
    (1, 0, 10, 1),  # max_size 0: fixed
    (2, 2, 10, 2),  # max_size <= size: fixed
    (1, 4, 0, 1),  # no demand: the minimum
    (1, 4, 3, 3),  # grows with demand
    (1, 4, 10, 4),  # never above the maximum
    (0, 3, 2, 2),  # may start from nothing
    (0, 3, 0, 0),
])
def test_pool_size_follows_recent_demand_between_min_and_max(size: int, max_size: int, demand: int,
                                                              wanted: int) -> None:
    assert wanted_empty(size, max_size, demand) == wanted
