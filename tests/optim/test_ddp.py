"""Under DDP (2 gloo processes on the CPU), LAMB and LARS give the single-process result on the same global batch.

DDP averages gradients before the optimizer sees them, so each rank steps on the global-batch gradient; the
only difference is the order of the floating-point sum in the all-reduce (tolerance 1e-6 relative).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from hf_colossal.registry import build_optimizer

OPTIONS = {
    "lamb": dict(lr=1e-2, weight_decay=0.01, options="max_trust_ratio=10"),
    "lars": dict(lr=0.5, weight_decay=1e-4, options="nesterov=true,trust_clip=true"),
}
STEPS, GLOBAL_BATCH = 5, 16


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 12, generator=generator), torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator))
            for _ in range(STEPS)]


def _train(model, optimizer, batches):
    for inputs, targets in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def _worker(rank, world_size, name, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _model()
        optimizer = build_optimizer(name, model, **OPTIONS[name])
        ddp = DistributedDataParallel(model)
        shard = GLOBAL_BATCH // world_size
        local = [(x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]) for x, y in _batches()]
        _train(ddp, optimizer, local)
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_ddp_matches_single_process_on_the_global_batch(name, tmp_path):
    port = 29600 + sorted(OPTIONS).index(name)
    mp.spawn(_worker, args=(2, name, port, tmp_path / "ddp.pt"), nprocs=2, join=True)
    reference = _model()
    _train(reference, build_optimizer(name, reference, **OPTIONS[name]), _batches())
    for got, expected in zip(torch.load(tmp_path / "ddp.pt"), reference.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7)
