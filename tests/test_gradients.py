"""Per-step gradient statistics: exact norms, grouping by module, no side effects, no host sync."""

import math

import pytest
import torch
from torch import nn

from hessdiag.steps.gradients import GradientStats, module_name


def model_with_grads(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Linear(8, 2))
    model(torch.randn(7, 5)).pow(2).sum().backward()
    return model


def norm(tensors):
    return float(torch.linalg.vector_norm(torch.cat([t.detach().flatten().double() for t in tensors])))


def test_module_name():
    assert module_name("layer1.0.conv1.weight") == "layer1.0.conv1"
    assert module_name("blocks.0.attn.in_proj_weight") == "blocks.0.attn"
    assert module_name("scale") == "scale"


def test_norms_match_per_module_and_globally():
    model = model_with_grads()
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    readout = stats.read()
    assert readout.steps == [1] and readout.nonfinite_tensors == [0] and readout.layer_update_ratios is None
    assert readout.grad_norms[0] == pytest.approx(norm(p.grad for p in model.parameters()), rel=1e-6)
    layer_grads, layer_weights = dict(readout.layer_grad_norms[0]), dict(readout.layer_weight_norms)
    assert list(layer_grads) == list(layer_weights) == ["0", "2", "3"]  # by module, in depth order
    for name in layer_grads:
        module = model[int(name)]
        assert layer_grads[name] == pytest.approx(norm(p.grad for p in module.parameters()), rel=1e-6)
        assert layer_weights[name] == pytest.approx(norm(module.parameters()), rel=1e-6)
    assert dict(readout.layer_ratios())["2"] == pytest.approx(layer_grads["2"] / layer_weights["2"])
    assert stats.read() is None  # nothing new


def test_grouping_by_module_with_nested_and_top_level_parameters():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1)
            self.norm = nn.LayerNorm(4)
            self.scale = nn.Parameter(torch.ones(4))

    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.block = Block()
    model.frozen = nn.Linear(4, 4).requires_grad_(False)
    stats = GradientStats(model.named_parameters())
    # named_parameters order: a module's own parameters before its children's
    # every parameter is watched: a frozen layer enters the statistics once it has a gradient
    assert stats.modules == ["embed", "block", "block.attn", "block.attn.out_proj", "block.norm", "frozen"]


def test_many_steps_are_read_in_one_go_and_missing_gradients_count_as_zero():
    model = model_with_grads()
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    model[3].weight.grad = None
    stats.observe(2)
    readout = stats.read()
    assert readout.steps == [1, 2]
    expected = norm(p.grad for p in model.parameters() if p.grad is not None)
    assert readout.grad_norms[1] == pytest.approx(expected, rel=1e-6) and readout.grad_norms[1] < readout.grad_norms[0]
    assert dict(readout.layer_grad_norms[1])["3"] == pytest.approx(float(model[3].bias.grad.norm()), rel=1e-6)


def test_non_finite_gradients_are_counted_per_tensor():
    model = model_with_grads()
    model[0].weight.grad[0, 0] = float("nan")
    model[0].weight.grad[1, 1] = float("nan")
    model[3].bias.grad[0] = float("inf")
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    readout = stats.read()
    assert readout.nonfinite_tensors == [2] and math.isnan(readout.grad_norms[0])
    assert math.isfinite(dict(readout.layer_grad_norms[0])["2"])


def test_parameters_of_several_dtypes():
    model = model_with_grads()
    model[2].double()
    model[2].weight.grad = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    readout = stats.read()
    assert readout.grad_norms[0] == pytest.approx(norm(p.grad for p in model.parameters()), rel=1e-6)
    assert dict(readout.layer_grad_norms[0])["2"] == pytest.approx(float(model[2].weight.grad.norm()), rel=1e-6)


def test_update_ratios_are_the_relative_step_of_the_optimizer():
    model = model_with_grads()
    model[2].double()  # two (device, dtype) groups: the readout must undo the grouping
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    stats = GradientStats(model.named_parameters(), track_updates=True)
    snapshots = []
    for step in range(1, 4):
        stats.observe(step)
        snapshots.append({name: [p.detach().clone() for p in model[int(name)].parameters()] for name in stats.modules})
        optimizer.step()
    readout = stats.read()
    assert all(math.isnan(ratio) for _, ratio in readout.layer_update_ratios[0])  # nothing to compare with yet
    for index in (1, 2):  # the update of the step between two observes
        for name, ratio in readout.layer_update_ratios[index]:
            before, after = snapshots[index - 1][name], snapshots[index][name]
            assert ratio == pytest.approx(norm(a - b for a, b in zip(after, before)) / norm(before), rel=1e-5)


