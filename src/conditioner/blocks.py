"""How parameters become stacks of equal-shape blocks (docs/algorithms.md §0).

A parameter is viewed as a tensor of order k after squeezing size-1 dimensions and, optionally,
merging neighbouring small dimensions. Each dimension is then either preconditioned (it gets a
Kronecker factor) or left as it is (identity basis). Preconditioned dimensions larger than
``max_preconditioner_dim`` are split into chunks when ``split_large_dims`` is set, otherwise they
are left unpreconditioned. The Cartesian product of the chunks gives the blocks. Blocks of ALL
parameters of a param group that share a shape and a pattern of preconditioned dimensions form a
:class:`Stack`, and optimizers do their work on whole stacks: one batched call per stack.
A block with no preconditioned dimension is the flattened parameter itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockPolicy:
    """The rules that turn a parameter into blocks.

    - ``max_preconditioner_dim``: the largest dimension a factor may have.
    - ``split_large_dims``: split larger dimensions into chunks (Shampoo) instead of leaving them
      unpreconditioned (the SOAP reference).
    - ``merge_small_dims``: keep the leading dimension and merge the following neighbours while
      their product stays within ``max_preconditioner_dim`` (a conv kernel ``[out, in, kh, kw]``
      becomes ``[out, in·kh·kw]``).
    - ``precondition_1d``: give 1-D parameters a factor too (off: they use the diagonal method).
    - ``one_sided_above``: dimensions larger than this are never preconditioned nor split, the
      other side still is: one-sided preconditioning for lopsided matrices such as embeddings.
    """

    max_preconditioner_dim: int
    split_large_dims: bool = False
    merge_small_dims: bool = False
    precondition_1d: bool = False
    one_sided_above: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_preconditioner_dim, int) or self.max_preconditioner_dim < 0:
            raise ValueError(f"max_preconditioner_dim must be an integer >= 0, got {self.max_preconditioner_dim!r}")
        if self.one_sided_above is not None and (
            not isinstance(self.one_sided_above, int) or self.one_sided_above < 1
        ):
            raise ValueError(f"one_sided_above must be None or an integer >= 1, got {self.one_sided_above!r}")


@dataclass(frozen=True)
class Block:
    """One block: the region ``index`` of parameter ``param_index`` viewed as ``view_shape``."""

    param_index: int
    view_shape: tuple[int, ...]
    index: tuple[slice, ...]
    shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]


def _squeeze(shape: Sequence[int]) -> list[int]:
    dims = [d for d in shape if d != 1]
    return dims or [math.prod(shape)]


def _merge(dims: list[int], limit: int) -> list[int]:
    """Keep the leading (output) dimension, merge the following ones greedily while their product
    stays within ``limit``: ``[out, in, kh, kw]`` becomes ``[out, in·kh·kw]``, and a matrix never
    collapses into a vector."""
    if len(dims) < 3:
        return dims
    merged = [dims[0], dims[1]]
    for d in dims[2:]:
        if merged[-1] * d <= limit:
            merged[-1] *= d
        else:
            merged.append(d)
    return merged


def _chunks(size: int, limit: int) -> list[slice]:
    return [slice(start, min(start + limit, size)) for start in range(0, size, limit)]


def blocks_of(shape: Sequence[int], param_index: int, policy: BlockPolicy) -> list[Block]:
    """The blocks of one parameter of shape ``shape``, in row-major order of their position."""
    dims = _squeeze(shape)
    if policy.merge_small_dims and len(dims) > 1:
        dims = _merge(dims, policy.max_preconditioner_dim)
    limit = policy.max_preconditioner_dim
    eligible = len(dims) > 1 or policy.precondition_1d
    preconditioned = []
    for d in dims:
        fits = d <= limit or policy.split_large_dims
        one_sided = policy.one_sided_above is not None and d > policy.one_sided_above
        preconditioned.append(eligible and fits and not one_sided and limit > 0)
    view_shape = tuple(dims)
    if not any(preconditioned):
        flat = math.prod(dims)
        return [Block(param_index, (flat,), (slice(0, flat),), (flat,), (False,))]
    per_dim = [_chunks(d, limit) if p else [slice(0, d)] for d, p in zip(dims, preconditioned)]
    blocks = []
    for index in itertools.product(*per_dim):
        block_shape = tuple(s.stop - s.start for s in index)
        blocks.append(Block(param_index, view_shape, index, block_shape, tuple(preconditioned)))
    return blocks


@dataclass
class Stack:
    """Blocks of equal shape and preconditioning pattern, processed as one batched tensor."""

    key: str
    shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]
    blocks: list[Block]

    @property
    def preconditioned_dims(self) -> list[int]:
        return [i for i, p in enumerate(self.preconditioned) if p]

    def views(
        self, tensors: Sequence[torch.Tensor], members: Sequence[int], staging: Staging | None = None
    ) -> list[torch.Tensor]:
        """The blocks of ``tensors`` (one per parameter of the group) for ``members``.

        Without ``staging`` the blocks are for reading: views where a tensor's memory layout lets
        it be viewed in its blocks' view shape, else slices of a contiguous copy (a
        ``channels_last`` conv kernel merged to ``[out, in·kh·kw]``, a non-contiguous gradient).
        With ``staging`` every block is writable: such a tensor is written through its copy in
        ``staging``, and :meth:`Staging.write_back` puts the writes into the tensor.
        """
        shaped: dict[int, torch.Tensor] = {}
        result = []
        for m in members:
            block = self.blocks[m]
            i = block.param_index
            if i not in shaped:
                shape = block.view_shape
                shaped[i] = tensors[i].reshape(shape) if staging is None else staging.view(tensors[i], shape)
            result.append(shaped[i][block.index])
        return result

    def gather(self, tensors: Sequence[torch.Tensor], members: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Stack the members' blocks into one contiguous ``(len(members), *shape)`` tensor of
        ``dtype``, whatever the layout of ``tensors``: the kernels see the same memory, and so
        round the same way, for a contiguous, transposed or ``channels_last`` gradient.

        A single contiguous block comes back as a view (no copy) when it already has the right dtype.
        """
        views = self.views(tensors, members)
        if len(views) == 1:
            return views[0].unsqueeze(0).contiguous().to(dtype)
        return torch.stack(views).to(dtype)


