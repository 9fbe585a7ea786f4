"""Progress bars in text: one line on standard error for long submits and maps, and the bars
that `jobbroker top` draws for running jobs."""

from __future__ import annotations

import sys

__all__ = ["progress_bar", "show_progress"]


def progress_bar(fraction: float, width: int = 30) -> str:
    """`[#####.....]`, filled to `fraction` (0..1)."""
    filled = min(width, max(0, int(width * fraction)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def show_progress(what: str, done: int, total: int) -> None:
    """Draw `what [#####.....] done/total` over the previous bar; a newline once done. Only
    on a terminal: a log file or a pipe gets no bars."""
    if not sys.stderr.isatty():
        return
    end = "\n" if done >= total else ""
    bar = progress_bar(done / total if total else 1.0)
    print(f"\r{what} {bar} {done}/{total}", end=end, file=sys.stderr, flush=True)