@pytest.mark.parametrize("track_updates", [False, True])
def test_parameters_and_gradients_untouched(track_updates):
    model = model_with_grads()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    stats = GradientStats(model.named_parameters(), track_updates=track_updates)
    for step in range(3):
        stats.observe(step)
    stats.read()
    for p, (value, grad) in zip(model.parameters(), before):
        assert torch.equal(p.detach(), value) and torch.equal(p.grad, grad)


@pytest.mark.parametrize("track_updates", [False, True])
def test_observe_never_reads_a_value_back(track_updates):
    """On the meta device tensors have no values: any .item(), float() or copy to the host raises."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 2)).to("meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    stats = GradientStats(model.named_parameters(), track_updates=track_updates)
    for step in range(3):
        stats.observe(step)
    with pytest.raises((RuntimeError, NotImplementedError)):
        stats.read()  # the one place that reads back


def test_no_parameters():
    with pytest.raises(ValueError, match="No parameters to watch"):
        GradientStats(nn.ReLU().named_parameters())


def test_a_parameter_without_gradient_is_left_out_not_counted_as_zero():
    """An unused head and a frozen layer have no gradient; unfreezing brings the layer in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    head = nn.Linear(8, 3)  # registered, never used in the loss
    model.add_module("head", head)
    model[0].requires_grad_(False)
    x = torch.randn(7, 5)
    model[2](model[1](model[0](x))).pow(2).sum().backward()
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    model[0].requires_grad_(True)  # unfrozen mid-run
    model.zero_grad()
    model[2](model[1](model[0](x))).pow(2).sum().backward()
    stats.observe(2)
    readout = stats.read()
    first, second = dict(readout.layer_grad_norms[0]), dict(readout.layer_grad_norms[1])
    assert list(first) == ["1", "2"] and list(second) == ["0", "1", "2"]
    assert "head" not in second and readout.nonfinite_tensors == [0, 0]
    assert second["0"] == pytest.approx(norm(p.grad for p in model[0].parameters()), rel=1e-6)
    assert readout.grad_norms[1] == pytest.approx(norm(p.grad for p in model.parameters() if p.grad is not None), rel=1e-6)
    assert "head" in dict(readout.layer_weight_norms)


@pytest.mark.parametrize("track_updates", [False, True])
def test_several_observes_of_one_step_make_one_record(track_updates):
    """LBFGS evaluates its closure several times, a GAN steps two optimizers: one record per step,
    holding each tensor's last gradient of that step."""
    model = model_with_grads()
    stats = GradientStats(model.named_parameters(), track_updates=track_updates)
    stats.observe(1)
    first_layer = [p.grad for p in model[0].parameters()]
    for p in model[0].parameters():  # the second optimizer's turn: only its parameters have gradients
        p.grad = None
    for p in model[3].parameters():
        p.grad = p.grad * 3
    stats.observe(1)
    stats.observe(2)
    readout = stats.read()
    assert readout.steps == [1, 2]
    latest = [*first_layer, *(p.grad for p in model.parameters() if p.grad is not None)]
    assert readout.grad_norms[0] == pytest.approx(norm(latest), rel=1e-6)
    assert dict(readout.layer_grad_norms[0])["3"] == pytest.approx(norm(p.grad for p in model[3].parameters()), rel=1e-6)
    assert "0" in dict(readout.layer_grad_norms[0]) and "0" not in dict(readout.layer_grad_norms[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only with CUDA")
@pytest.mark.parametrize("track_updates", [False, True])
def test_observe_does_not_synchronise(track_updates):
    model = model_with_grads().cuda()
    model(torch.randn(7, 5, device="cuda")).sum().backward()
    stats = GradientStats(model.named_parameters(), track_updates=track_updates)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            stats.observe(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    readout = stats.read()
    assert len(readout.steps) == 5
    assert readout.grad_norms[0] == pytest.approx(norm(p.grad for p in model.parameters()), rel=1e-6)
