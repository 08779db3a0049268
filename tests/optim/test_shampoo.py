"""Tests for :class:`hf_colossal.optim.Shampoo` and :class:`hf_colossal.optim.Soap`.

The references below are written from the papers one block at a time in float64, with explicit matrix roots
(``scipy.linalg.fractional_matrix_power``) and, for SOAP, the first moment kept in the original basis and rotated
every step (as Vyas et al. 2024, Algorithm 3 write it). The optimizers run on stacked blocks and must match them.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import scipy.linalg
import torch

from hf_colossal.optim import Shampoo, Soap
from hf_colossal.optim._blocks import block_slices, matrix_shape, merge_small_dims
from hf_colossal.optim.shampoo import recompute_selection

from .helpers import record_refresh_batches

MAX_DIM = 4
# w1: blocks of 4x4, 4x1, 2x4, 2x1; w2 (1, 3, 4): a 3x4 matrix once the size-1 dimension goes; w3 (3, 2, 2, 2):
# merged to (3, 4, 2), preconditioned as 3x8 (two 3x4 blocks); b1: 1-D, the diagonal path.
SHAPES = {"w1": (6, 5), "w2": (1, 3, 4), "w3": (3, 2, 2, 2), "b1": (6,)}
# SOAP's first eigenbasis is arbitrary inside a degenerate eigenspace, so its reference test keeps every block's
# factors at most one rank short (a 4x1 block's 4x4 left factor has a 3-dimensional null space).
SOAP_SHAPES = {**SHAPES, "w1": (8, 7)}
STEPS = 9


def make_problem(seed=7, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    params = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
    grads = [
        {name: 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
        for _ in range(STEPS)
    ]
    return params, grads


def run(optimizer_cls, params, grads_per_step, options, dtype=torch.float64):
    tensors = {name: value.to(dtype).requires_grad_() for name, value in params.items()}
    optimizer = optimizer_cls(list(tensors.values()), **options)
    for grads in grads_per_step:
        for name, tensor in tensors.items():
            tensor.grad = grads[name].to(dtype)
        optimizer.step()
    return tensors, optimizer


def assert_matches_reference(optimizer_cls, reference, hp, shapes, rtol, atol):
    """The optimizer in float64 on ``make_problem(shapes=shapes)`` ends where ``reference`` does, with no failed
    preconditioner computation."""
    params, grads = make_problem(shapes=shapes)
    expected = reference(params, grads, hp)
    tensors, optimizer = run(optimizer_cls, params, grads, hp)
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor.detach(), expected[name], rtol=rtol, atol=atol, msg=name)
    assert optimizer.preconditioner_failures() == 0


def blocks_of(shape):
    matrix = matrix_shape(shape, MAX_DIM)
    return matrix, (block_slices(*matrix, MAX_DIM) if matrix else None)


def inverse_root(matrix, eps, root):
    ridged = matrix + eps * torch.eye(matrix.shape[0], dtype=matrix.dtype)
    value = scipy.linalg.fractional_matrix_power(ridged.numpy(), -1.0 / root)
    return torch.from_numpy(value.real.copy())


def graft_direction(m, v, grafting, eps, bc2):
    if grafting == "adam":
        return m / ((v / bc2).sqrt() + eps)
    if grafting in ("adagrad", "rmsprop"):
        return m / (v.sqrt() + eps)
    return m


def reference_shampoo(params, grads_per_step, hp):
    """Shampoo with grafting (Shi et al. 2023, Alg. 1), one block at a time, float64, explicit matrix roots; with
    ``overlap_recompute`` (default; not with ``root_inverse="eigh"``, which runs in line) roots recomputed at step t
    after the start step are used from step t+1."""
    lr, (beta1, beta2), eps, wd = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    grafting, beta_s = hp["grafting"], hp["shampoo_beta"]
    frequency = hp["precondition_frequency"]
    start = hp.get("start_preconditioning_step") or frequency
    root = hp.get("exponent_override") or 4
    diagonal_grafting = "sgd" if grafting == "none" else grafting
    params = {name: value.clone() for name, value in params.items()}
    state = {}
    for t, grads in enumerate(grads_per_step, start=1):
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        recompute = t == start or (t > start and (t - start) % frequency == 0)
        for name, x in params.items():
            g = grads[name] if hp["decoupled_weight_decay"] else grads[name] + wd * x
            if hp["decoupled_weight_decay"]:
                x = x * (1 - lr * wd)
            matrix, slices = blocks_of(x.shape)
            if matrix is None:
                s = state.setdefault(name, {"m": torch.zeros_like(x), "v": torch.zeros_like(x)})
                s["m"] = beta1 * s["m"] + (1 - beta1) * g
                s["v"] = s["v"] + g * g if diagonal_grafting == "adagrad" else beta2 * s["v"] + (1 - beta2) * g * g
                params[name] = x - lr / bc1 * graft_direction(s["m"], s["v"], diagonal_grafting, eps, bc2)
                continue
            x, g = x.reshape(matrix).clone(), g.reshape(matrix)
            for index, (rows, cols) in enumerate(slices):
                G = g[rows, cols]
                r, c = G.shape
                s = state.setdefault((name, index), {
                    "m": torch.zeros_like(G), "v": torch.zeros_like(G), "L": torch.zeros(r, r, dtype=G.dtype),
                    "R": torch.zeros(c, c, dtype=G.dtype), "rootL": torch.eye(r, dtype=G.dtype),
                    "rootR": torch.eye(c, dtype=G.dtype),
                })
                s["L"] = beta_s * s["L"] + (1 - beta_s) * G @ G.T if beta_s < 1 else s["L"] + G @ G.T
                s["R"] = beta_s * s["R"] + (1 - beta_s) * G.T @ G if beta_s < 1 else s["R"] + G.T @ G
                s["m"] = beta1 * s["m"] + (1 - beta1) * G
                s["v"] = s["v"] + G * G if grafting == "adagrad" else beta2 * s["v"] + (1 - beta2) * G * G
                if "pending" in s:  # overlap_recompute: roots recomputed at the last step take effect now
                    s["rootL"], s["rootR"] = s.pop("pending")
                if recompute:
                    roots = tuple(inverse_root(s[side], hp["preconditioner_eps"], root) for side in ("L", "R"))
                    if hp.get("overlap_recompute", True) and hp.get("root_inverse", "qr") != "eigh" and t != start:
                        s["pending"] = roots
                    else:
                        s["rootL"], s["rootR"] = roots
                grafted = graft_direction(s["m"], s["v"], grafting, eps, bc2)
                if t < start:
                    d = grafted
                else:
                    d = s["rootL"] @ s["m"] @ s["rootR"]
                    if grafting != "none":
                        d = d * grafted.norm() / d.norm()
                x[rows, cols] -= lr / bc1 * d
            params[name] = x.reshape(grads[name].shape)
    return params


SHAMPOO_BASE = dict(
    lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, shampoo_beta=1.0, preconditioner_eps=1e-4,
    max_preconditioner_dim=MAX_DIM, precondition_frequency=3, grafting="adam", decoupled_weight_decay=True,
    stagger_recompute=False, preconditioner_dtype="float64", root_inverse="eigh",
)
SHAMPOO_CASES = {
    "adam": {},
    "adagrad": {"grafting": "adagrad"},
    "rmsprop": {"grafting": "rmsprop", "shampoo_beta": 0.9},
    "sgd": {"grafting": "sgd", "betas": (0.0, 0.99)},
    "none": {"grafting": "none", "lr": 0.005, "exponent_override": 2},
    "l2_decay_start_1": {"weight_decay": 0.1, "decoupled_weight_decay": False, "start_preconditioning_step": 1},
    "decoupled_decay": {"weight_decay": 0.1, "start_preconditioning_step": 2, "precondition_frequency": 2},
    # root_inverse="eigh" (the base) always runs in line; Newton (float64, exact here) overlaps by default.
    "newton_overlapped": {"root_inverse": "newton"},
    "newton_in_line": {"root_inverse": "newton", "overlap_recompute": False},
    "newton_overlapped_every_step": {"root_inverse": "newton", "precondition_frequency": 1,
                                     "start_preconditioning_step": 1},
    "newton_in_line_every_step": {"root_inverse": "newton", "overlap_recompute": False, "precondition_frequency": 1,
                                  "start_preconditioning_step": 1},
}


def test_blocking_merges_small_dims_and_cuts_edges():
    assert merge_small_dims((64, 3, 3, 3), 1024) == (576, 3)
    assert merge_small_dims((1, 1), 1024) == (1,)
    assert merge_small_dims((16, 32), 1024) == (16, 32)  # a matrix never becomes a vector
    assert matrix_shape((3, 2, 2, 2), MAX_DIM) == (3, 8) and matrix_shape((7,), MAX_DIM) is None
    assert [tuple(s.stop - s.start for s in b) for b in block_slices(6, 5, MAX_DIM)] == [(4, 4), (4, 1), (2, 4), (2, 1)]


@pytest.mark.parametrize("case", SHAMPOO_CASES.values(), ids=SHAMPOO_CASES.keys())
def test_shampoo_matches_float64_reference(case):
    assert_matches_reference(Shampoo, reference_shampoo, {**SHAMPOO_BASE, **case}, SHAPES, rtol=1e-9, atol=1e-10)


def test_shampoo_float32_matches_reference_and_state_layout():
    params, grads = make_problem()
    expected = reference_shampoo(params, grads, SHAMPOO_BASE)
    tensors, optimizer = run(Shampoo, params, grads, {**SHAMPOO_BASE, "preconditioner_dtype": "float32"},
                             dtype=torch.float32)
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor.detach().double(), expected[name], rtol=2e-4, atol=2e-5)
    state = optimizer.state[tensors["w1"]]
    assert [tuple(t.shape) for t in state["factor_left"]] == [(4, 4), (4, 4), (2, 2), (2, 2)]
    assert state["root_right"][1].shape == (1, 1) and state["factor_left"][0].dtype == torch.float32
    assert state["step"].item() == STEPS and state["step"].device.type == "cpu"
    assert set(optimizer.state[tensors["b1"]]) == {"step", "exp_avg", "exp_avg_sq"}


def reference_soap(params, grads_per_step, hp):
    """SOAP (Vyas et al. 2024, Alg. 3-4) one block at a time in float64, first moment in the original basis; with
    ``overlap_recompute`` (default) an eigenbasis refreshed at step t > 1 is used from step t+1."""
    lr, (beta1, beta2), eps, wd = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    frequency, beta_s = hp["precondition_frequency"], hp["shampoo_beta"]
    params = {name: value.clone() for name, value in params.items()}
    state = {}
    for t, grads in enumerate(grads_per_step, start=1):
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        for name, x in params.items():
            g = grads[name]
            x = x * (1 - lr * wd)
            matrix, slices = blocks_of(x.shape)
            if matrix is None:
                s = state.setdefault(name, {"m": torch.zeros_like(x), "v": torch.zeros_like(x)})
                s["m"] = beta1 * s["m"] + (1 - beta1) * g
                s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
                params[name] = x - lr / bc1 * graft_direction(s["m"], s["v"], "adam", eps, bc2)
                continue
            x, g = x.reshape(matrix).clone(), g.reshape(matrix)
            for index, (rows, cols) in enumerate(slices):
                G = g[rows, cols]
                r, c = G.shape
                s = state.setdefault((name, index), {
                    "m": torch.zeros_like(G), "v": torch.zeros_like(G), "L": torch.zeros(r, r, dtype=G.dtype),
                    "R": torch.zeros(c, c, dtype=G.dtype),
                })
                s["L"] = beta_s * s["L"] + (1 - beta_s) * G @ G.T
                s["R"] = beta_s * s["R"] + (1 - beta_s) * G.T @ G
                if t == 1:
                    s["QL"] = torch.linalg.eigh(s["L"])[1].flip(-1)
                    s["QR"] = torch.linalg.eigh(s["R"])[1].flip(-1)
                for side, dim, order, basis in s.pop("pending", ()):  # refreshed at the last step
                    s["v"] = s["v"].index_select(dim, order)
                    s["Q" + side] = basis
                if t > 1 and (t - 1) % frequency == 0:
                    refreshed = []
                    for side, dim in (("L", 0), ("R", 1)):
                        P, Q = s[side], s["Q" + side]
                        order = torch.diag(Q.T @ P @ Q).argsort(descending=True)
                        refreshed.append((side, dim, order, torch.linalg.qr(P @ Q[:, order])[0]))
                    if hp.get("overlap_recompute", True) and hp.get("eigenbasis_update", "qr") != "eigh":
                        s["pending"] = refreshed
                    else:
                        for side, dim, order, basis in refreshed:
                            s["v"] = s["v"].index_select(dim, order)
                            s["Q" + side] = basis
                QL, QR = s["QL"], s["QR"]
                s["m"] = beta1 * s["m"] + (1 - beta1) * G
                Gr = QL.T @ G @ QR
                s["v"] = beta2 * s["v"] + (1 - beta2) * Gr * Gr
                n = (QL.T @ s["m"] @ QR) / bc1 / ((s["v"] / bc2).sqrt() + eps)
                x[rows, cols] -= lr * QL @ n @ QR.T
            params[name] = x.reshape(grads[name].shape)
    return params


SOAP_BASE = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, shampoo_beta=0.9,
                 max_preconditioner_dim=MAX_DIM, precondition_frequency=3, stagger_recompute=False,
                 preconditioner_dtype="float64")


@pytest.mark.parametrize("case", [{}, {"weight_decay": 0.1, "precondition_frequency": 2}, {"overlap_recompute": False},
                                  {"precondition_frequency": 1}], ids=["base", "decay", "in_line", "every_step"])
def test_soap_matches_float64_reference(case):
    # The refresh's power step is shifted by 1e-6 ||P||_F (refresh_eigenbasis; the reference has no shift): about
    # 2e-7 of a parameter after 9 steps.
    assert_matches_reference(Soap, reference_soap, {**SOAP_BASE, **case}, SOAP_SHAPES, rtol=1e-6, atol=1e-6)


def test_recompute_schedule_and_stagger():
    assert recompute_selection(2, 5, frequency=3, start=3, stagger=True) is None
    assert recompute_selection(3, 5, frequency=3, start=3, stagger=True) == range(5)
    assert [list(recompute_selection(t, 5, frequency=3, start=3, stagger=True)) for t in (4, 5, 6)] == [
        [1, 4], [2], [0, 3]]
    assert recompute_selection(6, 5, frequency=3, start=3, stagger=False) == range(5)
    assert recompute_selection(5, 5, frequency=3, start=3, stagger=False) is None
    # Staggered runs stay finite and train.
    for cls, options in ((Shampoo, SHAMPOO_BASE), (Soap, SOAP_BASE)):
        params, grads = make_problem()
        tensors, _ = run(cls, params, grads, {**options, "stagger_recompute": True})
        assert all(t.isfinite().all() for t in tensors.values())


@pytest.mark.parametrize("cls, options, steps", [(Shampoo, SHAMPOO_BASE, 3), (Soap, SOAP_BASE, 4)])
def test_recomputation_runs_one_batch_per_factor_size_across_buckets_and_sides(cls, options, steps):
    """SHAPES has five block shapes (buckets) and ten factor stacks; at a recomputation (Shampoo's first, SOAP's
    first QR refresh) the factors go out as one batched computation per factor size: 7 of 4 x 4, 3 of 3 x 3, 2 of
    2 x 2, 2 of 1 x 1."""
    params, grads = make_problem()
    tensors = [value.requires_grad_() for value in params.values()]
    optimizer = cls(tensors, **options)
    calls = record_refresh_batches(optimizer)
    for grad in grads[:steps]:
        for tensor, value in zip(tensors, grad.values()):
            tensor.grad = value
        calls.clear()
        optimizer.step()
    assert sorted(calls) == [(1, 2), (2, 2), (3, 3), (4, 7)]


@pytest.mark.parametrize("cls, options", [(Shampoo, {**SHAMPOO_BASE, "root_inverse": "qr"}), (Soap, SOAP_BASE)])
def test_recomputation_in_chunks_of_one_factor_gives_the_same_result(cls, options, monkeypatch):
    from hf_colossal.optim import shampoo

    results = []
    for chunk_bytes in (shampoo.RECOMPUTE_CHUNK_BYTES, 1):
        monkeypatch.setattr(shampoo, "RECOMPUTE_CHUNK_BYTES", chunk_bytes)
        params, grads = make_problem()
        tensors = [value.requires_grad_() for value in params.values()]
        optimizer = cls(tensors, **options)
        batches = record_refresh_batches(optimizer)
        for grad in grads:
            for tensor, value in zip(tensors, grad.values()):
                tensor.grad = value
            optimizer.step()
        results.append(([t.detach().clone() for t in tensors], [count for _, count in batches]))
    (chunked_once, calls), (one_by_one, single_calls) = results
    assert set(single_calls) == {1} and sum(single_calls) == sum(calls) and max(calls) > 1
    for got, expected in zip(one_by_one, chunked_once):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("failure", ["raises", "nonfinite"])
@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_failed_decomposition_keeps_previous_preconditioner_and_counts(cls, failure, monkeypatch):
    options = {**(SHAMPOO_BASE if cls is Shampoo else SOAP_BASE), "precondition_frequency": 2,
               "preconditioner_dtype": "float32"}
    if cls is Shampoo:
        options["start_preconditioning_step"] = 1
    params, grads = make_problem()
    tensors, optimizer = run(cls, params, grads[:2], options, dtype=torch.float32)
    key = "root_left" if cls is Shampoo else "basis_left"
    state = optimizer.state[tensors["w1"]]
    before = [t.clone() for t in state[key]]
    state["factor_left"][0].fill_(float("nan"))
    if failure == "raises":
        real_eigh = torch.linalg.eigh

        def eigh(matrices):  # as LAPACK does when it does not converge
            if matrices.isnan().any():
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            return real_eigh(matrices)

        monkeypatch.setattr(torch.linalg, "eigh", eigh)
    if cls is Soap:  # QR of a NaN block gives NaN (never raises): exercise the eigh path through "eigh" refreshes
        optimizer.param_groups[0]["eigenbasis_update"] = "eigh"
    for t in range(2, 4):  # step 3 recomputes every block (frequency 2 from start 1)
        for name, tensor in tensors.items():
            tensor.grad = grads[t][name].float()
        optimizer.step()
    assert torch.equal(state[key][0], before[0])
    assert not torch.equal(state[key][2], before[2])
    assert [int(c) for c in state["preconditioner_failures"]] == [1, 0, 0, 0]
    assert optimizer.preconditioner_failures() == 1
    assert all(t.isfinite().all() for t in tensors.values())


def test_eigh_that_fails_in_float32_is_retried_in_float64(monkeypatch):
    from hf_colossal.optim.shampoo import symmetric_eigh

    real_eigh = torch.linalg.eigh
    calls = []
    factors = _spd_stack(8, 2, torch.float32)
    factors[1] *= 100
    threshold = 10 * float(factors[0].abs().max())

    def eigh(matrices):  # LAPACK's divide and conquer giving up on the float32 batch and on one float32 matrix
        calls.append((tuple(matrices.shape), matrices.dtype))
        if matrices.dtype == torch.float32 and (matrices.dim() == 3 or matrices.abs().max() > threshold):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(matrices)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    values, vectors = symmetric_eigh(factors)
    expected = real_eigh(factors.double())
    assert values.dtype == torch.float32 and values.isfinite().all()
    torch.testing.assert_close(values.double(), expected[0], rtol=1e-5, atol=1e-6)
    assert calls == [((2, 8, 8), torch.float32), ((8, 8), torch.float32), ((8, 8), torch.float32),
                     ((8, 8), torch.float64)]


def _train(cls, options, grads, tensors, optimizer=None):
    optimizer = optimizer or cls(list(tensors.values()), **options)
    for step in grads:
        for name, tensor in tensors.items():
            tensor.grad = step[name].float()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_resume_from_state_dict_is_exact(cls):
    options = _qr_options(cls)
    params, grads = make_problem()
    straight = {n: v.float().requires_grad_() for n, v in params.items()}
    _train(cls, options, grads, straight)

    first = {n: v.float().requires_grad_() for n, v in params.items()}
    optimizer = _train(cls, options, grads[:5], first)
    assert optimizer._pending is not None  # step 5's recomputation is still to be taken in (overlap_recompute)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": {n: t.detach() for n, t in first.items()}}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = {n: v.clone().requires_grad_() for n, v in saved["params"].items()}
    fresh = cls(list(resumed.values()), **options)
    fresh.load_state_dict(saved["optimizer"])
    _train(cls, options, grads[5:], resumed, fresh)
    for name in SHAPES:
        assert torch.equal(resumed[name], straight[name]), name
    assert fresh.state[resumed["w1"]]["preconditioner_failures"][0].dtype == torch.int64


def _qr_options(cls):
    options = {**SHAMPOO_BASE, "root_inverse": "qr"} if cls is Shampoo else SOAP_BASE
    return {**options, "stagger_recompute": True, "preconditioner_dtype": "float32"}


@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_deep_copy_carries_a_pending_recomputation(cls):
    params, grads = make_problem()
    straight = {n: v.float().requires_grad_() for n, v in params.items()}
    _train(cls, _qr_options(cls), grads, straight)
    first = {n: v.float().requires_grad_() for n, v in params.items()}
    optimizer = _train(cls, _qr_options(cls), grads[:5], first)
    assert optimizer._pending is not None
    copied, copied_optimizer = copy.deepcopy((first, optimizer))
    _train(cls, _qr_options(cls), grads[5:], copied, copied_optimizer)
    for name in SHAPES:
        assert torch.equal(copied[name], straight[name]), name


@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_skipped_step_while_a_recomputation_is_pending_equals_dropping_it(cls):
    params, grads = make_problem()
    dropped = {n: v.float().requires_grad_() for n, v in params.items()}
    _train(cls, _qr_options(cls), grads[:5] + grads[6:], dropped)
    skipped = {n: v.float().requires_grad_() for n, v in params.items()}
    optimizer = _train(cls, _qr_options(cls), grads[:5], skipped)
    assert optimizer._pending is not None
    nonfinite = {name: torch.full_like(grad, float("nan")) for name, grad in grads[5].items()}
    _train(cls, _qr_options(cls), [nonfinite] + grads[6:], skipped, optimizer)
    assert optimizer.param_groups[0]["nonfinite_skips"] == 1
    for name in SHAPES:
        assert torch.equal(skipped[name], dropped[name]), name


def test_state_loads_onto_other_parameter_dtype():
    params, grads = make_problem()
    options = {**SOAP_BASE, "preconditioner_dtype": "float32"}
    source = {n: v.float().requires_grad_() for n, v in params.items()}
    optimizer = _train(Soap, options, grads[:4], source)
    target = {n: v.detach().to(torch.bfloat16).requires_grad_() for n, v in source.items()}
    loaded = Soap(list(target.values()), **options)
    loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    state = loaded.state[target["w1"]]
    assert state["exp_avg"][0].dtype == torch.float32 and state["basis_left"][0].dtype == torch.float32
    assert state["preconditioner_failures"][0].dtype == torch.int64
    torch.testing.assert_close(state["basis_left"][0], optimizer.state[source["w1"]]["basis_left"][0])
    for step in grads[4:]:
        for name, tensor in target.items():
            tensor.grad = step[name].to(torch.bfloat16)
        loaded.step()
    assert all(t.dtype == torch.bfloat16 and t.isfinite().all() for t in target.values())


@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_nonfinite_gradient_skips_without_touching_state(cls):
    options = {**(SHAMPOO_BASE if cls is Shampoo else SOAP_BASE), "preconditioner_dtype": "float32"}
    params, grads = make_problem()
    tensors = {n: v.float().requires_grad_() for n, v in params.items()}
    control = {n: v.float().requires_grad_() for n, v in params.items()}
    optimizer = _train(cls, options, grads[:3], tensors)
    reference = _train(cls, options, grads[:3], control)
    before_params = {n: t.detach().clone() for n, t in tensors.items()}
    before_state = copy.deepcopy(optimizer.state_dict()["state"])
    for name, tensor in tensors.items():
        tensor.grad = grads[3][name].float()
    tensors["b1"].grad[0] = float("inf")
    optimizer.step()
    assert all(torch.equal(tensors[n], before_params[n]) for n in SHAPES)
    after = optimizer.state_dict()["state"]
    for index, entries in before_state.items():
        for key, value in entries.items():
            values = value if isinstance(value, list) else [value]
            now = after[index][key] if isinstance(after[index][key], list) else [after[index][key]]
            assert all(torch.equal(a, b) for a, b in zip(values, now)), (index, key)
    assert optimizer.param_groups[0]["nonfinite_skips"] == 1
    _train(cls, options, grads[4:6], tensors, optimizer)
    _train(cls, options, grads[4:6], control, reference)
    assert all(torch.equal(tensors[n], control[n]) for n in SHAPES)

    errors = cls([torch.zeros(3, 3, requires_grad=True)], nonfinite="error")
    errors.param_groups[0]["params"][0].grad = torch.full((3, 3), float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        errors.step()
    assert not errors.state


def test_missing_gradient_leaves_a_parameter_and_its_state_alone():
    params, grads = make_problem()
    tensors = {n: v.float().requires_grad_() for n, v in params.items()}
    optimizer = _train(Shampoo, {**SHAMPOO_BASE, "preconditioner_dtype": "float32"}, grads[:2], tensors)
    frozen = tensors["w3"].detach().clone()
    for name, tensor in tensors.items():
        tensor.grad = None if name == "w3" else grads[2][name].float()
    optimizer.step()
    assert torch.equal(tensors["w3"], frozen)
    assert optimizer.state[tensors["w3"]]["step"].item() == 2 and optimizer.state[tensors["w1"]]["step"].item() == 3
    _train(Shampoo, {}, grads[3:5], tensors, optimizer)  # all back: two buckets per shape, one per step count
    assert optimizer.state[tensors["w3"]]["step"].item() == 4
    assert all(t.isfinite().all() for t in tensors.values())


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (Shampoo, {"grafting": "adamw"}, "grafting"),
        (Shampoo, {"shampoo_beta": 0.0}, "shampoo_beta"),
        (Shampoo, {"max_preconditioner_dim": 0}, "max_preconditioner_dim"),
        (Shampoo, {"preconditioner_dtype": "float16"}, "preconditioner_dtype"),
        (Shampoo, {"start_preconditioning_step": 0}, "start_preconditioning_step"),
        (Shampoo, {"exponent_override": 0}, "exponent_override"),
        (Shampoo, {"preconditioner_eps": 0.0}, "preconditioner_eps"),
        (Soap, {"eigenbasis_update": "svd"}, "eigenbasis_update"),
        (Soap, {"betas": (0.9, 1.0)}, "betas[1]"),
        (Soap, {"nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_invalid_hyperparameters_name_the_valid_choices(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"invalid {re.escape(name)}=.*expected"):
        cls([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_sharded_dtensor_parameters_are_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="does not support sharded \\(DTensor\\) parameters.*FSDP2"):
            Soap([weight])
    finally:
        dist.destroy_process_group()



def _digits_eval_loss(make_optimizer, steps=60, batch=64):
    """An MLP trained on scikit-learn's digits (real 8x8 scans) for ``steps`` seeded mini-batches: held-out loss."""
    import sklearn.datasets

    digits = sklearn.datasets.load_digits()
    inputs = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1437], order[1437:]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, 10))
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        index = train[torch.randint(0, len(train), (batch,), generator=generator)]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs[index]), labels[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(inputs[held_out]), labels[held_out]).item()


