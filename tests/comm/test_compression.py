"""Gradient compression / infrequent sync (issue 8) on the CPU: 2 gloo processes, spawned.

Two spawns hold every distributed check (process start-up dominates on the 2-core machine): ``suite`` runs the
math checks on known tensors, a real-data training run per method through the accelerate one-call route (with
gradient accumulation 2) and checkpoint/resume; ``trainer`` runs the stock Trainer enabled only by
``HF_COLOSSAL_COMPRESSION``. The rest are plain unit tests.
"""

import math
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from hf_colossal.comm import GradientCompressionPlugin, choose_method
from hf_colossal.comm.local_sgd import outer_update_
from hf_colossal.comm.powersgd import compressible, initial_q, matrix_shape, orthogonalize
from hf_colossal.comm.sign import pack_bits, unpack_bits
from hf_colossal.config import OptionsError

from . import _workers as W

# ---------------------------------------------------------------------------------------------------------------
# unit tests


def test_plugin_validates_and_names_the_choices():
    with pytest.raises(OptionsError, match="'none' \\| 'bf16' .* 'diloco' \\| 'auto'"):
        GradientCompressionPlugin(method="powersdg")
    with pytest.raises(OptionsError, match="density must be in \\(0, 1\\]"):
        GradientCompressionPlugin(method="topk", density=0)
    with pytest.raises(OptionsError, match="valid methods: none, bf16"):
        GradientCompressionPlugin.from_string("method=nope")
    with pytest.raises(OptionsError, match="unknown option 'rnak'"):
        GradientCompressionPlugin.from_string("method=powersgd,rnak=4")
    plugin = GradientCompressionPlugin.from_env({"HF_COLOSSAL_COMPRESSION": "method=powersgd,rank=8"})
    assert (plugin.method, plugin.rank) == ("powersgd", 8)
    assert GradientCompressionPlugin.from_string("topk").method == "topk"
    assert GradientCompressionPlugin.from_env({}) is None


def test_recipe_plugins_slot_accepts_gradient_compression():
    from hf_colossal.recipes.schema import RECIPE_PLUGINS, RecipeError, build_slot_entry

    entry = build_slot_entry({"name": "gradient_compression", "method": "sign"}, RECIPE_PLUGINS, "r.yaml", "plugins")
    assert entry == GradientCompressionPlugin(method="sign")
    with pytest.raises(RecipeError, match="r.yaml: field 'plugins.gradient_compression'.*method"):
        build_slot_entry({"name": "gradient_compression", "method": "x"}, RECIPE_PLUGINS, "r.yaml", "plugins")


@pytest.mark.parametrize("allreduce_ms, compute_ms, expected", [
    (10.0, 50.0, "none"),      # NVLink-like: the all-reduce hides under backward
    (50.0, 50.0, "bf16"),      # comparable: halve the bytes, keep the overlap
    (300.0, 50.0, "powersgd"),  # socket transport: communication dominates
    (25.0, 50.0, "none"),      # exactly at the hidden ratio
])
def test_auto_decision_rule(allreduce_ms, compute_ms, expected):
    method, reason = choose_method(allreduce_ms, compute_ms)
    assert method == expected and f"{allreduce_ms:.2f} ms" in reason


