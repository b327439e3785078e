"""How parameters become stacks of equal-shape blocks (docs/algorithms.md §0).

A parameter is viewed as a tensor of order k after squeezing size-1 dimensions and, optionally,
merging neighbouring small dimensions (a 4-D parameter may first be read in another dimension
order, see :attr:`BlockPolicy.channels_last`). Each dimension is then either preconditioned (it
gets a Kronecker factor) or left as it is (identity basis). Preconditioned dimensions larger than
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
    - ``merge_all_dims``: with ``merge_small_dims``, the SOAP reference's rule instead: merge
      from the first dimension on, so that ``[64, 3, 3, 3]`` becomes one 1728 dimension (and a
      small matrix a vector, which keeps its factor).
    - ``channels_last``: with ``merge_small_dims``, read a 4-D parameter stored as
      ``[out, h, w, in]`` as ``[out, in, h, w]`` before merging (the SOAP reference's
      ``data_format="channels_last"``); its blocks are then not views of the parameter
      (:attr:`Block.dim_order`).
    - ``precondition_1d``: give 1-D parameters a factor too (off: they use the diagonal method).
    - ``one_sided_above``: dimensions larger than this are never preconditioned nor split, the
      other side still is: one-sided preconditioning for lopsided matrices such as embeddings.
    """

    max_preconditioner_dim: int
    split_large_dims: bool = False
    merge_small_dims: bool = False
    precondition_1d: bool = False
    one_sided_above: int | None = None
    merge_all_dims: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_preconditioner_dim, int) or self.max_preconditioner_dim < 0:
            raise ValueError(f"max_preconditioner_dim must be an integer >= 0, got {self.max_preconditioner_dim!r}")
        if self.one_sided_above is not None and (
            not isinstance(self.one_sided_above, int) or self.one_sided_above < 1
        ):
            raise ValueError(f"one_sided_above must be None or an integer >= 1, got {self.one_sided_above!r}")


@dataclass(frozen=True)
class Block:
    """One block: the region ``index`` of parameter ``param_index`` viewed as ``view_shape``,
    after permuting its dimensions to ``dim_order`` when that is given (then the view needs the
    tensor laid out in memory in that order, see :func:`laid_out`)."""

    param_index: int
    view_shape: tuple[int, ...]
    index: tuple[slice, ...]
    shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]
    dim_order: tuple[int, ...] | None = None

    def is_view_of(self, tensor: torch.Tensor) -> bool:
        """Whether this block of ``tensor`` is a view of it (writable in place): not when the block
        reads the dimensions in another order, nor when the memory layout (``channels_last``, a
        transpose) keeps the dimensions the block merges apart."""
        if self.dim_order is not None:
            return False
        try:
            tensor.view(self.view_shape)
        except RuntimeError:
            return False
        return True

    def region(self, tensor: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """This block of ``tensor`` (the whole parameter): a view, or with ``copy`` a copy where
        no view exists."""
        if self.dim_order is not None:
            tensor = tensor.permute(self.dim_order)
        shaped = tensor.reshape(self.view_shape) if copy else tensor.view(self.view_shape)
        return shaped[self.index]


def laid_out(tensor: torch.Tensor, dim_order: tuple[int, ...] | None, zeros: bool = False) -> torch.Tensor:
    """A contiguous copy of ``tensor`` (or zeros of its shape) laid out in memory in ``dim_order``,
    returned in ``tensor``'s dimension order: the blocks of a parameter read in that order are
    views of it."""
    order = list(dim_order) if dim_order is not None else list(range(tensor.ndim))
    permuted = tensor.permute(order)
    copy = torch.zeros_like(permuted, memory_format=torch.contiguous_format) if zeros else permuted.contiguous()
    return copy.permute([order.index(i) for i in range(tensor.ndim)])


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


def _merge_all(dims: list[int], limit: int) -> list[int]:
    """The SOAP reference's rule: left to right over all dimensions, multiply while the product
    stays within ``limit``, else close the running product (or a larger dimension on its own)."""
    merged, product = [], 1
    for d in dims:
        if product * d <= limit:
            product *= d
        elif product > 1:
            merged.append(product)
            product = d
        else:
            merged.append(d)
    if product > 1 or not merged:
        merged.append(product)
    return merged


def _chunks(size: int, limit: int) -> list[slice]:
    return [slice(start, min(start + limit, size)) for start in range(0, size, limit)]


def blocks_of(shape: Sequence[int], param_index: int, policy: BlockPolicy) -> list[Block]:
    """The blocks of one parameter of shape ``shape``, in row-major order of their position."""
    limit = policy.max_preconditioner_dim
    dim_order = (0, 3, 1, 2) if policy.merge_small_dims and policy.channels_last and len(shape) == 4 else None
    if dim_order is not None:
        shape = [shape[i] for i in dim_order]
    dims = _squeeze(shape)
    eligible = len(dims) > 1 or policy.precondition_1d
    if policy.merge_small_dims and len(dims) > 1:
        dims = _merge_all(dims, limit) if policy.merge_all_dims else _merge(dims, limit)
    preconditioned = []
    for d in dims:
        fits = d <= limit or policy.split_large_dims
        one_sided = policy.one_sided_above is not None and d > policy.one_sided_above
        preconditioned.append(eligible and fits and not one_sided and limit > 0)
    view_shape = tuple(dims)
    if not any(preconditioned):
        flat = math.prod(dims)
        return [Block(param_index, (flat,), (slice(0, flat),), (flat,), (False,), dim_order)]
    per_dim = [_chunks(d, limit) if p else [slice(0, d)] for d, p in zip(dims, preconditioned)]
    blocks = []
    for index in itertools.product(*per_dim):
        block_shape = tuple(s.stop - s.start for s in index)
        blocks.append(Block(param_index, view_shape, index, block_shape, tuple(preconditioned), dim_order))
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

    def views(self, tensors: Sequence[torch.Tensor], members: Sequence[int]) -> list[torch.Tensor]:
        """The block views of ``tensors`` (one per parameter of the group) for ``members``."""
        return [self.blocks[m].region(tensors[self.blocks[m].param_index]) for m in members]

    def gather(self, tensors: Sequence[torch.Tensor], members: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Stack the members' blocks into one contiguous ``(len(members), *shape)`` tensor of
        ``dtype``, whatever the layout of ``tensors``: the kernels see the same memory, and so
        round the same way, for a contiguous, transposed or ``channels_last`` gradient.

        A single contiguous block comes back as a view (no copy) when it already has the right
        dtype and the tensor is laid out in the block's order.
        """
        views = [self.blocks[m].region(tensors[self.blocks[m].param_index], copy=True) for m in members]
        if len(views) == 1:
            return views[0].unsqueeze(0).contiguous().to(dtype)
        return torch.stack(views).to(dtype)


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
