"""Under DDP (2 gloo processes on the CPU), LAMB and LARS give the single-process result on the same global batch.

DDP averages gradients before the optimizer sees them, so each rank steps on the global-batch gradient; the
only difference is the order of the floating-point sum in the all-reduce (tolerance 1e-6 relative).
"""

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from hf_colossal.registry import build_optimizer

from .distributed import batches, gloo_process_group, model, rank_shard, train

OPTIONS = {
    "lamb": dict(lr=1e-2, weight_decay=0.01, options="max_trust_ratio=10"),
    "lars": dict(lr=0.5, weight_decay=1e-4, options="nesterov=true,trust_clip=true"),
}
STEPS, GLOBAL_BATCH = 5, 16


def _worker(rank, world_size, name, port, result_path):
    with gloo_process_group(rank, world_size, port):
        net = model()
        optimizer = build_optimizer(name, net, **OPTIONS[name])
        train(DistributedDataParallel(net), optimizer, rank_shard(batches(STEPS, GLOBAL_BATCH), rank, world_size))
        if rank == 0:
            torch.save([p.detach() for p in net.parameters()], result_path)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_ddp_matches_single_process_on_the_global_batch(name, tmp_path):
    port = 29600 + sorted(OPTIONS).index(name)
    mp.spawn(_worker, args=(2, name, port, tmp_path / "ddp.pt"), nprocs=2, join=True)
    reference = model()
    train(reference, build_optimizer(name, reference, **OPTIONS[name]), batches(STEPS, GLOBAL_BATCH))
    for got, expected in zip(torch.load(tmp_path / "ddp.pt"), reference.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7)