def test_shampoo_and_soap_beat_tuned_adamw_on_digits():
    """Same 60 steps, same batches: AdamW at its best of four learning rates (3e-3 .. 1e-1) against Shampoo and
    SOAP at one setting each. Measured: AdamW 0.166 (lr 3e-2), Shampoo 0.102, SOAP 0.106."""
    adamw = min(_digits_eval_loss(lambda p, lr=lr: torch.optim.AdamW(p, lr=lr)) for lr in (3e-3, 1e-2, 3e-2, 1e-1))
    shampoo = _digits_eval_loss(lambda p: Shampoo(p, lr=2e-2, max_preconditioner_dim=128, shampoo_beta=0.99,
                                                  exponent_override=2, preconditioner_eps=1e-8))
    soap = _digits_eval_loss(lambda p: Soap(p, lr=2e-2, betas=(0.9, 0.95), max_preconditioner_dim=128))
    assert shampoo < 0.9 * adamw and soap < 0.9 * adamw, (adamw, shampoo, soap)


def test_shampoo_bfloat16_matmuls_stay_close_to_float32():
    """(SOAP is not held to this: in its first steps, Adam scales every rotated coordinate to about lr, so the
    rounding of bf16 factor products in a rank-deficient factor's null space moves the toy problem's parameters by
    up to 30% of the fp32 update.)"""
    options = {**SHAMPOO_BASE, "preconditioner_dtype": "float32"}
    params, grads = make_problem(shapes=SOAP_SHAPES)
    exact, _ = run(Shampoo, params, grads, options, dtype=torch.float32)
    fast, _ = run(Shampoo, params, grads, {**options, "matmul_dtype": "bfloat16"}, dtype=torch.float32)
    for name in SOAP_SHAPES:
        moved = (exact[name] - params[name].float()).norm()
        assert (fast[name] - exact[name]).norm() < 0.05 * moved, name


