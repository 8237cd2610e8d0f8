"""What a shard-building tool did: samples written, entries skipped and why. Written as OUT/report.json."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Skipped:
    """One input entry that did not become a sample."""

    source: str
    reason: str


@dataclass
class BuildReport:
    """Outcome of a build: `written` samples in `shards`, `skipped` entries with reasons."""

    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, source: str, reason: str) -> None:
        """Record a skipped entry."""
        self.skipped.append(Skipped(source, reason))

    def counts(self) -> dict[str, int]:
        """Skips by reason (the part before any parenthesised detail)."""
        return dict(Counter(s.reason.split(" (")[0] for s in self.skipped))

    def save(self, path: Path) -> None:
        """Write the report as JSON."""
        data = {"written": self.written, "shards": self.shards, "skipped_counts": self.counts(),
                "skipped": [asdict(s) for s in self.skipped]}
        path.write_text(json.dumps(data, indent=2) + "\n")

    def summary(self, limit: int = 20) -> str:
        """Human-readable lines: totals, then up to `limit` skipped entries."""
        lines = [f"wrote {self.written} samples in {len(self.shards)} shards"]
        if self.skipped:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts().items()))
            lines.append(f"skipped {len(self.skipped)} entries: {counts}")
            lines += [f"  {s.source}: {s.reason}" for s in self.skipped[:limit]]
            if len(self.skipped) > limit:
                lines.append(f"  ... and {len(self.skipped) - limit} more (see report.json)")
        return "\n".join(lines)
