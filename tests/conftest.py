import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests, restored afterwards.

    Matmuls this small gain nothing from threads, and on a busy shared CPU OpenMP spin-waiting makes them
    10-50x slower; one thread keeps the timings stable.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
