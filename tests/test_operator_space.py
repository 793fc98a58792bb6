"""`ParameterSpace`: the flat vectors of the chosen parameters (split, flatten, norm, random vectors)."""

import pytest
import torch
from torch import nn

from hessdiag.operator import ParameterSpace, trainable_parameters


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_split_and_flatten_are_inverse_and_follow_the_parameter_order():
    model = small_model()
    space = ParameterSpace(model, None, distributed=True)
    assert space.dim == space.size == sum(p.numel() for p in model.parameters())
    assert space.shard is None and not space.distributed and space.share == 1.0
    flat = torch.arange(space.dim, dtype=torch.float64)
    pieces = space.split(flat)
    assert [piece.shape for piece in pieces] == [p.shape for p in model.parameters()]
    assert torch.equal(pieces[0].reshape(-1), flat[:12])  # first weight (4 x 3) first
    assert torch.equal(space.flatten(pieces), flat)


def test_flatten_takes_none_as_zero_and_sparse_as_dense():
    model = small_model()
    space = ParameterSpace(model, None, distributed=True)
    tensors = [torch.ones_like(p) for p in model.parameters()]
    tensors[1] = None
    tensors[2] = torch.ones_like(model[2].weight).to_sparse()
    flat = space.flatten(tensors)
    assert flat.shape == (space.dim,)
    assert torch.equal(flat[12:16], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(flat[16:], torch.ones(space.dim - 16, dtype=torch.float64))


def test_norm_total_and_finish_without_data_parallelism():
    space = ParameterSpace(small_model(), None, distributed=True)
    flat = torch.full((space.dim,), 2.0, dtype=torch.float64)
    assert space.norm(flat) == pytest.approx(2.0 * space.dim**0.5)
    assert space.finish(flat) is flat  # nothing to reduce
    assert space.total(torch.tensor(1.5, dtype=torch.float64)) == 1.5


def test_random_unit_vectors_are_unit_and_seeded():
    space = ParameterSpace(small_model(), None, distributed=True)
    first, again, other = space.random_unit_vector(3), space.random_unit_vector(3), space.random_unit_vector(4)
    assert first.shape == (space.dim,) and first.dtype == torch.float64
    assert space.norm(first) == pytest.approx(1.0)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_chosen_parameters_a_subset_in_the_given_order():
    model = small_model()
    chosen = [model[2].bias, model[0].weight]
    space = ParameterSpace(model, chosen, distributed=True)
    assert space.params == chosen and space.dim == 2 + 12
    assert trainable_parameters(model, None) == list(model.parameters())


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ([], "`params` is empty"),
        ([nn.Parameter(torch.zeros(2))], r"`params\[0\]` is not a parameter of the model"),
        ("twice", "the same parameter twice"),
    ],
)
def test_bad_parameter_choices_are_refused(params, match):
    model = small_model()
    if params == "twice":
        params = [model[0].weight, model[0].weight]
    with pytest.raises(ValueError, match=match):
        ParameterSpace(model, params, distributed=True)