# -- root_inverse="newton" and the matmul precision ------------------------------------------------------------


def _spd_stack(n, count, dtype, seed=0, rank=None):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, n, dtype=torch.float64)
    grads = torch.randn(count, n, rank or n, generator=generator, dtype=torch.float64) * scale[:, None]
    return (grads @ grads.mT).to(dtype)


# Relative Frobenius error bounds after the default 20 iterations on condition numbers up to 1e6: p = 2 grows small
# eigenvalues by (3/2)^2 = 2.25 per iteration (p = 4: 2.44), so it is a few iterations short of fp64 accuracy.
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, {4: 1e-10, 2: 1e-5}), (torch.float32, {4: 2e-5, 2: 2e-5})])
def test_newton_inverse_root_agrees_with_eigh(dtype, rtol):
    from hf_colossal.optim.shampoo import RELATIVE_RIDGE, inverse_root as eigh_root, newton_inverse_root

    factors = _spd_stack(48, 3, dtype)
    # The same ridge on both sides: max(eps, floor * ||A||_F); condition numbers up to 1e6.
    ridges = (RELATIVE_RIDGE * torch.linalg.matrix_norm(factors.double())).clamp_min(1e-6)
    for root in (4, 2):
        reference = torch.stack([eigh_root(f[None].double(), root=root, eps=float(r))[0][0]
                                 for f, r in zip(factors, ridges)])
        roots, ok = newton_inverse_root(factors, root=root, eps=1e-6)
        assert ok.all() and roots.dtype == dtype
        error = torch.linalg.matrix_norm(roots.double() - reference) / torch.linalg.matrix_norm(reference)
        assert error.max() < rtol[root], (root, error)


