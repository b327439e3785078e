"""Warnings whose count lives on the device, logged at a synchronisation that happens anyway.

A routine that finds per-matrix failures (an ``eigh`` that could not be trusted, a Newton root
that did not converge) knows their count only as a device tensor; logging it at once would read
the tensor and stall the device. Inside :func:`deferring_warnings` the routine hands the count to
:func:`warn_later` instead, and whoever opened the scope (the optimizer step) reads every count
together with its own check and logs them (:func:`log_counts`). Outside such a scope
:func:`warn_later` reads the count and logs at once, as a plain warning would.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeferredWarning:
    """A warning to log once its count (the first ``%d`` of ``message``) is known."""

    logger: str
    message: str
    args: tuple


_pending: ContextVar[list[tuple[DeferredWarning, torch.Tensor]] | None] = ContextVar("pending_warnings", default=None)


@contextlib.contextmanager
def deferring_warnings() -> Iterator[list[tuple[DeferredWarning, torch.Tensor]]]:
    """Collect the :func:`warn_later` calls made inside: (warning, 0-dim int64 count) pairs."""
    collected: list[tuple[DeferredWarning, torch.Tensor]] = []
    token = _pending.set(collected)
    try:
        yield collected
    finally:
        _pending.reset(token)


def warn_later(logger: logging.Logger, message: str, count: torch.Tensor, *args: object) -> None:
    """Log ``message % (count, *args)`` when ``count`` (a device tensor) is positive: inside
    :func:`deferring_warnings` once the collector reads it, otherwise now."""
    collected = _pending.get()
    if collected is None:
        if bool(count > 0):
            logger.warning(message, int(count), *args)
        return
    collected.append((DeferredWarning(logger.name, message, args), count.reshape(()).to(torch.int64)))


def merge_counts(collected: list[tuple[DeferredWarning, torch.Tensor]]) -> dict[DeferredWarning, torch.Tensor]:
    """The counts of equal warnings added up (still on the device)."""
    merged: dict[DeferredWarning, torch.Tensor] = {}
    for warning, count in collected:
        merged[warning] = merged[warning] + count if warning in merged else count
    return merged


def log_counts(counts: dict[DeferredWarning, int]) -> None:
    """Log every warning whose count is positive."""
    for warning, count in counts.items():
        if count > 0:
            logging.getLogger(warning.logger).warning(warning.message, count, *warning.args)
