"""Assertions the optimizer tests share."""

import copy

import torch


def snapshot(optimizer, tensors):
    """Copies of the named tensors and of the optimizer's state, to compare after a step."""
    return {name: t.detach().clone() for name, t in tensors.items()}, copy.deepcopy(optimizer.state_dict()["state"])


def assert_state_equal(left, right):
    """Two ``state_dict()["state"]`` mappings hold bit-identical tensors under the same keys."""
    assert left.keys() == right.keys()
    for index in left:
        assert left[index].keys() == right[index].keys()
        for key in left[index]:
            assert torch.equal(left[index][key], right[index][key]), (index, key)
