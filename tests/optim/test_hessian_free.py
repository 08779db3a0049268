"""Hessian-free (hf_colossal.optim.hessian_free): Gauss-Newton products against explicit J^T H J in each Jv mode and
the fallback to forward mode where a backward has no derivative, the preconditioner's per-example squares by each
of their three routes, PCG and Martens' stopping rule, damping, CG-iterate backtracking and the line search, state
and exact resume, non-finite steps, refusals, and steps on real digits. (It does not beat tuned AdamW on digits:
benchmarks/RESULTS.md; no test claims it does.)"""

import copy
import math

import pytest
import torch
from torch import nn

from hf_colossal.config import OptionsError
from hf_colossal.nn.autoencoder import DeepAutoencoder
from hf_colossal.optim import HessianFree, HessianFreeBatch
from hf_colossal.optim.hessian_free import (
    JVP_MODES,
    GaussNewtonOperator,
    Linearization,
    armijo_backtracking,
    backtrack_iterates,
    batch_loss_normalizer,
    gauss_newton_vector_product,
    levenberg_marquardt,
    martens_preconditioner,
    per_example_losses,
    preconditioned_cg,
)
from hf_colossal.recipes.data import digits_arrays
from hf_colossal.registry import build_optimizer, get_optimizer_spec

from .helpers import assert_state_equal


def _tiny(out_features):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out_features)).double()


