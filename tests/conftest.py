"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The tensors in most tests are tiny: intra-op threads only add synchronisation, and on a busy
    2-core machine they made some tests 30× slower. The previous thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
