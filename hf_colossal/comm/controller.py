"""The glue: one controller per DDP model. It owns the method's state, is DDP's communication hook (torch's
``register_comm_hook`` API), follows optimizer steps (a step post-hook) for warm-up, local SGD / DiLoCo and auto
mode, counts bytes per collective, and saves / loads its state beside a checkpoint.

Checkpoint layout (a folder ``hf_colossal_comm/`` inside the checkpoint): ``shared.pt`` written by rank 0 (step
counters, PowerSGD's warm-start Q, DiLoCo's anchor and outer momentum, the auto decision — identical on all
ranks) and ``rank{r}.pt`` written by every rank (its error-feedback residuals). Resuming at the same world size
restores everything, so training continues exactly. At another world size the shared state is restored and the
error feedback restarts from zero, with a warning: a residual belongs to one rank's data shard and has no
meaning for another partition (its sum over ranks is at most one step's compression error).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from . import auto, local_sgd, lowp
from ._common import ByteCounter, Future, all_reduce_sum, completed_future
from .plugin import ERROR_FEEDBACK_METHODS, FREQUENCY_METHODS, GradientCompressionPlugin
from .powersgd import PowerSGD
from .sign import ScaledSign
from .topk import TopK

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "hf_colossal_comm"
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _comm_hook(controller, bucket):  # unannotated: DDP checks a real (non-string) annotation
    return controller.hook(bucket)


class CompressionController:
    """State and behaviour of one :class:`GradientCompressionPlugin` on one DDP model."""

    def __init__(self, plugin: GradientCompressionPlugin, group=None) -> None:
        self.plugin = plugin
        self.group = group
        self.method = "none" if plugin.method == "auto" else plugin.method  # what the hook does now
        self.counter = ByteCounter()
        self.step = 0  # optimizer steps taken (GradScaler-skipped steps don't count)
        self.round = 0  # synchronised backward passes seen by the hook
        self.scale_fn = None  # -> GradScaler's current scale (tensor) or None
        self.params: list[torch.Tensor] = []
        self.module: torch.nn.Module | None = None
        self._ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self._hooked = False  # auto registers the hook only once it chooses to compress
        self._keys: dict[int, int] = {}
        self.device = torch.device("cpu")
        self.compressor = None
        # local SGD settings: the plugin's, or for auto the ones it uses if it chooses local SGD
        auto_mode = plugin.method == "auto"
        self._sync_every = plugin.auto_sync_every if auto_mode else plugin.sync_every
        self._sync_dtype = torch.bfloat16 if auto_mode else getattr(torch, plugin.sync_dtype)
        if plugin.method in ("local_sgd", "auto") and self._sync_dtype != torch.float32:
            self.diloco = local_sgd.DiLoCoState(1.0, 0.0, False, self._sync_dtype)  # averaging: outer step of lr 1
        else:
            self.diloco = local_sgd.DiLoCoState(plugin.outer_lr, plugin.outer_momentum, plugin.outer_nesterov,
                                                self._sync_dtype)
        self.auto_info: dict = {}
        self._probe_start: float | None = None
        self._probe_from = 0
        self._optimizers: list = []
        self._pending_state: dict | None = None
        self._build_compressor()

    # -- set-up -------------------------------------------------------------------------------------------------
    def _build_compressor(self) -> None:
        p = self.plugin
        self.compressor = {
            "powersgd": lambda: PowerSGD(p.rank, p.seed, p.error_feedback),
            "topk": lambda: TopK(p.density, p.error_feedback),
            "sign": lambda: ScaledSign(p.error_feedback),
        }.get(self.method, lambda: None)()

    def _register_hook(self) -> None:
        """Become DDP's communication hook. Auto does this only when it chooses a method other than ``none``:
        until then (and for good, if it chooses ``none``) DDP all-reduces with its own C++ path, so auto costs
        nothing over plain DDP where compression does not pay."""
        if not self._hooked and self._ddp is not None:
            self._ddp.register_comm_hook(self, _comm_hook)
            self._hooked = True

    @property
    def uses_hook(self) -> bool:
        """Whether DDP's gradients go through this controller (False: DDP's own all-reduce, auto before choosing)."""
        return self._hooked

    def _set_method(self, method: str) -> None:
        self.method = method
        self._build_compressor()
        if method != "none":
            self._register_hook()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def attach_model(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        if self.params:
            raise RuntimeError("GradientCompressionPlugin: one model per accelerator/plugin; this one is attached")
        self.module = ddp_model.module
        self._ddp = ddp_model
        self.params = [p for p in ddp_model.module.parameters() if p.requires_grad]
        self._keys = {id(p): i for i, p in enumerate(self.params)}
        self.device = self.params[0].device if self.params else torch.device("cpu")
        if self.plugin.method != "auto":
            self._register_hook()
        if self._outer_steps() and self.plugin.warmup_steps == 0:
            self.diloco.start(self.params)  # DDP has just broadcast rank 0's parameters: the first anchor
        if self._pending_state is not None:  # before auto decides: a restored decision stands
            self._apply_state(self._pending_state)
            self._pending_state = None
        if self.plugin.method == "auto" and "chosen" not in self.auto_info:
            numel = sum(p.numel() for p in self.params)
            self.auto_info["allreduce_ms"] = auto.measure_allreduce_ms(numel, self.device, self.group)
            if self.plugin.auto_compute_ms is not None:
                self._decide(self.plugin.auto_compute_ms)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Follow ``optimizer``'s steps (needed by warm-up, local SGD, DiLoCo and auto's probe)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if any(o is inner for o in self._optimizers):
            return
        self._optimizers.append(inner)
        inner.register_step_post_hook(lambda _opt, _args, _kwargs: self.after_optimizer_step())

    # -- the DDP hook -------------------------------------------------------------------------------------------
    def _outer_steps(self) -> bool:
        """Syncs go through the anchor (DiLoCo, or local SGD averaging low-precision deltas)."""
        return self.method == "diloco" or (self.method == "local_sgd" and self._sync_dtype != torch.float32)

    @property
    def _local_from(self) -> int:
        """The step the local phase starts at: the end of warm-up, or auto's decision."""
        return self.auto_info.get("decided_at_step", self.plugin.warmup_steps)

    def _local_phase(self) -> bool:
        return self.method in FREQUENCY_METHODS and self.step >= self._local_from

    def hook(self, bucket) -> Future:
        try:
            return self._dispatch(bucket)
        finally:
            if bucket.is_last():
                self.round += 1

    def _dispatch(self, bucket) -> Future:
        buffer = bucket.buffer()
        world = self.world_size
        method = self.method
        if method in FREQUENCY_METHODS:
            if not self._optimizers:
                raise RuntimeError(f"method={method!r} follows optimizer steps: prepare the optimizer with the "
                                   "accelerator (or call controller.attach_optimizer(optimizer))")
            if self._local_phase():
                return completed_future(buffer)  # local step: nothing sent
            method = "none"
        if method in ERROR_FEEDBACK_METHODS and self.step < self.plugin.warmup_steps:
            method = "none"
        if method == "none":
            buffer.div_(world)
            return all_reduce_sum(buffer, self.group, self.counter)
        if method in _HALF:
            return lowp.low_precision_allreduce(buffer, _HALF[method], self.group, world, self.counter)
        params = bucket.parameters()
        keys = [self._keys[id(p)] for p in params]
        return self.compressor.run(buffer, keys, params, self.group, world, self.counter, self.scale_fn)

    # -- optimizer steps ----------------------------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        self.step += 1
        p = self.plugin
        if not self._hooked and self._ddp is not None:  # auto, plain DDP so far: its one all-reduce of the step
            self.round += 1
            self.counter.add("all_reduce", *self.params)
        if self.method in FREQUENCY_METHODS and self.step >= self._local_from:
            since = self.step - self._local_from
            if self._outer_steps() and since == 0:
                self.diloco.start(self.params)  # anchor = the (identical) parameters at the end of warm-up
            elif since > 0 and since % self._sync_every == 0:
                if self._outer_steps():
                    self.diloco.outer_step(self.params, self.group, self.world_size, self.counter)
                else:
                    local_sgd.average_parameters(self.params, self.group, self.world_size, self.counter)
        if p.method == "auto" and "chosen" not in self.auto_info:
            self._probe()

    def _probe(self) -> None:
        # the first step this run sees includes start-up costs; time the auto_probe_steps after it (also after a
        # resume from a checkpoint saved before the decision)
        if self._probe_start is None:
            auto.synchronize(self.device)
            self._probe_start = time.perf_counter()
            self._probe_from = self.step
        elif self.step == self._probe_from + self.plugin.auto_probe_steps:
            auto.synchronize(self.device)
            step_ms = (time.perf_counter() - self._probe_start) * 1e3 / self.plugin.auto_probe_steps
            step_ms = auto.max_over_ranks(step_ms, self.device, self.group)
            self.auto_info["probe_step_ms"] = step_ms
            self._decide(max(step_ms - self.auto_info["allreduce_ms"], 0.05 * step_ms))

    def _decide(self, compute_ms: float) -> None:
        p = self.plugin
        method, reason = auto.choose_method(self.auto_info["allreduce_ms"], compute_ms,
                                            hidden_ratio=p.auto_hidden_ratio, bf16_ratio=p.auto_bf16_ratio,
                                            compressed=p.auto_slow_link)
        self.auto_info.update(compute_ms=compute_ms, chosen=method, reason=reason)
        if method == "local_sgd":
            # until now plain DDP kept the ranks identical: the local phase and its anchor start here
            self.auto_info["decided_at_step"] = self.step
            if self.params:
                self.diloco.start(self.params)
        self._set_method(method)
        if dist.get_rank() == 0:
            logger.warning("hf_colossal auto compression: %s (%s)", method, reason)

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        shared = {
            "version": 1, "plugin": self.plugin.to_dict(), "method": self.method, "step": self.step,
            "round": self.round, "world_size": self.world_size, "auto": dict(self.auto_info),
            "diloco": self.diloco.state_dict(), "bytes": self.counter.snapshot(), "local_phase": self._local_phase(),
        }
        if isinstance(self.compressor, PowerSGD):
            shared["powersgd"] = self.compressor.state_dict()
        local = {"rank": dist.get_rank(self.group), "world_size": self.world_size,
                 "error_feedback": self.compressor.ef.state_dict() if self.compressor is not None else {}}
        if self._local_phase():
            # ranks diverge between synchronisations (parameters and the inner optimizer's state), while a
            # checkpoint's model and optimizer files are rank 0's: keep this rank's own copies
            local["params"] = [p.detach().cpu().clone() for p in self.params]
            local["optimizers"] = [o.state_dict() for o in self._optimizers]
        return {"shared": shared, "local": local}

    def save(self, checkpoint_dir: str | os.PathLike) -> None:
        folder = Path(checkpoint_dir) / CHECKPOINT_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        rank = dist.get_rank(self.group)
        if rank == 0:
            torch.save(state["shared"], folder / "shared.pt")
        torch.save(state["local"], folder / f"rank{rank}.pt")

    def load(self, checkpoint_dir: str | os.PathLike) -> bool:
        """Restore from a checkpoint folder; False (and a warning) when it holds no compression state."""
        folder = Path(checkpoint_dir) / CHECKPOINT_FOLDER
        if not (folder / "shared.pt").exists():
            warnings.warn(f"{checkpoint_dir} holds no {CHECKPOINT_FOLDER}/ state: gradient compression starts "
                          "fresh (error feedback zero, counters from 0)", stacklevel=2)
            self.diloco.forget()  # the anchor was taken from the weights the checkpoint replaces
            return False
        shared = torch.load(folder / "shared.pt", map_location="cpu", weights_only=False)
        local_path = folder / f"rank{dist.get_rank(self.group)}.pt"
        local = None
        if shared["world_size"] == self.world_size and local_path.exists():
            local = torch.load(local_path, map_location="cpu", weights_only=False)
        state = {"shared": shared, "local": local}
        if self.params:
            self._apply_state(state)
        else:
            self._pending_state = state  # loaded before prepare: applied when the model is attached
        return True

    def load_state_dict(self, state: dict) -> None:
        self._apply_state(state)

    def _apply_state(self, state: dict) -> None:
        shared, local = state["shared"], state.get("local")
        saved = (shared["plugin"].get("method"), shared["plugin"].get("sync_dtype", "float32"))
        if saved != (self.plugin.method, self.plugin.sync_dtype):
            warnings.warn(f"checkpoint's gradient compression (method, sync_dtype) {saved} differs from "
                          f"{(self.plugin.method, self.plugin.sync_dtype)}: its compression state is not restored",
                          stacklevel=3)
            self.diloco.forget()
            return
        self.step, self.round = shared["step"], shared["round"]
        self.auto_info = dict(shared.get("auto", {}))
        if shared["method"] != self.method:
            self._set_method(shared["method"])
        self.diloco.load_state_dict(shared.get("diloco", {}), self.device)
        if isinstance(self.compressor, PowerSGD) and "powersgd" in shared:
            self.compressor.load_state_dict(shared["powersgd"], self.device)
        if local is not None and "params" in local:
            self._restore_rank_copies(local)
        if self.compressor is not None:
            if local is not None:
                self.compressor.ef.load_state_dict(local["error_feedback"], self.device)
            else:
                warnings.warn(
                    f"resuming gradient compression at world size {self.world_size} from a checkpoint saved at "
                    f"{shared['world_size']}: error-feedback residuals restart from zero (they belong to the old "
                    "data partition); step counters, PowerSGD's Q and DiLoCo's anchor are restored", stacklevel=3)
                self.compressor.ef.residuals = {}
        if local is None and shared.get("local_phase"):
            warnings.warn("resuming local SGD / DiLoCo mid-phase at another world size: every rank restarts from "
                          "rank 0's parameters", stacklevel=3)

    def _restore_rank_copies(self, local: dict) -> None:
        """Put back this rank's parameters and inner-optimizer state — now, and once more just before the next
        forward (``accelerator.load_state`` runs our pre-hook first, then loads rank 0's model and optimizer)."""

        def restore() -> None:
            with torch.no_grad():
                for p, saved in zip(self.params, local["params"]):
                    p.copy_(saved.to(p.device))
            for opt, state in zip(self._optimizers, local.get("optimizers", [])):
                opt.load_state_dict(state)

        restore()
        if self.module is not None:
            handle = None

            def pre_forward(_module, _args):
                restore()
                handle.remove()

            handle = self.module.register_forward_pre_hook(pre_forward)
