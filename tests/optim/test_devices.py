"""CPU and CUDA give the same LAMB / LARS result (within fp32 rounding), in fp32, bf16 and fp16; Shampoo and SOAP
give the same result with their recomputations on a side CUDA stream as on the main stream, and replayed as CUDA
graphs as run eagerly; Hessian-free steps (CG reading its scalars one iteration late on CUDA, reverse-over-reverse
products and their adjoint check on the device) and K-FAC steps (batched Cholesky inverses) equal the CPU's.

Skipped where there is no GPU; run on the device machine with `pytest tests/optim/test_devices.py`.
"""

from unittest import mock

import pytest
import torch

from hf_colossal.nn.autoencoder import DeepAutoencoder
from hf_colossal.optim import HessianFree, HessianFreeBatch, Kfac, Lamb, Lars, Shampoo, Soap, _graphs, shampoo
from hf_colossal.recipes.data import digits_arrays
from hf_colossal.optim.shampoo import update_factors

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPTIMIZERS = {
    "lamb": (Lamb, dict(lr=1e-2, weight_decay=0.01, max_trust_ratio=10.0, grad_pre_normalization=True)),
    "lars": (Lars, dict(lr=0.5, weight_decay=1e-4, momentum=0.9, nesterov=True, trust_clip=True)),
}


def run(device, dtype, name, steps=5):
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (128, 64), (7,), (1, 1)]
    params = [torch.randn(s, generator=generator).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes] for _ in range(steps)]
    cls, kwargs = OPTIMIZERS[name]
    opt = cls([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0, "adapt": False}], **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return [p.detach().float().cpu() for p in params], opt


@cuda
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(name, dtype):
    cpu_params, _ = run("cpu", dtype, name)
    gpu_params, opt = run("cuda", dtype, name)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for a, b in zip(cpu_params, gpu_params):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)
    for state in opt.state.values():
        assert all(t.dtype == torch.float32 for k, t in state.items() if k != "step")


def hessian_free_run(device, steps=3):
    """Seeded Hessian-free steps on a small digits autoencoder, float64: (parameters, last-step statistics)."""
    x = torch.from_numpy(digits_arrays()["train"][0][:128]).double().to(device)
    model = DeepAutoencoder((64, 32, 8, 32, 64), seed=0).double().to(device)
    opt = HessianFree(model.parameters(), model, damping=0.01, curvature_batch_fraction=0.5, cg_max_iters=20)
    for _ in range(steps):
        opt.step(HessianFreeBatch(targets=x, loss="sigmoid_bce", args=(x,)))
    return [p.detach().cpu() for p in model.parameters()], opt.last_step


@cuda
def test_cuda_hessian_free_matches_cpu():
    cpu_params, cpu_stats = hessian_free_run("cpu")
    gpu_params, gpu_stats = hessian_free_run("cuda")
    assert gpu_stats["jvp"] == cpu_stats["jvp"] == "reverse_over_reverse"
    assert gpu_stats["cg_iters"] == cpu_stats["cg_iters"] and gpu_stats["accepted"]
    # Not bit-level: CG on this problem magnifies rounding. A 1e-15 relative change of the starting parameters
    # moves the CPU's own result by 3e-6 after one step and 2e-5 after three, while the three steps move the
    # parameters by up to 0.84; the GPU sums in another order. A wrong product or CG quantity moves it far more.
    for a, b in zip(cpu_params, gpu_params):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def kfac_run(device, steps=4):
    """Seeded K-FAC steps (factors every step, inverses every 2) on a small digits autoencoder, float64."""
    x = torch.from_numpy(digits_arrays()["train"][0][:128]).double().to(device)
    model = DeepAutoencoder((64, 32, 8, 32, 64), seed=0).double().to(device)
    opt = Kfac(model.parameters(), model, lr=0.01, weight_decay=0.01, factor_interval=1, inverse_interval=2,
               skip_layers=(), matmul_precision="highest")
    for _ in range(steps):
        model(x, labels=x)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().cpu() for p in model.parameters()], opt


@cuda
def test_cuda_kfac_matches_cpu():
    cpu_params, cpu_opt = kfac_run("cpu")
    gpu_params, gpu_opt = kfac_run("cuda")
    for a, b in zip(cpu_params, gpu_params):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    for layer_cpu, layer_gpu in zip(cpu_opt.layers, gpu_opt.layers):
        torch.testing.assert_close(gpu_opt.state[layer_gpu.weight]["kfac_a_inv"].cpu(),
                                   cpu_opt.state[layer_cpu.weight]["kfac_a_inv"], rtol=1e-9, atol=1e-11)


@cuda
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cuda_nonfinite_gradient_skips_the_step(name):
    _, opt = run("cuda", torch.float32, name, steps=1)
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.full_like(params[0], float("nan"))
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(g["nonfinite_skips"] == 1 for g in opt.param_groups)


SIDE_STREAM_SHAPES = [(768, 512), (512, 512), (300, 200), (64,)]
#: A spin of about 30 ms before every recomputation and factor update: it is still running on the side stream when
#: the main stream goes on, so a missing wait or an input changed under it cannot go unseen.
SLEEP_CYCLES = 50_000_000


