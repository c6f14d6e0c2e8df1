"""What every benchmark prints: progress lines on stderr and one Markdown table of results on stdout.

Kept apart so that the tables in docs/performance.md all look alike and a verdict means the same everywhere.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def verdict(ok: bool) -> str:
    """PASS when the goal is met, MISS when it is not (never a softer word)."""
    return "PASS" if ok else "MISS"


def log(message: str) -> None:
    """A timestamped progress line on stderr, so stdout holds only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns, ready to paste into docs/performance.md."""
    cells = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
