"""Usage records: queries for the usage pages, exports, charts and group statistics."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupStats:
    calls: int
    success_rate: float | None  # 0..1
    median_latency_ms: int | None
    median_ttfb_ms: int | None


def group_stats() -> dict[int, GroupStats]:
    """Last-24h stats per group id (filled in by the usage feature; cached for a minute)."""
    return {}
