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
# optim_args keys that TrainingArguments sets through its own flags (named in the error)
_TRAINER_FLAGS: dict[str, str] = {"lr": _LR, "learning_rate": _LR, "weight_decay": _WD}
_ADAM_FLAGS: dict[str, str] = {
    "betas": "--adam_beta1/--adam_beta2", "beta1": "--adam_beta1", "beta2": "--adam_beta2", "eps": "--adam_epsilon",
}
_MASTER_WEIGHTS_HELP = "fp32 master copies of bf16/fp16 params in the optimizer state (+4 B/param)"


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
    reserved_keys: ClassVar[dict[str, str]] = {**_TRAINER_FLAGS, **_ADAM_FLAGS}

    bias_correction: bool = _opt(True, "Adam bias correction of the moments (LAMB paper: on)")
    decoupled_weight_decay: bool = _opt(True, "add wd*x to the update (paper) instead of to the gradient (L2)")
    max_trust_ratio: float | None = _opt(None, "clip the trust ratio from above (LAMBC); none = no clip")
    always_adapt: bool = _opt(False, "apply the trust ratio to every group, ignoring no_adapt")
    grad_pre_normalization: bool = _opt(False, "divide all grads by max(1, global_norm/max) first (NVLAMB)")
    pre_normalization_max_norm: float = _opt(1.0, "the max global grad norm of grad_pre_normalization")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")
    master_weights: bool = _opt(False, _MASTER_WEIGHTS_HELP)
    fused: bool | None = _opt(None, "Triton kernels on CUDA (none = when possible, true = required, false = foreach)")


@dataclasses.dataclass(frozen=True)
class LarsConfig(OptimizerConfig):
    """``optim_args`` for ``optim="lars"`` (You, Gitman, Ginsburg 2017; LARC clipping)."""

    subject: ClassVar[str] = 'optim="lars"'
    reserved_keys: ClassVar[dict[str, str]] = dict(_TRAINER_FLAGS)

    momentum: float = _opt(0.9, "momentum coefficient")
    dampening: float = _opt(0.0, "dampening of the momentum buffer (torch SGD semantics)")
    nesterov: bool = _opt(False, "Nesterov momentum")
    trust_coefficient: float = _opt(0.001, "eta in the local LR eta*||w||/(||g||+wd*||w||+eps)")
    eps: float = _opt(1e-8, "added to the trust-ratio denominator")
    trust_clip: bool = _opt(False, "LARC clipping: local LR = min(local/lr, 1)")
    always_adapt: bool = _opt(False, "apply the trust ratio to every group, ignoring no_adapt")
    lr_in_momentum: bool = _opt(False, "paper placement: lr inside the momentum buffer (else torch-SGD form)")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")
    master_weights: bool = _opt(False, _MASTER_WEIGHTS_HELP)
    fused: bool | None = _opt(None, "Triton kernels on CUDA (none = when possible, true = required, false = foreach)")


