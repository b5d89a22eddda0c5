"""Progress bars for long steps (tqdm on stderr), switchable off for quiet runs and tests."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class _ProgressBar:
    def __init__(self) -> None:
        self.active = True

    def __call__(self, iterable: Iterable[T], desc: str) -> Iterator[T]:
        disable = not self.active or not sys.stderr.isatty()
        return iter(tqdm(iterable, desc=desc, disable=disable, leave=False, dynamic_ncols=True))

    @contextlib.contextmanager
    def enabled(self, flag: bool):
        previous, self.active = self.active, flag and self.active
        try:
            yield
        finally:
            self.active = previous


progress_bar = _ProgressBar()
