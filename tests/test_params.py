"""The parameter store knows the layout it holds: a network of another layout is one line, never
filled with a prefix of the flat vector (the review's 22.5-against-228 run)."""

import pytest
import torch

from impala.agent.params import ParameterStore, layout_of
from impala.errors import ConfigError
from impala.nets.mlp import MLPNet


def test_a_smaller_network_is_refused_not_filled_with_a_prefix():
    big, small = MLPNet(4, 2, num_hidden=64), MLPNet(4, 2, num_hidden=32)
    store = ParameterStore(*ParameterStore.allocate(big))
    before = [p.clone() for p in small.parameters()]
    with pytest.raises(ConfigError) as err:
        store.load_into(small, -1)
    line = str(err.value)
    assert "\n" not in line and "policy_torso.0.weight" in line and "[32, 4]" in line, line
    assert "[64, 4]" in line and "--net package.module:build" in line, line
    assert all(torch.equal(a, b) for a, b in zip(before, small.parameters(), strict=True))
    with pytest.raises(ConfigError, match="not the one the learner publishes"):
        store.publish(small)


def test_same_size_but_other_names_or_shapes_are_refused():
    """A net of the same parameter count but another layout (what a prefix copy would take)."""
    a = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 4))  # 30 + 28
    b = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 6))  # 28 + 30
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    store = ParameterStore(*ParameterStore.allocate(a))
    with pytest.raises(ConfigError, match=r"parameter 0 is '0.weight' \[4, 6\]"):
        store.load_into(b, -1)


def test_the_layout_crosses_to_other_processes_with_the_tensors():
    model = MLPNet(3, 2, num_hidden=8)
    store = ParameterStore(*ParameterStore.allocate(model))
    flat, seq, layout = store.tensors
    assert layout == layout_of(model) and layout[0] == ("policy_torso.0.weight", (8, 3))
    other = ParameterStore(flat, seq, layout)
    copy = MLPNet(3, 2, num_hidden=8)
    assert other.load_into(copy, -1) == 0
    assert torch.equal(torch.nn.utils.parameters_to_vector(copy.parameters()), flat)


def test_weights_of_another_size_from_elsewhere_are_refused():
    store = ParameterStore(*ParameterStore.allocate(MLPNet(3, 2, num_hidden=8)))
    with pytest.raises(ConfigError, match="received for a network of"):
        store.assign(1, torch.zeros(store.flat.numel() + 1))
    with pytest.raises(ConfigError):  # a single number would broadcast over the vector
        store.assign(1, torch.zeros(1))
    assert store.version == 0
