"""What an ingest did: the version it committed, what it refused and why, what it uploaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.ingest.sources import Rejection


@dataclass
class IngestReport:
    dataset: str
    version: int | None = None  # the version committed; with nothing to commit, the latest one
    items: int = 0  # items the source held (accepted)
    changed: int = 0  # of them, new or different from the latest version: what was committed
    unchanged: int = 0  # identical to the latest version (image, instances, tags, attributes)
    restored: int = 0  # of the unchanged, those whose lost media were packed again (committed too)
    rejected: list[Rejection] = field(default_factory=list)
    blobs_uploaded: int = 0
    blobs_reused: int = 0
    bytes_uploaded: int = 0
    boxes_clipped: int = 0
    instances_dropped: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    committed: bool = False  # False: nothing new (or everything rejected); the history did not grow

    def as_dict(self) -> dict:
        """The JSON the CLI prints with ``--json`` (stable keys)."""
        return {
            "dataset": self.dataset,
            "version": self.version,
            "items": self.items,
            "committed": self.committed,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "restored": self.restored,
            "rejected": [r.as_dict() for r in self.rejected],
            "blobs_uploaded": self.blobs_uploaded,
            "blobs_reused": self.blobs_reused,
            "bytes_uploaded": self.bytes_uploaded,
            "boxes_clipped": self.boxes_clipped,
            "instances_dropped": self.instances_dropped,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        """A few human lines: the outcome first, then rejections (capped) and warning count."""
        if self.committed:
            head = (f"dataset {self.dataset!r}: committed version {self.version}: {self.changed} of {self.items} "
                    f"items new or changed" + (f", {self.unchanged} unchanged" if self.unchanged else "")
                    + (f" ({self.restored} with lost media restored)" if self.restored else ""))
        elif self.items:
            head = (f"dataset {self.dataset!r}: nothing committed: all {self.items} items are identical to "
                    f"version {self.version}")
        else:
            head = f"dataset {self.dataset!r}: nothing committed"
        lines = [
            head,
            f"  blobs: {self.blobs_uploaded} uploaded ({self.bytes_uploaded / 1e6:.1f} MB), "
            f"{self.blobs_reused} already in the store",
            f"  boxes clipped: {self.boxes_clipped}, instances dropped: {self.instances_dropped}, "
            f"warnings: {len(self.warnings)}, time: {self.seconds:.1f} s",
        ]
        if self.rejected:
            lines.append(f"  rejected: {len(self.rejected)}")
            lines += [f"    {r.file}: {r.reason}" for r in self.rejected[:20]]
            if len(self.rejected) > 20:
                lines.append(f"    ... and {len(self.rejected) - 20} more (use --json for all)")
        return "\n".join(lines)