def test_newton_floors_rank_deficient_factors_instead_of_diverging():
    from hf_colossal.optim.shampoo import RELATIVE_RIDGE, inverse_root as eigh_root, newton_inverse_root

    factors = _spd_stack(64, 2, torch.float32, rank=12)  # null space with fp32 round-off eigenvalues
    roots, ok = newton_inverse_root(factors, root=4, eps=1e-12)
    assert ok.all() and roots.isfinite().all()
    ridge = RELATIVE_RIDGE * torch.linalg.matrix_norm(factors.double())
    reference = torch.stack([eigh_root(f[None].double(), root=4, eps=float(r))[0][0] for f, r in zip(factors, ridge)])
    error = torch.linalg.matrix_norm(roots.double() - reference) / torch.linalg.matrix_norm(reference)
    assert error.max() < 2e-2
    # Not PSD: the iteration diverges and the block is flagged; the other block is fine.
    bad = torch.stack([factors[0] - 10 * torch.eye(64), factors[1]])
    _, ok = newton_inverse_root(bad, root=4, eps=1e-12)
    assert ok.tolist() == [False, True]


# -- root_inverse="qr": warm-started eigenbasis refreshes --------------------------------------------------------


def test_cholesky_qr_equals_householder_qr_up_to_column_signs_and_flags_dependent_columns():
    from hf_colossal.optim.shampoo import cholesky_qr

    generator = torch.Generator().manual_seed(3)
    # Columns scaled over six decades: a Gram condition number of about 1e12 after unit scaling would be far worse.
    matrices = torch.randn(3, 40, 40, generator=generator, dtype=torch.float64) * torch.logspace(0, -6, 40)
    for dtype in (torch.float64, torch.float32):
        q, ok = cholesky_qr(matrices.to(dtype))
        reference = torch.linalg.qr(matrices)[0]
        signs = torch.sign((q.double() * reference).sum(-2, keepdim=True))
        assert ok.all() and q.dtype == dtype
        torch.testing.assert_close(q.double(), reference * signs, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-5)
    dependent = matrices.clone()
    dependent[1, :, 5] = dependent[1, :, 4]
    assert cholesky_qr(dependent)[1].tolist() == [True, False, True]


