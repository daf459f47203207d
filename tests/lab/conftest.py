"""The lab's tests: one torch thread for every test here."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: with pytest-xdist's two workers on two cores, more only spin and wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