@dataclasses.dataclass(frozen=True)
class KfacConfig(OptimizerConfig):
    """``optim_args`` for ``optim="kfac"`` (Martens & Grosse 2015; KAISA, Pauloski et al. 2021)."""

    subject: ClassVar[str] = 'optim="kfac"'
    reserved_keys: ClassVar[dict[str, str]] = {**_TRAINER_FLAGS, **_ADAM_FLAGS}

    base_rule: Literal["adam_graft", "adam", "sgd"] = _opt(
        "adam_graft", "step after preconditioning: momentum grafted to Adam's norm, Adam, or SGD momentum"
    )
    momentum: float = _opt(0.9, "momentum of base_rule=sgd")
    method: Literal["inverse", "eigen"] = _opt("inverse", "damped factor inverses (batched Cholesky) or eigh")
    damping: float = _opt(1e-3, "Tikhonov damping lambda; each factor gets sqrt(lambda) (times pi or 1/pi)")
    damping_scale: Literal["absolute", "relative"] = _opt(
        "absolute", "damping as given, or relative to each layer's mean eigenvalue of A x G"
    )
    damping_adaptation: Literal["none", "levenberg_marquardt"] = _opt(
        "none", "fixed damping, or Levenberg-Marquardt from the loss of the last batch replayed (M&G 6.5)"
    )
    adaptation_interval: int = _opt(5, "steps between damping adaptations (2 extra forwards each)")
    min_damping: float = _opt(1e-8, "floor of the adapted damping")
    pi_damping: bool = _opt(True, "split the damping between the factors by their traces (Martens & Grosse 6.3)")
    factor_decay: float = _opt(0.95, "moving-average decay of the factors")
    factor_interval: int = _opt(10, "steps between factor updates (statistics taken only before those)")
    inverse_interval: int = _opt(10, "steps between inverse / eigendecomposition updates")
    kl_clip: float | None = _opt(
        1e-3, "bound on lr^2 * <preconditioned grad, grad> (none = off); bounds the step with base_rule=sgd, "
        "with adam_graft it weights the new direction against the momentum"
    )
    linear_approximation: Literal["expand", "reduce"] = _opt(
        "expand", "Linear/Conv1D over a sequence: K-FAC-expand or K-FAC-reduce (Eschenhagen et al. 2023)"
    )
    conv2d_approximation: Literal["expand", "reduce"] = _opt("expand", "Conv2d over positions: expand (KFC) or reduce")
    embedding: Literal["diagonal", "skip"] = _opt("diagonal", "nn.Embedding: diagonal input factor, or base rule")
    skip_layers: tuple[str, ...] = _opt(("lm_head",), "module-name regexes left to the base rule")
    max_factor_dim: int = _opt(8192, "layers with a larger factor use the base rule (vocab x vocab is infeasible)")
    matmul_precision: Literal["high", "highest"] = _opt("high", "TF32 (high) or fp32 (highest) K-FAC matmuls on CUDA")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")


@dataclasses.dataclass(frozen=True)
class ShampooConfig(OptimizerConfig):
    """``optim_args`` for ``optim="shampoo"`` (Gupta et al. 2018; Anil et al. 2020; Shi et al. 2023).

    ``--adam_beta1`` is the first moment (filtered gradient), ``--adam_beta2`` and ``--adam_epsilon`` the Adam
    grafting's second moment and epsilon. ``no_adapt`` has no effect (there is no trust ratio).
    """

    subject: ClassVar[str] = 'optim="shampoo"'
    reserved_keys: ClassVar[dict[str, str]] = {**_TRAINER_FLAGS, **_ADAM_FLAGS}

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
    preconditioner_dtype: Literal["float32", "float64"] = _opt("float32", "dtype of factors, root computations, roots")
    matmul_dtype: Literal["tfloat32", "float32", "bfloat16"] = _opt(
        "tfloat32", "precision of the per-step products (TF32 on CUDA, true fp32, or bf16 inputs); roots stay fp32"
    )
    root_inverse: Literal["qr", "newton", "eigh"] = _opt(
        "qr", "inverse roots: warm-started QR eigenbasis refresh, coupled Newton (matmuls) or full eigh"
    )
    newton_iterations: int = _opt(20, "fixed iteration count of root_inverse=newton")
    stagger_recompute: bool = _opt(True, "spread the root recomputations over the frequency's steps")
    overlap_recompute: bool = _opt(
        True, "use recomputed roots from the next step; on CUDA computed on a side stream behind forward/backward "
        "(not with root_inverse=eigh)"
    )
    graph_recompute: bool = _opt(False, "on CUDA, replay the qr/newton recomputation batches as CUDA graphs")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")


