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


@dataclasses.dataclass(frozen=True)
class KfacConfig(OptimizerConfig):
    """``optim_args`` for ``optim="kfac"`` (Martens & Grosse 2015; KAISA, Pauloski et al. 2021)."""

    subject: ClassVar[str] = 'optim="kfac"'
    reserved_keys: ClassVar[dict[str, str]] = {
        "lr": _LR, "learning_rate": _LR, "weight_decay": _WD,
        "betas": "--adam_beta1/--adam_beta2", "beta1": "--adam_beta1", "beta2": "--adam_beta2",
        "eps": "--adam_epsilon",
    }

    base_rule: Literal["adam_graft", "adam", "sgd"] = _opt(
        "adam_graft", "step after preconditioning: momentum grafted to Adam's norm, Adam, or SGD momentum"
    )
    momentum: float = _opt(0.9, "momentum of base_rule=sgd")
    method: Literal["inverse", "eigen"] = _opt("inverse", "damped factor inverses (batched inv) or eigh")
    damping: float = _opt(1e-3, "Tikhonov damping lambda; each factor gets sqrt(lambda) (times pi or 1/pi)")
    pi_damping: bool = _opt(True, "split the damping between the factors by their traces (Martens & Grosse 6.3)")
    factor_decay: float = _opt(0.95, "moving-average decay of the factors")
    factor_interval: int = _opt(10, "steps between factor updates (statistics taken only before those)")
    inverse_interval: int = _opt(10, "steps between inverse / eigendecomposition updates")
    kl_clip: float | None = _opt(1e-3, "bound on lr^2 * <preconditioned grad, grad> (none = off)")
    linear_approximation: Literal["expand", "reduce"] = _opt(
        "expand", "Linear/Conv1D over a sequence: K-FAC-expand or K-FAC-reduce (Eschenhagen et al. 2023)"
    )
    conv2d_approximation: Literal["expand", "reduce"] = _opt("expand", "Conv2d over positions: expand (KFC) or reduce")
    embedding: Literal["diagonal", "skip"] = _opt("diagonal", "nn.Embedding: diagonal input factor, or base rule")
    skip_layers: tuple[str, ...] = _opt(("lm_head",), "module-name regexes left to the base rule")
    max_factor_dim: int = _opt(8192, "layers with a larger factor use the base rule (vocab x vocab is infeasible)")
    matmul_precision: Literal["high", "highest"] = _opt("high", "TF32 (high) or fp32 (highest) K-FAC matmuls on CUDA")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")


_ADAM_FLAGS: dict[str, str] = {
    "betas": "--adam_beta1/--adam_beta2", "beta1": "--adam_beta1", "beta2": "--adam_beta2", "eps": "--adam_epsilon",
}


@dataclasses.dataclass(frozen=True)
class ShampooConfig(OptimizerConfig):
    """``optim_args`` for ``optim="shampoo"`` (Gupta et al. 2018; Anil et al. 2020; Shi et al. 2023).

    ``--adam_beta1`` is the first moment (filtered gradient), ``--adam_beta2`` and ``--adam_epsilon`` the Adam
    grafting's second moment and epsilon. ``no_adapt`` has no effect (there is no trust ratio).
    """

    subject: ClassVar[str] = 'optim="shampoo"'
    reserved_keys: ClassVar[dict[str, str]] = {"lr": _LR, "learning_rate": _LR, "weight_decay": _WD, **_ADAM_FLAGS}

    max_preconditioner_dim: int = _opt(1024, "largest block side; also the merge threshold of small dimensions")
    precondition_frequency: int = _opt(10, "steps between recomputations of a block's inverse roots")
    start_preconditioning_step: int | None = _opt(
        None, "first step using the roots (grafting only before); none = precondition_frequency"
    )
    shampoo_beta: float = _opt(1.0, "EMA coefficient of the Kronecker factors (1.0 = sum, as AdaGrad)")
    preconditioner_eps: float = _opt(1e-12, "epsilon added to the factors' eigenvalues before the inverse root")
    grafting: Literal["adam", "adagrad", "rmsprop", "sgd", "none"] = _opt("adam", "per-block norm of the update from")
    decoupled_weight_decay: bool = _opt(True, "AdamW-style decay (true) or L2 added to the gradient (false)")
    exponent_override: int | None = _opt(None, "root p of the factors' X^(-1/p); none = 4 (2 x matrix order)")
    preconditioner_dtype: Literal["float32", "float64"] = _opt("float32", "dtype of factors, eigh and roots")
    matmul_dtype: Literal["float32", "bfloat16"] = _opt("float32", "input dtype of the per-step matrix products")
    stagger_recompute: bool = _opt(True, "spread the root recomputations over the frequency's steps")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")


@dataclasses.dataclass(frozen=True)
class SoapConfig(OptimizerConfig):
    """``optim_args`` for ``optim="soap"`` (Vyas et al. 2024): Adam (``--adam_beta1/2``, ``--adam_epsilon``) in
    the eigenbasis of Shampoo's factors; weight decay decoupled. ``no_adapt`` has no effect."""

    subject: ClassVar[str] = 'optim="soap"'
    reserved_keys: ClassVar[dict[str, str]] = {"lr": _LR, "learning_rate": _LR, "weight_decay": _WD, **_ADAM_FLAGS}

    max_preconditioner_dim: int = _opt(1024, "largest block side; also the merge threshold of small dimensions")
    precondition_frequency: int = _opt(10, "steps between eigenbasis refreshes of a block")
    shampoo_beta: float = _opt(0.95, "EMA coefficient of the Kronecker factors")
    eigenbasis_update: Literal["qr", "eigh"] = _opt("qr", "refresh by one power-iteration + QR step, or full eigh")
    preconditioner_dtype: Literal["float32", "float64"] = _opt("float32", "dtype of factors, eigh/QR and bases")
    matmul_dtype: Literal["float32", "bfloat16"] = _opt("float32", "input dtype of the factor products (rotations: fp32)")
    stagger_recompute: bool = _opt(True, "spread the eigenbasis refreshes over the frequency's steps")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")
