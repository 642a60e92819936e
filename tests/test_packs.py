"""Pure pack logic: which requests fetch a set of (pack, offset, length) locations, and how blobs
are cut into packs. Every location is served exactly once, by a request that contains it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.packs import group_into_packs, plan_reads

A, B = "a" * 64, "b" * 64


def test_neighbours_merge_and_far_ranges_do_not():
    locs = [(A, 0, 10), (A, 10, 5), (A, 100, 5), (B, 0, 3), (None, None, 7), (A, 1000, 4)]
    reads = plan_reads(locs, merge_gap=85, max_request=1 << 20)  # 15..100 merges, 105..1000 not
    spans = [(r.pack, r.start, r.end) for r in reads]
    assert (None, 0, 7) in spans
    assert (A, 0, 105) in spans and (A, 1000, 1004) in spans and (B, 0, 3) in spans
    merged = next(r for r in reads if r.pack == A and r.start == 0)
    assert sorted(merged.members) == [(0, 0, 10), (1, 10, 5), (2, 100, 5)]


def test_a_request_never_exceeds_the_maximum_unless_one_item_does():
    locs = [(A, i * 10, 10) for i in range(10)] + [(A, 500, 300)]
    reads = plan_reads(locs, merge_gap=0, max_request=35)
    for r in reads:
        assert r.end - r.start <= 35 or len(r.members) == 1
    assert sum(len(r.members) for r in reads) == len(locs)


@given(st.lists(st.tuples(st.sampled_from([A, B, None]), st.integers(0, 5000), st.integers(1, 300)),
                max_size=40),
       st.integers(0, 400), st.integers(1, 2000))
def test_every_location_is_served_once_by_a_request_containing_it(locs, gap, max_request):
    locs = [(p, o if p else None, n) for p, o, n in locs]
    reads = plan_reads(locs, merge_gap=gap, max_request=max_request)
    served = sorted(i for r in reads for i, _, _ in r.members)
    assert served == list(range(len(locs)))
    for r in reads:
        for i, rel, n in r.members:
            pack, offset, length = locs[i]
            assert r.pack == pack and n == length
            if pack is not None:
                assert r.start + rel == offset and offset + length <= r.end
            else:
                assert (r.start, r.end, rel) == (0, length, 0)


def test_blobs_are_cut_into_packs_of_about_the_target_size_in_order():
    sizes = [("x1", 40), ("x2", 40), ("x3", 40), ("big", 500), ("x4", 10)]
    assert group_into_packs(sizes, target=100) == [["x1", "x2"], ["x3"], ["big"], ["x4"]]
    assert group_into_packs([], target=100) == []