def test_qr_inverse_root_converges_to_the_exact_root_on_a_fixed_factor():
    from hf_colossal.optim.shampoo import RELATIVE_RIDGE, inverse_root, qr_inverse_root

    factors = _spd_stack(32, 2, torch.float64, rank=20)  # rank-deficient: the shifted power step must still work
    ridge = RELATIVE_RIDGE * torch.linalg.matrix_norm(factors)
    reference = torch.stack([inverse_root(f[None], root=4, eps=float(r))[0][0] for f, r in zip(factors, ridge)])
    bases = torch.linalg.qr(torch.randn(2, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    errors = []
    for _ in range(60):
        roots, bases, ok = qr_inverse_root(factors, bases, root=4, eps=1e-12)
        assert ok.all()
        errors.append(float((torch.linalg.matrix_norm(roots - reference) / torch.linalg.matrix_norm(reference)).max()))
    # Subspace iteration from a random start: the error falls with every refresh (0.04 -> 2e-5 here; close
    # eigenvalues converge slowly).
    assert errors[0] > 1e-2 and errors[-1] < 1e-4
    assert all(later <= earlier * 1.01 for earlier, later in zip(errors, errors[1:]))


def test_shampoo_qr_starts_exact_then_tracks_the_reference():
    """At the first preconditioned step "qr" is a full eigendecomposition (the reference up to the 1e-6 ||A||_F
    ridge); later refreshes are one warm QR step each, close to the exact roots on these slowly changing factors."""
    hp = {**SHAMPOO_BASE, "root_inverse": "qr", "preconditioner_eps": 1e-4}
    params, grads = make_problem()
    expected = reference_shampoo(params, grads, hp)
    params, grads = make_problem()
    tensors, optimizer = run(Shampoo, params, grads, hp)
    for name, tensor in tensors.items():
        moved = (expected[name] - make_problem()[0][name]).norm()
        assert (tensor.detach() - expected[name]).norm() < 0.05 * moved, name
    state = optimizer.state[tensors["w1"]]
    assert optimizer.preconditioner_failures() == 0 and len(state["basis_left"]) == 4
    # The stored bases are orthonormal.
    for basis in state["basis_left"] + state["basis_right"]:
        torch.testing.assert_close(basis.mT @ basis, torch.eye(basis.shape[0], dtype=basis.dtype), atol=1e-10, rtol=0)


def test_shampoo_qr_refreshes_move_the_basis_toward_the_exact_root():
    """Recomputations at steps 3 (eigendecomposition), 6 and 9 (QR refreshes): the last roots are closer to the
    exact roots of the final factors than roots taken in the basis of step 3 would be."""
    from hf_colossal.optim.shampoo import RELATIVE_RIDGE, inverse_root, root_from_eigenpairs

    hp = {**SHAMPOO_BASE, "root_inverse": "qr", "preconditioner_eps": 1e-4}
    params, grads = make_problem()
    tensors, optimizer = run(Shampoo, params, grads[:3], hp, dtype=torch.float32)
    state = optimizer.state[tensors["w1"]]
    first_bases = [basis.clone() for basis in state["basis_left"]]
    _train(Shampoo, hp, grads[3:], tensors, optimizer)
    optimizer.state_dict()  # takes in the roots recomputed at step 9 (overlap_recompute: pending until step 10)
    for block, (factor, root, first, last) in enumerate(zip(state["factor_left"], state["root_left"], first_bases,
                                                            state["basis_left"])):
        ridge = max(1e-4, RELATIVE_RIDGE * float(torch.linalg.matrix_norm(factor)))
        exact = inverse_root(factor[None], root=4, eps=ridge)[0][0]
        stale = root_from_eigenpairs(factor[None], (first * (factor @ first)).sum(dim=-2)[None], first[None], root=4,
                                     eps=1e-4)[0]
        error, stale_error = (float(torch.linalg.matrix_norm(r - exact) / torch.linalg.matrix_norm(exact))
                              for r in (root, stale))
        assert not torch.equal(last, first), block
        assert error < 0.75 * stale_error and error < 0.05, (block, error, stale_error)


def test_switching_a_group_to_qr_starts_its_bases_from_eigendecompositions():
    hp = {**SHAMPOO_BASE, "root_inverse": "newton"}
    params, grads = make_problem()
    tensors, optimizer = run(Shampoo, params, grads[:4], hp, dtype=torch.float32)
    optimizer.param_groups[0]["root_inverse"] = "qr"
    _train(Shampoo, hp, grads[4:], tensors, optimizer)
    state = optimizer.state[tensors["w1"]]
    assert optimizer.preconditioner_failures() == 0 and len(state["basis_right"]) == 4
    for basis in state["basis_left"] + state["basis_right"]:
        torch.testing.assert_close(basis.mT @ basis, torch.eye(basis.shape[0], dtype=basis.dtype), atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", ["adam", "none", "l2_decay_start_1"])
def test_shampoo_eigh_and_newton_both_match_the_reference(case):
    for method in ("eigh", "newton"):
        hp = {**SHAMPOO_BASE, **SHAMPOO_CASES[case], "root_inverse": method}
        params, grads = make_problem()
        expected = reference_shampoo(params, grads, hp)
        params, grads = make_problem()  # run() updates float64 params in place
        tensors, optimizer = run(Shampoo, params, grads, hp)
        for name, tensor in tensors.items():
            torch.testing.assert_close(tensor.detach(), expected[name], rtol=1e-9, atol=1e-10, msg=(method, name))
        assert optimizer.preconditioner_failures() == 0


@pytest.mark.parametrize("method", ["newton", "qr"])
def test_root_failure_keeps_previous_root_and_counts(method):
    options = {**SHAMPOO_BASE, "precondition_frequency": 2, "start_preconditioning_step": 1,
               "preconditioner_dtype": "float32", "root_inverse": method}
    params, grads = make_problem()
    tensors, optimizer = run(Shampoo, params, grads[:2], options, dtype=torch.float32)
    state = optimizer.state[tensors["w1"]]
    kept = ("root_left", "basis_left") if method == "qr" else ("root_left",)
    before = {key: [t.clone() for t in state[key]] for key in kept}
    if method == "newton":
        state["factor_left"][0].copy_(-torch.eye(4))  # negative definite: the Newton iteration diverges
    else:
        state["factor_left"][0].fill_(float("nan"))  # the Cholesky factorisation of the QR refresh fails
    for t in range(2, 4):
        for name, tensor in tensors.items():
            tensor.grad = grads[t][name].float()
        optimizer.step()
    for key in kept:  # the failed block keeps its root (and eigenbasis); the others were recomputed
        assert torch.equal(state[key][0], before[key][0]) and not torch.equal(state[key][2], before[key][2]), key
    assert [int(c) for c in state["preconditioner_failures"]] == [1, 0, 0, 0]
    assert all(t.isfinite().all() for t in tensors.values())


@pytest.mark.parametrize("setting", ["untouched", "legacy_high", "new_api_ieee"])
def test_matmul_precision_is_restored_after_steps(setting):
    from hf_colossal.optim._precision import current_fp32_matmul_precision, fp32_matmul_precision

    matmul = torch.backends.cuda.matmul
    saved_new, saved_legacy = matmul.fp32_precision, torch.get_float32_matmul_precision()
    try:
        if setting == "legacy_high":
            torch.set_float32_matmul_precision("high")
        elif setting == "new_api_ieee":
            matmul.fp32_precision = "ieee"
        before = matmul.fp32_precision
        with fp32_matmul_precision("tf32"):
            assert current_fp32_matmul_precision() == "tf32"
        with pytest.raises(RuntimeError), fp32_matmul_precision("ieee"):
            raise RuntimeError("inside")
        assert matmul.fp32_precision == before
        for cls, options in ((Shampoo, SHAMPOO_BASE), (Soap, SOAP_BASE)):
            for dtype_name in ("tfloat32", "float32", "bfloat16"):
                params, grads = make_problem()
                run(cls, params, grads[:4], {**options, "matmul_dtype": dtype_name, "preconditioner_dtype": "float32"},
                    dtype=torch.float32)
                assert matmul.fp32_precision == before
        if setting != "new_api_ieee":  # the legacy getter still agrees (no mixed-API error)
            assert torch.get_float32_matmul_precision() == ("high" if setting == "legacy_high" else saved_legacy)
    finally:
        matmul.fp32_precision = saved_new
        if setting == "legacy_high":
            torch.set_float32_matmul_precision(saved_legacy)
            matmul.fp32_precision = saved_new


def test_defaults_are_tf32_products_and_qr_roots():
    params, _ = make_problem()
    shampoo = Shampoo([params["w1"].float().requires_grad_()])
    soap = Soap([params["w1"].float().requires_grad_()])
    assert shampoo.defaults["matmul_dtype"] == "tfloat32" and shampoo.defaults["root_inverse"] == "qr"
    assert soap.defaults["matmul_dtype"] == "tfloat32"
    with pytest.raises(ValueError, match="root_inverse"):
        Shampoo([params["w1"].float().requires_grad_()], root_inverse="cholesky")
    with pytest.raises(ValueError, match="newton_iterations"):
        Shampoo([params["w1"].float().requires_grad_()], newton_iterations=0)
