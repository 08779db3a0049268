"""Worker functions for the 2-process gloo tests (importable by spawn: module-level, no pytest state)."""

from __future__ import annotations

import gc
import os
import warnings

import torch
import torch.distributed as dist

STEPS = 12


def init(rank: int, world_size: int, port: int, accelerate_env: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if accelerate_env:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not accelerate_env:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)


class FakeBucket:
    def __init__(self, params, grads):
        self._params = params
        self._buffer = torch.cat([g.reshape(-1) for g in grads])

    def buffer(self):
        return self._buffer

    def parameters(self):
        return self._params

    def is_last(self):
        return True


def known_grads(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(12, 10, generator=g), torch.randn(10, generator=g), torch.randn(6, 4, 2, generator=g)]


def math_worker(rank, world_size, port, out_path):
    init(rank, world_size, port)
    try:
        _math(rank, world_size, out_path)
    finally:
        dist.destroy_process_group()


def _math(rank, world_size, out_path):
    """Run each compressor on known tensors for two steps; save inputs and outputs for the parent to check."""
    from hf_colossal.comm._common import ByteCounter
    from hf_colossal.comm.lowp import low_precision_allreduce
    from hf_colossal.comm.powersgd import PowerSGD
    from hf_colossal.comm.sign import ScaledSign
    from hf_colossal.comm.topk import TopK

    if True:  # (kept indented: one block per compressor below)
        params = [torch.nn.Parameter(torch.zeros(s)) for s in [(12, 10), (10,), (6, 4, 2)]]
        keys = [0, 1, 2]
        results = {}
        for name, make in [("powersgd", lambda: PowerSGD(rank=2, seed=3)), ("topk", lambda: TopK(density=0.1)),
                           ("sign", lambda: ScaledSign())]:
            comp, counter, outs, efs = make(), ByteCounter(), [], []
            for step in range(2):
                buffer = torch.cat([g.reshape(-1) for g in known_grads(rank, step)])
                outs.append(comp.run(buffer, keys, params, None, world_size, counter).wait().clone())
                efs.append(torch.cat([comp.ef.residuals[k] for k in keys]).clone())
            results[name] = dict(outs=outs, efs=efs, bytes=counter.snapshot(),
                                 q=getattr(comp, "q", {}) and {k: v.clone() for k, v in comp.q.items()})
            # a non-finite gradient on rank 0 only: every rank's output is non-finite, no residual changes
            before = torch.cat([comp.ef.residuals[k] for k in keys]).clone()
            buffer = torch.cat([g.reshape(-1) for g in known_grads(rank, 5)])
            if rank == 0:
                buffer[3] = float("inf")
            out = comp.run(buffer, keys, params, None, world_size, counter).wait()
            results[name]["nonfinite_out"] = bool(torch.isfinite(out).all())
            results[name]["ef_kept"] = bool(torch.equal(before, torch.cat([comp.ef.residuals[k] for k in keys])))
            if name == "powersgd":
                results[name]["q_finite"] = all(bool(torch.isfinite(q).all()) for q in comp.q.values())
        # error feedback in unscaled units under a loss scale: residual(scale=S, grads*S) == residual(no scale)
        plain, scaled = ScaledSign(), ScaledSign()
        for step in range(2):
            grads = torch.cat([g.reshape(-1) for g in known_grads(rank, step)])
            plain.run(grads.clone(), keys, params, None, world_size, ByteCounter()).wait()
            scaled.run(grads * 1024.0, keys, params, None, world_size, ByteCounter(),
                       scale_fn=lambda: torch.tensor(1024.0)).wait()
        results["scale_ok"] = all(torch.allclose(plain.ef.residuals[k], scaled.ef.residuals[k], atol=1e-5)
                                  for k in keys)
        buffer = torch.cat([g.reshape(-1) for g in known_grads(rank, 0)])
        counter = ByteCounter()
        results["bf16"] = dict(out=low_precision_allreduce(buffer.clone(), torch.bfloat16, None, world_size,
                                                           counter).wait().clone(), bytes=counter.snapshot())
        torch.save(results, f"{out_path}.{rank}")


