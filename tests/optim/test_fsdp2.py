"""Under FSDP2 (2 gloo processes on the CPU, parameters are DTensor shards), LAMB and LARS give the unsharded result.

The trust ratio needs the norm of the whole parameter: each rank has a shard (here unevenly split: 3 rows over 2
ranks), so the shards' squared norms are summed across ranks — in one batched all-reduce per step, not one per
tensor (counted below). The non-finite check is agreed across ranks the same way, so every rank skips together.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_colossal.registry import build_optimizer

from .distributed import batches, gloo_process_group, model, rank_shard, train

OPTIONS = {
    "lamb": dict(lr=1e-2, weight_decay=0.01, options="max_trust_ratio=10,grad_pre_normalization=true"),
    "lars": dict(lr=0.5, weight_decay=1e-4, options="nesterov=true,trust_clip=true"),
}
STEPS, GLOBAL_BATCH = 5, 16
NAN_STEP = 3  # rank 1 alone sees a NaN gradient at this step: both ranks must skip it


def _worker(rank, world_size, name, port, result_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with gloo_process_group(rank, world_size, port):
        net = model()
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in (net[0], net[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        optimizer = build_optimizer(name, net, **OPTIONS[name])
        local = rank_shard(batches(STEPS, GLOBAL_BATCH), rank, world_size)

        calls = []
        all_reduce = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            calls.append(1)
            return all_reduce(*args, **kwargs)

        def poison(step):  # after backward: only rank 1's shard of the last weight gets a NaN
            if step == NAN_STEP and rank == 1:
                net[3].weight.grad.to_local()[0, 0] = float("nan")

        step = optimizer.step

        def counted_step():
            dist.all_reduce = counting_all_reduce
            try:
                return step()
            finally:
                dist.all_reduce = all_reduce

        optimizer.step = counted_step
        train(net, optimizer, local, poison)
        full = [p.full_tensor().detach() for p in net.parameters()]
        skips = optimizer.param_groups[0]["nonfinite_skips"]
        if rank == 0:
            torch.save({"params": full, "all_reduces": len(calls), "skips": skips}, result_path)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_fsdp2_matches_unsharded_training(name, tmp_path):
    port = 29620 + sorted(OPTIONS).index(name)
    mp.spawn(_worker, args=(2, name, port, tmp_path / "fsdp2.pt"), nprocs=2, join=True)
    result = torch.load(tmp_path / "fsdp2.pt")

    reference = model()
    taken = batches(STEPS, GLOBAL_BATCH)
    del taken[NAN_STEP]  # the poisoned step is skipped under FSDP2: the reference never takes it
    train(reference, build_optimizer(name, reference, **OPTIONS[name]), taken)
    for got, expected in zip(result["params"], reference.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    assert result["skips"] == 1
    # per step: the non-finite agreement, the NVLAMB global norm (LAMB), and one for the trust-ratio norms of the
    # adapting group; 4 tensors adapt, so a per-tensor reduction would need at least 4
    per_step = {"lamb": 3, "lars": 2}[name]
    assert result["all_reduces"] <= STEPS * per_step
