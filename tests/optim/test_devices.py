"""CPU and CUDA give the same LAMB / LARS result (within fp32 rounding), in fp32, bf16 and fp16; Shampoo and SOAP
give the same result with their recomputations on a side CUDA stream as on the main stream.

Skipped where there is no GPU; run on the device machine with `pytest tests/optim/test_devices.py`.
"""

import pytest
import torch

from hf_colossal.optim import Lamb, Lars, Shampoo, Soap

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


@cuda
@pytest.mark.parametrize("cls", [Shampoo, Soap])
def test_side_stream_recomputation_equals_the_same_schedule_on_the_main_stream(cls):
    """Blocks large enough that a recomputation is still running on the side stream when the next step starts; a
    missing wait or an input changed under it would show far above rounding against the same schedule computed on
    the main stream (same kernels, same order). CPU against GPU is not compared here: the factors of blocks with
    fewer gradient rows than columns have degenerate eigenspaces, whose bases legitimately differ by device."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(768, 512), (512, 512), (300, 200), (64,)]
    inits = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[0.1 * torch.randn(s, generator=generator) for s in shapes] for _ in range(12)]
    results = {}
    for side_stream in (True, False):
        params = [init.to("cuda", copy=True).requires_grad_() for init in inits]
        optimizer = cls(params, lr=1e-3, max_preconditioner_dim=256, precondition_frequency=2)
        if not side_stream:
            optimizer._side_stream = lambda device: None
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad.to("cuda")
            optimizer.step()
        assert optimizer.preconditioner_failures() == 0
        assert bool(optimizer._side_streams) == side_stream
        results[side_stream] = [param.detach().cpu() for param in params]
    for overlapped, in_line, init in zip(results[True], results[False], inits):
        torch.testing.assert_close(overlapped - init, in_line - init, rtol=1e-6, atol=1e-8)
