"""K-FAC (hf_colossal.optim.kfac): factors against per-example formulas, preconditioning against dense algebra,
statistics hygiene, state, non-finite steps, DDP, refusals, and a seeded quality check on real data."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from hf_colossal.config import OptionsError
from hf_colossal.optim import Kfac
from hf_colossal.optim.kfac import (
    adam_direction,
    damped_inverses,
    damped_kronecker_quadratic,
    find_kfac_layers,
    reduction_ratio,
    update_factor_,
)
from hf_colossal.registry import build_optimizer, get_optimizer_spec

from .distributed import gloo_process_group
from .helpers import assert_state_equal

EXACT = dict(base_rule="sgd", momentum=0.0, kl_clip=None, factor_interval=1, inverse_interval=1, skip_layers=())


class Conv1D(nn.Module):
    """The shape of transformers' GPT-2 Conv1D (weight (in, nf)), without importing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def _layer_case(kind):
    """(module, input batch, per-example input rows (N, R, d_A) with the bias's 1, output as (N, R, d_G) fn)."""
    g = torch.Generator().manual_seed(3)
    n = 5
    if kind in ("linear", "conv1d"):
        module = nn.Linear(4, 3) if kind == "linear" else Conv1D(3, 4)
        x = torch.randn(n, 6, 4, generator=g, dtype=torch.float64)
        rows = torch.cat([x, torch.ones(n, 6, 1, dtype=torch.float64)], dim=2)
        return module, x, rows, lambda s: s
    if kind == "conv2d":
        module = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
        patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)
        rows = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=torch.float64)], dim=2)
        return module, x, rows, lambda s: s.flatten(2).transpose(1, 2)
    module = nn.Embedding(7, 3)
    x = torch.randint(0, 7, (n, 6), generator=g)
    return module, x, F.one_hot(x, 7).double(), lambda s: s


@pytest.mark.parametrize("kind, approximation", [(kind, approximation) for kind in ("linear", "conv1d", "conv2d")
                                                 for approximation in ("expand", "reduce")]
                         + [("embedding", "expand")])  # embeddings: expand, a diagonal A
def test_factors_match_per_example_formulas(kind, approximation):
    module, x, rows, positions = _layer_case(kind)
    module.double()
    target = torch.randn(positions(module(x)).shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    opt = Kfac(module.parameters(), module, lr=0.0, linear_approximation=approximation,
               conv2d_approximation=approximation, **EXACT)
    assert [layer.kind for layer in opt.layers] == ["embedding" if kind == "embedding" else
                                                     "conv2d" if kind == "conv2d" else "linear"]
    out = positions(module(x))
    per_example_losses = (torch.tanh(out) * target).sum(dim=(1, 2))
    per_example_losses.mean().backward(retain_graph=True)
    opt.step()
    grads = torch.stack([torch.autograd.grad(loss, out, retain_graph=True)[0][i]
                         for i, loss in enumerate(per_example_losses)])  # g_nr = d loss_n / d s_nr
    n, r = rows.shape[:2]
    if approximation == "expand":
        a_ref = torch.einsum("nri,nrj->ij", rows, rows) / (n * r)
        g_ref = torch.einsum("nri,nrj->ij", grads, grads) / n
    else:
        mean_rows, summed = rows.mean(dim=1), grads.sum(dim=1)
        a_ref, g_ref = mean_rows.T @ mean_rows / n, summed.T @ summed / n
    state = opt.state[module.weight]
    if kind == "embedding":
        a_ref = a_ref.diagonal()
    torch.testing.assert_close(state["kfac_a"], a_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["kfac_g"], g_ref, rtol=1e-10, atol=1e-12)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.proj = nn.Linear(6 + 4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids, images):
        tokens = self.embed(ids)  # (N, T, 6)
        pooled = self.conv(images).mean(dim=(2, 3))  # (N, 4)
        h = torch.cat([tokens, pooled[:, None].expand(-1, ids.shape[1], -1)], dim=2)
        return self.head(torch.tanh(self.norm(self.proj(h))))


def _net_batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 11, (n, 5), generator=g), torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n, 5), generator=g))


def _loss(model, batch):
    ids, images, labels = batch
    return F.cross_entropy(model(ids, images).reshape(-1, 3), labels.reshape(-1))


