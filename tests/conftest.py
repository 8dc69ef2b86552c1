"""Shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The test models are tiny: on the shared 2-core machine, two intra-op threads under load run
    their small ops many times slower than one. Each module runs on one thread and restores it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
