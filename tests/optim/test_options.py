"""Options a user brings from torch.optim or from the reference SOAP: the statistics dtype, a
checkpoint resumed in another state precision, a tensor learning rate, and the reference SOAP's
constructor arguments (``shampoo_beta=-1``, ``normalize_grads``, ``data_format``, its
``merge_dims`` rule; their step-by-step agreement with the reference is in
test_soap_reference.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from cases import (
    FACTORIES,
    cross_entropy_step,
    first_features_batches,
    make_model,
    params_of,
    tanh_mlp,
    through_file,
    train,
)
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, Shampoo, state_memory
from conditioner.optim.precision import decode

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = {**FACTORIES, "Muon": lambda params, **kw: Muon(params, **{"lr": 1e-2, **kw})}


# --- state_dtype: half precision is refused, low-precision storage is state_precision's -----------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_half_precision_state_dtype_is_refused_pointing_to_state_precision(name, dtype):
    model = make_model()
    with pytest.raises(ValueError, match=r"state_dtype: must be None, torch.float32 or torch.float64") as refused:
        ALL[name](model.parameters(), state_dtype=dtype)
    assert "state_precision='bfloat16'" in str(refused.value) and str(dtype) in str(refused.value)
    opt = ALL[name](model.inp.parameters())
    with pytest.raises(ValueError, match="state_dtype"):
        opt.add_param_group({"params": list(model.out.parameters()), "state_dtype": dtype})


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL)
def test_full_precision_state_dtypes_are_accepted(name, dtype):
    model = make_model()
    opt = ALL[name](model.parameters(), state_dtype=dtype)
    train(model, opt, 2)
    expected = dtype or torch.float32
    assert all(
        v.dtype == expected
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


# --- a tensor learning rate, as torch.optim accepts it -------------------------------------------


def _run_with_lr(name, lr, steps=8, groups=False):
    """Train the shared MLP with ``lr`` (a float or a tensor) under a LambdaLR schedule."""
    model = make_model(dtype=torch.float64)
    if groups:
        params = [
            {"params": model.inp.parameters(), "lr": lr},
            {"params": [p for n, p in model.named_parameters() if not n.startswith("inp")]},
        ]
        opt = ALL[name](params)
    else:
        opt = ALL[name](model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + step))
    for i in range(steps):
        train(model, opt, 1, start=i)
        scheduler.step()
    return model, opt


@pytest.mark.parametrize("groups", [False, True], ids=["defaults", "param-group"])
@pytest.mark.parametrize("name", ALL)
def test_a_tensor_lr_gives_the_trajectory_of_the_equal_float_lr(name, groups):
    # float64 tensors hold 0.01 and every scheduled value exactly as the Python float does, and
    # LambdaLR writes the same products into the tensor in place: the runs are bit-identical
    tensor_lr = torch.tensor(0.01, dtype=torch.float64)
    model, opt = _run_with_lr(name, tensor_lr, groups=groups)
    reference, _ = _run_with_lr(name, 0.01, groups=groups)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] is tensor_lr  # the scheduler filled it in place
    assert float(tensor_lr) == pytest.approx(0.01 / 9)
    assert not torch.equal(model.inp.weight, make_model(dtype=torch.float64).inp.weight)


@pytest.mark.parametrize("name", ALL)
def test_a_float32_tensor_lr_is_its_float_value(name):
    lr = torch.tensor(0.01)  # float32: 0.009999999776...
    model, reference = make_model(), make_model()
    train(model, ALL[name](model.parameters(), lr=lr), 5)
    train(reference, ALL[name](reference.parameters(), lr=float(lr)), 5)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_a_tensor_lr_with_more_than_one_element_is_refused(name):
    model = make_model()
    with pytest.raises(ValueError, match="lr: Tensor lr must be 1-element"):
        ALL[name](model.parameters(), lr=torch.tensor([0.01, 0.02]))
    opt = ALL[name](model.inp.parameters(), lr=torch.tensor([0.01]))  # one element, any shape
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.add_param_group({"params": list(model.out.parameters()), "lr": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="lr: must be a number in"):
        ALL[name](model.parameters(), lr=torch.tensor(-1.0))


# --- a checkpoint resumed in another state precision ----------------------------------------------

PRECISIONS = ("full", "bfloat16", "4bit")
PAIRS = [(saved, loaded) for saved in PRECISIONS for loaded in PRECISIONS if saved != loaded]
#: bfloat16's unit round-off: round-to-nearest moves a value by at most this relative amount
BF16_ROUNDOFF = 2.0**-8
CONVERTIBLE = {
    "SOAP": lambda params, **kw: SOAP(params, **{"lr": 1e-2, "precondition_frequency": 3, "weight_decay": 0.0, **kw}),
    "ECS-rotate": lambda params, **kw: EigenvalueCorrectedShampoo(
        params,
        **{"lr": 1e-2, "betas": (0.9, 0.95), "precondition_frequency": 3, "merge_dims": False,
           "eigenvalue_transport": "rotate", **kw},
    ),  # fmt: skip
    # the default refreshes before its update: frequency 4 keeps the first step after loading
    # (t = 6) an ordinary one, taken in the converted bases
    "ECS": lambda params, **kw: EigenvalueCorrectedShampoo(
        params, **{"lr": 1e-2, "betas": (0.9, 0.95), "precondition_frequency": 4, "merge_dims": False, **kw}
    ),
}


def _model() -> nn.Module:
    """Linear(80 → 64) and Linear(64 → 3): factors of 64², 80² (large: 4-bit and bfloat16 forms)
    and 3² (small: always float32)."""
    return tanh_mlp((80, 64, 3), 0)


def _layout(opt) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """Every stored entry's dtype and shape, by stack."""
    return {
        stack: {k: (v.dtype, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)}
        for stack, state in opt.state.items()
    }


