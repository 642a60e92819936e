"""manifest_faults: what a ``_delta_log`` listing and an entry's bytes say is damaged (pure)."""

from __future__ import annotations

from orchestrator.manifest_faults import LogDamage, LogListing, entry_problem, listing_damage


def listing(*names: str) -> LogListing:
    return LogListing.from_names(names)


def entries(*versions: int) -> list[str]:
    return [f"{v:020d}.json" for v in versions]


def test_a_whole_log_has_no_damage_and_other_files_are_ignored():
    whole = listing(*entries(0, 1, 2), "_last_checkpoint", "00000000000000000001.crc", ".tmp-x.json")
    assert whole.commits == {0, 1, 2} and whole.latest == 2
    assert listing_damage(whole) is None
    assert listing_damage(listing()) is None and listing().empty


def test_a_missing_first_entry_or_a_gap_is_named_with_what_stays_readable():
    first_gone = listing(*entries(1, 2))
    assert listing_damage(first_gone) == LogDamage(0, "is missing")
    assert first_gone.readable(0) is None
    gap = listing(*entries(0, 1, 3))
    assert listing_damage(gap) == LogDamage(2, "is missing")
    assert gap.readable(2) == (0, 1)
    assert listing(*entries(0, 1, 2)).readable(1) == (0, 0)


def test_a_checkpoint_stands_in_for_the_entries_before_it():
    cleaned = listing(*entries(10, 11, 12), "00000000000000000010.checkpoint.parquet")
    assert listing_damage(cleaned) is None
    gap = listing(*entries(10, 12), "00000000000000000010.checkpoint.parquet")
    assert listing_damage(gap) == LogDamage(11, "is missing")
    assert gap.readable(11) == (10, 10)


def test_entry_problems_name_empty_truncated_and_garbage_text():
    good = b'{"commitInfo": {"timestamp": 1}}\n{"add": {"path": "a.parquet"}}\n'
    assert entry_problem(good) is None
    assert entry_problem(b"") == "is empty"
    assert "not valid JSON (line 2" in entry_problem(good[:-12])
    assert "not valid JSON (line 1" in entry_problem(b"garbage{{{\n")
    assert "not a JSON object" in entry_problem(b"[1, 2]\n")
    assert "not valid JSON" in entry_problem(b"\xff\xfe\x00garbage")
