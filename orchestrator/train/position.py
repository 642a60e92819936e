"""Where a run is inside an epoch, kept in its mid-epoch checkpoints, so that a run killed in the
middle of an epoch trains exactly the items that epoch had not trained yet, on any number of
workers.

Why item ids and not a batch counter: a worker's shard arrives in the order its read tasks
finish (Ray Data), not in a fixed order, and a resume may run on another number of workers,
whose shards are other sets. "Rank 1 did 3 batches" names nothing a resumed run can skip; the
ids each rank trained do. So every ``checkpoint.every_steps`` steps each rank writes the ids it
trained this epoch (``position-rank<r>.json``) into the checkpoint, which Ray Train merges from
every worker into one directory, and rank 0 adds ``position.json`` (the epoch, the step, and
what attempts before this one had already trained of it). A resumed worker group reads them
back (:func:`read_position`), deals the epoch's remaining items over its own ranks
(``stream.split.balanced_shards``: sizes within one) and trains those; the epochs after it are
whole again.

Evidence: every epoch's metrics carry ``train_items`` and ``train_digest``, a digest of the
multiset of ids trained in it (:func:`multiset_digest`, a sum of per-id hashes modulo a prime:
independent of order and rank, additive across ranks and attempts, and changed by any repeat or
gap). A complete epoch's digest is ``multiset_digest(train_ids)``, whatever was interrupted,
resumed or re-sharded on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import OrchestratorError

POSITION = "position.json"
_RANK_FILE = "position-rank{rank}.json"
_MODULUS = (1 << 61) - 1  # a Mersenne prime: sums of 61-bit hashes stay exact in Python ints
_LOW_BITS = 31  # a digest travels as (high, low) halves: float64 sums of them stay exact


def _item_hash(item_id: str) -> int:
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") % _MODULUS


def multiset_digest(item_ids: Iterable[str]) -> str:
    """A digest of the multiset of ``item_ids`` (order does not matter, repeats do), as 16 hex
    digits: equal digests mean the same ids the same number of times (up to 2**-61)."""
    return _hex(sum(_item_hash(i) for i in item_ids) % _MODULUS)


def _hex(value: int) -> str:
    return f"{value:016x}"


@dataclass
class EpochTally:
    """One rank's account of an epoch in this attempt: the ids it trained (weight 1 rows only)
    and its loss sum over ``loss_n`` (rows for Torch, steps for Keras, whose step loss is already
    global). ``vector`` is what the ranks sum at the epoch's end; ``carried`` (rank 0 only)
    folds in what earlier attempts trained of this epoch, so it is counted once."""

    ids: list[str] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_n: float = 0.0
    _digest: int = 0

    def add(self, ids: Iterable[Any], loss_sum: float = 0.0, loss_n: float = 0.0) -> None:
        for i in ids:
            i = str(i)
            self.ids.append(i)
            self._digest = (self._digest + _item_hash(i)) % _MODULUS
        self.loss_sum += loss_sum
        self.loss_n += loss_n

    def vector(self, carried: Resume | None = None) -> list[float]:
        """``[items, digest high, digest low, loss_sum, loss_n]``, float64-exact when summed
        over ranks (each half is below 2**31)."""
        count, digest, loss_sum, loss_n = len(self.ids), self._digest, self.loss_sum, self.loss_n
        if carried is not None:
            count += len(carried.consumed)
            digest = (digest + int(carried.digest, 16)) % _MODULUS
            loss_sum += carried.loss_sum
            loss_n += carried.loss_n
        return [float(count), float(digest >> _LOW_BITS), float(digest & ((1 << _LOW_BITS) - 1)),
                loss_sum, loss_n]


def epoch_totals(summed: Sequence[float]) -> dict[str, Any]:
    """The ranks' summed ``EpochTally.vector``s -> ``train_items``, ``train_digest`` and the
    loss (``None`` when nothing was trained)."""
    count, high, low, loss_sum, loss_n = summed
    digest = ((int(round(high)) << _LOW_BITS) + int(round(low))) % _MODULUS
    return {"train_items": int(round(count)), "train_digest": _hex(digest),
            "train_loss": loss_sum / loss_n if loss_n else None}


@dataclass(frozen=True)
class Resume:
    """What a mid-epoch checkpoint says the epoch had trained: its ids (every rank of every
    attempt so far), their digest, and the loss sum so far."""

    epoch: int
    step: int
    consumed: tuple[str, ...]
    digest: str
    loss_sum: float
    loss_n: float

    def remaining(self, train_ids: Sequence[str]) -> list[str]:
        """The epoch's items not trained yet, in ``train_ids``' order."""
        done = set(self.consumed)
        return [i for i in train_ids if i not in done]


def write_position(directory: str, *, rank: int, epoch: int, step: int, tally: EpochTally,
                   carried: Resume | None, world: int | None = None, shard_seed: int | None = None) -> None:
    """This rank's part of a mid-epoch checkpoint in ``directory`` (every rank calls it; rank 0
    also writes ``position.json`` with what earlier attempts trained of the epoch, and, for a
    person reading it, the worker count and shard seed that dealt this attempt's shards)."""
    with open(os.path.join(directory, _RANK_FILE.format(rank=rank)), "w") as f:
        json.dump({"epoch": epoch, "rank": rank, "ids": tally.ids, "loss_sum": tally.loss_sum,
                   "loss_n": tally.loss_n}, f)
    if rank == 0:
        with open(os.path.join(directory, POSITION), "w") as f:
            json.dump({"epoch": epoch, "step": step, "world": world, "shard_seed": shard_seed,
                       "consumed_before": list(carried.consumed) if carried else [],
                       "loss_sum_before": carried.loss_sum if carried else 0.0,
                       "loss_n_before": carried.loss_n if carried else 0.0}, f)


def read_position(directory: str) -> Resume | None:
    """The position a checkpoint directory holds; None for an end-of-epoch checkpoint.

    Raises ``OrchestratorError`` when the files contradict each other (an id trained twice,
    files of another epoch): resuming from them could not be exact."""
    path = os.path.join(directory, POSITION)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        head = json.load(f)
    epoch = int(head["epoch"])
    consumed = list(head["consumed_before"])
    loss_sum, loss_n = float(head["loss_sum_before"]), float(head["loss_n_before"])
    for name in sorted(os.listdir(directory)):
        if name.startswith("position-rank") and name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                part = json.load(f)
            if int(part["epoch"]) != epoch:
                raise OrchestratorError(f"checkpoint {directory}: {name} is of epoch {part['epoch']}, "
                                        f"{POSITION} of epoch {epoch}", user_fault=False)
            consumed += part["ids"]
            loss_sum += float(part["loss_sum"])
            loss_n += float(part["loss_n"])
    if len(set(consumed)) != len(consumed):
        raise OrchestratorError(f"checkpoint {directory} records items trained twice in epoch {epoch}",
                                hint="resume from an earlier checkpoint, or start a new run", user_fault=False)
    return Resume(epoch, int(head["step"]), tuple(consumed), multiset_digest(consumed), loss_sum, loss_n)
