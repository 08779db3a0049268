"""The registry, optim_args parsing and the parameter-group policy."""

import pytest
import torch
from torch import nn

import hf_colossal
from hf_colossal.cli import main as cli_main
from hf_colossal.config import OptionsError
from hf_colossal.params import ParamGroupPolicy, parameter_categories
from hf_colossal.registry import build_optimizer, get_optimizer_spec, optimizer_names


def test_registry_names_and_table(capsys):
    specs = hf_colossal.list_optimizers()
    table = capsys.readouterr().out
    assert [s.name for s in specs] == optimizer_names()
    assert {"lamb", "lars"} <= set(optimizer_names())
    for name in ("lamb", "lars"):
        assert name in table
    assert "DeepSpeed" in table and "FSDP2" in table
    assert cli_main(["optimizers"]) == 0
    assert "lamb" in capsys.readouterr().out


def test_cli_lists_options_of_one_optimizer(capsys):
    assert cli_main(["optimizers", "lamb"]) == 0
    out = capsys.readouterr().out
    assert "max_trust_ratio" in out and "bias_correction" in out and "no_adapt" in out


def test_unknown_optimizer_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*lamb.*lars"):
        get_optimizer_spec("lamb2")


@pytest.mark.parametrize(
    "text, match",
    [
        ("max_trust_ratoi=10", r"(?s)unknown option 'max_trust_ratoi'.*max_trust_ratio \(float \| none"),
        ("max_trust_ratio=abc", r"'max_trust_ratio' must be float \| none, got 'abc'"),
        ("bias_correction=maybe", r"'bias_correction' must be bool"),
        ("nonfinite=ignore", r"'nonfinite' must be 'skip' \| 'error' \| 'apply'"),
        ("weight_decay=0.1", r"'weight_decay' is set by --weight_decay"),
        ("lr=0.1", r"'lr' is set by --learning_rate"),
        ("eps=1e-6", r"'eps' is set by --adam_epsilon"),
        ("max_trust_ratio", r"not of the form key=value"),
        ("max_trust_ratio=10,bias_correction=true,max_trust_ratio=5",
         r"option 'max_trust_ratio' twice \(max_trust_ratio=10 and max_trust_ratio=5\); give it once"),
        ("no_adapt=bias|(", r"neither a category .* nor a valid regular expression"),
    ],
)
def test_lamb_optim_args_errors_name_the_key_and_list_valid_keys(text, match):
    with pytest.raises(OptionsError, match=match) as info:
        get_optimizer_spec("lamb").parse_options(text)
    assert "Valid keys for optim=\"lamb\"" in str(info.value)


def test_optim_args_typed_parsing():
    spec = get_optimizer_spec("lamb")
    config = spec.parse_options("max_trust_ratio=10, bias_correction=false,no_decay=bias|norm|embedding")
    assert config.max_trust_ratio == 10.0 and config.bias_correction is False
    assert config.no_decay == ("bias", "norm", "embedding")
    assert spec.parse_options("max_trust_ratio=none").max_trust_ratio is None
    assert spec.parse_options({"max_trust_ratio": 5}).max_trust_ratio == 5
    with pytest.raises(OptionsError, match="must be float"):
        spec.parse_options({"max_trust_ratio": "x"})
    lars = get_optimizer_spec("lars").parse_options("eps=1e-9,momentum=0.8,nesterov=true")
    assert (lars.eps, lars.momentum, lars.nesterov) == (1e-9, 0.8, True)


def test_out_of_range_values_are_refused_before_training():
    spec = get_optimizer_spec("lamb")
    with pytest.raises(OptionsError, match="max_trust_ratio"):
        spec.validate(spec.parse_options("max_trust_ratio=-1"), lr=1e-3)
    with pytest.raises(OptionsError, match="lr"):
        spec.validate(spec.parse_options(""), lr=-1.0)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2, bias=False)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_policy_categories_and_regex():
    model = _Block()
    tags = parameter_categories(model)
    assert tags["proj.bias"] == {"bias"} and tags["norm.weight"] == {"norm"} and tags["norm.bias"] == {"bias", "norm"}
    assert tags["embed.weight"] == {"embedding"} and tags["head.weight"] == set()
    groups = ParamGroupPolicy().groups(model, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_param[id(names["proj.weight"])]["weight_decay"] == 0.1 and by_param[id(names["proj.weight"])]["adapt"]
    assert by_param[id(names["proj.bias"])]["weight_decay"] == 0.0 and not by_param[id(names["proj.bias"])]["adapt"]
    assert not by_param[id(names["norm.weight"])]["adapt"]
    assert id(names["frozen.weight"]) not in by_param  # only trainable parameters
    custom = ParamGroupPolicy(no_decay=("embedding", r"^head\."), no_adapt=())
    groups = custom.groups(model, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(names["embed.weight"])]["weight_decay"] == 0.0
    assert by_param[id(names["head.weight"])]["weight_decay"] == 0.0
    assert by_param[id(names["proj.bias"])]["weight_decay"] == 0.1
    assert all(g["adapt"] for g in groups)


def test_build_optimizer_from_model_and_from_tensors():
    model = _Block()
    opt = build_optimizer("lamb", model, lr=1e-2, weight_decay=0.1, options="max_trust_ratio=10")
    assert isinstance(opt, hf_colossal.Lamb)
    assert sum(len(g["params"]) for g in opt.param_groups) == 6  # the frozen layer is left out
    loss = model.proj(model.embed(torch.tensor([1, 2]))).sum()
    loss.backward()
    before = model.proj.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.proj.weight)
    lars = build_optimizer("lars", model.proj.parameters(), lr=0.1, options={"momentum": 0.5})
    assert isinstance(lars, hf_colossal.Lars) and lars.param_groups[0]["momentum"] == 0.5


def test_fused_choice_reaches_the_optimizer():
    model = _Block()
    for text, expected in (("fused=false", False), ("fused=none", None), ("", None)):
        assert build_optimizer("lars", model, lr=0.1, options=text).param_groups[0]["fused"] is expected
    spec = get_optimizer_spec("lamb")
    spec.validate(spec.parse_options("fused=true"), lr=1e-3)  # arguments stay valid: devices are checked later
    # Here: no CUDA tensors (and, in CI, no triton); the message says which and how to proceed.
    with pytest.raises(RuntimeError, match=r"Lamb\(fused=True\) cannot run: .*; use fused=None or fused=False"):
        build_optimizer("lamb", model, lr=1e-3, options="fused=true")
