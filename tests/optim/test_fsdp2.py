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
# case -> (optimizer, parameter dtype, extra options, relative tolerance of the parameters); bf16 shards keep fp32
# master shards (DTensors), which must agree far closer than the 4e-2 the run moves them (gradients reduced in bf16)
CASES = {
    "lamb": ("lamb", torch.float32, "", 1e-5),
    "lars": ("lars", torch.float32, "", 1e-5),
    "lamb-bf16-master": ("lamb", torch.bfloat16, ",master_weights=true", 2**-7),
}
STEPS, GLOBAL_BATCH = 5, 16
NAN_STEP = 3  # rank 1 alone sees a NaN gradient at this step: both ranks must skip it


def _build(name, net, extra):
    options = OPTIONS[name]
    return build_optimizer(name, net, **{**options, "options": options["options"] + extra})


def _in_dtype(batches_, dtype):
    return [(inputs.to(dtype), targets) for inputs, targets in batches_]


def _worker(rank, world_size, case, port, result_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    name, dtype, extra, _ = CASES[case]
    with gloo_process_group(rank, world_size, port):
        net = model().to(dtype)
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in (net[0], net[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        optimizer = _build(name, net, extra)
        local = rank_shard(_in_dtype(batches(STEPS, GLOBAL_BATCH), dtype), rank, world_size)

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
        masters = [optimizer.state[p].get("master_param") for p in net.parameters()]
        masters = [None if m is None else (type(m).__name__, m.full_tensor()) for m in masters]
        if rank == 0:
            torch.save({"params": full, "all_reduces": len(calls), "skips": skips, "masters": masters}, result_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp2_matches_unsharded_training(case, tmp_path):
    name, dtype, extra, tolerance = CASES[case]
    port = 29620 + sorted(CASES).index(case)
    mp.spawn(_worker, args=(2, case, port, tmp_path / "fsdp2.pt"), nprocs=2, join=True)
    result = torch.load(tmp_path / "fsdp2.pt")

    reference = model().to(dtype)
    taken = _in_dtype(batches(STEPS, GLOBAL_BATCH), dtype)
    del taken[NAN_STEP]  # the poisoned step is skipped under FSDP2: the reference never takes it
    reference_optimizer = _build(name, reference, extra)
    train(reference, reference_optimizer, taken)
    for got, expected in zip(result["params"], reference.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=tolerance, atol=tolerance / 10)
    for master, param in zip(result["masters"], reference.parameters()):
        if dtype == torch.float32:
            assert master is None
            continue
        kind, value = master
        assert kind == "DTensor" and value.dtype == torch.float32
        torch.testing.assert_close(value, reference_optimizer.state[param]["master_param"], rtol=1e-3, atol=3e-4)
    assert result["skips"] == 1
    # per step: the non-finite agreement, the NVLAMB global norm (LAMB), and one for the trust-ratio norms of the
    # adapting group; 4 tensors adapt, so a per-tensor reduction would need at least 4
    per_step = {"lamb": 3, "lars": 2}[name]
    assert result["all_reduces"] <= STEPS * per_step