def _targets(kind, n=5, c=3):
    g = torch.Generator().manual_seed(2)
    if kind == "cross_entropy":
        labels = torch.randint(0, c, (n,), generator=g)
        labels[1] = -100  # ignored
        return labels
    if kind == "mse":
        return torch.randn(n, c, generator=g, dtype=torch.float64)
    return torch.rand(n, c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("jvp_mode", JVP_MODES)
@pytest.mark.parametrize("kind", ["cross_entropy", "mse", "sigmoid_bce"])
def test_gauss_newton_product_equals_explicit_jt_h_j(kind, jvp_mode):
    model = _tiny(3)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = _targets(kind)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(vector):
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = vector[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
        return out

    def outputs_of(vector):
        return torch.func.functional_call(model, unflat(vector), (x,))

    jacobian = torch.autograd.functional.jacobian(outputs_of, theta).reshape(-1, theta.numel())  # (N*C, P)
    z = outputs_of(theta).detach()
    normalizer = batch_loss_normalizer(kind, z, targets)

    def loss_of_outputs(flat_z):
        return per_example_losses(kind, flat_z.view_as(z), targets, normalizer).sum()

    hessian = torch.autograd.functional.hessian(loss_of_outputs, z.reshape(-1))  # exact H_L, (N*C, N*C)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = jacobian.T @ hessian @ jacobian @ v

    operator = GaussNewtonOperator(lambda p: torch.func.functional_call(model, p, (x,)),
                                   {n: t.detach() for n, t in model.named_parameters()}, kind, targets,
                                   jvp_mode=jvp_mode)
    got = operator(v)
    assert operator.linearization.jvp_mode == ("reverse_over_reverse" if jvp_mode == "auto" else jvp_mode)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the matching loss makes G positive semi-definite
    gn = jacobian.T @ hessian @ jacobian
    assert torch.linalg.eigvalsh(gn).min() > -1e-10


class _TanhDerivative(torch.autograd.Function):
    """grad * (1 - y^2), with no derivative of its own: a backward that raises under a second backward."""

    @staticmethod
    def forward(grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("no second derivative")


class _Tanh(torch.autograd.Function):
    """tanh with a forward-mode rule and a backward that is either marked ``once_differentiable`` (a second
    backward silently loses this path) or raises under a second backward."""

    @staticmethod
    def forward(x, once_differentiable):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.once_differentiable = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        if ctx.once_differentiable:
            return _once_differentiable_tanh_backward(ctx, grad), None
        return _TanhDerivative.apply(grad, y), None

    @staticmethod
    def jvp(ctx, tangent, _):
        (y,) = ctx.saved_tensors
        return tangent * (1 - y * y)


@torch.autograd.function.once_differentiable
def _once_differentiable_tanh_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return grad * (1 - y * y)


class _TanhModule(nn.Module):
    def __init__(self, backward):
        super().__init__()
        self.backward_kind = backward

    def forward(self, x):
        if self.backward_kind == "differentiable":
            return torch.tanh(x)
        return _Tanh.apply(x, self.backward_kind == "once_differentiable")


@pytest.mark.parametrize("backward", ["once_differentiable", "raises"])
def test_jacobian_vector_products_fall_back_to_forward_mode_where_the_backward_has_no_derivative(backward):
    """Reverse-over-reverse needs the backward's derivative. Where a layer lacks it (autograd raises, or silently
    drops the path), the adjoint check at the first product picks forward mode: the same products and steps, and
    the optimizer keeps forward mode for later steps."""
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = _targets("mse", n=6)
    results = {}
    for kind in ("differentiable", backward):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 4), _TanhModule(kind), nn.Linear(4, 3)).double()
        params = {n: t.detach() for n, t in model.named_parameters()}
        tangent = torch.ones(sum(t.numel() for t in params.values()), dtype=torch.float64)
        linearization = Linearization(lambda p, model=model: torch.func.functional_call(model, p, (x,)), params)
        jv = linearization.jvp(tangent)
        expected_mode = "reverse_over_reverse" if kind == "differentiable" else "forward"
        assert linearization.jvp_mode == expected_mode
        opt = HessianFree(model.parameters(), model, damping=0.1, cg_max_iters=5)
        for _ in range(2):
            opt.step(HessianFreeBatch(targets=targets, loss="mse", args=(x,)))
            assert opt.last_step["jvp"] == expected_mode
        results[kind] = (jv, [p.detach() for p in model.parameters()])
    torch.testing.assert_close(results[backward][0], results["differentiable"][0], rtol=1e-12, atol=1e-14)
    for with_fallback, plain in zip(results[backward][1], results["differentiable"][1]):
        torch.testing.assert_close(with_fallback, plain, rtol=1e-9, atol=1e-12)
    if backward == "once_differentiable":  # what the check guards against: reverse-over-reverse loses the path
        forced = Linearization(lambda p, model=model: torch.func.functional_call(model, p, (x,)), params,
                               jvp_mode="reverse_over_reverse")
        assert not torch.allclose(forced.jvp(tangent), jv)


def _spd(n, condition, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T, torch.randn(n, generator=g, dtype=torch.float64)


def test_gauss_newton_product_is_zero_where_the_outputs_do_not_depend_on_the_parameters():
    """An unused parameter, or outputs that depend on no parameter at all, get zero curvature (as torch.func's
    vjp gives), not an autograd error."""
    linear, unused = nn.Linear(3, 2), torch.zeros(4)
    x, targets = torch.randn(5, 3), torch.randn(5, 2)
    params = {"weight": linear.weight.detach(), "bias": linear.bias.detach(), "unused": unused}
    tangent = {name: torch.ones_like(value) for name, value in params.items()}
    for forward in (lambda p: x @ p["weight"].T + p["bias"], lambda p: x[:, :2] * 2.0):
        product = gauss_newton_vector_product(forward, params, tangent, "mse", targets)
        assert torch.equal(product["unused"], torch.zeros(4))
    assert all(not value.any() for value in product.values())


def _per_example_setup(model, x, targets, loss):
    optimizer = HessianFree(model.parameters(), model)
    batch = HessianFreeBatch(targets=targets, loss=loss, args=(x,))
    optimizer._gradient_rows = batch.size
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        normalizer = batch_loss_normalizer(loss, batch.select(model(x)), targets)
    return optimizer, batch, params, normalizer


@pytest.mark.parametrize("loss", ["sigmoid_bce", "cross_entropy"])
def test_linear_per_example_squares_equal_the_vmap_ones(loss):
    """The outer-product identity for MLPs (one forward and backward) gives vmap's sum of squared per-example
    gradients."""
    torch.manual_seed(0)
    if loss == "sigmoid_bce":
        model, x = DeepAutoencoder((16, 12, 4, 12, 16)), torch.rand(10, 16)
        targets = x
    else:
        model, x = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(10, 6)
        targets = torch.randint(0, 3, (10,))
    optimizer, batch, params, normalizer = _per_example_setup(model, x, targets, loss)
    fast = optimizer._linear_per_example_squares(batch, None, params, normalizer)
    assert fast is not None
    optimizer._linear_per_example_squares = lambda *args: None  # force the vmap path
    torch.testing.assert_close(fast, optimizer._per_example_squared_gradients(batch, None, params, normalizer),
                               rtol=1e-5, atol=1e-8)


def test_per_example_squares_fall_back_to_vmap_outside_plain_mlps():
    """Another layer's parameters, a linear layer applied twice, or sequences of rows: the identity does not hold
    and vmap computes the sum."""
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    cases = [(nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 3)), torch.randn(8, 5)),
             (nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(5, 3)), torch.randn(8, 5)),
             (nn.Sequential(nn.Linear(5, 3), nn.Flatten()), torch.randn(8, 2, 5))]
    for model, x in cases:
        targets = torch.randn(8, 6) if x.dim() == 3 else torch.randn(8, 3)
        optimizer, batch, params, normalizer = _per_example_setup(model, x, targets, "mse")
        assert optimizer._linear_per_example_squares(batch, None, params, normalizer) is None
        assert optimizer._per_example_squared_gradients(batch, None, params, normalizer).isfinite().all()


