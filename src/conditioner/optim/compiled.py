"""Running a per-stack kernel eagerly or compiled: the ``compile_kernels`` option.

``compile_kernels`` is False (eager), True (``torch.compile`` with its default backend,
inductor) or the name of a ``torch.compile`` backend. A compiled kernel is captured whole
(``fullgraph=True``: a graph break is an error) and specialised on its input shapes
(``dynamic=False``), so each stack signature (shapes, dtype, options) compiles once, on its first
step, and later steps reuse that graph: the scalars that change between steps (bias corrections,
a scheduled learning rate or β) reach it packed in one tensor, as data. Under the on-device
non-finite policy a bias correction is per block, a tensor ``(B, 1, ...)``; the pack then holds
every scalar broadcast to that shape, ``(S, B, 1, ...)``, which is again one input whose shape
does not change between steps. Only the ordinary-step math is compiled; the bookkeeping around
it (stacks, step counts, refresh decisions and the decompositions of a refresh, 4-bit decoding,
the commit) stays eager Python.

A kernel that cannot be compiled (a graph break, an unsupported operation) raises on the first
step that meets its signature. The step commits stack after stack (chunked, :mod:`.base`), so the
stacks committed earlier in that step keep their new state and parameters; a step whose every
stack has run once compiled is past this.

Inside a function that is itself being compiled (a whole training step under ``torch.compile``)
the kernel runs as plain code, which the enclosing compilation traces.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: most graphs one kernel may hold: one per stack signature of every optimizer in the process
#: (torch's default of 8 would be too few for a model with many parameter shapes)
MAX_GRAPHS_PER_KERNEL = 256


def check_compile_kernels(name: str, value: Any) -> None:
    """False, True or the name of a ``torch.compile`` backend; refused, with the reason, where this
    torch's ``torch.compile`` cannot bound the graphs per kernel (no ``recompile_limit``)."""
    if value is False:
        return
    if value is not True and not isinstance(value, str):
        raise ValueError(f"{name}: must be False, True or the name of a torch.compile backend, got {value!r}")
    if "recompile_limit" not in inspect.signature(torch.compile).parameters:
        raise ValueError(
            f"{name}: needs a torch whose torch.compile takes recompile_limit, got torch {torch.__version__}"
        )
    if isinstance(value, str):
        backends = torch.compiler.list_backends(exclude_tags=())
        if value not in backends:
            raise ValueError(
                f"{name}: must be False, True or one of the torch.compile backends {backends}, got {value!r}"
            )


@functools.cache
def _compiled(kernel: Callable[..., Any], backend: str) -> Callable[..., Any]:
    return torch.compile(kernel, backend=backend, fullgraph=True, dynamic=False, recompile_limit=MAX_GRAPHS_PER_KERNEL)


def pack_scalars(scalars: Sequence[float | torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The scalars as one tensor in ``like``'s dtype and device: ``(S,)`` for numbers, or every
    scalar broadcast to the shape of the tensor ones and stacked, ``(S, B, 1, ...)``; either way
    ``packed[i]`` is scalar ``i``."""
    if not any(isinstance(s, torch.Tensor) for s in scalars):
        return torch.tensor(scalars, dtype=like.dtype, device=like.device)
    parts = [torch.as_tensor(s, dtype=like.dtype, device=like.device) for s in scalars]
    return torch.stack(torch.broadcast_tensors(*parts))


def run_kernel(
    setting: bool | str,
    kernel: Callable[..., Any],
    tensors: Sequence[Any],
    scalars: Sequence[float | torch.Tensor],
    **options: Any,
) -> Any:
    """``kernel(*tensors, scalars, **options)``, compiled when ``setting`` (the group's
    ``compile_kernels``) asks for it; the scalars (numbers, or per-block tensors ``(B, 1, ...)``)
    are then packed by :func:`pack_scalars` against the first tensor."""
    if not setting or torch.compiler.is_compiling():
        return kernel(*tensors, tuple(scalars), **options)
    backend = "inductor" if setting is True else setting
    return _compiled(kernel, backend)(*tensors, pack_scalars(scalars, tensors[0]), **options)


__all__ = ["MAX_GRAPHS_PER_KERNEL", "check_compile_kernels", "pack_scalars", "run_kernel"]
