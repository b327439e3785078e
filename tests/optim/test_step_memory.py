"""The memory a step allocates is a chunk's, not the model's (issue 14), and chunking changes
nothing but the memory: a step computed chunk by chunk equals one computed in one piece, and an
update that holds NaN or Inf never reaches the parameters."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import conditioner.optim.base as base
from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, NonFiniteGradientError, Shampoo

WIDTH = 256
BLOCK_ELEMENTS = WIDTH * WIDTH
OPTIMIZERS = {
    "SOAP": "conditioner.SOAP(p, precondition_frequency=10)",
    "ECS": "conditioner.EigenvalueCorrectedShampoo(p, precondition_frequency=10, max_precond_dim=256)",
    "Shampoo": "conditioner.Shampoo(p, precondition_frequency=10, max_preconditioner_dim=256)",
    "Muon": "conditioner.Muon(p)",
}

PROBE = textwrap.dedent(
    """
    import re, sys, torch
    from torch import nn
    import conditioner
    import conditioner.optim.base as base

    def status(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024

    torch.set_num_threads(1)
    base.CHUNK_ELEMENTS = {chunk}
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear({width}, {width}, bias=False) for _ in range({layers})))
    p = model.parameters()
    optimizer = {make}
    x = torch.randn(32, {width})
    for step in range(13):  # past the first refresh at frequency 10: step 12 is an ordinary one
        optimizer.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        if step == 12:
            before = status("VmRSS")
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            optimizer.step()
            print(status("VmHWM") - before, conditioner.state_memory(optimizer).total)
        else:
            optimizer.step()
    """
)


def step_peak(name: str, layers: int) -> tuple[int, int]:
    """Resident bytes one ordinary step adds above the level before it, and the state's bytes,
    measured in a fresh interpreter whose allocator maps every tensor of 64 KiB or more on its
    own (``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor leaves the resident set at once."""
    code = PROBE.format(chunk=BLOCK_ELEMENTS, width=WIDTH, layers=layers, make=OPTIMIZERS[name])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    peak, state = map(int, out.stdout.split())
    return peak, state


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_memory_an_ordinary_step_allocates_does_not_grow_with_the_model(name):
    """Four times the layers, four times the state, the same step peak. With one block per chunk
    the peak is a few block-sized temporaries (gradient, projections, moments, update: measured
    about 7 blocks for SOAP and 10 for Muon's Newton–Schulz). Each measurement varies from run to
    run by about one block (page rounding, the interpreter's own allocations: SOAP and Shampoo
    peaks between 1.30 and 1.86 MB over ten runs of each size), so the bound allows four blocks
    between the two sizes; without chunking the nine more layers would add about 7 blocks each.
    (Before chunking the peak grew with the layers: SOAP 22 MB at 3 layers, 88 MB at 12, 1.17×
    the state.) With one block of slack, Shampoo failed once in a run of the suite (1.47 → 1.78 MB)."""
    small, small_state = step_peak(name, 3)
    large, large_state = step_peak(name, 12)
    block_bytes = BLOCK_ELEMENTS * 4
    assert large_state >= 3.9 * small_state
    assert large <= small + 4 * block_bytes, (small, large)
    assert large <= 12 * block_bytes, large


def _trained(make, chunk: int, monkeypatch, steps: int = 23) -> list[torch.Tensor]:
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12)).double()
    optimizer = make(model.parameters())
    x, y = torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "make",
    [
        lambda p: SOAP(p, lr=1e-2, precondition_frequency=5),
        lambda p: EigenvalueCorrectedShampoo(p, lr=1e-2, precondition_frequency=5, refresh="adaptive"),
        lambda p: Shampoo(p, lr=1e-2, precondition_frequency=5, weight_decay=0.1),
        lambda p: Muon(p, lr=1e-2),
        lambda p: SOAP(p, lr=1e-2, precondition_frequency=5, state_precision="bfloat16"),
    ],
    ids=["SOAP", "ECS-adaptive", "Shampoo", "Muon", "SOAP-bfloat16"],
)
def test_a_step_in_chunks_of_one_block_equals_a_step_in_one_piece(make, monkeypatch):
    """The three 16×16 kernels of the middle layers and the rest form stacks of several blocks;
    one block per chunk writes each block's rows in place. Same arithmetic per block, batched
    differently: float64, 23 steps with refreshes, equal to 1e-12 (round-off of differently
    batched products, far below any algorithmic difference)."""
    whole = _trained(make, 2**22, monkeypatch)
    chunked = _trained(make, 1, monkeypatch)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_an_update_holding_nan_never_reaches_the_parameters_and_is_reported(monkeypatch):
    """From finite gradients, a kernel's update can still hold NaN (ε = 0 over a coordinate that
    never moved). The chunk's update is withheld on the device, without a synchronisation; the
    next step's one check reports it under the policy and changes nothing."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    optimizer = SOAP(model.parameters(), precondition_frequency=10)
    x = torch.randn(16, 8)

    def backward():
        optimizer.zero_grad()
        model(x).square().mean().backward()

    for _ in range(3):
        backward()
        optimizer.step()
    kernel = SOAP.stack_step

    def poisoned(self, group, stack, *args):
        result = kernel(self, group, stack, *args)
        if stack.preconditioned_dims:
            result.update = torch.full_like(result.update, float("nan"))
        return result

    monkeypatch.setattr(SOAP, "stack_step", poisoned)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    backward()
    optimizer.step()
    assert torch.equal(model.weight.detach(), weight * (1 - 3e-3 * 0.01))  # only the decay
    assert not torch.equal(model.bias.detach(), bias)  # the bias block's update went through
    monkeypatch.setattr(SOAP, "stack_step", kernel)
    parameters = [p.detach().clone() for p in model.parameters()]
    backward()
    with pytest.raises(NonFiniteGradientError, match=re.escape("1 block update(s) of an earlier step")):
        optimizer.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), parameters))
    optimizer.step()  # reported once: the next step goes on
    assert not torch.equal(model.weight.detach(), parameters[0])
