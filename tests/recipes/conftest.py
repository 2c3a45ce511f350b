"""Shared by the recipe tests."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for a whole test module, module-scoped fixtures included: the wiring
    tests compare against hand values at tight tolerances, and the recipes' engines may change
    the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
