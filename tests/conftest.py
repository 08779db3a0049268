"""Test-wide settings: CPU threads capped, hub access off, deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """A test that starts the default process group in this process (heterogeneous memory starts a one-process
    group for FSDP2 when none exists) must not leave it to the next test, which may start its own."""
    import torch.distributed as dist

    started_before = dist.is_available() and dist.is_initialized()
    yield
    if not started_before and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test: small batched kernels (K-FAC's Cholesky inverses, convolutions) run
    far faster on one thread than on two of a shared 2-core machine, and a single-process reference then sums in the
    same order as 1-thread worker processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