def test_pack_unpack_bits_and_orthogonalize():
    positive = torch.rand(37) > 0.5
    packed = pack_bits(positive)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert torch.equal(unpack_bits(packed, 37), positive)
    P = torch.randn(3, 20, 4, dtype=torch.float64)
    Q = orthogonalize(P.clone())
    torch.testing.assert_close(Q.transpose(1, 2) @ Q, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    reference, _ = torch.linalg.qr(P)  # same span: equal projectors
    torch.testing.assert_close(Q @ Q.transpose(1, 2), reference @ reference.transpose(1, 2))


def test_diloco_outer_step_reduces_to_averaging_and_nesterov():
    anchor, buf, delta = [torch.ones(3)], [torch.zeros(3)], [torch.tensor([0.5, 1.0, -1.0])]
    outer_update_(anchor, buf, delta, lr=1.0, momentum=0.0, nesterov=True)  # lr 1, mu 0: anchor - mean delta
    torch.testing.assert_close(anchor[0], torch.tensor([0.5, 0.0, 2.0]))
    anchor, buf = [torch.zeros(2)], [torch.tensor([1.0, 2.0])]
    outer_update_(anchor, buf, [torch.tensor([1.0, 1.0])], lr=0.5, momentum=0.9, nesterov=True)
    new_buf = torch.tensor([1.9, 2.8])  # torch SGD nesterov: buf = mu buf + d; step = d + mu buf
    torch.testing.assert_close(buf[0], new_buf)
    torch.testing.assert_close(anchor[0], -0.5 * (torch.tensor([1.0, 1.0]) + 0.9 * new_buf))


# ---------------------------------------------------------------------------------------------------------------
# 2-process gloo


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comm")
    mp.spawn(W.suite_worker, args=(2, 29811, str(tmp / "out"), str(tmp)), nprocs=2, join=True)
    load = lambda name: [torch.load(tmp / f"out.{name}.{r}", weights_only=False) for r in range(2)]  # noqa: E731
    return {"math": load("math"), "train": load("train"), "resume": load("resume")}


def _grads(rank, step):
    return torch.cat([g.reshape(-1) for g in W.known_grads(rank, step)])


SHAPES = [(12, 10), (10,), (6, 4, 2)]
SIZES = [120, 10, 48]


def test_powersgd_equals_one_power_iteration_with_error_feedback(suite):
    got = suite["math"]
    rank_r, seed = 2, 3
    errors = [torch.zeros(178), torch.zeros(178)]
    qs = {k: initial_q(matrix_shape(torch.Size(s))[1], rank_r, seed, k, torch.device("cpu"))
          for k, s in enumerate(SHAPES) if compressible(torch.Size(s), rank_r)}
    for step in range(2):
        M = [_grads(w, step) + errors[w] for w in range(2)]
        out = torch.zeros(178)
        new_err = [torch.zeros(178), torch.zeros(178)]
        offset = 0
        for k, (shape, n) in enumerate(zip(SHAPES, SIZES)):
            sl = slice(offset, offset + n)
            offset += n
            if k not in qs:
                out[sl] = (M[0][sl] + M[1][sl]) / 2
                continue
            mats = [m[sl].view(matrix_shape(torch.Size(shape))) for m in M]
            basis, _ = torch.linalg.qr((mats[0] @ qs[k] + mats[1] @ qs[k]) / 2)  # orthonormal span of mean P
            proj = basis @ basis.T
            out[sl] = (proj @ (mats[0] + mats[1]) / 2).reshape(-1)
            for w in range(2):
                new_err[w][sl] = (mats[w] - proj @ mats[w]).reshape(-1)
            qs[k] = ((mats[0].T @ basis + mats[1].T @ basis) / 2)  # warm start (sign of basis cancels in P Q^T)
        errors = new_err
        for w in range(2):
            torch.testing.assert_close(got[w]["powersgd"]["outs"][step], out, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[w]["powersgd"]["efs"][step], errors[w], rtol=1e-4, atol=1e-5)


def test_topk_and_sign_equal_their_definitions(suite):
    got = suite["math"]
    errors = {"topk": [torch.zeros(178)] * 2, "sign": [torch.zeros(178)] * 2}
    for step in range(2):
        for name in ("topk", "sign"):
            sent, new_err = [], []
            for w in range(2):
                M = _grads(w, step) + errors[name][w]
                if name == "topk":
                    k = math.ceil(0.1 * 178)
                    keep = torch.zeros(178, dtype=torch.bool)
                    keep[M.abs().argsort(descending=True)[:k]] = True
                    C = torch.where(keep, M, torch.zeros(()))
                else:
                    scales = torch.cat([piece.abs().mean().expand(n) for piece, n in zip(M.split(SIZES), SIZES)])
                    C = scales * torch.where(M >= 0, 1.0, -1.0)
                sent.append(C)
                new_err.append(M - C)
            errors[name] = new_err
            for w in range(2):
                torch.testing.assert_close(got[w][name]["outs"][step], (sent[0] + sent[1]) / 2)
                torch.testing.assert_close(got[w][name]["efs"][step], new_err[w])
    assert got[0]["topk"]["bytes"]["all_gather"] == 2 * 18 * 8  # 2 steps x k=18 x (fp32 value + int32 index)
    assert got[0]["sign"]["bytes"]["all_gather"] == 2 * (23 + 3 * 4)  # 178 bits -> 23 bytes + 3 fp32 scales


def test_bf16_is_the_mean_in_bfloat16(suite):
    got = suite["math"]
    expected = (_grads(0, 0).div(2).bfloat16() + _grads(1, 0).div(2).bfloat16()).float()
    for w in range(2):
        torch.testing.assert_close(got[w]["bf16"]["out"], expected)
    assert got[0]["bf16"]["bytes"]["all_reduce"] == 178 * 2


def test_nonfinite_gradient_poisons_every_rank_and_never_enters_error_feedback(suite):
    for w in range(2):
        for name in ("powersgd", "topk", "sign"):
            r = suite["math"][w][name]
            assert r["nonfinite_out"] is False and r["ef_kept"] is True, (w, name)
        assert suite["math"][w]["powersgd"]["q_finite"]
        assert suite["math"][w]["scale_ok"]  # residual stored unscaled under a GradScaler scale


METHODS = ("none", "bf16", "fp16", "powersgd", "topk", "sign", "local_sgd", "diloco", "auto", "local_sgd_bf16",
           "auto_late", "auto_late_powersgd")


@pytest.mark.parametrize("method", METHODS)
def test_training_converges_and_ranks_agree(suite, method):
    r0, r1 = (suite["train"][w][method] for w in range(2))
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"])), "ranks diverged"
    assert r0["after"] < r0["before"] - 0.4, (r0["before"], r0["after"])
    if method != "none":
        # 12 optimizer steps of 2 micro-batches: the hook ran once per step (no_sync micro-batch not compressed)
        assert r0["rounds"] == r0["steps"] == W.STEPS
    if method == "auto":
        assert r0["method"] == "none"  # injected compute time makes the all-reduce negligible
    if method == "auto_late":
        assert r0["method"] == "local_sgd"  # a slow link after the probe: local SGD from then on, synced at the end
    if method == "auto_late_powersgd":
        assert r0["method"] == "powersgd"  # chosen after the probe: the hook joined DDP mid-run


def test_bytes_shrink_by_method(suite):
    sent = {m: sum(suite["train"][0][m]["bytes"].values()) for m in METHODS if m != "none"}
    assert sent["bf16"] * 2 == sent["auto"]  # auto chose none here: DDP's own fp32 all-reduce, counted per step
    assert sent["powersgd"] < sent["auto_late_powersgd"] < sent["auto"]  # 2 plain steps, then PowerSGD
    # 2 plain fp32 steps, then bf16 deltas at steps 4, 6, 8, 10 and 12 (every 2 from the decision at step 2)
    assert sent["auto_late"] == sent["auto"] * (2 * 4 + 5 * 2) // (12 * 4)
    assert sent["powersgd"] < sent["bf16"] and sent["sign"] < sent["topk"] < sent["bf16"]
    assert sent["local_sgd"] < sent["auto"] / 3  # parameters averaged every 4 steps instead of 12 all-reduces
    assert sent["local_sgd_bf16"] * 2 == sent["local_sgd"]


def test_local_sgd_with_bf16_deltas_stays_next_to_fp32_averaging(suite):
    fp32, bf16 = (suite["train"][0][label]["params"] for label in ("local_sgd", "local_sgd_bf16"))
    gaps = [(a - b).abs().max().item() for a, b in zip(fp32, bf16)]
    scale = max(a.abs().max().item() for a in fp32)
    assert 0 < max(gaps) < 1e-2 * scale, (max(gaps), scale)  # only the change since the last sync is rounded


def test_sync_dtype_applies_to_frequency_methods_only():
    with pytest.raises(OptionsError, match="sync_dtype applies to local_sgd / diloco only"):
        GradientCompressionPlugin(method="powersgd", sync_dtype="bfloat16")
    with pytest.raises(OptionsError, match="option 'sync_dtype' must be 'float32' \\| 'bfloat16'"):
        GradientCompressionPlugin(method="local_sgd", sync_dtype="float16")


@pytest.mark.parametrize("method", ["powersgd", "sign", "diloco", "local_sgd_bf16", "auto_late"])
def test_checkpoint_resume_is_exact(suite, method):
    for w in range(2):
        r = suite["resume"][w][method]
        assert r["exact"], method
        assert r["files"] == ["rank0.pt", "rank1.pt", "shared.pt"] and r["step"] == 6


def test_resume_at_another_world_size_resets_error_feedback_with_a_warning(suite):
    r = suite["resume"][0]["sign"]
    assert r["world_size_warning"] and r["residuals_reset"]


def test_stock_trainer_enabled_by_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_COLOSSAL_COMPRESSION", "method=powersgd,rank=2")
    mp.spawn(W.trainer_worker, args=(2, 29812, str(tmp_path / "out"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{w}", weights_only=False) for w in range(2))
    assert r0["method"] == "powersgd" and r0["rounds"] == r0["steps"] == 6  # accumulation 2: one hook per step
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert r0["files"] == ["rank0.pt", "rank1.pt", "shared.pt"]
    assert r0["exact"] and r1["exact"]  # Trainer resume from checkpoint-3 ends where the straight run ended
    assert r0["after"] < r0["before"]


def test_trainer_mixin_builds_in_one_process(tmp_path):
    """The mixin route wires up (single process: nothing to communicate, so no controller) and FSDP is refused."""
    from accelerate import Accelerator
    from transformers import Trainer, TrainingArguments

    from hf_colossal.integrations.accelerate import CompressionSetupError, enable
    from hf_colossal.integrations.trainer_compression import compression_trainer_class

    cls = compression_trainer_class(Trainer)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    trainer = cls(model=W.DigitsModel(), args=args, gradient_compression="method=powersgd,rank=2")
    assert trainer.gradient_compression.rank == 2 and trainer.compression_controller is None
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = type(accelerator.distributed_type).FSDP  # what FSDP launch sets
    try:
        with pytest.raises(CompressionSetupError, match="works with DDP only"):
            enable(accelerator, GradientCompressionPlugin(method="sign"))
    finally:
        accelerator.state.distributed_type = type(accelerator.distributed_type).NO
