"""A one-line progress bar on standard error, for long submits and maps."""

from __future__ import annotations

import sys

__all__ = ["show_progress"]

_WIDTH = 30


def show_progress(what: str, done: int, total: int) -> None:
    """Draw `what [#####.....] done/total` over the previous bar; a newline once done."""
    filled = _WIDTH * done // total if total else _WIDTH
    end = "\n" if done >= total else ""
    bar = "#" * filled + "." * (_WIDTH - filled)
    print(f"\r{what} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)
