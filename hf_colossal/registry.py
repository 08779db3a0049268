"""The optimizer registry: the single source of every optimizer name hf_colossal adds.

Each :class:`OptimizerSpec` records the name a user types (``optim="lamb"``), the optimizer class, the
dataclass of its ``optim_args``, which TrainingArguments hyperparameters it takes, and what it works with.
The transformers integration, the CLI table, the error messages and the docs all read from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import OptionsError
from .optim import Kfac, Lamb, Lars, Shampoo, Soap
from .optim.configs import KfacConfig, LambConfig, LarsConfig, OptimizerConfig, ShampooConfig, SoapConfig
from .optim.configs import HessianFreeConfig
from .optim.hessian_free import HessianFree

@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What an optimizer works with. ``limits`` says why, where something is not supported."""

    needs_model: bool = False
    #: works under fp16 with a GradScaler (``--fp16``): what it reads from the backward pass is unscaled by then
    fp16_loss_scaling: bool = True
    ddp: bool = True
    fsdp2: bool = False
    deepspeed: bool = False
    cpu: bool = True
    limits: str = ""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer."""

    name: str
    optimizer_cls: type[torch.optim.Optimizer]
    config_cls: type[OptimizerConfig]
    hyperparameters: tuple[str, ...]
    capabilities: Capabilities
    summary: str
    reference: str

    def parse_options(self, options: str | dict[str, Any] | OptimizerConfig | None = None) -> OptimizerConfig:
        """``optim_args`` as a string (``"a=1,b=2"``), a dict of strings or typed values, or a config."""
        if isinstance(options, self.config_cls):
            return options
        if options is None or isinstance(options, str):
            return self.config_cls.from_optim_args(options)
        if isinstance(options, dict):
            if all(isinstance(v, str) for v in options.values()):
                return self.config_cls.from_strings(options)
            return self.config_cls.from_mapping(options)
        raise TypeError(f"{self.config_cls.subject}: options must be a str, dict or {self.config_cls.__name__}")

    def build(
        self,
        params_or_model: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        options: str | dict[str, Any] | OptimizerConfig | None = None,
    ) -> torch.optim.Optimizer:
        """Construct the optimizer. A model is grouped by the config's policy; tensors or groups pass as given.

        An optimizer whose capabilities say ``needs_model`` (K-FAC hooks the model's layers) must get the model.
        """
        config = self.parse_options(options)
        given = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        kwargs = {k: given[k] for k in self.hyperparameters if given[k] is not None}
        kwargs.update(config.optimizer_kwargs())
        if self.capabilities.needs_model:
            if not isinstance(params_or_model, nn.Module):
                raise TypeError(f"optimizer {self.name!r} needs the model (an nn.Module), not parameters")
            kwargs["model"] = params_or_model
        if isinstance(params_or_model, nn.Module):
            params: Any = config.policy().groups(params_or_model, weight_decay)
        else:
            params = list(params_or_model)
        return self.optimizer_cls(params, **kwargs)

    def validate(self, config: OptimizerConfig, **hyperparameters: Any) -> None:
        """Raise :class:`OptionsError` now if the constructor would refuse these values later.

        Builds the optimizer over a 1-element CPU tensor: that checks every value, but not what depends on the
        real parameters' devices (``fused=True`` needs CUDA tensors), which the real construction checks.
        """
        probe = nn.Linear(1, 1) if self.capabilities.needs_model else [torch.zeros(1, requires_grad=True)]
        try:
            self.build(probe, options=config, **hyperparameters)
        except ValueError as err:
            raise OptionsError(f"{self.config_cls.subject}: {err}\n{self.config_cls.describe()}") from None
        except RuntimeError:
            pass  # a device requirement of the dummy tensor, not a bad value


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def optimizer_names() -> list[str]:
    return sorted(_REGISTRY)


def get_optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return _REGISTRY[str(name)]
    except KeyError:
        raise ValueError(f"unknown hf_colossal optimizer {name!r}; valid names: {', '.join(optimizer_names())}") from None


def find_optimizer_spec(name: Any) -> OptimizerSpec | None:
    """The spec for ``name`` (str or a transformers OptimizerNames member), or None if it is not ours."""
    return _REGISTRY.get(getattr(name, "value", name))


def build_optimizer(name: str, params_or_model: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """``build_optimizer("lamb", model, lr=1e-3, weight_decay=0.01, options="max_trust_ratio=10")``."""
    return get_optimizer_spec(name).build(params_or_model, **kwargs)


def format_optimizer_table() -> str:
    """A plain-text table of the registered optimizers and their capabilities."""
    yes_no = {True: "yes", False: "no"}
    header = ("name", "summary", "DDP", "FSDP2", "DeepSpeed", "CPU", "needs model", "reference")
    rows = [header] + [
        (
            s.name, s.summary, yes_no[s.capabilities.ddp], yes_no[s.capabilities.fsdp2],
            yes_no[s.capabilities.deepspeed], yes_no[s.capabilities.cpu], yes_no[s.capabilities.needs_model],
            s.reference,
        )
        for s in (_REGISTRY[n] for n in optimizer_names())
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{s.name}: {s.capabilities.limits}" for s in _REGISTRY.values() if s.capabilities.limits]
    if notes:
        lines += ["", "Limits:"] + [f"  {n}" for n in notes]
    lines += ["", "Options: `hf-colossal optimizers NAME` lists a name's optim_args keys."]
    return "\n".join(lines)


def list_optimizers(verbose: bool = True) -> list[OptimizerSpec]:
    """Print the table (unless ``verbose=False``) and return the specs, sorted by name."""
    if verbose:
        print(format_optimizer_table())
    return [_REGISTRY[n] for n in optimizer_names()]


_PER_TENSOR_NORMS = (
    "DeepSpeed ZeRO and FSDP1 hand the optimizer flat partitions, which breaks per-tensor trust ratios. Under "
    "FSDP2 (DTensor shards) the trust ratio uses whole-parameter norms, one all-reduce per step (foreach path)."
)

register(
    OptimizerSpec(
        name="lamb",
        optimizer_cls=Lamb,
        config_cls=LambConfig,
        hyperparameters=("lr", "weight_decay", "betas", "eps"),
        capabilities=Capabilities(fsdp2=True, limits=_PER_TENSOR_NORMS),
        summary="Adam moments + layer-wise trust ratio (large-batch BERT)",
        reference="You et al. 2019, arXiv:1904.00962, Alg. 2",
    )
)
register(
    OptimizerSpec(
        name="lars",
        optimizer_cls=Lars,
        config_cls=LarsConfig,
        hyperparameters=("lr", "weight_decay"),
        capabilities=Capabilities(fsdp2=True, limits=_PER_TENSOR_NORMS),
        summary="SGD momentum + layer-wise trust ratio (large-batch CNNs)",
        reference="You et al. 2017, arXiv:1708.03888, eq. 6",
    )
)
register(
    OptimizerSpec(
        name="kfac",
        optimizer_cls=Kfac,
        config_cls=KfacConfig,
        hyperparameters=("lr", "weight_decay", "betas", "eps"),
        capabilities=Capabilities(
            needs_model=True,
            fp16_loss_scaling=False,
            limits=(
                "K-FAC hooks each layer and needs its whole weight matrix: FSDP2 DTensors and DeepSpeed ZeRO's "
                "flat partitions are refused. Its output-gradient statistics are taken during the backward pass, "
                "before a GradScaler unscales anything, so --fp16 (loss scaling) is refused: use --bf16 or fp32."
            ),
        ),
        summary="Kronecker-factored natural gradient + Adam grafting",
        reference="Martens & Grosse 2015, arXiv:1503.05671; KAISA 2021",
    )
)

_WHOLE_MATRICES = (
    "preconditioners need whole weight matrices: FSDP2 (DTensor parameters) is refused at construction, "
    "DeepSpeed ZeRO's flat partitions are refused with the arguments. Under DDP the root / eigenbasis "
    "computations are split across ranks."
)
register(
    OptimizerSpec(
        name="shampoo",
        optimizer_cls=Shampoo,
        config_cls=ShampooConfig,
        hyperparameters=("lr", "weight_decay", "betas", "eps"),
        capabilities=Capabilities(limits=_WHOLE_MATRICES),
        summary="Blocked Shampoo with grafting (Adam/AdaGrad/RMSprop/SGD)",
        reference="Gupta et al. 2018, arXiv:1802.09568; Shi et al. 2023, arXiv:2309.06497",
    )
)
register(
    OptimizerSpec(
        name="soap",
        optimizer_cls=Soap,
        config_cls=SoapConfig,
        hyperparameters=("lr", "weight_decay", "betas", "eps"),
        capabilities=Capabilities(limits=_WHOLE_MATRICES),
        summary="Adam in the eigenbasis of Shampoo's factors",
        reference="Vyas et al. 2024, arXiv:2409.11321, Alg. 3",
    )
)
register(
    OptimizerSpec(
        name="hessian_free",
        optimizer_cls=HessianFree,
        config_cls=HessianFreeConfig,
        hyperparameters=("lr", "weight_decay"),
        capabilities=Capabilities(
            needs_model=True,
            ddp=False,
            limits=(
                "needs the batch at each step: use hf_colossal.integrations.transformers.HessianFreeTrainer (or "
                "HessianFreeTrainerMixin); one process, no gradient accumulation; losses with a Gauss-Newton form "
                "only (cross_entropy, mse, sigmoid_bce); --learning_rate is unused."
            ),
        ),
        summary="Hessian-free: Gauss-Newton CG steps, LM damping, line search",
        reference="Martens 2010, ICML, Sec. 4; Martens & Sutskever 2012",
    )
)
