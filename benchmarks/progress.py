"""A progress bar: tqdm when it is installed, else a one-line bar of our own on stderr."""
from __future__ import annotations

import sys
import time


class _SimpleBar:
    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.done = total, width, 0
        self.started = time.monotonic()
        self.description = ""

    def set_description(self, text: str) -> None:
        self.description = text
        self._draw()

    def update(self, count: int = 1) -> None:
        self.done += count
        self._draw()

    def write(self, text: str) -> None:
        sys.stderr.write("\r\033[K" + text + "\n")
        self._draw()

    def _draw(self) -> None:
        filled = self.width * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self.started
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r\033[K[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {self.description[:60]}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def progress_bar(total: int):
    """An object with set_description(text), update(n), write(text) and close()."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleBar(total)
    return tqdm(total=total, unit="process", dynamic_ncols=True)
