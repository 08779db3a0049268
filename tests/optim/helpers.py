"""The problem and assertions the Lamb and Lars tests share, and a probe of Shampoo / SOAP's batched
recomputations."""

import copy

import torch


def snapshot(optimizer, tensors):
    """Copies of the named tensors and of the optimizer's state, to compare after a step."""
    return {name: t.detach().clone() for name, t in tensors.items()}, copy.deepcopy(optimizer.state_dict()["state"])


def record_refresh_batches(optimizer):
    """Wrap a Shampoo / SOAP optimizer's batched preconditioner computation (``_refresh``); returns the list to
    which every call appends (factor size, factors in the batch)."""
    batches, compute = [], optimizer._refresh

    def refresh(key, inputs):
        batches.append((inputs[0].shape[-1], inputs[0].shape[0]))
        return compute(key, inputs)

    optimizer._refresh = refresh
    return batches


def assert_state_equal(left, right):
    """Two ``state_dict()["state"]`` mappings hold bit-identical tensors (and equal counts) under the same keys."""
    assert left.keys() == right.keys()
    for index in left:
        assert left[index].keys() == right[index].keys()
        for key in left[index]:
            a, b = left[index][key], right[index][key]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (index, key)


SHAPES = {"w1": (6, 5), "b1": (6,), "w2": (3, 6), "b2": (3,)}
STEPS = 4
MISSING_GRAD = (2, "b2")  # at step 2, b2 has no gradient: it is not updated and its state does not advance


def make_problem(*, seed, w2_grad_scale, grad_scale, dtype=torch.float64):
    """Initial parameters and a gradient sequence (float64), deterministic for ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    scales = {"w1": 0.5, "b1": 0.1, "w2": 3.0, "b2": 0.2}
    params = {
        name: torch.randn(shape, generator=generator, dtype=dtype) * scales[name] for name, shape in SHAPES.items()
    }
    grads = []
    for step in range(STEPS):
        grads.append(
            {
                name: None
                if (step, name) == MISSING_GRAD
                else torch.randn(shape, generator=generator, dtype=dtype) * (w2_grad_scale if name == "w2" else grad_scale)
                for name, shape in SHAPES.items()
            }
        )
    return params, grads


def groups_and_options(groups, options):
    """``groups`` with ``options["bias_group"]`` (per-group overrides) merged into the bias group; the other options."""
    options = dict(options)
    bias_overrides = options.pop("bias_group", {})
    return [(groups[0][0], groups[0][1]), (groups[1][0], {**groups[1][1], **bias_overrides})], options
