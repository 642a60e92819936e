"""Shard assignment for train workers: balanced, disjoint, complete, stable (pure logic, no Ray)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.stream.split import balanced_shards


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 9), seed=st.integers(0, 3))
def test_shards_hold_every_item_once_and_differ_by_at_most_one(n: int, world: int, seed: int) -> None:
    ids = [f"item-{i}" for i in range(n)]
    shards = balanced_shards(ids, world, seed)
    assert len(shards) == world
    assert {len(s) for s in shards} <= {n // world, n // world + 1}
    flat = [i for s in shards for i in s]
    assert sorted(flat) == sorted(ids)  # disjoint, and none sits out


def test_assignment_depends_on_ids_not_their_order() -> None:
    ids = [f"x{i}" for i in range(101)]
    assert balanced_shards(ids, 4, 7) == balanced_shards(list(reversed(ids)), 4, 7)
    assert balanced_shards(ids, 4, 7) != balanced_shards(ids, 4, 8)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_shards"):
        balanced_shards(["a"], 0)
    with pytest.raises(ValueError, match="unique"):
        balanced_shards(["a", "a"], 1)