class _DataDependent(nn.Module):
    """A branch on a tensor's value, which vmap refuses (as transformers' attention-mask checks)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))  # not a linear layer's: no outer-product shortcut

    def forward(self, x):
        return self.linear(x) * self.scale if bool((x > 0).any()) else self.linear(x)


def test_per_example_squares_fall_back_to_one_example_at_a_time_where_vmap_fails():
    """The loop gives vmap's sum where both work; where vmap fails the optimizer switches to the loop for good."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 3)), torch.randn(8, 5)
    optimizer, batch, params, normalizer = _per_example_setup(model, x, torch.randn(8, 3), "mse")
    torch.testing.assert_close(optimizer._looped_per_example_squares(batch, None, params, normalizer),
                               optimizer._vmap_per_example_squares(batch, params, normalizer), rtol=1e-5, atol=1e-8)

    model = _DataDependent()
    optimizer, batch, params, normalizer = _per_example_setup(model, x, torch.randn(8, 3), "mse")
    with pytest.raises(RuntimeError, match="vmap"):
        optimizer._vmap_per_example_squares(batch, params, normalizer)
    squares = optimizer._per_example_squared_gradients(batch, None, params, normalizer)
    assert optimizer._vmap_per_example is False
    expected = torch.zeros_like(squares)
    for i in range(8):  # by hand: each example's gradient of N times its share of the batch loss
        model.zero_grad()
        ((model(x[i:i + 1]) - batch.targets[i:i + 1]).square().sum() / normalizer * 8).backward()
        expected += torch.cat([p.grad.reshape(-1) for p in model.parameters()]).square()
    torch.testing.assert_close(squares, expected / 8, rtol=1e-5, atol=1e-8)


def test_cg_solves_a_known_spd_system_with_and_without_preconditioner():
    a, b = _spd(20, 50.0)
    exact = torch.linalg.solve(a, b)
    for inverse in (None, 1.0 / a.diagonal()):
        result = preconditioned_cg(lambda v: a @ v, b, inverse_preconditioner=inverse, max_iters=60,
                                   tolerance=1e-12)
        torch.testing.assert_close(result.x, exact, rtol=1e-6, atol=1e-8)
        assert result.phi == pytest.approx(float(-0.5 * b @ exact), rel=1e-8)
        assert result.stop in ("converged", "max_iters", "relative_progress")
        # phi is tracked from the residual: check it against its definition
        assert result.phis[-1] == pytest.approx(float(0.5 * result.x @ a @ result.x - b @ result.x), rel=1e-8)
    # warm start from the solution: phi starts at the optimum
    warm = preconditioned_cg(lambda v: a @ v, b, x0=exact, max_iters=5)
    assert warm.phis[0] == pytest.approx(float(-0.5 * b @ exact), rel=1e-8)


