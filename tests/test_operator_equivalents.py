"""Ops without a second derivative (Hardsigmoid, EmbeddingBag, sparse embeddings), evaluated by the
operator as exact equivalents: the same loss and gradient, every method running, the model as built,
and error advice that never leads back to where it started."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import HessdiagError, HessianOperator, Monitor, hessian_eigenvalues, hessian_vector_product
from hessdiag.operator.equivalents import TwiceDifferentiable
from oracles import dense_hessian, finite_difference_hvp

METHODS = ("auto", "double_backward", "forward_over_reverse", "finite_difference")


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def loss_and_gradient(model, batch, routed):
    model.zero_grad()
    if routed:
        with TwiceDifferentiable():
            loss = cross_entropy(model, batch)
            loss.backward()
    else:
        loss = cross_entropy(model, batch)
        loss.backward()
    return loss.detach(), [p.grad.to_dense().clone() for p in model.parameters()]


def bags(sparse=False, mode="sum", padding_idx=None):
    return nn.Sequential(nn.EmbeddingBag(20, 5, mode=mode, sparse=sparse, padding_idx=padding_idx), nn.Tanh(), nn.Linear(5, 3))


BAG_CASES = [  # (model, input, offsets)
    (lambda: bags(), torch.randint(0, 20, (8, 4)), None),
    (lambda: bags(mode="mean", padding_idx=2), torch.tensor([[2, 2, 2], [1, 2, 3]] * 4), None),
    (lambda: bags(mode="mean", sparse=True), torch.randint(0, 20, (20,)), torch.tensor([0, 3, 3, 5, 9, 12, 15, 18])),
]


@pytest.mark.parametrize("case", range(len(BAG_CASES)))
def test_embedding_bag_as_index_and_sum_gives_the_same_loss_and_gradient(case):
    make, inputs, offsets = BAG_CASES[case]
    torch.manual_seed(0)
    model = make()
    forward = model.forward
    model.forward = lambda x: forward(x) if offsets is None else model[2](model[1](model[0](x, offsets)))
    batch = (inputs, torch.randint(0, 3, (8,)))
    loss, grads = loss_and_gradient(model, batch, routed=False)
    routed_loss, routed_grads = loss_and_gradient(model, batch, routed=True)
    assert torch.equal(loss, routed_loss)
    for got, want in zip(routed_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_hardsigmoid_as_relu6_gives_the_same_loss_bit_for_bit_and_gradient_to_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Hardsigmoid(), nn.Linear(8, 3))
    x = torch.randn(64, 4) * 4
    x[0, :2] = torch.tensor([-3.0, 3.0])  # the kinks themselves
    batch = (x, torch.randint(0, 3, (64,)))
    loss, grads = loss_and_gradient(model, batch, routed=False)
    routed_loss, routed_grads = loss_and_gradient(model, batch, routed=True)
    assert torch.equal(loss, routed_loss)
    for got, want in zip(routed_grads, grads, strict=True):  # x / 6 against x * (1 / 6)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_an_inplace_hardsigmoid_stays_in_place_and_differentiable():
    x = torch.randn(10, requires_grad=True)
    with TwiceDifferentiable():
        y = x * 1.0
        out = F.hardsigmoid(y, inplace=True)
        (gradient,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    assert out is y
    torch.testing.assert_close(out, F.hardsigmoid(x.detach()))
    (curvature,) = torch.autograd.grad(gradient.sum(), x)
    inside = (x.detach().abs() < 3).float()
    torch.testing.assert_close(curvature, 2 * inside / 36)


class SmoothGate(nn.Module):
    """Hardsigmoid written as relu6(x + 3) / 6: twice differentiable, the reference."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


def gated(gate):
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 6), gate, nn.Linear(6, 3))


def flat(pieces):
    return torch.cat([piece.reshape(-1) for piece in pieces])


@pytest.mark.parametrize("method", METHODS[:3])
def test_a_hardsigmoid_model_as_built_matches_its_dense_hessian(method):
    torch.manual_seed(0)
    model = gated(nn.Hardsigmoid()).double()
    reference = gated(SmoothGate()).double()
    reference.load_state_dict(model.state_dict())
    batch = (torch.randn(32, 4, dtype=torch.float64) * 2, torch.randint(0, 3, (32,)))
    spectrum = torch.linalg.eigvalsh(dense_hessian(reference, cross_entropy, batch))
    result = hessian_eigenvalues(model, cross_entropy, batch, hvp_method=method, tol=1e-8, max_iter=spectrum.numel())
    scale = float(spectrum.abs().max())
    assert abs(result.lambda_max - float(spectrum[-1])) <= 1e-8 * scale
    assert abs(result.lambda_min - float(spectrum[0])) <= 1e-8 * scale
    assert isinstance(model[3], nn.Hardsigmoid)  # the model is left as built
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):  # and torch still cannot do it alone
        torch.autograd.grad(torch.autograd.grad(cross_entropy(model, batch), model[0].weight, create_graph=True)[0].sum(), model[0].weight)