def _bases(opt) -> dict[tuple[str, str], torch.Tensor]:
    """The projection bases the next update uses, decoded to float32, by (stack, key)."""
    bases = {}
    for stack, state in opt.state.items():
        working = decode({k: v for k, v in state.items() if k != "step"}, torch.float32)[0]
        bases.update({(stack, k): v for k, v in working.items() if k.startswith("basis")})
    return bases


def _first_update_bound(original, converted, moments_rounded: bool) -> float:
    """How far, relative to its norm, the converted optimizer's first update may be from the
    original's, from the basis and moment conversion error alone.

    A matrix block's update is ``U = Q_L N Q_Rᵀ`` with ``N = m / (sqrt(v) + ε)`` element-wise. The
    converted one is ``Ũ = Q̃_L Ñ Q̃_Rᵀ``, and
    ``Ũ − U = Q̃_L (Ñ − N) Q̃_Rᵀ + (Q̃_L − Q_L) N Q̃_Rᵀ + Q_L N (Q̃_R − Q_R)ᵀ``, so with ``a`` the
    largest ``‖Q̃ − Q‖₂``, ``s`` the largest ``‖Q‖₂`` of either, ``σ`` the smallest singular value of
    an original basis (``‖N‖ ≤ ‖U‖/σ²``) and ``|Ñ − N| ≤ n·|N|`` element-wise:
    ``‖Ũ − U‖ ≤ (s²·n + 2·s·a)/σ² · ‖U‖``. Moments rounded to bfloat16 (``m`` and ``v`` each by
    at most u = 2⁻⁸, ``sqrt(v)`` by u/2) give ``n ≤ 1.53·u``; float32 moments are carried exactly.
    Vector blocks (biases) are plain Adam: ``n`` alone, which the matrix bound exceeds.
    """
    before, after = _bases(original), _bases(converted)
    assert before.keys() == after.keys()
    a = max(float(torch.linalg.matrix_norm(after[k] - before[k], ord=2).max()) for k in before)
    s = max(float(torch.linalg.matrix_norm(q, ord=2).max()) for q in [*before.values(), *after.values()])
    sigma = min(float(torch.linalg.svdvals(q).min()) for q in before.values())
    n = 1.6 * BF16_ROUNDOFF if moments_rounded else 0.0
    return (s * s * n + 2 * s * a) / sigma**2