def test_relative_progress_rule_stops_cg_early_on_an_ill_conditioned_system():
    a, b = _spd(300, 1e4, seed=1)
    result = preconditioned_cg(lambda v: a @ v, b, max_iters=300, tolerance=5e-4)
    assert result.stop == "relative_progress"
    i, k = result.iterations, max(10, math.ceil(0.1 * result.iterations))
    assert 10 < i < 200
    assert result.phi == pytest.approx(float(-0.5 * b @ torch.linalg.solve(a, b)), rel=0.01)  # near the optimum
    # the rule's condition holds at the stop and not at the iteration before
    assert (result.phis[i] - result.phis[i - k]) / result.phis[i] < k * 5e-4
    k_prev = max(10, math.ceil(0.1 * (i - 1)))
    assert (result.phis[i - 1] - result.phis[i - 1 - k_prev]) / result.phis[i - 1] >= k_prev * 5e-4
    # kept iterates: ceil(1.3^j) and the last
    indices = [index for index, _, _ in result.iterates]
    assert indices[:6] == [1, 2, 3, 4, 5, 7] and indices[-1] == i


def test_cg_stops_on_nonfinite_or_nonpositive_curvature_with_a_finite_iterate():
    a, b = _spd(6, 10.0)
    calls = []

    def broken(v):
        calls.append(1)
        return a @ v if len(calls) < 3 else torch.full_like(v, float("nan"))

    result = preconditioned_cg(broken, b, max_iters=10)
    assert result.stop == "nonfinite" and result.iterations == 2 and torch.isfinite(result.x).all()
    negative = preconditioned_cg(lambda v: -v, b, max_iters=10)
    assert negative.stop == "nonpositive_curvature" and negative.iterations == 0 and not negative.x.any()


@pytest.mark.parametrize("case", ["relative_progress", "max_iters", "converged", "nonfinite", "nonpositive_curvature"])
def test_cg_reading_its_scalars_one_iteration_late_gives_the_same_run(case):
    """``lookahead`` (the CUDA default: the host queues iteration i+1 before it reads iteration i's scalars)
    changes no decision and no iterate; it costs at most one product more."""
    a, b = _spd(300, 1e4, seed=1)
    if case == "converged":
        b = torch.zeros_like(b)
    results, products = [], []
    for lookahead in (False, True):
        calls = []

        def matvec(v):
            calls.append(1)
            if case == "nonfinite" and len(calls) >= 8:
                return torch.full_like(v, float("nan"))
            return -(a @ v) if case == "nonpositive_curvature" else a @ v

        max_iters = 15 if case == "max_iters" else 300
        results.append(preconditioned_cg(matvec, b, max_iters=max_iters, lookahead=lookahead))
        products.append(len(calls))
    plain, ahead = results
    assert plain.stop == case and ahead.stop == case
    assert plain.iterations == ahead.iterations and plain.phis == ahead.phis
    assert torch.equal(plain.x, ahead.x)
    assert [(i, phi) for i, _, phi in plain.iterates] == [(i, phi) for i, _, phi in ahead.iterates]
    assert products[0] <= products[1] <= products[0] + 1
    if case == "converged":  # a zero residual at the start costs no product
        assert products == [0, 0] and plain.iterations == 0