class _NetWithLoss(_Net):
    """The same network returning its loss, as a model must for the damping adaptation's replays."""

    def forward(self, ids, images, labels):
        return F.cross_entropy(super().forward(ids, images).reshape(-1, 3), labels.reshape(-1))


def _net(cls=_Net):
    torch.manual_seed(0)
    return cls().double()


@pytest.mark.parametrize("method, damping_scale", [("inverse", "absolute"), ("eigen", "absolute"),
                                                   ("inverse", "relative")])
def test_preconditioned_step_equals_dense_damped_inverses(method, damping_scale):
    model = _net()
    opt = build_optimizer("kfac", model, lr=1.0,
                          options={**EXACT, "method": method, "damping": 0.01, "damping_scale": damping_scale})
    _loss(model, _net_batch(1)).backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    for layer in opt.layers:
        state = opt.state[layer.weight]
        a, g = state["kfac_a"], state["kfac_g"]
        a_full = torch.diag(a) if a.dim() == 1 else a
        a_mean, g_mean = a_full.trace() / a_full.shape[0], g.trace() / g.shape[0]
        # absolute: (pi sqrt(lambda), sqrt(lambda) / pi), pi = sqrt(a_mean / g_mean); relative: lambda times
        # a_mean * g_mean, which makes the terms sqrt(lambda) a_mean and sqrt(lambda) g_mean
        if damping_scale == "absolute":
            pi = (a_mean / g_mean).sqrt()
            gamma_a, gamma_g = 0.1 * pi, 0.1 / pi
        else:
            gamma_a, gamma_g = 0.1 * a_mean, 0.1 * g_mean
        damped_a = a_full + gamma_a * torch.eye(a_full.shape[0], dtype=a.dtype)
        damped_g = g + gamma_g * torch.eye(g.shape[0], dtype=g.dtype)
        expected = torch.linalg.solve(damped_g, layer.grad_matrix()) @ torch.linalg.inv(damped_a)
        names = [n for n, p in model.named_parameters() if any(p is q for q in layer.params)]
        for name, param, update in zip(names, layer.params, layer.split(expected)):
            torch.testing.assert_close(before[name] - param.detach(), update, rtol=1e-8, atol=1e-10)
    assert {layer.name for layer in opt.layers} == {"embed", "conv", "proj", "head"}
    # the LayerNorm falls back to SGD on the raw gradient
    torch.testing.assert_close(before["norm.weight"] - model.norm.weight.detach(), model.norm.weight.grad)


