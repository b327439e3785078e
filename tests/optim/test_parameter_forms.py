"""Parameters in the forms torch.optim users hand over: memory layouts other than contiguous
(channels_last conv kernels, non-contiguous gradients) train exactly as contiguous ones, and
tensors the optimizers cannot train (complex, integer) are refused up front."""

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