def test_levenberg_marquardt_rule():
    assert levenberg_marquardt(1.0, 0.1) == pytest.approx(1.5)
    assert levenberg_marquardt(1.0, 0.9) == pytest.approx(2 / 3)
    assert levenberg_marquardt(1.0, 0.5) == 1.0
    assert levenberg_marquardt(1.0, float("nan")) == pytest.approx(1.5)
    assert levenberg_marquardt(1.0, -math.inf) == pytest.approx(1.5)
    assert levenberg_marquardt(1e-9, 0.9, min_damping=1e-8) == 1e-8
    assert levenberg_marquardt(10.0, 0.0, max_damping=12.0) == 12.0


def test_cg_iterate_backtracking_and_armijo_line_search():
    iterates = [(i, torch.tensor([float(i)]), -float(i)) for i in (1, 2, 3, 5, 7)]
    values = {1: 3.0, 2: 1.0, 3: 2.0, 5: 4.0, 7: 5.0}  # objective at each iterate
    seen = []

    def objective(x):
        seen.append(int(x))
        return values[int(x)]

    position, value = backtrack_iterates(iterates, objective)
    assert iterates[position][0] == 2 and value == 1.0 and seen == [7, 5, 3, 2, 1]
    # the last iterate best: one evaluation back, then stop
    seen.clear()
    values.update({7: 0.0})
    assert backtrack_iterates(iterates, objective) == (4, 0.0) and seen == [7, 5]
    # non-finite counts as +inf
    values.update({7: float("nan")})
    assert backtrack_iterates(iterates, objective)[0] == 1

    f = lambda alpha: (alpha - 0.3) ** 2  # f(0) = 0.09, slope -0.6
    alpha, value, evaluations = armijo_backtracking(f, 0.09, -0.6)
    assert alpha == pytest.approx(0.8 ** 3) and value == pytest.approx(f(alpha)) and evaluations == 4
    assert 0.09 + 1e-2 * alpha * -0.6 >= value and f(0.8 ** 2) > 0.09 + 1e-2 * 0.8 ** 2 * -0.6
    assert armijo_backtracking(f, 0.09, 0.5)[0] == 0.0  # not a descent direction
    assert armijo_backtracking(lambda a: float("inf"), 0.09, -0.6, max_trials=3) == (0.0, 0.09, 3)
    assert martens_preconditioner(torch.tensor([0.0, 3.0]), 1.0).tolist() == pytest.approx([1.0, 4 ** -0.75])


# ---------------------------------------------------------------------------------------------------------------
# The optimizer


@pytest.fixture(scope="module")
def digits():
    return torch.from_numpy(digits_arrays()["train"][0])


def _autoencoder_run(x, steps, state=None, **options):
    model = DeepAutoencoder((64, 16, 4, 16, 64))
    settings = dict(damping=0.01, curvature_batch_fraction=0.5, cg_max_iters=10)
    settings.update(options)
    opt = HessianFree(model.parameters(), model, **settings)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    batch = HessianFreeBatch(targets=x, loss="sigmoid_bce", args=(x,))
    losses = [float(opt.step(batch)) for _ in range(steps)]
    return model, opt, losses


def test_steps_decrease_the_loss_and_state_round_trips_with_exact_resume(digits):
    x = digits[:100]
    rng = torch.get_rng_state()
    straight, straight_opt, losses = _autoencoder_run(x, 4)
    assert losses[-1] < losses[0] and straight_opt.accepted_steps >= 3
    assert straight_opt.backward_equivalents() > 4 * 1.5

    torch.set_rng_state(rng)
    first, first_opt, _ = _autoencoder_run(x, 2)
    saved = copy.deepcopy((first.state_dict(), first_opt.state_dict()))
    assert saved[1]["hessian_free"]["step_calls"] == 2
    assert {"hf_warm_start"} == set(saved[1]["state"][0])
    resumed, resumed_opt, _ = _autoencoder_run(x, 2, state=saved)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert resumed_opt.damping == straight_opt.damping and resumed_opt.step_calls == 4
    assert_state_equal(straight_opt.state_dict()["state"], resumed_opt.state_dict()["state"])


