"""Parameters in the forms torch.optim users hand over: memory layouts other than contiguous
(channels_last conv kernels, non-contiguous gradients) train exactly as contiguous ones; groups
added after steps, zero-element, frozen, 0-d, float16 parameters and parameters built on the meta
device work (each against the plain float32 run it should equal); tensors the optimizers cannot
train (complex, integer, the same tensor twice, values on the meta device) are refused up front,
naming the parameter, before anything changes."""

from __future__ import annotations

import pytest
import torch
from cases import assert_params_equal, assert_same_state_dict, params_of
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, Shampoo

pytestmark = pytest.mark.usefixtures("one_thread")

# All four with merge_dims on (Muon always merges), small frequencies so that refreshes happen.
OPTIMIZERS = {
    "SOAP": lambda params, **kw: SOAP(params, lr=1e-2, precondition_frequency=2, merge_dims=True, **kw),
    "ECS": lambda params, **kw: EigenvalueCorrectedShampoo(params, lr=1e-2, precondition_frequency=2, **kw),
    "Shampoo": lambda params, **kw: Shampoo(
        params, lr=1e-2, precondition_frequency=2, start_preconditioning_step=2, **kw
    ),
    "Muon": lambda params, **kw: Muon(params, lr=1e-2, **kw),
}
# A small maximum dimension: the merged kernels are also split into several blocks and stacks.
SPLIT = {
    "SOAP": dict(max_precond_dim=16, split_large_dims=True),
    "ECS": dict(max_precond_dim=16),
    "Shampoo": dict(max_preconditioner_dim=16),
}


class CNN(nn.Module):
    """Two 3×3 convolutions (kernels [8, 3, 3, 3] and [6, 8, 3, 3], merged to [8, 27] and [6, 72])
    and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1))


def cnn(channels_last: bool) -> CNN:
    torch.manual_seed(0)
    model = CNN()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def images(i: int, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 3, generator=g)
    return (x.to(memory_format=torch.channels_last) if channels_last else x), y


def backward(model: CNN, i: int, channels_last: bool) -> None:
    model.zero_grad()
    x, y = images(i, channels_last)
    ((model(x) - y) ** 2).mean().backward()


def kernels(model: CNN) -> list[torch.Tensor]:
    return [model.conv1.weight, model.conv2.weight]


@pytest.mark.parametrize(
    "name,split", [(name, False) for name in OPTIMIZERS] + [(name, True) for name in SPLIT], ids=lambda x: str(x)
)
def test_channels_last_trains_exactly_as_contiguous(name, split):
    """Same initial values, data and gradient values: the parameters stay bit-identical through
    several refreshes, and the channels_last kernels stay channels_last.

    The channels_last model runs its own backward, so its gradients have the layout autograd
    gives them (channels_last), and then take the contiguous model's gradient VALUES in place:
    the convolution's backward itself rounds differently in the two layouts (by about 4e-9 here),
    which is not the optimizer's doing, and the optimizers would amplify it."""
    options = SPLIT[name] if split else {}
    plain, last = cnn(False), cnn(True)
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in kernels(last))
    opt_plain = OPTIMIZERS[name](plain.parameters(), weight_decay=0.1, **options)
    opt_last = OPTIMIZERS[name](last.parameters(), weight_decay=0.1, **options)
    for i in range(7):
        backward(plain, i, False)
        backward(last, i, True)
        for p, q in zip(plain.parameters(), last.parameters(), strict=True):
            q.grad.copy_(p.grad)
        assert all(w.grad.is_contiguous(memory_format=torch.channels_last) for w in kernels(last))
        opt_plain.step()
        opt_last.step()
        assert_params_equal(params_of(plain), params_of(last))
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in kernels(last))
    if name != "Muon":
        assert opt_last.total_refreshes() == opt_plain.total_refreshes() > 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_channels_last_model_trains_with_its_own_gradients(name):
    """End to end as a user runs it: channels_last model and inputs, autograd's own gradients;
    the loss goes down, and the kernels stay finite and channels_last."""
    model = cnn(True)
    opt = OPTIMIZERS[name](model.parameters())
    losses = []
    for i in range(12):
        model.zero_grad()
        x, y = images(i % 2, True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(w).all() and w.is_contiguous(memory_format=torch.channels_last) for w in kernels(model))


