"""``GradientCompressionPlugin``: the one config object behind every route (accelerate call, Trainer, recipe, env).

It is a frozen :class:`~hf_colossal.config.OptionsConfig`, validated when built; errors name the valid choices.
The environment variable ``HF_COLOSSAL_COMPRESSION`` holds the same options in ``optim_args`` syntax
(``"method=powersgd,rank=4,warmup_steps=10"``), parsed by :meth:`GradientCompressionPlugin.from_env`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Literal

from ..config import OptionsConfig, OptionsError

ENV_VAR = "HF_COLOSSAL_COMPRESSION"

METHODS = ("none", "bf16", "fp16", "powersgd", "topk", "sign", "local_sgd", "diloco", "auto")
#: methods that change what the gradient hook sends (volume) / how often parameters meet (frequency)
VOLUME_METHODS = ("bf16", "fp16", "powersgd", "topk", "sign")
FREQUENCY_METHODS = ("local_sgd", "diloco")
ERROR_FEEDBACK_METHODS = ("powersgd", "topk", "sign")

Method = Literal["none", "bf16", "fp16", "powersgd", "topk", "sign", "local_sgd", "diloco", "auto"]


def _field(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class GradientCompressionPlugin(OptionsConfig):
    """Gradient compression (volume) or infrequent synchronisation (frequency) for DDP.

    ``method``: none | bf16 | fp16 | powersgd | topk | sign | local_sgd | diloco | auto.
    """

    subject: ClassVar[str] = f"GradientCompressionPlugin ({ENV_VAR} / recipe plugins: gradient_compression)"

    method: Method = _field("auto", "none | bf16 | fp16 | powersgd | topk | sign | local_sgd | diloco | auto")
    rank: int = _field(4, "powersgd: rank of the approximation (Vogels et al. 2019)")
    density: float = _field(0.01, "topk: fraction of each bucket's entries sent (0 < density <= 1)")
    error_feedback: bool = _field(True, "powersgd / topk / sign: carry the compression error to the next step")
    warmup_steps: int = _field(0, "optimizer steps of plain all-reduce before compressing / going local "
                                  "(post-local SGD's warm-up)")
    sync_every: int = _field(8, "local_sgd: average parameters every H steps; diloco: inner steps H")
    outer_lr: float = _field(0.7, "diloco: outer learning rate (Douillard et al. 2023: 0.7)")
    outer_momentum: float = _field(0.9, "diloco: outer Nesterov momentum (0.9)")
    outer_nesterov: bool = _field(True, "diloco: Nesterov outer momentum (false: heavy ball)")
    sync_dtype: Literal["float32", "bfloat16"] = _field(
        "float32", "local_sgd / diloco: dtype of what is averaged at a sync; bfloat16 sends the change since the "
                   "last sync (an fp32 anchor per parameter) in half the bytes, so sync_every can halve at the "
                   "same traffic")
    seed: int = _field(0, "powersgd: seed of the initial Q (the same on every rank)")
    auto_compute_ms: float | None = _field(None, "auto: compute time of one step without communication, in ms "
                                                 "(default: measured over the first auto_probe_steps steps)")
    auto_probe_steps: int = _field(3, "auto: plain-DDP steps timed to estimate the compute time")
    auto_hidden_ratio: float = _field(0.5, "auto: choose none when all-reduce <= this x compute")
    auto_bf16_ratio: float = _field(1.5, "auto: choose bf16 when all-reduce <= this x compute, else "
                                         "auto_slow_link")
    auto_slow_link: Literal["local_sgd", "powersgd"] = _field(
        "local_sgd", "auto: what a link-bound run gets: local_sgd (from the decision on, average bf16 deltas every "
                     "auto_sync_every steps) or powersgd (rank `rank`)")
    auto_sync_every: int = _field(4, "auto: sync_every of the local SGD it chooses for a link-bound run")

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if not 0 < self.density <= 1:
            problems.append(f"density must be in (0, 1], got {self.density}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.sync_every < 1:
            problems.append(f"sync_every must be >= 1, got {self.sync_every}")
        if self.outer_lr <= 0:
            problems.append(f"outer_lr must be > 0, got {self.outer_lr}")
        if not 0 <= self.outer_momentum < 1:
            problems.append(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.sync_dtype != "float32" and self.method not in FREQUENCY_METHODS:
            problems.append(f"sync_dtype applies to {' / '.join(FREQUENCY_METHODS)} only (method={self.method!r}); "
                            "for compressed gradients use method=bf16")
        if self.auto_compute_ms is not None and self.auto_compute_ms <= 0:
            problems.append(f"auto_compute_ms must be > 0, got {self.auto_compute_ms}")
        if self.auto_sync_every < 1:
            problems.append(f"auto_sync_every must be >= 1, got {self.auto_sync_every}")
        if self.auto_probe_steps < 1:
            problems.append(f"auto_probe_steps must be >= 1, got {self.auto_probe_steps}")
        if not 0 <= self.auto_hidden_ratio <= self.auto_bf16_ratio:
            problems.append("need 0 <= auto_hidden_ratio <= auto_bf16_ratio")
        if problems:
            raise OptionsError(f"{self.subject}: " + "; ".join(problems) + ".\n" + self.describe())

    @classmethod
    def from_string(cls, text: str) -> "GradientCompressionPlugin":
        """``"method=powersgd,rank=4"``; a bare method name (``"powersgd"``) is accepted too."""
        text = (text or "").strip()
        if text and "=" not in text:
            text = f"method={text}"
        if "method=" in text:
            method = text.split("method=", 1)[1].split(",", 1)[0].strip()
            if method not in METHODS:
                raise OptionsError(f"{cls.subject}: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
        return cls.from_optim_args(text)  # type: ignore[return-value]

    @classmethod
    def from_env(cls, environ=None) -> "GradientCompressionPlugin | None":
        """The plugin described by ``HF_COLOSSAL_COMPRESSION``, or None when unset/empty."""
        text = (environ if environ is not None else os.environ).get(ENV_VAR, "").strip()
        return cls.from_string(text) if text else None
