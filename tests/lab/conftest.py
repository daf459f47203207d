"""The lab's tests: one torch thread for every test here, and for every run they start."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread: with pytest-xdist's two workers on two cores, more only spin and wait.
    Runs get one thread per worker too (NORMKIT_THREADS), so that the rows of two runs compare
    equal whatever the machine's load when each started."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("NORMKIT_THREADS", "1")
    yield
    torch.set_num_threads(threads)