@pytest.mark.parametrize("saved, loaded", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
@pytest.mark.parametrize("name", CONVERTIBLE)
def test_a_checkpoint_resumes_in_the_precision_the_optimizer_was_built_with(name, saved, loaded):
    make = CONVERTIBLE[name]
    batches = first_features_batches(12)
    model = _model()
    opt = make(model.parameters(), state_precision=saved)
    for batch in batches[:5]:
        cross_entropy_step(model, opt, batch)
    saved = through_file(opt.state_dict())
    twin = copy.deepcopy(model)
    converted = make(twin.parameters(), state_precision=loaded, lr=3e-2)
    converted.load_state_dict(saved)

    # the precision asked for now wins; every other hyperparameter comes from the checkpoint
    assert converted.param_groups[0]["state_precision"] == loaded and converted.param_groups[0]["lr"] == 1e-2
    # the state is stored exactly as an optimizer that ran in `loaded` all along stores it
    native_model = _model()
    native = make(native_model.parameters(), state_precision=loaded)
    for batch in batches[:5]:
        cross_entropy_step(native_model, native, batch)
    assert _layout(converted) == _layout(native)
    assert state_memory(converted) == state_memory(native)

    lossless = loaded == "full"
    if not lossless:
        bound = _first_update_bound(opt, converted, moments_rounded=loaded == "bfloat16")
        assert bound < (0.05 if loaded == "bfloat16" else 1.0)
    refreshes = converted.total_refreshes()
    agreeing = lossless  # bit-identical so far
    losses, converted_losses = [], []
    for i, batch in enumerate(batches[5:]):
        before = params_of(model)
        losses.append(cross_entropy_step(model, opt, batch))
        converted_losses.append(cross_entropy_step(twin, converted, batch))
        if agreeing:
            # the converted state decodes to exactly what the original's kernel reads; an
            # optimizer that refreshes before its update (ECS's default) takes the first refresh
            # step in the new bases already, which differ (see below)
            refreshed = converted.total_refreshes() != refreshes
            if not (refreshed and converted.rules_for(converted.param_groups[0]).refresh_before_update):
                assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
            # bfloat16 → full: the original rounds its new state to bfloat16, the converted one
            # does not. 4-bit → full: the same projection bases and float32 moments until a
            # refresh replaces the bases (4-bit adopts its tracked eigenbasis, full precision
            # refreshes the factor): bit for bit through the first refresh step (up to it when
            # the refresh comes first)
            agreeing = saved == "4bit" and not refreshed
        elif i == 0:
            for start, a, b in zip(before, model.parameters(), twin.parameters(), strict=True):
                change, converted_change = (a - start).detach(), (b - start).detach()
                assert float((converted_change - change).norm()) <= bound * float(change.norm()) * (1 + 1e-4) + 1e-9
    assert not agreeing, "no refresh happened after loading"
    assert all(math.isfinite(x) for x in converted_losses)
    assert all(bool(torch.isfinite(p).all()) for p in twin.parameters())
    if saved == "bfloat16" and lossless:
        # bfloat16 → full: after the identical first step the runs differ only by the original's
        # rounding of its new state to bfloat16, relative u = 2⁻⁸ per stored value and step; the
        # losses agree to 2·u (measured: at most 0.5·u over these 7 steps). The parameters
        # themselves may drift further apart after a refresh: the 3×64 weight's 64² factor has
        # rank ≤ 3 per step, and the basis of its null space follows the rounding.
        for x, y in zip(losses, converted_losses):
            assert abs(x - y) <= 2 * BF16_ROUNDOFF * x
    else:
        # after the first step, whose conversion error is bounded above, these are two low-
        # precision trainings (or 4-bit → full after its refresh: full precision and 4-bit
        # eigenpair tracking), which test_precision.py holds within 10% of the starting loss
        # of each other (measured here: within 1.1%)
        start = float(nn.functional.cross_entropy(_model()(batches[0][0]), batches[0][1]).detach())
        assert abs(losses[-1] - converted_losses[-1]) < 0.1 * start


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_changing_a_groups_state_precision_converts_its_state_at_the_next_step(name):
    """Setting ``param_groups[i]['state_precision']`` (as one did after loading a checkpoint to
    force the precision back) used to raise ``KeyError: 'eigenbasis0'`` or ``'factor0'``."""
    make = CONVERTIBLE[name]
    batches = first_features_batches(12)
    model = _model()
    opt = make(model.parameters(), state_precision="full")
    for batch in batches[:4]:
        cross_entropy_step(model, opt, batch)
    for i, precision in enumerate(("4bit", "bfloat16", "4bit", "full", "bfloat16", "full"), start=4):
        opt.param_groups[0]["state_precision"] = precision
        assert math.isfinite(cross_entropy_step(model, opt, batches[i]))
        native_model = _model()
        native = make(native_model.parameters(), state_precision=precision)
        for batch in batches[: i + 1]:
            cross_entropy_step(native_model, native, batch)
        assert _layout(opt) == _layout(native), precision


def test_loading_into_a_4bit_optimizer_and_forcing_the_precision_back_no_longer_fails():
    batches = first_features_batches(8)
    model = _model()
    opt = CONVERTIBLE["SOAP"](model.parameters())
    for batch in batches[:4]:
        cross_entropy_step(model, opt, batch)
    resumed = CONVERTIBLE["SOAP"](model.parameters(), state_precision="4bit")
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed.param_groups[0]["state_precision"] = "4bit"
    for batch in batches[4:]:
        assert math.isfinite(cross_entropy_step(model, resumed, batch))


@pytest.mark.parametrize("name", ["Shampoo", "Muon"])
def test_shampoo_and_muon_resume_a_bfloat16_checkpoint_in_full_precision_and_back(name):
    model = make_model()
    opt = ALL[name](model.parameters(), state_precision="bfloat16")
    train(model, opt, 4)
    twin = copy.deepcopy(model)
    full = ALL[name](twin.parameters())
    full.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(
        v.dtype != torch.bfloat16 for s in full.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    train(model, opt, 1, start=4)
    train(twin, full, 1, start=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    back = ALL[name](twin.parameters(), state_precision="bfloat16")
    back.load_state_dict(copy.deepcopy(full.state_dict()))
    assert state_memory(back).total == state_memory(opt).total


def test_a_checkpoint_without_options_added_since_loads_with_their_defaults():
    model = make_model()
    opt = SOAP(model.parameters())
    train(model, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["normalize_grads"], group["data_format"]
    resumed = SOAP(model.parameters())
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["normalize_grads"] is False
    train(model, resumed, 2, start=3)


# --- the reference SOAP's arguments ---------------------------------------------------------------


def test_shampoo_beta_minus_one_means_beta2_as_in_the_reference():
    runs = []
    for shampoo_beta in (-1, None, 0.95):
        model = make_model(dtype=torch.float64)
        train(
            model,
            SOAP(model.parameters(), lr=1e-2, betas=(0.9, 0.95), shampoo_beta=shampoo_beta, precondition_frequency=3),
            8,
        )
        runs.append(params_of(model))
    for a, b, c in zip(*runs, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="shampoo_beta"):
        SOAP(make_model().parameters(), shampoo_beta=1.0)


def _block_shapes(opt) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    return sorted({(s.shape, s.preconditioned) for s in opt.layout(0)})


@pytest.mark.parametrize(
    "shape, max_dim, data_format, blocks",
    [
        # a conv kernel: one 1728 dimension, with its factor (the library's other rule: [64, 27])
        ((64, 3, 3, 3), 10000, "channels_first", [((1728,), (True,))]),
        ((64, 3, 3, 3), 10000, "channels_last", [((1728,), (True,))]),
        ((32, 32), 10000, "channels_first", [((1024,), (True,))]),  # a small matrix too
        ((256, 784), 10000, "channels_first", [((256, 784), (True, True))]),  # 256·784 > 10000
        ((8, 3, 3, 16), 100, "channels_first", [((72, 16), (True, True))]),
        ((8, 3, 3, 16), 100, "channels_last", [((8, 48, 3), (True, True, True))]),  # read as [8, 16, 3, 3]
        ((4, 20000, 3), 10000, "channels_first", [((4, 20000, 3), (True, False, True))]),  # too large: left alone
    ],
)
def test_soap_merge_dims_follows_the_reference_rule(shape, max_dim, data_format, blocks):
    """The reference multiplies ALL dimensions together left to right while the product stays
    within max_precond_dim (test_soap_reference.py writes the rule out and compares trajectories)."""
    param = nn.Parameter(torch.zeros(shape))
    opt = SOAP([param], merge_dims=True, max_precond_dim=max_dim, data_format=data_format)
    assert _block_shapes(opt) == blocks


def test_ecs_keeps_its_own_merge_rule():
    param = nn.Parameter(torch.zeros(64, 3, 3, 3))
    assert _block_shapes(EigenvalueCorrectedShampoo([param])) == [((64, 27), (True, True))]
    assert _block_shapes(Shampoo([param])) == [((64, 27), (True, True))]


def test_a_channels_last_kernel_trains_through_its_merged_blocks():
    """The update of a parameter read in another dimension order reaches every element once."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3, 3, 5, dtype=torch.float64))
    start = weight.detach().clone()
    twin = nn.Parameter(weight.detach().permute(0, 3, 1, 2).contiguous())  # the same kernel, [out, in, h, w]
    settings = dict(lr=1e-2, merge_dims=True, max_precond_dim=20, precondition_frequency=3)
    opt = SOAP([weight], data_format="channels_last", **settings)
    reference = SOAP([twin], **settings)
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):
        grad = torch.randn(4, 5, 3, 3, generator=generator, dtype=torch.float64)
        twin.grad = grad
        weight.grad = grad.permute(0, 2, 3, 1).contiguous()
        opt.step()
        reference.step()
        torch.testing.assert_close(weight.detach().permute(0, 3, 1, 2), twin.detach(), rtol=1e-12, atol=1e-14)
    assert opt.total_refreshes() > 0 and not torch.equal(weight.detach(), start)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(data_format="NHWC"), "data_format"),
        (dict(normalize_grads=1), "normalize_grads"),
        (dict(shampoo_beta=float("nan")), "shampoo_beta"),
    ],
)
def test_bad_reference_arguments_are_refused(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SOAP(make_model().parameters(), **kwargs)
