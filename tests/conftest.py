"""Shared fixtures, and the device every device-parametrised test runs on.

A test that takes the ``device`` fixture runs once on the CPU and once on CUDA (ids ``-cpu`` and
``-cuda``); the CUDA case is skipped at collection, visibly and with a reason, where no CUDA device
is present. Tests marked ``cuda`` (the CUDA case here, the GPU-only checks in test_cuda.py) need one.

Device tests draw their random data from CPU generators and then move it to ``device``: the CUDA
case sees bit for bit the data of the CPU case, so the tolerances and thresholds the CPU case
justifies hold on the GPU up to the devices' round-off, not up to another random draw.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

pytest_plugins = ["pytester"]  # test_devices.py runs the device mechanism in an inner session

CUDA_MARK = "cuda: needs a CUDA device; skipped where none is present"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", CUDA_MARK)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """The tensors in most tests are tiny: intra-op threads only add synchronisation, and on a busy
    2-core machine they made some tests 30× slower. The previous thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """The device a test builds its models, data and generators' results on."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    with full_float32_precision():
        yield torch.device("cuda")


#: (owner, flag, value) for CUDA: see full_float32_precision
EXACT_CUDA_FLAGS = (
    (torch.backends.cuda.matmul, "allow_tf32", False),
    (torch.backends.cudnn, "allow_tf32", False),
    (torch.backends.cudnn, "deterministic", True),
    (torch.backends.cudnn, "benchmark", False),
)


@contextmanager
def full_float32_precision() -> Iterator[None]:
    """On CUDA, float32 matrix products and convolutions in IEEE float32 and convolutions by
    deterministic algorithms, restored afterwards. TF32 (on by default for cuDNN convolutions) keeps
    10 mantissa bits: a relative error near 1e-3 where the float32 tolerances of the tests assume
    about 1e-6; and a non-deterministic convolution algorithm would break the bit-identical
    resumption the state-dict tests check."""
    saved = [getattr(owner, name) for owner, name, _ in EXACT_CUDA_FLAGS]
    for owner, name, value in EXACT_CUDA_FLAGS:
        setattr(owner, name, value)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest", torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        for (owner, name, _), value in zip(EXACT_CUDA_FLAGS, saved, strict=True):
            setattr(owner, name, value)
