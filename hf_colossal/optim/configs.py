"""``optim_args`` of each optimizer as a frozen, validated dataclass (one per optimizer).

Hyperparameters that TrainingArguments already owns (learning rate, weight decay, Adam betas and epsilon) are
not options here: they come from ``--learning_rate``, ``--weight_decay``, ``--adam_beta1/2`` and
``--adam_epsilon`` and putting them in ``optim_args`` is an error that names the flag to use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from ..config import OptionsConfig, OptionsError
from ..params import ParamGroupPolicy

_LR = "--learning_rate"
_WD = "--weight_decay"


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(OptionsConfig):
    """Options every grouped optimizer shares: the parameter-group policy."""

    no_decay: tuple[str, ...] = _opt(
        ("bias", "norm"), "params without weight decay: categories bias|norm|embedding or name regexes"
    )
    no_adapt: tuple[str, ...] = _opt(
        ("bias", "norm"), "params without trust-ratio adaptation: categories or name regexes"
    )

    def policy(self) -> ParamGroupPolicy:
        return ParamGroupPolicy(no_decay=self.no_decay, no_adapt=self.no_adapt)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The options the optimizer constructor takes (everything but the grouping policy)."""
        policy_fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in policy_fields}

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.policy()
        except ValueError as err:
            raise OptionsError(f"{self.subject}: {err}\n{self.describe()}") from None


@dataclasses.dataclass(frozen=True)
class LambConfig(OptimizerConfig):
    """``optim_args`` for ``optim="lamb"`` (You et al. 2019, Algorithm 2)."""

    subject: ClassVar[str] = 'optim="lamb"'
    reserved_keys: ClassVar[dict[str, str]] = {
        "lr": _LR, "learning_rate": _LR, "weight_decay": _WD,
        "betas": "--adam_beta1/--adam_beta2", "beta1": "--adam_beta1", "beta2": "--adam_beta2",
        "eps": "--adam_epsilon",
    }

    bias_correction: bool = _opt(True, "Adam bias correction of the moments (LAMB paper: on)")
    decoupled_weight_decay: bool = _opt(True, "add wd*x to the update (paper) instead of to the gradient (L2)")
    max_trust_ratio: float | None = _opt(None, "clip the trust ratio from above (LAMBC); none = no clip")
    always_adapt: bool = _opt(False, "apply the trust ratio to every group, ignoring no_adapt")
    grad_pre_normalization: bool = _opt(False, "divide all grads by max(1, global_norm/max) first (NVLAMB)")
    pre_normalization_max_norm: float = _opt(1.0, "the max global grad norm of grad_pre_normalization")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")
    fused: bool | None = _opt(None, "Triton kernels on CUDA (none = when possible, true = required, false = foreach)")


@dataclasses.dataclass(frozen=True)
class LarsConfig(OptimizerConfig):
    """``optim_args`` for ``optim="lars"`` (You, Gitman, Ginsburg 2017; LARC clipping)."""

    subject: ClassVar[str] = 'optim="lars"'
    reserved_keys: ClassVar[dict[str, str]] = {"lr": _LR, "learning_rate": _LR, "weight_decay": _WD}

    momentum: float = _opt(0.9, "momentum coefficient")
    dampening: float = _opt(0.0, "dampening of the momentum buffer (torch SGD semantics)")
    nesterov: bool = _opt(False, "Nesterov momentum")
    trust_coefficient: float = _opt(0.001, "eta in the local LR eta*||w||/(||g||+wd*||w||+eps)")
    eps: float = _opt(1e-8, "added to the trust-ratio denominator")
    trust_clip: bool = _opt(False, "LARC clipping: local LR = min(local/lr, 1)")
    always_adapt: bool = _opt(False, "apply the trust ratio to every group, ignoring no_adapt")
    lr_in_momentum: bool = _opt(False, "paper placement: lr inside the momentum buffer (else torch-SGD form)")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")
    fused: bool | None = _opt(None, "Triton kernels on CUDA (none = when possible, true = required, false = foreach)")
