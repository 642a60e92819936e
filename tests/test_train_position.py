"""The data position of a mid-epoch checkpoint and the per-epoch multiset digest (train.position)."""

from __future__ import annotations

import json

import pytest

from orchestrator.errors import OrchestratorError
from orchestrator.train.position import EpochTally, epoch_totals, multiset_digest, read_position, write_position

IDS = [f"img_{i:04d}.jpg" for i in range(50)]


def test_the_digest_ignores_order_and_sees_a_repeat_that_replaces_an_item():
    assert multiset_digest(IDS) == multiset_digest(reversed(IDS))
    assert multiset_digest(IDS) != multiset_digest([*IDS[:-1], IDS[0]])  # a repeat for a gap
    assert multiset_digest(IDS) != multiset_digest(IDS[:-1])
    assert multiset_digest([]) == "0" * 16


def test_ranks_tallies_summed_give_the_digest_and_count_of_all_their_items():
    ranks = [EpochTally(), EpochTally(), EpochTally()]
    for k, tally in enumerate(ranks):
        tally.add(IDS[k::3], loss_sum=float(k), loss_n=len(IDS[k::3]))
    summed = [sum(col) for col in zip(*(t.vector() for t in ranks))]
    totals = epoch_totals(summed)
    assert totals["train_items"] == 50 and totals["train_digest"] == multiset_digest(IDS)
    assert totals["train_loss"] == pytest.approx(3.0 / 50)


def test_a_position_written_by_two_ranks_is_read_back_whole_and_carried_into_the_next(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    tallies = [EpochTally(), EpochTally()]
    tallies[0].add(IDS[:10], 5.0, 10)
    tallies[1].add(IDS[10:18], 4.0, 8)
    for rank, tally in enumerate(tallies):
        write_position(str(first), rank=rank, epoch=3, step=2, tally=tally, carried=None)
    resume = read_position(str(first))
    assert resume is not None and (resume.epoch, resume.step) == (3, 2)
    assert sorted(resume.consumed) == sorted(IDS[:18]) and resume.digest == multiset_digest(IDS[:18])
    assert (resume.loss_sum, resume.loss_n) == (9.0, 18.0)
    assert resume.remaining(IDS) == IDS[18:]

    # A resumed attempt on one worker checkpoints again: what the first attempt trained is carried.
    second = tmp_path / "second"
    second.mkdir()
    more = EpochTally()
    more.add(IDS[18:30], 6.0, 12)
    write_position(str(second), rank=0, epoch=3, step=1, tally=more, carried=resume)
    again = read_position(str(second))
    assert again is not None and sorted(again.consumed) == sorted(IDS[:30]) and again.loss_n == 30.0
    # The epoch's end: the rank's tally plus what it carries makes the whole epoch.
    rest = EpochTally()
    rest.add(IDS[30:], 1.0, 20)
    assert epoch_totals(rest.vector(again))["train_digest"] == multiset_digest(IDS)


def test_an_end_of_epoch_checkpoint_has_no_position_and_contradictions_are_refused(tmp_path):
    assert read_position(str(tmp_path)) is None
    tally = EpochTally()
    tally.add(IDS[:3])
    write_position(str(tmp_path), rank=0, epoch=1, step=1, tally=tally, carried=None)
    write_position(str(tmp_path), rank=1, epoch=1, step=1, tally=tally, carried=None)  # the same ids twice
    with pytest.raises(OrchestratorError, match="trained twice"):
        read_position(str(tmp_path))
    (tmp_path / "position-rank1.json").write_text(json.dumps({"epoch": 0, "ids": [], "loss_sum": 0, "loss_n": 0}))
    with pytest.raises(OrchestratorError, match="epoch 0"):
        read_position(str(tmp_path))