# ---------------------------------------------------------------------------------------------------------------
# Real-data training through accelerate (the one-call route)


def digits_tensors():
    from hf_colossal.recipes.data import digits_arrays

    arrays = digits_arrays()
    return {k: (torch.from_numpy(x), torch.from_numpy(y)) for k, (x, y) in arrays.items()}


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def eval_loss(model, data) -> float:
    x, y = data["eval"]
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def local_batches(data, rank, world_size, steps, micro, batch, seed=0):
    x, y = data["train"]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps * micro):
        idx = torch.randint(0, len(x), (batch * world_size,), generator=g)[rank::world_size]
        out.append((x[idx], y[idx]))
    return out


def train_accelerate(plugin, data, rank, world_size, steps, micro=2, batch=16, start=0, resume_dir=None,
                     save_dir=None, seed=0):
    """``steps`` optimizer steps of an MLP on digits with gradient accumulation ``micro`` through accelerate."""
    from accelerate import Accelerator

    from hf_colossal.comm import enable

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=micro)
    controller = enable(accelerator, plugin)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_dir is not None:
        accelerator.load_state(resume_dir)
    batches = local_batches(data, rank, world_size, steps + start, micro, batch, seed)[start * micro:]
    losses = []
    for x, y in batches:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(float(loss.detach()))
    if save_dir is not None:
        accelerator.save_state(save_dir)
    return accelerator, controller, accelerator.unwrap_model(model)


def _train_results(plugins, data, rank, world_size) -> dict:
    """Per plugin label: eval loss before/after ``STEPS`` steps, the final parameters and the controller's counters."""
    results = {}
    for label, plugin in plugins.items():
        torch.manual_seed(0)
        before = eval_loss(mlp(), data)
        _, controller, model = train_accelerate(plugin, data, rank, world_size, steps=STEPS)
        results[label] = dict(
            before=before, after=eval_loss(model, data), params=[p.detach().clone() for p in model.parameters()],
            rounds=None if controller is None else controller.round,
            steps=None if controller is None else controller.step,
            method=None if controller is None else controller.method,
            bytes=None if controller is None else controller.counter.snapshot(),
        )
    return results


def _resume_results(plugins, data, rank, world_size, tmp) -> dict:
    """6 steps straight vs 3 steps + save_state + fresh everything + load_state + 3 steps: identical parameters."""
    results = {}
    for label, plugin in plugins.items():
        _, _, straight = train_accelerate(plugin, data, rank, world_size, steps=6)
        ckpt = f"{tmp}/{label}"
        train_accelerate(plugin, data, rank, world_size, steps=3, save_dir=ckpt)
        _, controller, resumed = train_accelerate(plugin, data, rank, world_size, steps=3, start=3, resume_dir=ckpt)
        results[label] = dict(
            exact=all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters())),
            files=sorted(os.listdir(f"{ckpt}/hf_colossal_comm")), step=controller.step,
        )
        if label == "sign":  # another world size: the residuals restart from zero, with a warning
            shared = torch.load(f"{ckpt}/hf_colossal_comm/shared.pt", weights_only=False)
            shared["world_size"] = world_size + 2
            dist.barrier()
            if rank == 0:
                torch.save(shared, f"{ckpt}/hf_colossal_comm/shared.pt")
            dist.barrier()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                controller.load(ckpt)
            results[label]["world_size_warning"] = any("error-feedback residuals restart" in str(w.message)
                                                       for w in caught)
            results[label]["residuals_reset"] = controller.compressor.ef.residuals == {}
    return results


def accelerate_train_worker(rank, world_size, port, out_path, plugins):
    init(rank, world_size, port, accelerate_env=True)
    torch.save(_train_results(plugins, digits_tensors(), rank, world_size), f"{out_path}.{rank}")
    dist.destroy_process_group()


def resume_worker(rank, world_size, port, out_path, plugins, tmp):
    init(rank, world_size, port, accelerate_env=True)
    torch.save(_resume_results(plugins, digits_tensors(), rank, world_size, tmp), f"{out_path}.{rank}")
    dist.destroy_process_group()


