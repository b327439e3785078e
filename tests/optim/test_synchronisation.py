"""Host synchronisations in an ordinary optimizer step (issue 14's budget): at most one with the
default ``nonfinite="raise"``, the combined finiteness check of gradients and updates.

A synchronisation is counted wherever the library turns a tensor into a Python value: the
``Tensor`` methods that must wait for the device (``item``, ``__bool__``, ``__float__``,
``__int__``, ``__index__``, ``tolist``, ``nonzero``, ``numpy``) are wrapped while one step runs.
On CUDA, ``tests/test_cuda.py`` counts torch's own synchronisation warnings instead.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, Shampoo

pytestmark = pytest.mark.usefixtures("one_thread")

SYNCHRONISING = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "nonzero", "numpy")
OPTIMIZERS = {
    "SOAP": lambda p: SOAP(p, lr=1e-3, precondition_frequency=10),
    "ECS": lambda p: EigenvalueCorrectedShampoo(p, lr=1e-3, precondition_frequency=10),
    "ECS-adaptive": lambda p: EigenvalueCorrectedShampoo(p, lr=1e-3, precondition_frequency=10, refresh="adaptive"),
    "Shampoo": lambda p: Shampoo(p, lr=1e-3, precondition_frequency=10),
    "Muon": lambda p: Muon(p, lr=1e-3),
}


@contextlib.contextmanager
def counted_synchronisations() -> Iterator[collections.Counter]:
    """Count, by ``file:line`` of the caller, every synchronising ``Tensor`` call inside."""
    calls: collections.Counter = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in SYNCHRONISING}

    def counting(method):
        def wrapper(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            calls[f"{caller.filename}:{caller.lineno}"] += 1
            return method(self, *args, **kwargs)

        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(method))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_ordinary_step_synchronises_at_most_once(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = OPTIMIZERS[name](model.parameters())
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    for step in range(6):  # the first steps initialise; step 5 is an ordinary one (no refresh)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step < 5:
            optimizer.step()
    with counted_synchronisations() as calls:
        optimizer.step()
    assert sum(calls.values()) <= 1, dict(calls)
