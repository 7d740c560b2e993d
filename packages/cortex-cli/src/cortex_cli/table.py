"""Plain-text tables and the small formatters `cortex status` and `cortex models` use."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "  ") -> str:
    """Left-aligned columns separated by two spaces; the last column is never padded."""
    widths = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(widths[i]) if i < len(cells) - 1 else cell for i, cell in enumerate(cells)]
        return (indent + "  ".join(padded)).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def ago(timestamp: float | None, now: float) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago`; `-` when never."""
    if timestamp is None:
        return "-"
    seconds = max(0, int(now - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def memory(used_mb: int | None, total_mb: int | None) -> str:
    """`12.3 / 80.0 GiB (15%)`; whatever is known when a reading is missing."""
    if total_mb is None or total_mb <= 0:
        return "-" if used_mb is None else f"{used_mb / 1024:.1f} GiB used"
    if used_mb is None:
        return f"? / {total_mb / 1024:.1f} GiB"
    percent = round(100 * used_mb / total_mb)
    return f"{used_mb / 1024:.1f} / {total_mb / 1024:.1f} GiB ({percent}%)"
