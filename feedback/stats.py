"""Counts over the flags a reviewer or operator wants first: how many, why, from which model, when."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from feedback.reader import latest_flags, read_flags


@dataclass
class FlagStats:
    flags: int = 0
    revisions: int = 0
    bad_lines: int = 0
    with_correction: int = 0
    thumbs: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    days: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [
            f"flags: {self.flags} ({self.revisions} revisions written, {self.bad_lines} bad lines)",
            f"with a correction: {self.with_correction}",
            "thumbs: " + _fmt(self.thumbs),
            "reasons: " + _fmt(self.reasons),
            "models: " + _fmt(self.models),
            "days: " + _fmt(dict(sorted(self.days.items()))),
        ]
        return out


def _fmt(counts) -> str:
    items = counts.most_common() if isinstance(counts, Counter) else counts.items()
    return ", ".join(f"{k}={v}" for k, v in items) or "-"


def flag_stats(root: str | Path) -> FlagStats:
    everything = read_flags(root)
    latest = latest_flags(root).records.values()
    stats = FlagStats(revisions=len(everything.records), bad_lines=len(everything.bad))
    for rec in latest:
        stats.flags += 1
        stats.with_correction += rec.correction is not None
        stats.thumbs[rec.thumbs or "none"] += 1
        stats.reasons.update(rec.reasons)
        stats.models[rec.model.version or f"{rec.model.file}@{rec.model.sha256[:12]}"] += 1
        stats.days[rec.created_at.strftime("%Y-%m-%d")] += 1
    return stats
