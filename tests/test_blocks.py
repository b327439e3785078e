"""conditioner.blocks: how parameters become blocks, and blocks become stacks (docs/algorithms.md §0)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conditioner.blocks import BlockPolicy, blocks_of, build_stacks
from conditioner.distributed.sharded import UpdateBuffers


def layout(shape, **policy):
    """(view_shape, [(block shape, preconditioned pattern), ...]) of one parameter."""
    blocks = blocks_of(shape, 0, BlockPolicy(**policy))
    views = {b.view_shape for b in blocks}
    assert len(views) == 1, "all blocks of one parameter share the parameter's view"
    return views.pop(), [(b.shape, b.preconditioned) for b in blocks]


def coverage(shapes, stacks):
    """Write, through Stack.views, a running block number into every element of every parameter
    and count the writes; returns (counts, ids) tensors per parameter."""
    counts = [torch.zeros(s, dtype=torch.int64) for s in shapes]
    ids = [torch.full(s, -1, dtype=torch.int64) for s in shapes]
    block_id = 0
    for stack in stacks:
        members = range(len(stack.blocks))
        for count, ident, block in zip(
            stack.views(counts, members), stack.views(ids, members), stack.blocks, strict=True
        ):
            assert tuple(count.shape) == stack.shape == block.shape
            count += 1
            ident.fill_(block_id)
            block_id += 1
    return counts, ids


# --- single parameters -----------------------------------------------------------------------


def test_zero_dim_parameter_is_one_unpreconditioned_element():
    assert layout((), max_preconditioner_dim=16) == ((1,), [((1,), (False,))])
    counts, _ = coverage([()], build_stacks([()], BlockPolicy(16)))
    assert counts[0].item() == 1


def test_one_dim_parameter_unpreconditioned_by_default_and_preconditioned_on_request():
    assert layout((10,), max_preconditioner_dim=16) == ((10,), [((10,), (False,))])
    assert layout((10,), max_preconditioner_dim=16, precondition_1d=True) == ((10,), [((10,), (True,))])
    # precondition_1d with a vector above the limit: split when asked to, else left alone
    _, blocks = layout((10,), max_preconditioner_dim=4, precondition_1d=True, split_large_dims=True)
    assert blocks == [((4,), (True,)), ((4,), (True,)), ((2,), (True,))]
    assert layout((10,), max_preconditioner_dim=4, precondition_1d=True) == ((10,), [((10,), (False,))])


def test_matrix_gets_a_factor_on_each_side():
    assert layout((6, 5), max_preconditioner_dim=16) == ((6, 5), [((6, 5), (True, True))])


def test_conv_kernel_without_merging_has_four_preconditioned_dims():
    view, blocks = layout((8, 4, 3, 3), max_preconditioner_dim=16)
    assert view == (8, 4, 3, 3)
    assert blocks == [((8, 4, 3, 3), (True, True, True, True))]


def test_conv_kernel_with_merging_becomes_out_by_in_times_kernel():
    # out·in = 2048 exceeds the limit, in·kh·kw = 288 fits: [out, in·kh·kw]
    view, blocks = layout((64, 32, 3, 3), max_preconditioner_dim=300, merge_small_dims=True)
    assert view == (64, 288)
    assert blocks == [((64, 288), (True, True))]


def test_merging_never_takes_away_the_preconditioning_of_a_matrix():
    """A parameter with two or more dimensions that would be preconditioned without merging must
    keep at least one preconditioned dimension after merging. Merging everything into one vector
    and then treating it as a 1-D parameter (precondition_1d=False) turns the layer into plain
    Adam: EigenvalueCorrectedShampoo and Shampoo, whose defaults are merge_dims=True and
    max_preconditioner_dim=1024, would not precondition any weight with at most 1024 entries
    (nn.Linear(32, 32), or the conv kernel [8, 4, 3, 3] that docs/algorithms.md §0 says becomes
    [out, in·kh·kw])."""
    for shape in [(32, 32), (8, 4, 3, 3), (6, 5)]:
        unmerged = blocks_of(shape, 0, BlockPolicy(1024, split_large_dims=True))
        assert all(any(b.preconditioned) for b in unmerged)
        merged = blocks_of(shape, 0, BlockPolicy(1024, split_large_dims=True, merge_small_dims=True))
        assert all(any(b.preconditioned) for b in merged), (
            f"{shape} merged to {merged[0].view_shape} lost all preconditioning"
        )


def test_size_one_dims_are_squeezed():
    assert layout((1, 6, 1, 4), max_preconditioner_dim=16) == ((6, 4), [((6, 4), (True, True))])
    assert layout((1, 1, 7), max_preconditioner_dim=16) == ((7,), [((7,), (False,))])
    assert layout((1, 1), max_preconditioner_dim=16) == ((1,), [((1,), (False,))])


def test_embedding_table_split_into_chunks():
    view, blocks = layout((50000, 64), max_preconditioner_dim=1024, split_large_dims=True)
    assert view == (50000, 64)
    assert len(blocks) == math.ceil(50000 / 1024) == 49
    assert blocks[:48] == [((1024, 64), (True, True))] * 48
    assert blocks[48] == ((50000 - 48 * 1024, 64), (True, True))  # last chunk: 848 rows
    stacks = build_stacks([(50000, 64)], BlockPolicy(1024, split_large_dims=True))
    assert sorted((s.shape, len(s.blocks)) for s in stacks) == [((848, 64), 1), ((1024, 64), 48)]
    counts, _ = coverage([(50000, 64)], stacks)
    assert bool((counts[0] == 1).all())


def test_embedding_table_without_splitting_leaves_the_large_dim_alone():
    assert layout((50000, 64), max_preconditioner_dim=1024) == ((50000, 64), [((50000, 64), (False, True))])


def test_one_sided_above_leaves_only_the_big_dim_unpreconditioned():
    for split in (False, True):
        policy = dict(max_preconditioner_dim=1024, split_large_dims=split, one_sided_above=4096)
        assert layout((50000, 64), **policy) == ((50000, 64), [((50000, 64), (False, True))])
        assert layout((64, 50000), **policy) == ((64, 50000), [((64, 50000), (True, False))])
    # below the threshold the large dim is still split as usual
    _, blocks = layout((3000, 64), max_preconditioner_dim=1024, split_large_dims=True, one_sided_above=4096)
    assert [b[0] for b in blocks] == [(1024, 64), (1024, 64), (952, 64)]
    # a matrix whose both dims exceed the threshold is not preconditioned at all
    assert layout((80, 90), max_preconditioner_dim=1024, one_sided_above=50) == ((7200,), [((7200,), (False,))])


def test_zero_max_preconditioner_dim_preconditions_nothing():
    for shape in [(), (5,), (6, 5), (4, 3, 2, 2), (50000, 4)]:
        for split in (False, True):
            for merge in (False, True):
                policy = BlockPolicy(0, split_large_dims=split, merge_small_dims=merge, precondition_1d=True)
                blocks = blocks_of(shape, 0, policy)
                assert len(blocks) == 1
                assert blocks[0].shape == (max(1, math.prod(shape)),)
                assert blocks[0].preconditioned == (False,)


# --- stacks ------------------------------------------------------------------------------------


def test_equal_shape_blocks_of_different_parameters_share_a_stack():
    d = 8
    layer = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]  # qkv, out, up, down, norm w, b
    shapes = layer * 4
    stacks = build_stacks(shapes, BlockPolicy(64))
    by_key = {s.key: s for s in stacks}
    assert set(by_key) == {"24x8:PP", "8x8:PP", "32x8:PP", "8x32:PP", "8:I"}
    for key in ["24x8:PP", "8x8:PP", "32x8:PP", "8x32:PP"]:
        assert len(by_key[key].blocks) == 4
    assert len(by_key["8:I"].blocks) == 8
    assert [b.param_index for b in by_key["8x8:PP"].blocks] == [1, 7, 13, 19]
    assert by_key["8x8:PP"].preconditioned_dims == [0, 1]
    # the same shape with another pattern is another stack
    mixed = build_stacks([(8, 8), (8, 200)], BlockPolicy(64))
    assert sorted(s.key for s in mixed) == ["8x200:PI", "8x8:PP"]
    # deterministic order: building twice gives the same layout
    assert [(s.key, s.blocks) for s in build_stacks(shapes, BlockPolicy(64))] == [(s.key, s.blocks) for s in stacks]


def test_stack_gather_returns_the_blocks_values_and_dtype():
    torch.manual_seed(0)
    shapes = [(10, 3), (7, 3), (10, 3)]
    tensors = [torch.randn(s) for s in shapes]
    stacks = build_stacks(shapes, BlockPolicy(4, split_large_dims=True))
    by_key = {s.key: s for s in stacks}
    # (10, 3) -> rows 0:4, 4:8, 8:10; (7, 3) -> rows 0:4, 4:7
    assert sorted((k, len(s.blocks)) for k, s in by_key.items()) == [("2x3:PP", 2), ("3x3:PP", 1), ("4x3:PP", 5)]
    four = by_key["4x3:PP"]
    gathered = four.gather(tensors, range(5), torch.float64)
    assert gathered.dtype == torch.float64 and gathered.shape == (5, 4, 3)
    expected = torch.stack(
        [tensors[0][0:4], tensors[0][4:8], tensors[1][0:4], tensors[2][0:4], tensors[2][4:8]]
    ).double()
    assert torch.equal(gathered, expected)
    # a subset of members, in the order asked for
    assert torch.equal(four.gather(tensors, [4, 0], torch.float32), torch.stack([tensors[2][4:8], tensors[0][0:4]]))
    # one member in its own dtype is a view, not a copy
    single = by_key["3x3:PP"].gather(tensors, [0], torch.float32)
    assert single.shape == (1, 3, 3) and torch.equal(single[0], tensors[1][4:7])
    assert single.data_ptr() == tensors[1][4:7].data_ptr()
    # bfloat16 parameters gathered to float32 statistics
    half = [t.bfloat16() for t in tensors]
    up = four.gather(half, range(5), torch.float32)
    assert up.dtype == torch.float32 and torch.equal(up, expected.bfloat16().float())


def test_stack_views_write_through_to_the_parameter():
    shapes = [(6, 5)]
    (stack,) = build_stacks(shapes, BlockPolicy(16))
    t = torch.zeros(6, 5)
    (view,) = stack.views([t], [0])
    view += 2.0
    assert bool((t == 2.0).all())


@pytest.mark.parametrize("limit", [32, 16], ids=["8x27", "8x9x3"])
def test_blocks_of_a_channels_last_kernel_read_and_write_as_those_of_a_contiguous_one(limit):
    """Merged dimensions of a channels_last kernel [8, 3, 3, 3] are not adjacent in memory, so its
    view shape ([8, 27], or [8, 9, 3] split into chunks) is no view of it. Reads gather the same
    values, contiguous; writes through UpdateBuffers land in the kernel, which keeps its layout."""
    shape = (8, 3, 3, 3)
    stacks = build_stacks([shape], BlockPolicy(limit, split_large_dims=True, merge_small_dims=True))
    plain = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    last = plain.contiguous(memory_format=torch.channels_last)
    target, strides = torch.zeros(shape).contiguous(memory_format=torch.channels_last), last.stride()
    buffers = UpdateBuffers()
    for stack in stacks:
        members = range(len(stack.blocks))
        gathered = stack.gather([last], members, torch.float32)
        assert gathered.is_contiguous() and torch.equal(gathered, stack.gather([plain], members, torch.float32))
        targets = buffers.targets([target], [stack.blocks[m] for m in members])
        for view, value in zip(stack.views(targets, members), gathered, strict=True):
            view += value
    assert not target.any()  # nothing reaches the kernel before apply
    buffers.apply()
    assert torch.equal(target, plain) and target.stride() == strides


def test_update_buffers_write_through_views_when_the_layout_allows():
    (stack,) = build_stacks([(6, 5)], BlockPolicy(16))
    t = torch.zeros(5, 6).T  # transposed: still a view in its own (unmerged) shape
    buffers = UpdateBuffers()
    (view,) = stack.views(buffers.targets([t], stack.blocks), [0])
    view += 2.0
    assert bool((t == 2.0).all())
    buffers.apply()
    assert bool((t == 2.0).all())


def test_four_dim_blocks_cover_a_split_conv_kernel_exactly_once():
    shape = (10, 3, 3, 3)
    stacks = build_stacks([shape], BlockPolicy(4, split_large_dims=True))
    counts, ids = coverage([shape], stacks)
    assert bool((counts[0] == 1).all())
    assert sorted(s.shape for s in stacks) == [(2, 3, 3, 3), (4, 3, 3, 3)]
    assert ids[0][0:4].unique().numel() == 1 and ids[0][8:10].unique().numel() == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_preconditioner_dim=-1), "max_preconditioner_dim"),
        (dict(max_preconditioner_dim=2.5), "max_preconditioner_dim"),
        (dict(max_preconditioner_dim="8"), "max_preconditioner_dim"),
        (dict(max_preconditioner_dim=8, one_sided_above=0), "one_sided_above"),
        (dict(max_preconditioner_dim=8, one_sided_above=-3), "one_sided_above"),
        (dict(max_preconditioner_dim=8, one_sided_above=2.0), "one_sided_above"),
    ],
)
def test_invalid_policy_raises_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockPolicy(**kwargs)


# --- property: every element is in exactly one block ------------------------------------------

shape_strategy = st.lists(st.integers(1, 9), min_size=0, max_size=4).map(tuple)
policy_strategy = st.builds(
    BlockPolicy,
    max_preconditioner_dim=st.integers(0, 10),
    split_large_dims=st.booleans(),
    merge_small_dims=st.booleans(),
    precondition_1d=st.booleans(),
    one_sided_above=st.none() | st.integers(1, 10),
)


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(shape_strategy, min_size=1, max_size=4), policy=policy_strategy)
def test_every_element_is_covered_by_exactly_one_block(shapes, policy):
    stacks = build_stacks(shapes, policy)
    counts, ids = coverage(shapes, stacks)
    for count in counts:
        assert bool((count == 1).all())
    total_blocks = sum(len(s.blocks) for s in stacks)
    seen = torch.cat([i.flatten() for i in ids]).unique()
    assert seen.numel() == total_blocks  # no block is empty or overwritten
    limit = policy.max_preconditioner_dim
    for stack in stacks:
        assert len({(b.shape, b.preconditioned) for b in stack.blocks}) == 1
        for dim in stack.preconditioned_dims:
            assert stack.shape[dim] <= limit, "a factor larger than max_preconditioner_dim"
            if policy.one_sided_above is not None:
                assert stack.shape[dim] <= policy.one_sided_above
        if limit == 0:
            assert not stack.preconditioned_dims
        # a block's order never exceeds its parameter's number of non-trivial dims
        for block in stack.blocks:
            assert len(block.view_shape) <= max(1, sum(d != 1 for d in shapes[block.param_index]))
    # every parameter's blocks come back in row-major order through blocks_of as well
    for index, shape in enumerate(shapes):
        direct = blocks_of(shape, index, policy)
        stacked = [b for s in stacks for b in s.blocks if b.param_index == index]
        assert sorted(direct, key=repr) == sorted(stacked, key=repr)