@pytest.mark.parametrize("bag", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_sparse_gradient_layers_give_the_dense_models_hessian(method, bag):
    """nn.Embedding / nn.EmbeddingBag with sparse=True: every method gives the products and the
    eigenvalues of the same model with sparse=False."""
    torch.manual_seed(0)
    make = (lambda s: bags(sparse=s)) if bag else (lambda s: nn.Sequential(nn.Embedding(20, 4, sparse=s), nn.Flatten(), nn.Tanh(), nn.Linear(12, 3)))
    dense, sparse = make(False).double(), make(True).double()
    sparse.load_state_dict(dense.state_dict())
    batch = (torch.randint(0, 20, (16, 3)), torch.randint(0, 3, (16,)))
    v = torch.randn(sum(p.numel() for p in dense.parameters()), dtype=torch.float64)
    reference = finite_difference_hvp(copy.deepcopy(dense), cross_entropy, batch, v)
    products = flat(hessian_vector_product(sparse, cross_entropy, batch, v, method=method))
    assert float((products - reference).norm()) <= 1e-6 * float(reference.norm())
    expected = hessian_eigenvalues(dense, cross_entropy, batch, hvp_method="double_backward", tol=1e-8, max_iter=60)
    got = hessian_eigenvalues(sparse, cross_entropy, batch, hvp_method=method, tol=1e-8, max_iter=60)
    assert got.lambda_max == pytest.approx(expected.lambda_max, rel=1e-6)


def test_the_monitor_checks_a_sparse_adam_run():
    """The Monitor's checks (eigenvalues, noise scale) on a model trained with SparseAdam on sparse
    embedding gradients: every check completes, strict mode raising any diagnostics error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Flatten(), nn.Tanh(), nn.Linear(12, 3))
    sparse_adam = torch.optim.SparseAdam(list(model[0].parameters()), lr=1e-2)
    adam = torch.optim.Adam(model[3].parameters(), lr=1e-2)
    monitor = Monitor(model, cross_entropy, optimizer=adam, check_every=2, log_every=2, strict=True)
    batch = (torch.randint(0, 20, (16, 3)), torch.randint(0, 3, (16,)))
    for _ in range(4):
        sparse_adam.zero_grad()
        adam.zero_grad()
        loss = cross_entropy(model, batch)
        loss.backward()
        monitor.after_backward()
        sparse_adam.step()
        adam.step()
        monitor.after_step(batch, loss)
    monitor.read_back()
    assert len(monitor.checks) == 2 and all(check.lambda_max > 0 for check in monitor.checks)


def test_mobilenet_v3_small_as_built_gets_exact_products():
    """torchvision's MobileNetV3 (Hardswish, and Hardsigmoid in its squeeze-excitation gates): double
    backward and forward-over-reverse agree, and "auto" keeps double backward."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    v /= v.norm()
    exact = flat(hessian_vector_product(model, cross_entropy, batch, v, method="double_backward"))
    forward = flat(hessian_vector_product(model, cross_entropy, batch, v, method="forward_over_reverse"))
    assert float((exact - forward).norm()) <= 1e-4 * float(exact.norm())
    with HessianOperator(model, cross_entropy, batch) as operator:  # "auto": probed, then kept exact
        assert operator.method == "double_backward", operator.method_reason


class OnceReLU(torch.autograd.Function):
    """ReLU whose backward is marked @once_differentiable: no exact method, and kinks for finite differences."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class Once(nn.Module):
    def forward(self, x):
        return OnceReLU.apply(x)


def advice_paths(run, start):
    """Follow every product method a failure's message advises, from `start`; returns the paths."""
    paths, stack = [], [[start]]
    while stack:
        path = stack.pop()
        try:
            run(path[-1])
        except HessdiagError as error:
            advised = sorted(set(re.findall(r"hvp_method='(\w+)'", str(error))))
            for method in advised:
                assert method not in path, f"the advice loops: {path + [method]}: {error}"
                stack.append(path + [method])
            if not advised:
                paths.append(path + [type(error).__name__])
        else:
            paths.append(path + ["works"])
    return paths


@pytest.mark.parametrize(
    "name, make",
    [
        ("kinks", lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))),
        ("once_differentiable kinks", lambda: nn.Sequential(nn.Linear(4, 16), Once(), nn.Linear(16, 3))),
        ("hardsigmoid", lambda: gated(nn.Hardsigmoid())),
        ("embedding bag max", lambda: nn.Sequential(nn.EmbeddingBag(20, 5, mode="max"), nn.Tanh(), nn.Linear(5, 3))),
    ],
)
def test_following_the_advice_never_leads_back(name, make):
    torch.manual_seed(0)
    model = make()
    inputs = torch.randint(0, 20, (32, 4)) if "bag" in name else torch.randn(32, 4)
    batch = (inputs, torch.randint(0, 3, (32,)))

    def run(method):
        hessian_eigenvalues(model, cross_entropy, batch, hvp_method=method, which="top", max_iter=5)

    for start in METHODS:
        assert advice_paths(run, start)