def test_nonfinite_loss_or_direction_is_rejected_and_raises_damping(digits):
    x = digits[:64]
    model = DeepAutoencoder((64, 16, 64))
    opt = HessianFree(model.parameters(), model, damping=0.5)
    before = copy.deepcopy(model.state_dict())
    bad = x.clone()
    bad[3, 5] = float("nan")
    opt.step(HessianFreeBatch(targets=bad, loss="sigmoid_bce", args=(x,)))
    assert opt.last_step["accepted"] is False and "non-finite" in opt.last_step["rejected"]
    assert opt.damping == pytest.approx(5.0) and opt.rejected_steps == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name

    # a step whose trial points overflow: the line search rejects them, parameters stay finite
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0]))

        def forward(self, t):
            return t * self.w * torch.where(self.w.detach() > 1.0, torch.tensor(float("inf")), torch.tensor(1.0))

    model = Exploding()
    opt = HessianFree(model.parameters(), model, damping=1e-3, preconditioner="none")
    opt.step(HessianFreeBatch(targets=torch.full((4, 1), 3.0), loss="mse", args=(torch.ones(4, 1),)))
    assert opt.last_step["accepted"] is False and opt.damping > 1e-3
    assert model.w.item() == 1.0


def test_clear_errors():
    model = nn.Linear(2, 2)
    opt = HessianFree(model.parameters(), model)
    with pytest.raises(RuntimeError, match="needs the batch.*HessianFreeTrainer"):
        opt.step()
    with pytest.raises(TypeError, match="not a loss closure"):
        opt.step(lambda: torch.tensor(0.0))
    with pytest.raises(ValueError, match="no Gauss-Newton form.*Sampled or generative"):
        HessianFreeBatch(targets=torch.zeros(2), loss="nll_sampled")
    with pytest.raises(ValueError, match="BatchNorm1d; batch normalisation"):
        bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        HessianFree(bn.parameters(), bn)
    with pytest.raises(ValueError, match="not parameters of the model"):
        HessianFree([nn.Parameter(torch.zeros(1))], model)
    with pytest.raises(ValueError, match=r"curvature_batch_fraction=2\.0; expected 0 < fraction <= 1"):
        build_optimizer("hessian_free", model, lr=1.0, options="curvature_batch_fraction=2")
    with pytest.raises(OptionsError, match="'learning_rate' is set by --learning_rate"):
        get_optimizer_spec("hessian_free").parse_options("learning_rate=1")
    spec = get_optimizer_spec("hessian_free")
    assert spec.capabilities.needs_model and not spec.capabilities.ddp
    opt = build_optimizer("hessian_free", model, lr=1.0, weight_decay=0.1, options="cg_max_iters=7,loss=mse")
    assert opt.settings["cg_max_iters"] == 7 and {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}


def test_weight_decay_enters_the_objective(digits):
    """With L2 weight decay the minimised objective includes (w/2)|theta|^2: a huge decay shrinks the weights."""
    x = digits[:64]
    model = DeepAutoencoder((64, 16, 64))
    norm = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()
    opt = HessianFree(model.parameters(), model, weight_decay=1.0, damping=1e-3)
    for _ in range(3):
        opt.step(HessianFreeBatch(targets=x, loss="sigmoid_bce", args=(x,)))
    assert torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm() < 0.5 * norm
    assert opt.last_step["objective_after"] < opt.last_step["objective_before"]


def test_each_evaluation_of_a_step_draws_the_same_dropout_masks():
    """With dropout in training mode, every forward of one step (gradient, Gauss-Newton products, line search)
    runs under the step's seed: the same masks each time, those ``torch.manual_seed(seed)`` gives, and other masks
    at the next step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 3)).train()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    optimizer = HessianFree(model.parameters(), model)
    batch = HessianFreeBatch(targets=y, loss="cross_entropy", args=(x,))
    params = {name: p.detach() for name, p in model.named_parameters()}
    outputs = []
    for seed in (5, 5, 6):
        forward = optimizer._forward_fn(batch, seed)
        outputs.append(forward(params))
        torch.manual_seed(seed)
        assert torch.equal(outputs[-1], model(x).detach())
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