def test_eval_and_no_grad_forwards_do_not_change_factors():
    states = []
    for extra_forwards in (False, True):
        model = _net()
        opt = build_optimizer("kfac", model, lr=0.1, options="factor_interval=1,inverse_interval=2")
        for step in range(3):
            if extra_forwards:
                model.eval()
                _loss(model, _net_batch(100 + step)).backward()  # eval mode, even with a backward
                model.zero_grad()
                model.train()
                with torch.no_grad():
                    _loss(model, _net_batch(200 + step))
            _loss(model, _net_batch(step)).backward()
            opt.step()
            model.zero_grad()
        states.append(opt.state_dict()["state"])
    assert_state_equal(*states)


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_gradient_accumulation_equals_one_big_batch(approximation):
    options = {"linear_approximation": approximation, "factor_interval": 1, "inverse_interval": 1}
    results = []
    for micro_batches in (1, 4):
        model = _net()
        opt = build_optimizer("kfac", model, lr=0.05, options=options)
        for step in range(2):
            ids, images, labels = _net_batch(step, n=16)
            size = 16 // micro_batches
            for i in range(micro_batches):
                part = slice(i * size, (i + 1) * size)
                (_loss(model, (ids[part], images[part], labels[part])) / micro_batches).backward()
            opt.step()
            model.zero_grad()
        results.append((opt.state_dict()["state"], [p.detach() for p in model.parameters()]))
    (state_big, params_big), (state_micro, params_micro) = results
    for index in state_big:
        for key in state_big[index]:
            torch.testing.assert_close(state_micro[index][key], state_big[index][key], rtol=1e-9, atol=1e-12)
    for a, b in zip(params_micro, params_big):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _train(model, opt, seeds):
    for seed in seeds:
        _loss(model, _net_batch(seed)).backward()
        opt.step()
        model.zero_grad()


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_state_dict_round_trip_resumes_exactly(method):
    options = f"factor_interval=2,inverse_interval=3,method={method}"
    model = _net()
    opt = build_optimizer("kfac", model, lr=0.05, weight_decay=0.01, options=options)
    _train(model, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["kfac"] == {"step_calls": 3, "factor_updates": 2, "damping": 1e-3, "reduction_ratio": None}
    assert {"kfac_a", "kfac_g", "step", "exp_avg", "exp_avg_sq", "kfac_exp_avg"} <= set(saved_opt["state"][0])
    _train(model, opt, range(3, 7))

    fresh = _net()
    fresh.load_state_dict(saved_model)
    fresh_opt = build_optimizer("kfac", fresh, lr=0.05, weight_decay=0.01, options=options)
    fresh_opt.load_state_dict(saved_opt)
    _train(fresh, fresh_opt, range(3, 7))
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert_state_equal(opt.state_dict()["state"], fresh_opt.state_dict()["state"])


def test_inverse_updates_reach_the_batched_preconditioning():
    """Layers of one shape are preconditioned with stacks of their inverses; each inverse update must land in
    those stacks (it writes into the layers' views of them), on the steps of ``inverse_interval`` only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = build_optimizer("kfac", model, lr=0.05, options="factor_interval=1,inverse_interval=3,skip_layers=")
    generator = torch.Generator().manual_seed(1)
    changed, previous = [], None
    for step in range(7):
        x = torch.randn(16, 6, generator=generator, dtype=torch.float64)
        F.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=generator)).backward()
        opt.step()
        model.zero_grad()
        (layers, g_inverses, a_inverses), = opt._batched_layers()  # the two 6 x 6 layers
        if previous is not None and not torch.equal(previous, g_inverses):
            changed.append(step)
        previous = g_inverses.clone()
        for layer, g_inverse, a_inverse in zip(layers, g_inverses, a_inverses):
            state = opt.state[layer.weight]
            assert g_inverse.data_ptr() == state["kfac_g_inv"].data_ptr()
            assert a_inverse.data_ptr() == state["kfac_a_inv"].data_ptr()
    assert changed == [3, 6]
    for layer, g_inverse in zip(layers, g_inverses):  # the stack holds the damped inverse of the step-6 factor
        state = opt.state[layer.weight]
        gamma_g = opt._damping_terms(state)[1]
        torch.testing.assert_close(g_inverse @ (state["kfac_g"] + gamma_g * torch.eye(6, dtype=torch.float64)),
                                   torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-9)


def test_copies_of_the_model_run_without_feeding_or_holding_the_optimizer():
    """A deep copy (EMA, best-model copies) or an unpickled copy of the model gets inert hooks: its forwards work in
    training mode and never reach the original's statistics; the original keeps collecting."""
    import io

    model = _net()
    opt = build_optimizer("kfac", model, lr=0.05, options="factor_interval=1,inverse_interval=1")
    _train(model, opt, range(2))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy_ in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        hooks = [hook for module in copy_.modules() for hook in module._forward_hooks.values()]
        assert len(hooks) == len(opt.layers) and all(hook._optimizer is None for hook in hooks)  # inert
        copy_.train()
        _loss(copy_, _net_batch(5)).backward()
        assert all(layer.input_sum is None and layer.output_grad_sum is None for layer in opt.layers)
    _loss(model, _net_batch(6)).backward()
    assert all(layer.input_sum is not None and layer.output_grad_sum is not None for layer in opt.layers)


class _Branchy(nn.Module):
    """A trunk and a branch that only some batches reach (a conditional path, an MoE expert)."""

    def __init__(self):
        super().__init__()
        self.trunk, self.branch = nn.Linear(4, 4), nn.Linear(4, 4)
        self.use_branch = False

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.branch(h) if self.use_branch else h


def _input_factor(x):
    rows = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return rows.T @ rows / len(x)


def test_a_layer_first_used_late_starts_from_its_own_statistics():
    """Each layer ramps its own factor decay: a branch first reached at the fourth factor update gets its batch
    factor (decay 0), not 0.95 x identity + 0.05 x batch."""
    torch.manual_seed(0)
    model = _Branchy().double()
    opt = build_optimizer("kfac", model, lr=0.01, options="factor_interval=1,inverse_interval=1,skip_layers=")
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        model.use_branch = step == 3
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
        if step == 3:
            expected_a = _input_factor(torch.tanh(model.trunk(x)).detach())
        model(x).pow(2).sum().backward()
        opt.step()
        model.zero_grad()
    state = opt.state[model.branch.weight]
    torch.testing.assert_close(state["kfac_a"], expected_a, rtol=1e-12, atol=1e-12)
    assert state["kfac_factor_updates"] == 1 and opt.state[model.trunk.weight]["kfac_factor_updates"] == 4


def test_resuming_with_the_other_method_recomputes_inverses_and_keeps_the_configured_damping():
    model = _net()
    opt = build_optimizer("kfac", model, lr=0.05, options="factor_interval=1,inverse_interval=3,damping=0.01")
    _train(model, opt, range(2))
    saved = copy.deepcopy(opt.state_dict())
    eigen = build_optimizer("kfac", model, lr=0.05,
                            options="factor_interval=1,inverse_interval=3,method=eigen,damping=0.1")
    eigen.load_state_dict(saved)
    assert eigen.damping == 0.1  # fixed damping: the configured value, not the checkpoint's 0.01 (nor its inverses)
    _train(model, eigen, range(2, 3))  # step 2: not an inverse step, yet the eigen inverses are computed
    for layer in eigen.layers:
        state = eigen.state[layer.weight]
        assert "kfac_g_inv" not in state and "kfac_g_eigenvectors" in state
        assert ("kfac_a_inv" in state) == layer.diagonal_input_factor
    # the same method with another fixed damping: the next step inverts the loaded factors with the new damping
    other = _net()
    resumed = build_optimizer("kfac", other, lr=0.05, options="factor_interval=1,inverse_interval=3,damping=0.1")
    resumed.load_state_dict(saved)
    _train(other, resumed, range(2, 3))
    for layer in resumed.layers:
        state = resumed.state[layer.weight]
        gamma_g = resumed._damping_terms(state)[1]
        eye = torch.eye(state["kfac_g"].shape[0], dtype=torch.float64)
        torch.testing.assert_close(state["kfac_g_inv"] @ (state["kfac_g"] + gamma_g * eye), eye, rtol=0, atol=1e-9)


def test_a_module_called_several_times_in_one_forward_counts_its_examples_once():
    """Weights reused across depth (one Linear applied three times, as ALBERT does): G sums the three calls'
    positions for the same N examples, N * sum(delta delta^T) (K-FAC-expand over the shared positions), not 3N x."""
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, keep=None):
            for _ in range(3):
                x = self.lin(x)
                if keep is not None:
                    x.retain_grad()
                    keep.append(x)
                x = torch.tanh(x)
            return x

    torch.manual_seed(0)
    model = Reused().double()
    opt = build_optimizer("kfac", model, lr=0.01, options="factor_interval=1,inverse_interval=1,skip_layers=")
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for micro_batch in (x[:4], x[4:]):  # two accumulation micro-batches: their examples add up to 8
        outputs = []
        (model(micro_batch, outputs).pow(2).mean() / 2).backward()
        expected += sum(s.grad.T @ s.grad for s in outputs)
    opt.step()
    torch.testing.assert_close(opt.state[model.lin.weight]["kfac_g"], 8 * expected, rtol=1e-12, atol=1e-14)

    # calls of different batch sizes in one pass (a shared encoder on 4 queries and 8 documents): the larger batch
    # counts, in either order
    for order in ((4, 8), (8, 4)):
        torch.manual_seed(0)
        lin = nn.Linear(4, 4).double()
        opt = build_optimizer("kfac", lin, lr=0.01, options="factor_interval=1,inverse_interval=1,skip_layers=")
        outputs = [lin(x[:n]) for n in order]
        for output in outputs:
            output.retain_grad()
        sum(output.pow(2).mean() for output in outputs).backward()
        opt.step()
        expected = sum(output.grad.T @ output.grad for output in outputs)
        torch.testing.assert_close(opt.state[lin.weight]["kfac_g"], 8 * expected, rtol=1e-12, atol=1e-14)


