"""The benchmark's models: output shapes, parameter counts in the documented ranges, causality."""

from __future__ import annotations

import pytest
import torch

from conditioner.app.data import Dataset
from conditioner.app.models import CharGPT, build_model, parameter_count


def fake(task: str, input_shape: tuple[int, ...], classes: int, n: int = 4) -> Dataset:
    if task == "language":
        x = torch.randint(0, classes, (n, *input_shape))
        return Dataset("fake", task, x, x, x, x, classes, input_shape)
    x = torch.rand(n, *input_shape)
    y = torch.randint(0, classes, (n,))
    return Dataset("fake", task, x, y, x, y, classes, input_shape)


@pytest.mark.parametrize(
    "kind, kwargs, data, low, high",
    [
        ("mlp", {"hidden": (128, 128)}, fake("classification", (1, 8, 8), 10), 26_122, 26_122),
        ("mlp", {"hidden": (256, 256)}, fake("classification", (1, 28, 28), 10), 269_322, 269_322),
        ("cnn", {}, fake("classification", (1, 28, 28), 10), 20_000, 60_000),
        ("cnn", {}, fake("classification", (1, 8, 8), 10), 20_000, 60_000),
        ("gpt", {"layers": 4, "width": 128, "heads": 4, "context": 128}, fake("language", (128,), 84), 700_000, 1_000_000),
    ],
)
def test_shapes_and_sizes(kind, kwargs, data, low, high):
    torch.manual_seed(0)
    model = build_model(kind, data, **kwargs)
    assert low <= parameter_count(model) <= high
    out = model(data.x_train)
    if kind == "gpt":
        assert out.shape == (*data.x_train.shape, data.num_classes)
    else:
        assert out.shape == (len(data.x_train), data.num_classes)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_same_seed_same_initialisation():
    data = fake("classification", (1, 8, 8), 10)
    torch.manual_seed(3)
    a = build_model("cnn", data)
    torch.manual_seed(3)
    b = build_model("cnn", data)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = CharGPT(vocab=20, context=16, width=32, layers=2, heads=4).eval()
    tokens = torch.randint(0, 20, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 20
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.int64))


def test_bad_model_requests():
    with pytest.raises(ValueError, match="model kind"):
        build_model("rnn", fake("classification", (1, 8, 8), 10))
    with pytest.raises(ValueError, match="language"):
        build_model("gpt", fake("classification", (1, 8, 8), 10))
    with pytest.raises(ValueError, match="too small"):
        build_model("cnn", fake("classification", (1, 4, 4), 10))