def suite_worker(rank, world_size, port, out_path, tmp):
    """All accelerate-route checks in one pair of processes (process start-up dominates on 2 cores)."""
    from hf_colossal.comm import GradientCompressionPlugin as G

    init(rank, world_size, port, accelerate_env=True)
    from accelerate import Accelerator

    Accelerator(cpu=True)  # initialises the gloo group from the environment (as every later Accelerator)
    _math(rank, world_size, f"{out_path}.math")
    data = digits_tensors()
    plugins = {m: G(method=m, sync_every=4, density=0.1) for m in
               ("none", "bf16", "fp16", "powersgd", "topk", "sign", "local_sgd", "diloco")}
    plugins["auto"] = G(method="auto", auto_compute_ms=1e6)
    plugins["local_sgd_bf16"] = G(method="local_sgd", sync_every=4, sync_dtype="bfloat16")
    # auto that finds the link slow after its probe step (ratios 0): DDP's hook is registered mid-run
    late = dict(method="auto", auto_probe_steps=1, auto_hidden_ratio=0, auto_bf16_ratio=0)
    plugins["auto_late"] = G(**late, auto_sync_every=2)  # -> local SGD, bf16 deltas every 2 steps
    plugins["auto_late_powersgd"] = G(**late, auto_slow_link="powersgd")
    torch.save(_train_results(plugins, data, rank, world_size), f"{out_path}.train.{rank}")
    resume_plugins = {label: G(method=label, sync_every=2) for label in ("powersgd", "sign", "diloco")}
    resume_plugins["local_sgd_bf16"] = G(method="local_sgd", sync_every=2, sync_dtype="bfloat16")
    resume_plugins["auto_late"] = plugins["auto_late"]
    torch.save(_resume_results(resume_plugins, data, rank, world_size, tmp), f"{out_path}.resume.{rank}")
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Stock Trainer, enabled only by HF_COLOSSAL_COMPRESSION (set by the parent before spawning)


class DigitsModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, pixels, labels=None):
        logits = self.net(pixels)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def trainer_worker(rank, world_size, port, out_path, tmp):
    init(rank, world_size, port, accelerate_env=True)
    from transformers import Trainer, TrainingArguments

    from hf_colossal.integrations.accelerate import current_controller

    data = digits_tensors()
    x, y = data["train"]
    train = [{"pixels": x[i], "labels": y[i]} for i in range(512)]

    def run(max_steps, resume=None):
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=f"{tmp}/trainer", per_device_train_batch_size=16, max_steps=max_steps,
                                 gradient_accumulation_steps=2, learning_rate=0.1, optim="sgd",
                                 lr_scheduler_type="constant", save_strategy="steps", save_steps=3,
                                 report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                                 seed=0, logging_steps=1000)
        trainer = Trainer(model=DigitsModel(), args=args, train_dataset=train)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(6)
    controller = current_controller(straight.accelerator)
    before = eval_loss(mlp(), data)
    after = eval_loss(straight.model.net, data)
    params = [p.detach().clone() for p in straight.model.parameters()]
    resumed = run(6, resume=f"{tmp}/trainer/checkpoint-3")
    result = dict(
        method=None if controller is None else controller.method,
        rounds=None if controller is None else controller.round, steps=None if controller is None else controller.step,
        before=before, after=after, params=params,
        files=sorted(os.listdir(f"{tmp}/trainer/checkpoint-3/hf_colossal_comm")),
        exact=all(torch.equal(a, b) for a, b in zip(params, resumed.model.parameters())),
    )
    torch.save(result, f"{out_path}.{rank}")
    # Trainer's last collective (store_flos's all_gather) ended milliseconds ago, and its gloo thread may still have
    # to take the GIL to free that work's Python tensors. Destroying the group then (here: when the Trainers' DDP
    # reducers, its last owners, die on return) joins gloo's threads with the GIL held: a deadlock. So free the
    # Trainers while the group is registered and let gloo settle in a barrier (the GIL released) before destroying.
    del straight, resumed, controller
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
