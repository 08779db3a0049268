"""Under DDP (2 gloo processes on the CPU) Shampoo and SOAP split the preconditioner work across the ranks and
still give the single-process result.

Both ranks see the same batch, so DDP's averaged gradient ((g + g) / 2) is exactly the single process's; the
difference left comes from the work split (each rank decomposes its share of the due blocks, one all_reduce of
zero-padded results shares them): a batched decomposition or matmul over fewer blocks may round differently in the
last bit (MKL picks kernels by batch size), hence the tolerance.
"""

import json

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from hf_colossal.registry import build_optimizer

from .distributed import batches, gloo_process_group, model, train
from .helpers import record_refresh_batches

OPTIONS = {
    "shampoo": dict(lr=1e-2, weight_decay=0.01,
                    options="max_preconditioner_dim=8,precondition_frequency=2,preconditioner_eps=1e-6"),
    "soap": dict(lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95), options="max_preconditioner_dim=8,precondition_frequency=2"),
}
STEPS, BATCH = 6, 16


def _worker(rank, world_size, port, folder):
    with gloo_process_group(rank, world_size, port):
        for name in OPTIONS:
            net = model()
            optimizer = build_optimizer(name, net, **OPTIONS[name])
            computed = record_refresh_batches(optimizer)
            train(DistributedDataParallel(net), optimizer, batches(STEPS, BATCH))
            factors = sum(count for _, count in computed)  # two per block
            (folder / f"{name}_blocks{rank}.json").write_text(json.dumps(factors))
            if rank == 0:
                torch.save([p.detach() for p in net.parameters()], folder / f"{name}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Both optimizers trained under DDP in one pair of spawned processes (start-up is most of the cost)."""
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, 29650, folder), nprocs=2, join=True)
    return folder


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_ddp_splits_the_work_and_matches_single_process(name, ddp_results, one_thread):
    # one thread, as the workers: the same summation order in every kernel
    reference = model()
    optimizer = build_optimizer(name, reference, **OPTIONS[name])
    computed = record_refresh_batches(optimizer)
    train(reference, optimizer, batches(STEPS, BATCH))
    factors = sum(count for _, count in computed)
    for got, expected in zip(torch.load(ddp_results / f"{name}.pt"), reference.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=2e-6)
    per_rank = [json.loads((ddp_results / f"{name}_blocks{rank}.json").read_text()) for rank in range(2)]
    assert sum(per_rank) == factors > 0
    assert max(per_rank) <= factors * 0.6  # each rank computed about half