@dataclasses.dataclass(frozen=True)
class SoapConfig(OptimizerConfig):
    """``optim_args`` for ``optim="soap"`` (Vyas et al. 2024): Adam (``--adam_beta1/2``, ``--adam_epsilon``) in
    the eigenbasis of Shampoo's factors; weight decay decoupled. ``no_adapt`` has no effect."""

    subject: ClassVar[str] = 'optim="soap"'
    reserved_keys: ClassVar[dict[str, str]] = {**_TRAINER_FLAGS, **_ADAM_FLAGS}

    max_preconditioner_dim: int = _opt(1024, "largest block side; also the merge threshold of small dimensions")
    precondition_frequency: int = _opt(10, "steps between eigenbasis refreshes of a block")
    shampoo_beta: float = _opt(0.95, "EMA coefficient of the Kronecker factors")
    eigenbasis_update: Literal["qr", "eigh"] = _opt("qr", "refresh by one power-iteration + QR step, or full eigh")
    preconditioner_dtype: Literal["float32", "float64"] = _opt("float32", "dtype of factors, eigh/QR and bases")
    matmul_dtype: Literal["tfloat32", "float32", "bfloat16"] = _opt(
        "tfloat32", "precision of the factor products (TF32 on CUDA, fp32, bf16)"
    )
    rotation_dtype: Literal["float32", "tfloat32", "bfloat16"] = _opt(
        "float32", "precision of the rotations into/out of the eigenbasis (tfloat32: ~5x faster, noisier)"
    )
    stagger_recompute: bool = _opt(True, "spread the eigenbasis refreshes over the frequency's steps")
    overlap_recompute: bool = _opt(
        True, "use refreshed eigenbases from the next step; on CUDA refreshed on a side stream behind "
        "forward/backward (not with eigenbasis_update=eigh)"
    )
    graph_recompute: bool = _opt(False, "on CUDA, replay the qr refresh batches as CUDA graphs")
    nonfinite: Literal["skip", "error", "apply"] = _opt("skip", "on inf/NaN grads: skip the step, raise, or apply")


@dataclasses.dataclass(frozen=True)
class HessianFreeConfig(OptimizerConfig):
    """``optim_args`` for ``optim="hessian_free"`` (Martens 2010; Martens & Sutskever 2012 Sec. 8.8).

    There is no learning rate: ``--learning_rate`` (and the scheduler) is accepted and **unused**; the step length
    comes from the damping and the line search. ``--weight_decay`` is an L2 term of the objective (exact in the
    quadratic model). ``no_adapt`` has no effect. Needs ``HessianFreeTrainer`` (or ``HessianFreeTrainerMixin``).
    """

    subject: ClassVar[str] = 'optim="hessian_free"'
    reserved_keys: ClassVar[dict[str, str]] = dict(_TRAINER_FLAGS)

    damping: float = _opt(1.0, "initial Levenberg-Marquardt lambda (adapted: x3/2 if rho<1/4, x2/3 if rho>3/4)")
    damping_increase: float = _opt(1.5, "damping factor when rho < 1/4 (Martens 2010 Sec. 4.1)")
    damping_decrease: float = _opt(2.0 / 3.0, "damping factor when rho > 3/4")
    min_damping: float = _opt(1e-6, "lower bound of the damping")
    max_damping: float = _opt(1e6, "upper bound of the damping")
    cg_max_iters: int = _opt(250, "most CG iterations per step")
    cg_tolerance: float = _opt(5e-4, "epsilon of Martens' relative-progress CG stopping rule (Sec. 4.4)")
    cg_decay: float = _opt(0.95, "CG starts from this times the previous solution (Sec. 4.5; 0 = from zero)")
    backtrack_gamma: float = _opt(1.3, "CG iterates kept at ceil(gamma^j) for backtracking (Sec. 4.6)")
    curvature_batch_fraction: float = _opt(1.0, "curvature mini-batch as a fraction of the gradient batch (Sec. 4.3)")
    preconditioner: Literal["martens", "none"] = _opt("martens", "diag(mean per-example grad^2)+lambda)^0.75 or none")
    preconditioner_exponent: float = _opt(0.75, "exponent xi of the preconditioner (Sec. 4.7)")
    per_example_chunk: int = _opt(256, "examples per vmap chunk of the preconditioner's per-example gradients")
    jvp_mode: Literal["auto", "reverse_over_reverse", "forward"] = _opt(
        "auto", "Jv of the Gauss-Newton products: reverse-over-reverse where the model's backward is differentiable "
        "(checked at the first product), or forward mode"
    )
    line_search: bool = _opt(True, "Armijo backtracking line search on the CG step")
    armijo_c: float = _opt(1e-2, "sufficient-decrease constant of the line search")
    line_search_shrink: float = _opt(0.8, "step shrink factor of the line search")
    line_search_max_trials: int = _opt(20, "line-search trials before the step is rejected")
    nonfinite_damping_factor: float = _opt(10.0, "damping factor after a step with non-finite loss/direction")
    loss: Literal["auto", "cross_entropy", "mse", "sigmoid_bce"] = _opt(
        "auto", "loss of the model's logits/outputs (auto: from the model's config or hessian_free_loss)"
    )