def _scrambled(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a non-contiguous layout: dimensions stored in reverse order."""
    order = list(range(t.ndim))[::-1]
    return t.permute(order).contiguous().permute(order)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_contiguous_gradients_train_exactly_as_contiguous_ones(name):
    """Gradients in a scrambled layout (kernels' merged dimensions not adjacent in memory,
    transposed matrices) on contiguous parameters give bit-identical parameters."""
    plain, other = cnn(False), cnn(False)
    opt_plain = OPTIMIZERS[name](plain.parameters())
    opt_other = OPTIMIZERS[name](other.parameters())
    for i in range(5):
        backward(plain, i, False)
        for p, q in zip(plain.parameters(), other.parameters(), strict=True):
            q.grad = _scrambled(p.grad)
        assert not other.conv1.weight.grad.is_contiguous() and not other.head.weight.grad.is_contiguous()
        opt_plain.step()
        opt_other.step()
        assert_params_equal(params_of(plain), params_of(other))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parameter_whose_layout_has_no_block_view_is_written_in_place(name):
    """A parameter that is not contiguous in any standard format (dimensions stored in reverse
    order) is updated in place: same tensor object, same strides, values as the contiguous twin."""
    plain, other = cnn(False), cnn(False)
    with torch.no_grad():
        other.conv2.weight = nn.Parameter(_scrambled(plain.conv2.weight.detach().clone()))
    weight, strides = other.conv2.weight, other.conv2.weight.stride()
    opt_plain = OPTIMIZERS[name](plain.parameters(), weight_decay=0.1)
    opt_other = OPTIMIZERS[name](other.parameters(), weight_decay=0.1)
    for i in range(5):
        backward(plain, i, False)
        for p, q in zip(plain.parameters(), other.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt_plain.step()
        opt_other.step()
        assert_params_equal(params_of(plain), params_of(other))
    assert other.conv2.weight is weight and weight.stride() == strides


# --- parameters the optimizers refuse ---------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_complex_parameter_is_refused_at_construction_naming_it(name):
    real = nn.Parameter(torch.randn(4, 5))
    bad = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"param group 0, params\[1\]: must be a real floating-point tensor") as info:
        OPTIMIZERS[name]([real, bad])
    assert "torch.complex64" in str(info.value) and "(3, 4)" in str(info.value)
    with pytest.raises(ValueError, match=r"param group 1, params\[0\]: .*torch.complex128.*\(6,\)"):
        OPTIMIZERS[name]([{"params": [real]}, {"params": [torch.zeros(6, dtype=torch.complex128)]}])
    with pytest.raises(ValueError, match=r"param group 0, params\[1\] \('z'\): .*complex64"):
        OPTIMIZERS[name]([("w", real), ("z", bad)])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_integer_parameter_is_refused(name):
    with pytest.raises(ValueError, match=r"params\[0\]: must be a real floating-point tensor.*torch.int64"):
        OPTIMIZERS[name]([torch.zeros(3, 3, dtype=torch.int64)])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_complex_parameter_group_added_later_is_refused_and_changes_nothing(name):
    model, twin = cnn(False), cnn(False)
    opt = OPTIMIZERS[name](model.parameters())
    reference = OPTIMIZERS[name](twin.parameters())
    for i in range(3):
        for m, o in ((model, opt), (twin, reference)):
            backward(m, i, False)
            o.step()
    before = opt.state_dict()
    extra = nn.Parameter(torch.randn(5, 5))
    # a generator, as model.parameters() gives: listed once, then checked
    group = {"params": (p for p in [extra, nn.Parameter(torch.randn(2, 3, dtype=torch.complex64))]), "lr": 0.5}
    with pytest.raises(ValueError, match=r"param group 1, params\[1\]: .*complex64.*\(2, 3\)"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1
    assert_same_state_dict(opt.state_dict(), before)
    for i in range(3, 6):  # and it goes on exactly as an optimizer that never saw the group
        for m, o in ((model, opt), (twin, reference)):
            backward(m, i, False)
            o.step()
    assert_params_equal(params_of(model), params_of(twin))
    assert_same_state_dict(opt.state_dict(), reference.state_dict())


# --- the other forms a torch.optim user can pass ------------------------------------------------


def _steps(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, first: int, last: int) -> None:
    """Steps ``first..last-1`` with fixed gradients per (parameter shape, step): the same for every
    optimizer, whatever else it holds."""
    for i in range(first, last):
        for p in params:
            g = torch.Generator().manual_seed(1000 * i + p.numel())
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        optimizer.step()


def _weights(seed: int, *shapes: tuple[int, ...], dtype=torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in shapes]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_same_tensor_twice_is_refused_in_one_group_and_across_groups(name):
    w = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"param group 0, params\[1\]: is the same tensor as params\[0\]"):
        OPTIMIZERS[name]([w, w])
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        OPTIMIZERS[name]([{"params": [w]}, {"params": [w]}])
    opt = OPTIMIZERS[name]([w])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_group_added_after_steps_trains_as_its_own_optimizer_would(name):
    a, b = _weights(0, (6, 5), (5, 4))
    a_alone, b_alone = _weights(0, (6, 5), (5, 4))
    opt, only_a, only_b = OPTIMIZERS[name]([a]), OPTIMIZERS[name]([a_alone]), None
    _steps([a], opt, 0, 4)
    _steps([a_alone], only_a, 0, 4)
    opt.add_param_group({"params": [b], "lr": 5e-3})
    only_b = OPTIMIZERS[name]([{"params": [b_alone], "lr": 5e-3}])
    for i in range(4, 9):
        _steps([a, b], opt, i, i + 1)
        _steps([a_alone], only_a, i, i + 1)
        b_alone.grad = b.grad.clone()
        only_b.step()
    assert torch.equal(a, a_alone) and torch.equal(b, b_alone)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_element_and_frozen_parameters_change_nothing(name):
    empty, frozen = nn.Parameter(torch.zeros(0, 3)), nn.Parameter(torch.randn(3, 3), requires_grad=False)
    frozen_before = frozen.detach().clone()
    (w,) = _weights(1, (6, 5))
    (plain,) = _weights(1, (6, 5))
    opt, reference = OPTIMIZERS[name]([w, empty, frozen]), OPTIMIZERS[name]([plain])
    for i in range(6):
        _steps([w, empty], opt, i, i + 1)
        _steps([plain], reference, i, i + 1)
    assert torch.equal(w, plain) and torch.equal(frozen, frozen_before) and empty.shape == (0, 3)
    restored = OPTIMIZERS[name]([w, empty, frozen])
    restored.load_state_dict(opt.state_dict())
    assert_same_state_dict(restored.state_dict(), opt.state_dict())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_0d_parameter_trains_as_its_one_element_vector(name):
    scalar, vector = nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.tensor([0.7]))
    opt_scalar, opt_vector = OPTIMIZERS[name]([scalar]), OPTIMIZERS[name]([vector])
    for i in range(6):
        g = torch.Generator().manual_seed(i)
        scalar.grad = torch.randn((), generator=g)
        vector.grad = scalar.grad.reshape(1).clone()
        opt_scalar.step()
        opt_vector.step()
    assert scalar.shape == () and scalar != 0.7 and torch.equal(scalar.reshape(1), vector)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_float16_parameters_train_with_float32_state_like_float32_ones(name):
    """A float16 parameter gets float32 statistics. Given the same (float16) gradients, its state
    is that of a float32 parameter bit for bit, and the parameters differ only by rounding to
    float16 what is applied: at most two roundings per step (the update, then the sum), each
    within 2^-11 of the value's size."""
    half, full = _weights(2, (6, 5), dtype=torch.float16), [nn.Parameter(p.detach().float()) for p in
                                                            _weights(2, (6, 5), dtype=torch.float16)]
    opt_half, opt_full = OPTIMIZERS[name](half), OPTIMIZERS[name](full)
    steps = 8
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        half[0].grad = torch.randn(6, 5, generator=g).to(torch.float16)
        full[0].grad = half[0].grad.float()
        opt_full.step()
        opt_half.step()
    assert half[0].dtype == torch.float16
    assert_same_state_dict(opt_half.state_dict(), opt_full.state_dict())
    bound = steps * 2 * 2**-11 * float(full[0].detach().abs().max() + 1)
    torch.testing.assert_close(half[0].float(), full[0].detach(), rtol=0, atol=bound)
    assert not torch.equal(half[0], _weights(2, (6, 5), dtype=torch.float16)[0])  # it moved


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_optimizer_built_on_meta_parameters_trains_once_they_are_materialised_in_place(name):
    torch.manual_seed(0)
    with torch.device("meta"):
        deferred = nn.Linear(5, 4)
    opt = OPTIMIZERS[name](deferred.parameters())
    deferred.weight.grad, deferred.bias.grad = torch.empty_like(deferred.weight), torch.empty_like(deferred.bias)
    with pytest.raises(ValueError, match=r"param group 0, params\[0\]: is on the meta device"):
        opt.step()
    assert opt.state_dict()["state"] == {}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        deferred.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    eager = nn.Linear(5, 4)
    with torch.no_grad():
        for target, source in zip(deferred.parameters(), eager.parameters()):
            target.copy_(source)
    reference = OPTIMIZERS[name](eager.parameters())
    params = list(deferred.parameters())
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in params)  # the same objects
    for i in range(5):
        _steps(params, opt, i, i + 1)
        _steps(list(eager.parameters()), reference, i, i + 1)
    assert_params_equal(params_of(deferred), params_of(eager))
