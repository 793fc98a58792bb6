"""Per-step gradient statistics: exact norms, grouping by module, no side effects, no host sync."""

import pytest
import torch
from torch import nn

from hessdiag.gradients import GradientStats, module_name


def model_with_grads(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Linear(8, 2))
    model(torch.randn(7, 5)).pow(2).sum().backward()
    return model


def test_module_name():
    assert module_name("layer1.0.conv1.weight") == "layer1.0.conv1"
    assert module_name("scale") == "scale"


def test_norms_match_per_module_and_globally():
    model = model_with_grads()
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    readout = stats.read()
    assert readout.steps == [1]
    expected_global = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert readout.grad_norms[0] == pytest.approx(float(expected_global), rel=1e-6)
    layer_grads = dict(readout.layer_grad_norms[0])
    assert list(layer_grads) == ["0", "2", "3"]
    for name in layer_grads:
        module = model[int(name)]
        grads = torch.cat([p.grad.flatten() for p in module.parameters()])
        weights = torch.cat([p.detach().flatten() for p in module.parameters()])
        assert layer_grads[name] == pytest.approx(float(grads.norm()), rel=1e-6)
        assert dict(readout.layer_weight_norms)[name] == pytest.approx(float(weights.norm()), rel=1e-6)
    assert stats.read() is None  # nothing new


def test_many_steps_are_read_in_one_go_and_missing_gradients_count_as_zero():
    model = model_with_grads()
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    model[3].weight.grad = None
    stats.observe(2)
    readout = stats.read()
    assert readout.steps == [1, 2] and readout.grad_norms[1] < readout.grad_norms[0]


def test_non_finite_gradients_are_counted():
    model = model_with_grads()
    model[0].weight.grad[0, 0] = float("nan")
    model[3].bias.grad[0] = float("inf")
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    assert stats.read().nonfinite_tensors == [2]


def test_parameters_and_gradients_untouched():
    model = model_with_grads()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    stats = GradientStats(model.named_parameters())
    stats.observe(1)
    stats.read()
    for p, (value, grad) in zip(model.parameters(), before):
        assert torch.equal(p.detach(), value) and torch.equal(p.grad, grad)


def test_no_trainable_parameters():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameters"):
        GradientStats(model.named_parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only with CUDA")
def test_observe_does_not_synchronise():
    model = model_with_grads().cuda()
    model(torch.randn(7, 5, device="cuda")).sum().backward()
    stats = GradientStats(model.named_parameters())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            stats.observe(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(stats.read().steps) == 5
