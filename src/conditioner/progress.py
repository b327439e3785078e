"""Progress reporting without a dependency.

Library functions that loop over data take ``progress``: None (silent, the default) or a callable
that wraps an iterable and yields its items, called as ``progress(iterable, desc=..., total=...)``.
``tqdm.tqdm`` fits as it is (``functools.partial(tqdm.tqdm, leave=False)`` to tune it), and so does
any function of the user's own; the library never imports a progress-bar package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Any, TypeVar

Item = TypeVar("Item")
Progress = Callable[..., Iterable[Any]]


def check_progress(progress: Any) -> Progress | None:
    """``progress`` itself, or a TypeError naming the argument and what it may be."""
    if progress is not None and not callable(progress):
        raise TypeError(
            f"progress: must be None or a callable wrapping an iterable (tqdm.tqdm fits), got {progress!r}"
        )
    return progress


def tracked(items: Iterable[Item], progress: Progress | None, description: str) -> Iterable[Item]:
    """``items``, reported through ``progress`` under ``description`` when one is given."""
    if progress is None:
        return items
    total = len(items) if isinstance(items, Sized) else None
    return progress(items, desc=description, total=total)