class Staging:
    """Writable stand-ins for tensors whose memory layout has no view in their blocks' view shape.

    Merging dimensions needs them adjacent in memory: a ``channels_last`` kernel
    ``[out, in, kh, kw]`` keeps ``in`` innermost, so ``[out, in·kh·kw]`` is no view of it. Such a
    tensor is written through a contiguous copy of it, which :meth:`write_back` copies into the
    tensor: the tensor keeps its identity and its strides, and every element receives exactly the
    arithmetic it would receive in a contiguous tensor.
    """

    def __init__(self) -> None:
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def view(self, tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """``tensor`` in ``shape``: a view of it, or its staged copy (made on the first call)."""
        staged = self._copies.get(id(tensor))
        if staged is not None:
            return staged[1]
        shaped = tensor.reshape(shape)
        if shaped.data_ptr() != tensor.data_ptr():
            self._copies[id(tensor)] = (tensor, shaped)
        return shaped

    def write_back(self) -> None:
        """Copy every staged copy into its tensor."""
        for tensor, shaped in self._copies.values():
            tensor.copy_(shaped.view(tensor.shape))
        self._copies.clear()


def build_stacks(shapes: Sequence[Sequence[int]], policy: BlockPolicy) -> list[Stack]:
    """Group the blocks of parameters with these shapes into stacks, in a deterministic order."""
    stacks: dict[tuple, Stack] = {}
    for param_index, shape in enumerate(shapes):
        for block in blocks_of(shape, param_index, policy):
            key = (block.shape, block.preconditioned)
            if key not in stacks:
                pattern = "".join("P" if p else "I" for p in block.preconditioned)
                name = f"{'x'.join(map(str, block.shape))}:{pattern}"
                stacks[key] = Stack(name, block.shape, block.preconditioned, [])
            stacks[key].blocks.append(block)
    return list(stacks.values())