def test_skip_layers_takes_one_pattern_as_a_string_and_refuses_other_types():
    model = _net()
    opt = Kfac(model.parameters(), model, skip_layers="head")
    assert opt.settings["skip_layers"] == ("head",) and {layer.name for layer in opt.layers} == {"embed", "conv",
                                                                                                  "proj"}
    with pytest.raises(ValueError, match="skip_layers must be a tuple of module-name regexes"):
        Kfac(_net().parameters(), _net(), skip_layers=5)


def test_adam_direction_is_algorithm_1_with_each_tensors_own_step_count():
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    exp_avgs = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    exp_avg_sqs = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    steps = [torch.tensor(float(start)) for start in (0, 4, 9)]  # e.g. a parameter without gradients for a while
    moments = [(torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.float64)) for s in shapes]
    beta1, beta2, eps = 0.9, 0.99, 1e-8
    for step in range(1, 4):
        grads = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
        directions = adam_direction(grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps)
        for index, (grad, start) in enumerate(zip(grads, (0, 4, 9))):
            m, v = moments[index]
            m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad**2
            moments[index] = (m, v)
            t = start + step
            expected = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            torch.testing.assert_close(directions[index], expected, rtol=1e-12, atol=0)
            torch.testing.assert_close(exp_avgs[index], m, rtol=1e-12, atol=0)
    assert [float(s) for s in steps] == [3.0, 7.0, 12.0]


