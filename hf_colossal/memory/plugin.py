"""``HeterogeneousMemoryPlugin``: FSDP2 sharding plus GPU / CPU placement of master weights and optimizer state.

The one config object behind every route (accelerate script, Trainer mixin, recipe ``plugins:
heterogeneous_memory``). A frozen :class:`~hf_colossal.config.OptionsConfig`: validated when built, and errors
list every valid key.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from ..config import OptionsConfig, OptionsError

#: base optimizers the heterogeneous optimizer can run on both devices (name -> optimizer states per parameter)
BASE_OPTIMIZERS = {"adamw": 2, "lamb": 2}


def _field(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class HeterogeneousMemoryPlugin(OptionsConfig):
    """Gemini-style heterogeneous memory on FSDP2 (Colossal-AI's Gemini; ZeRO-Offload, Ren et al. 2021).

    Parameters are bf16 (or fp16, or fp32) FSDP2 shards on the GPU; each unit's fp32 master weights and optimizer
    state live on the GPU or in pinned CPU memory; offloaded units are stepped on the CPU while the GPU runs on.
    fp16 parameters need dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2):
    torch's ``ShardedGradScaler``, which unscales fp16 gradients and agrees on inf/NaN across ranks; the accelerate
    and Trainer routes install it (see :meth:`check_mixed_precision`).
    """

    subject: ClassVar[str] = "HeterogeneousMemoryPlugin (recipe plugins: heterogeneous_memory)"

    param_dtype: Literal["bfloat16", "float16", "float32"] = _field(
        "bfloat16", "dtype of the sharded parameters the model computes with (float16: with fp16 mixed precision and "
                    "loss scaling; float32: fp32 training with only the "
                    "optimizer state and master copy placed; no low-precision copy)")
    placement: Literal["auto", "static"] = _field(
        "auto", "auto: size the GPU-resident share from the first step's measured activation peak; static: use "
                "offload_optim_frac")
    offload_optim_frac: float = _field(1.0, "static: fraction of the blocks' parameters whose fp32 master and "
                                            "optimizer state live on the CPU (the last blocks first)")
    auto_margin_gib: float = _field(2.0, "auto: GiB of device memory left free besides the measured peak")
    device_memory_gib: float | None = _field(None, "device capacity to plan for (default: the GPU's total memory)")
    unit_classes: tuple[str, ...] = _field((), "module class names sharded as units (default: the model's "
                                                "_no_split_modules)")
    reshard_after_forward: bool = _field(True, "FSDP2: free gathered parameters after forward (world size > 1: "
                                               "False trades memory for one all-gather less)")
    overlap: bool = _field(True, "run offloaded units' optimizer steps in a background thread, joined before each "
                                 "unit's next forward (False: inline, for debugging)")
    cpu_threads: int | None = _field(None, "intra-op threads of the CPU optimizer step (default: this process's "
                                           "share of the cores, LOCAL_WORLD_SIZE processes per host, less one left "
                                           "to the thread that launches GPU work)")
    pin_memory: bool = _field(True, "pin host buffers (needed for asynchronous copies; ignored without CUDA)")

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if not 0.0 <= self.offload_optim_frac <= 1.0:
            problems.append(f"offload_optim_frac must be in [0, 1], got {self.offload_optim_frac}")
        if self.auto_margin_gib < 0:
            problems.append(f"auto_margin_gib must be >= 0, got {self.auto_margin_gib}")
        if self.device_memory_gib is not None and self.device_memory_gib <= 0:
            problems.append(f"device_memory_gib must be > 0, got {self.device_memory_gib}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            problems.append(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.placement == "auto" and self.offload_optim_frac != 1.0:
            problems.append("offload_optim_frac applies to placement='static' only")
        if problems:
            raise OptionsError(f"{self.subject}: " + "; ".join(problems) + ".\n" + self.describe())

    def check_mixed_precision(self, mixed_precision: str) -> None:
        """Refuse a mixed-precision mode (accelerate's ``"no" | "bf16" | "fp16"``, Trainer's ``--bf16`` / ``--fp16``)
        that does not go with ``param_dtype``: fp16 parameters need fp16 mixed precision (its loss scaling keeps
        their gradients from underflowing), and fp16 mixed precision needs fp16 or fp32 parameters (bf16 weights
        would be cast to fp16 for every product)."""
        if self.param_dtype == "float16" and mixed_precision != "fp16":
            raise ValueError(f"HeterogeneousMemoryPlugin(param_dtype='float16') needs fp16 mixed precision for its "
                             f"loss scaling (accelerate mixed_precision='fp16', Trainer --fp16); got "
                             f"{mixed_precision!r}. Use param_dtype='bfloat16' with bf16 or no mixed precision.")
        if mixed_precision == "fp16" and self.param_dtype == "bfloat16":
            raise ValueError("fp16 mixed precision with HeterogeneousMemoryPlugin(param_dtype='bfloat16') would cast "
                             "the bf16 weights to fp16 for every product: use param_dtype='float16' (fp16 weights, "
                             "fp32 masters) or 'float32', or bf16 mixed precision.")

    def check_loss_scaler(self, scaler: object) -> None:
        """Refuse fp16 parameters without a loss scaler (accelerate builds none without a GPU: fp16 mixed precision
        on the CPU has neither autocast nor a ``GradScaler``)."""
        if self.param_dtype == "float16" and scaler is None:
            raise ValueError("HeterogeneousMemoryPlugin(param_dtype='float16') needs a loss scaler, and this "
                             "accelerator has none (fp16 mixed precision without a GPU has no GradScaler): use "
                             "param_dtype='float32' or 'bfloat16' on the CPU.")
