"""The stock-script path: an unmodified HF script (no import of hf_colossal) run in a fresh interpreter."""

import re

import pytest
import torch

from .subprocesses import STOCK_SCRIPT, run_python


def stock_args(out, bbc_jsonl, minilm_path, *extra):
    train, evaluation = bbc_jsonl
    return [
        str(STOCK_SCRIPT), "--model_name_or_path", minilm_path, "--train_file", train,
        "--validation_file", evaluation, "--output_dir", str(out), "--max_seq_length", "32",
        "--per_device_train_batch_size", "8", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--dataloader_num_workers", "0", *extra,
    ]


@pytest.mark.parametrize(
    "optim, optim_args, lr, state_key",
    [("lamb", "max_trust_ratio=10", "2e-3", "exp_avg_sq"), ("lars", "trust_clip=true,nesterov=true", "0.5",
                                                              "momentum_buffer")],
)
def test_stock_script_trains_with_our_optimizer(tmp_path, bbc_jsonl, minilm_path, optim, optim_args, lr, state_key):
    result = run_python(stock_args(tmp_path, bbc_jsonl, minilm_path, "--optim", optim, "--optim_args", optim_args,
                                   "--learning_rate", lr, "--weight_decay", "0.01"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"optimizer: hf_colossal.optim.{optim}.{optim.capitalize()}" in result.stdout
    state = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=False)
    assert {g["adapt"] for g in state["param_groups"]} == {True, False}
    assert all(state_key in s for s in state["state"].values())
    # training_args.bin loads where hf_colossal is not importable, and says "lamb"/"lars" as a plain string.
    probe = (
        "import sys; sys.modules['hf_colossal'] = None\n"
        "import torch, transformers\n"
        f"args = torch.load({str(tmp_path / 'checkpoint-3' / 'training_args.bin')!r}, weights_only=False)\n"
        f"assert type(args.optim) is str and args.optim == {optim!r}, repr(args.optim)\n"
        "assert 'hf_colossal' not in repr(sys.modules.get('hf_colossal'))\n"
        "print('loaded', args.optim)"
    )
    loaded = run_python(["-c", probe], env={"HF_COLOSSAL_AUTOLOAD": "0"})
    assert loaded.returncode == 0 and f"loaded {optim}" in loaded.stdout, loaded.stderr[-2000:]


def test_stock_script_bad_optim_args_fail_before_training(tmp_path, bbc_jsonl, minilm_path):
    result = run_python(stock_args(tmp_path, bbc_jsonl, minilm_path, "--optim", "lamb", "--optim_args",
                                   "max_trust_ration=10"))
    assert result.returncode != 0
    assert "unknown option 'max_trust_ration'" in result.stderr and "max_trust_ratio (float | none" in result.stderr
    assert not (tmp_path / "checkpoint-3").exists()


def test_unknown_name_lists_ours_and_autoload_can_be_turned_off(tmp_path, bbc_jsonl, minilm_path):
    result = run_python(stock_args(tmp_path, bbc_jsonl, minilm_path, "--optim", "lamb_typo"))
    assert result.returncode != 0 and "invalid choice: 'lamb_typo'" in result.stderr
    assert re.search(r"choose from .*'lamb'.*'lars'", result.stderr)
    off = run_python(stock_args(tmp_path, bbc_jsonl, minilm_path, "--optim", "lamb"),
                     env={"HF_COLOSSAL_AUTOLOAD": "0"})
    assert off.returncode != 0 and "invalid choice: 'lamb'" in off.stderr


def test_torchrun_two_gloo_workers_each_get_the_optimizer(tmp_path, bbc_jsonl, minilm_path):
    result = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                         *stock_args(tmp_path, bbc_jsonl, minilm_path, "--optim", "lamb", "--max_steps", "2",
                                     "--save_strategy", "no", "--ddp_backend", "gloo")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("optimizer: hf_colossal.optim.lamb.Lamb") == 2


def test_autoload_is_cheap_and_imports_nothing_heavy():
    result = run_python(["-X", "importtime", "-c", "import sys; print('torch' in sys.modules, "
                         "'transformers' in sys.modules, 'hf_colossal' in sys.modules)"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True"]
    cumulative_us = [int(line.split("|")[1]) for line in result.stderr.splitlines()
                     if line.startswith("import time:") and line.split("|")[-1].strip() == "hf_colossal"]
    assert cumulative_us and cumulative_us[0] < 20_000, cumulative_us


def test_with_autoload_off_importing_the_package_registers_even_after_transformers():
    code = (
        "from transformers import HfArgumentParser, Trainer, TrainingArguments\n"
        "import transformers.trainer_optimizer as registry\n"
        "assert 'lamb' not in registry._OPTIMIZER_HANDLERS\n"
        "import hf_colossal\n"
        "(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses("
        "['--output_dir', 'o', '--optim', 'lamb', '--report_to', 'none'])\n"
        "print(Trainer.get_optimizer_cls_and_kwargs(args)[0].__name__)"
    )
    result = run_python(["-c", code], env={"HF_COLOSSAL_AUTOLOAD": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("Lamb")