def test_damped_inverses_equal_the_dense_inverse():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 40, 12, generator=generator, dtype=torch.float64)
    factors = rows.transpose(1, 2) @ rows / 40
    damping = torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0], dtype=torch.float64)
    expected = torch.linalg.inv(factors + damping[:, None, None] * torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(damped_inverses(factors, damping), expected, rtol=1e-10, atol=1e-12)


def test_nonfinite_gradients_skip_the_step_and_statistics_never_enter_factors():
    model = _net()
    opt = build_optimizer("kfac", model, lr=0.05, options="factor_interval=1,inverse_interval=1")
    _train(model, opt, range(2))
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    _loss(model, _net_batch(5)).backward()
    model.proj.weight.grad[0, 0] = float("nan")
    opt.step()
    model.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert_state_equal(state, opt.state_dict()["state"])
    assert all(group["nonfinite_skips"] == 1 for group in opt.param_groups)

    # finite gradients, an infinite statistic: the step happens, that factor keeps its value
    _loss(model, _net_batch(6)).backward()
    opt.layers[[layer.name for layer in opt.layers].index("proj")].input_sum[0, 0] = float("inf")
    proj_factor, head_factor = (opt.state[m.weight]["kfac_a"].clone() for m in (model.proj, model.head))
    opt.step()
    assert torch.equal(opt.state[model.proj.weight]["kfac_a"], proj_factor)
    assert not torch.equal(opt.state[model.head.weight]["kfac_a"], head_factor)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    update_target = torch.ones(2, 2)
    update_factor_(update_target, torch.full((2, 2), float("nan")), 0.5, torch.tensor(False))
    assert torch.equal(update_target, torch.ones(2, 2))

    erroring = build_optimizer("kfac", model, lr=0.05, options="nonfinite=error")
    _loss(model, _net_batch(7)).backward()
    model.head.bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
        erroring.step()


def test_layer_selection_fallbacks_and_conv1d_detection():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(50, 8)
            self.attn = Conv1D(24, 8)
            self.big = nn.Linear(8, 40)
            self.lm_head = nn.Linear(8, 50, bias=False)
            self.lm_head.weight = self.wte.weight
            self.norm = nn.LayerNorm(8)

    model = Tied()
    layers, fallback = find_kfac_layers(model, {id(p) for p in model.parameters()}, skip_layers=(),
                                        max_factor_dim=32)
    assert [(layer.name, layer.kind) for layer in layers] == [("attn", "linear")]
    assert fallback["big"].startswith("factor of dimension 40 > max_factor_dim=32")
    assert "tied" in fallback["wte"] and "tied" in fallback["lm_head"]
    assert "LayerNorm" in fallback["norm"]
    model.lm_head.weight = nn.Parameter(torch.randn(50, 8))  # untied
    layers, fallback = find_kfac_layers(model, {id(p) for p in model.parameters()}, skip_layers=("lm_head",))
    assert fallback["lm_head"] == "matches skip_layers" and "wte" in {layer.name for layer in layers}


def test_options_and_construction_errors():
    spec = get_optimizer_spec("kfac")
    with pytest.raises(OptionsError, match=r"(?s)unknown option 'dampng'.*damping \(float"):
        spec.parse_options("dampng=1")
    with pytest.raises(OptionsError, match="'method' must be 'inverse' \\| 'eigen'"):
        spec.parse_options("method=cholesky")
    with pytest.raises(OptionsError, match="'damping_scale' must be 'absolute' \\| 'relative'"):
        spec.parse_options("damping_scale=adaptive")
    with pytest.raises(ValueError, match="damping_scale"):
        Kfac(_net().parameters(), _net(), damping_scale="scaled")
    with pytest.raises(OptionsError, match="'damping_adaptation' must be 'none' \\| 'levenberg_marquardt'"):
        spec.parse_options("damping_adaptation=lm")
    with pytest.raises(ValueError, match="adaptation_interval"):
        Kfac(_net().parameters(), _net(), damping_adaptation="levenberg_marquardt", adaptation_interval=0)
    with pytest.raises(OptionsError, match="'lr' is set by --learning_rate"):
        spec.parse_options("lr=1")
    with pytest.raises(OptionsError, match="damping"):
        spec.validate(spec.parse_options("damping=-1"), lr=1e-3)
    with pytest.raises(TypeError, match="needs the model"):
        build_optimizer("kfac", [torch.zeros(2, requires_grad=True)], lr=1e-3)
    assert spec.capabilities.needs_model and not spec.capabilities.fsdp2 and not spec.capabilities.deepspeed


# ---------------------------------------------------------------------------------------------------------------
# Data parallel: 2 gloo processes equal one process on the global batch

DDP_OPTIONS = dict(lr=0.05, weight_decay=0.01, options="factor_interval=1,inverse_interval=2")
# the damping adaptation replays each rank's half batch and averages the two losses: the global batch's loss
DDP_ADAPTIVE_OPTIONS = dict(DDP_OPTIONS, options=DDP_OPTIONS["options"] + ",damping_adaptation=levenberg_marquardt,"
                            "adaptation_interval=1")


def _ddp_worker(rank, world_size, port, result_path, adaptive):
    with gloo_process_group(rank, world_size, port):
        _ddp_train_and_save(rank, world_size, result_path, adaptive)


def _ddp_train_and_save(rank, world_size, result_path, adaptive):
    model = _net(_NetWithLoss if adaptive else _Net)
    opt = build_optimizer("kfac", model, **(DDP_ADAPTIVE_OPTIONS if adaptive else DDP_OPTIONS))
    ddp = DistributedDataParallel(model)
    for step in range(4):
        ids, images, labels = _net_batch(step, n=16)
        part = slice(rank * 8, (rank + 1) * 8)
        if adaptive:
            ddp(ids[part], images[part], labels[part]).backward()
        else:
            F.cross_entropy(ddp(ids[part], images[part]).reshape(-1, 3), labels[part].reshape(-1)).backward()
        opt.step()
        model.zero_grad()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_module

    sharded = distribute_module(nn.Linear(4, 4), init_device_mesh("cpu", (world_size,)))
    try:
        Kfac(sharded.parameters(), sharded)
        refusal = None
    except ValueError as err:
        refusal = str(err)
    dampings = [torch.zeros((), dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(dampings, torch.tensor(opt.damping, dtype=torch.float64))
    if rank == 0:
        torch.save(([p.detach() for p in model.parameters()], opt.state_dict()["state"], refusal,
                    [d.item() for d in dampings]), result_path)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed_damping", "adaptive_damping"])
def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path, adaptive):
    mp.spawn(_ddp_worker, args=(2, 29650 + adaptive, tmp_path / "ddp.pt", adaptive), nprocs=2, join=True)
    params, state, refusal, dampings = torch.load(tmp_path / "ddp.pt", weights_only=False)
    reference = _net(_NetWithLoss if adaptive else _Net)
    opt = build_optimizer("kfac", reference, **(DDP_ADAPTIVE_OPTIONS if adaptive else DDP_OPTIONS))
    for step in range(4):
        batch = _net_batch(step, n=16)
        (reference(*batch) if adaptive else _loss(reference, batch)).backward()
        opt.step()
        reference.zero_grad()
    if adaptive:
        assert opt.damping != 1e-3 and dampings == [pytest.approx(opt.damping, rel=1e-9)] * 2
    for got, expected in zip(params, reference.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-9, atol=1e-12)
    for index, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            torch.testing.assert_close(state[index][key], value, rtol=1e-9, atol=1e-12)
    assert refusal is not None and "FSDP" in refusal


def _branch_batch(rank):
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)


def _ddp_branch_worker(rank, world_size, port, result_path):
    with gloo_process_group(rank, world_size, port):
        torch.manual_seed(0)
        model = _Branchy().double()
        opt = build_optimizer("kfac", model, lr=0.01, options="factor_interval=1,inverse_interval=1,skip_layers=")
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        x = _branch_batch(rank)
        with torch.no_grad():
            branch_input = torch.tanh(model.trunk(x))
        model.use_branch = rank == 0  # rank 1's inputs never reach the branch
        ddp(x).pow(2).sum().backward()
        opt.step()
        nothing = build_optimizer("kfac", model, lr=0.01, options="skip_layers=.*")  # no layer: the base rule only
        assert nothing.layers == []
        nothing.step()
        if rank == 0:
            torch.save((opt.state[model.branch.weight]["kfac_a"], opt.state[model.trunk.weight]["kfac_a"],
                        _input_factor(branch_input)), result_path)


def test_ddp_a_layer_reached_on_some_ranks_only_takes_their_statistics(tmp_path):
    """Under DDP a layer that one rank's inputs never reach (a branch, an MoE expert) must not desynchronise the
    factor collectives: every rank sends every layer, and the factor averages the ranks that had statistics."""
    mp.spawn(_ddp_branch_worker, args=(2, 29654, tmp_path / "branch.pt"), nprocs=2, join=True)
    branch_a, trunk_a, rank0_branch_a = torch.load(tmp_path / "branch.pt")
    torch.testing.assert_close(branch_a, rank0_branch_a, rtol=1e-12, atol=1e-12)  # rank 0's alone
    torch.testing.assert_close(trunk_a, (_input_factor(_branch_batch(0)) + _input_factor(_branch_batch(1))) / 2,
                               rtol=1e-12, atol=1e-12)  # both ranks'


# ---------------------------------------------------------------------------------------------------------------
# Quality: a seeded run on real data (sklearn digits, SmallCNN)

QUALITY_STEPS, QUALITY_BATCH, EVAL_EVERY = 80, 64, 5


def _digits():
    from hf_colossal.recipes.data import load_digits_dataset

    splits = load_digits_dataset(seed=0).with_format("torch")
    return [(rows["pixel_values"], rows["label"]) for rows in (splits["train"][:], splits["eval"][:])]


def _eval_losses(make_optimizer, data):
    from hf_colossal.recipes.models import SmallCNN

    (x_train, y_train), (x_eval, y_eval) = data
    torch.manual_seed(0)
    model = SmallCNN(channels=16)
    opt = make_optimizer(model)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for step in range(1, QUALITY_STEPS + 1):
        index = torch.randint(0, len(x_train), (QUALITY_BATCH,), generator=generator)
        model.train()
        model(x_train[index], y_train[index])["loss"].backward()
        opt.step()
        opt.zero_grad()
        if step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                losses.append((step, model(x_eval, y_eval)["loss"].item()))
    return losses


def test_kfac_reaches_the_tuned_baselines_final_eval_loss_in_fewer_steps(one_thread):
    data = _digits()
    baselines = [lambda m, lr=lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
                 for lr in (5e-3, 1e-2, 2e-2)]
    baselines += [lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for lr in (0.05, 0.1, 0.2)]
    target = min(_eval_losses(make, data)[-1][1] for make in baselines)
    kfac = _eval_losses(lambda m: build_optimizer("kfac", m, lr=2e-2, options="factor_interval=2,inverse_interval=10"),
                        data)
    reached = next((step for step, loss in kfac if loss <= target), None)
    assert reached is not None and reached <= 0.75 * QUALITY_STEPS, (target, kfac)


# ---------------------------------------------------------------------------------------------------------------
# Levenberg-Marquardt damping (Martens & Grosse 2015 Sec. 6.5)


def test_damped_kronecker_quadratic_matches_the_dense_form():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    rows_a, rows_g = torch.randn(7, 3, generator=generator, dtype=torch.float64), torch.randn(7, 4, generator=generator,
                                                                                               dtype=torch.float64)
    a, g = rows_a.T @ rows_a, rows_g.T @ rows_g
    gamma_a, gamma_g = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    vec = delta.T.reshape(-1)  # column-major vec: (A kron G) vec(D) = vec(G D A)
    dense = torch.kron(a + gamma_a * torch.eye(3, dtype=torch.float64), g + gamma_g * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(damped_kronecker_quadratic(delta, a, g, gamma_a, gamma_g), vec @ dense @ vec)
    diagonal = a.diagonal().clone()
    dense = torch.kron(torch.diag(diagonal + gamma_a), g + gamma_g * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(damped_kronecker_quadratic(delta, diagonal, g, gamma_a, gamma_g), vec @ dense @ vec)


def test_reduction_ratio_cases():
    t = torch.tensor
    assert reduction_ratio(t(2.0), t(1.5), t(-1.0)) == 0.5
    assert reduction_ratio(t(2.0), t(2.5), t(-1.0)) == -0.5
    assert reduction_ratio(t(2.0), t(2.5), t(0.3)) == -math.inf  # the model saw no decrease and the loss rose
    assert reduction_ratio(t(2.0), t(2.0), t(0.0)) is None  # a skipped step: nothing to learn
    assert reduction_ratio(t(2.0), t(1.9), t(0.3)) is None
    assert reduction_ratio(t(2.0), t(float("nan")), t(-1.0)) == -math.inf


ADAPTIVE = "damping_adaptation=levenberg_marquardt,adaptation_interval=1,factor_interval=1,inverse_interval=1"


def _digits_cnn_steps(lr, steps, options=ADAPTIVE, model=None, optimizer=None, first_step=0):
    from hf_colossal.recipes.models import SmallCNN

    (x_train, y_train), _ = _digits()
    if model is None:
        torch.manual_seed(0)
        model = SmallCNN(channels=8)
        optimizer = build_optimizer("kfac", model, lr=lr, options=options)
    ratios = []
    for step in range(first_step, first_step + steps):
        index = torch.arange(step * 32, (step + 1) * 32)
        model.train()
        model(x_train[index], y_train[index])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        ratios.append((optimizer.reduction_ratio, optimizer.damping))
    return model, optimizer, ratios


def test_damping_adaptation_replays_the_batch_and_follows_the_reduction_ratio(one_thread):
    omega = (19 / 20) ** 1
    # tiny steps: the loss changes by the linear term of the model, so rho is close to 1 and the damping shrinks
    _, _, small = _digits_cnn_steps(1e-5, 3)
    for rho, _ in small:
        assert abs(rho - 1.0) < 0.05, small
    assert small[-1][1] == pytest.approx(1e-3 * omega**3)
    # a step far too long: the loss rises, rho < 1/4 and the damping grows
    _, _, large = _digits_cnn_steps(30.0, 2)
    assert large[0][0] < 0.25 and large[0][1] == pytest.approx(1e-3 / omega)


def test_damping_adaptation_touches_no_batch_norm_statistics_or_random_stream(one_thread):
    from hf_colossal.recipes.models import SmallCNN

    (x_train, y_train), _ = _digits()
    torch.manual_seed(0)
    model = SmallCNN(channels=8)
    optimizer = build_optimizer("kfac", model, lr=1e-3, options=ADAPTIVE)
    model.train()
    model(x_train[:32], y_train[:32])["loss"].backward()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    optimizer.step()
    assert optimizer.reduction_ratio is not None
    assert torch.equal(torch.get_rng_state(), rng)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    with torch.no_grad():  # evaluation between steps keeps no batch for the replay
        model.eval()
        model(x_train[32:64], y_train[32:64])
    assert optimizer._probe_inputs is None


def test_damping_adaptation_state_round_trip_resumes_exactly(one_thread):
    model, optimizer, _ = _digits_cnn_steps(2e-2, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert saved_opt["kfac"]["damping"] == optimizer.damping != 1e-3
    _, _, straight = _digits_cnn_steps(None, 3, model=model, optimizer=optimizer, first_step=3)

    from hf_colossal.recipes.models import SmallCNN

    fresh = SmallCNN(channels=8)
    fresh.load_state_dict(saved_model)
    fresh_opt = build_optimizer("kfac", fresh, lr=2e-2, options=ADAPTIVE)
    fresh_opt.load_state_dict(saved_opt)
    _, _, resumed = _digits_cnn_steps(None, 3, model=fresh, optimizer=fresh_opt, first_step=3)
    assert resumed == straight
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_damping_adaptation_needs_a_model_that_returns_its_loss():
    model = _net()
    optimizer = build_optimizer("kfac", model, lr=1e-3, options=ADAPTIVE)
    _loss(model, _net_batch(0)).backward()
    with pytest.raises(ValueError, match="return its loss"):
        optimizer.step()
