"""Ghost batch norm: per-ghost-batch statistics in training, the running average of Algorithm 1, eval unchanged."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_colossal.nn import GhostBatchNorm, apply_ghost_batch_norm


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                         nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def test_training_normalises_each_ghost_batch_and_updates_running_stats_in_order():
    torch.manual_seed(1)
    x = torch.randn(32, 8, 5, 5) * 3 + 1
    reference = nn.BatchNorm2d(8)
    ghost = GhostBatchNorm(8, ghost_batch_size=8)
    out = ghost(x)
    expected = torch.cat([reference(chunk) for chunk in x.split(8)])  # BN applied to each ghost batch in turn
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ghost.running_mean, reference.running_mean)
    torch.testing.assert_close(ghost.running_var, reference.running_var)
    whole = nn.BatchNorm2d(8)(x)
    assert not torch.allclose(out, whole, atol=1e-3)  # ghost statistics differ from whole-batch ones


def test_uneven_batch_ends_with_a_smaller_ghost_batch():
    x = torch.randn(20, 4)
    out = GhostBatchNorm(4, ghost_batch_size=8)(x)
    reference = nn.BatchNorm1d(4)
    torch.testing.assert_close(out, torch.cat([reference(c) for c in x.split(8)]))


def test_transform_keeps_state_and_eval_outputs():
    model = cnn()
    x = torch.randn(64, 1, 8, 8)
    model.train()(x)  # some running statistics
    original = copy.deepcopy(model).eval()
    transformed = apply_ghost_batch_norm(model, ghost_batch_size=16)
    assert sum(isinstance(m, GhostBatchNorm) for m in transformed.modules()) == 2
    assert transformed.state_dict().keys() == original.state_dict().keys()
    torch.testing.assert_close(transformed.eval()(x), original(x))
    small = torch.randn(16, 1, 8, 8)
    torch.testing.assert_close(transformed.train()(small), original.train()(small))  # batch <= ghost: plain BN
    big = torch.randn(64, 1, 8, 8)
    assert not torch.allclose(transformed(big), original(big), atol=1e-4)


def test_refusals_are_clear():
    with pytest.raises(ValueError, match="ghost_batch_size must be an int >= 2"):
        GhostBatchNorm(4, ghost_batch_size=1)
    with pytest.raises(ValueError, match="momentum=None"):
        apply_ghost_batch_norm(nn.Sequential(nn.BatchNorm1d(4, momentum=None)), 8)
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        apply_ghost_batch_norm(nn.Sequential(nn.SyncBatchNorm(4)), 8)


def test_functional_equivalence_of_one_ghost_batch():
    x = torch.randn(8, 3)
    bn = GhostBatchNorm(3, ghost_batch_size=8)
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.1, bn.eps))