def _train_on_cuda(cls, *, side_stream=True, wait=True, join=True, slow=True, steps=12, **options):
    """Train SIDE_STREAM_SHAPES parameters on fixed gradients with ``cls(..., **options)``; ``slow``: every
    side-stream recomputation and every factor update spins first."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).cuda().requires_grad_() for s in SIDE_STREAM_SHAPES]
    grads = [[0.1 * torch.randn(s, generator=generator).cuda() for s in SIDE_STREAM_SHAPES] for _ in range(steps)]
    optimizer = cls(params, lr=1e-3, max_preconditioner_dim=256, precondition_frequency=2, **options)
    compute, accept = optimizer._refresh, optimizer._accept_recomputed

    def slow_refresh(key, inputs):
        if torch.cuda.current_stream() != torch.cuda.default_stream():  # only what overlaps the main stream
            torch.cuda._sleep(SLEEP_CYCLES)
        return compute(key, inputs)

    def slow_update_factors(*args, **kwargs):
        torch.cuda._sleep(SLEEP_CYCLES)
        return update_factors(*args, **kwargs)

    if slow:
        optimizer._refresh = slow_refresh
    if not side_stream:
        optimizer._side_stream = lambda device: None
    if not wait:  # a negative control: take the results in without waiting for the side stream
        optimizer._accept_recomputed = lambda due, per_job, events: accept(due, per_job, [])
    if not join:  # a negative control: the first (in-line) recomputation does not wait for the factor updates
        optimizer._join_side_streams = lambda: None
    with mock.patch.object(shampoo, "update_factors", slow_update_factors if slow else update_factors):
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad
            optimizer.step()
    torch.cuda.synchronize()
    return [param.detach().cpu() for param in params], optimizer


@cuda
@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_side_stream_recomputation_equals_the_same_schedule_on_the_main_stream(cls):
    """Same kernels in the same order, with the factor updates and recomputations on a side stream or on the main
    stream: equal. CPU against GPU is not compared here: the factors of blocks with fewer gradient rows than
    columns have degenerate eigenspaces, whose bases legitimately differ by device."""
    overlapped, optimizer = _train_on_cuda(cls)
    assert optimizer.preconditioner_failures() == 0 and optimizer._side_streams
    in_line, optimizer = _train_on_cuda(cls, side_stream=False)
    assert not optimizer._side_streams
    for got, expected in zip(overlapped, in_line):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@cuda
@pytest.mark.parametrize("control", ["no_event_wait", "no_join"])
@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_without_the_stream_waits_the_side_stream_results_are_wrong(cls, control):
    """The controls for the test above: it would catch a missing wait for the recomputed results, or a first
    recomputation that does not wait for the factor updates."""
    in_line, _ = _train_on_cuda(cls, side_stream=False)
    unsynchronised, _ = _train_on_cuda(cls, wait=control != "no_event_wait", join=control != "no_join")
    assert any(not torch.allclose(got, expected, rtol=1e-3, atol=1e-5) for got, expected in zip(unsynchronised, in_line))


def _factors_and_bases(rows, size=64, seed=0):
    """Well-conditioned factors (eigenvalues about 0.25 to 2.3) and bases near their eigenvectors, so the
    comparison measures the graph, not the round-off of a badly conditioned refresh."""
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(rows, size, 4 * size, generator=generator, dtype=torch.float64)
    factors = grads @ grads.mT / (4 * size)
    vectors = torch.linalg.eigh(factors)[1]
    bases = torch.linalg.qr(vectors + 0.01 * torch.randn(vectors.shape, generator=generator, dtype=torch.float64))[0]
    return factors.float().cuda(), bases.float().cuda()


@cuda
def test_recompute_graphs_capture_pad_and_grow():
    """A kind's first batch runs eagerly, the second is captured; a smaller batch is padded, a larger one is
    captured again. Every result equals the eager computation on the same rows."""
    graphs = _graphs.RecomputeGraphs()
    key = ("qr", 4, 1e-12)
    for expected_captures, rows in zip([0, 1, 1, 2, 2], [3, 2, 1, 5, 4]):
        factors, bases = _factors_and_bases(rows, seed=rows)
        pieces = [[factors[:1], factors[1:]], [bases[:1], bases[1:]]]
        got = graphs(Shampoo._refresh, key, pieces)
        expected = Shampoo._refresh(key, (factors, bases))
        assert graphs.captures == expected_captures
        assert all(g.shape[0] == rows for g in got)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert graphs.replays == 4


@cuda
def test_recompute_graphs_run_a_kind_eagerly_after_its_capture_fails():
    """A recomputation that synchronises the host cannot be captured: the failed capture warns once, and that
    kind runs eagerly from then on with the eager result."""

    def synchronising(key, inputs):
        return (inputs[0] * float(inputs[0].abs().max()),)

    graphs = _graphs.RecomputeGraphs()
    factors, _ = _factors_and_bases(3)
    expected = synchronising(("sync",), (factors,))
    stream = torch.cuda.current_stream()
    for call in range(3):
        if call == 1:
            with pytest.warns(RuntimeWarning, match="capture of the 'sync' recomputations failed"):
                got = graphs(synchronising, ("sync",), [[factors]])
        else:
            got = graphs(synchronising, ("sync",), [[factors]])
        torch.testing.assert_close(got[0], expected[0])
        assert torch.cuda.current_stream() == stream  # the failed capture gave the caller's stream back
    assert graphs.captures == 0 and graphs.replays == 0


@cuda
@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_graphed_recomputations_equal_the_eager_ones(cls):
    """Staggered recomputations (batches of 10 and 11 blocks of 256, 2 of 200) replayed as CUDA graphs train as
    the eager ones do."""
    graphed, optimizer = _train_on_cuda(cls, slow=False, graph_recompute=True)
    assert optimizer._recompute_graphs.replays >= 6 and optimizer.preconditioner_failures() == 0
    eager, optimizer = _train_on_cuda(cls, slow=False, graph_recompute=False)
    assert optimizer._recompute_graphs.captures == 0
    for got, expected in zip(graphed, eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
