"""Finite-difference products and the "auto" method against float64 references.

References: the dense Hessian by looped double backward (`tests/oracles.py`) of the same network
written with twice-differentiable ops, or float64 central differences where no op has a second
derivative (EmbeddingBag).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from hessdiag import HessianOperator, MicroBatches, NonSmoothLossError, SecondDerivativeError, hessian_eigenvalues
from oracles import dense_hessian, finite_difference_hvp


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def cnn(activation=nn.GELU, norm=lambda c: nn.GroupNorm(2, c)):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm(4), activation(), nn.Conv2d(4, 4, 3, padding=1), activation(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def image_batch():
    return torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))


class AttentionBlock(nn.Module):
    """A GELU transformer block; `fused` runs attention on the CPU flash kernel, whose backward has
    no derivative (as a fused GPU kernel), False on the twice-differentiable math kernel, None on
    whatever kernel PyTorch picks."""

    def __init__(self, fused: bool | None, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.fused = fused
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm, self.mlp, self.head = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, d)), nn.Linear(d, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        if self.fused is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION if self.fused else SDPBackend.MATH):
                attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).flatten(2))
        x = x + self.mlp(self.norm(x))
        return self.head(x.mean(1))


def unit(n, seed=1):
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=generator)
    return v / v.norm()


def product_with(model, batch, vector, method, loss_fn=cross_entropy):
    with HessianOperator(model, loss_fn, batch, method=method) as operator:
        return operator.matvec(vector), operator


@pytest.mark.parametrize("method", ["finite_difference", "auto"])
def test_products_of_a_smooth_cnn_match_exact_float64_products(method):
    torch.manual_seed(0)
    model, batch = cnn(), image_batch()
    model64, batch64 = copy.deepcopy(model).double(), (batch[0].double(), batch[1])
    lambda_max = hessian_eigenvalues(model64, cross_entropy, batch64, which="top", hvp_method="double_backward").lambda_max
    for seed in range(2):
        v = unit(sum(p.numel() for p in model.parameters()), seed)
        product, operator = product_with(model, batch, v, method)
        exact, _ = product_with(model64, batch64, v.double(), "double_backward")
        error = float((product.double() - exact).norm())
        assert error < 1e-3 * lambda_max
        if operator.method == "finite_difference":
            # measured error: of the right order (an estimate, not a bound: within 10x either way)
            assert 0 < operator.product_error < 1e-3 * lambda_max
            assert error < 10 * operator.product_error
    assert operator.method == ("finite_difference" if method == "finite_difference" else "double_backward")


def test_fused_attention_without_double_backward_is_measured_by_finite_differences():
    torch.manual_seed(0)
    fused = AttentionBlock(fused=True)
    math = AttentionBlock(fused=False)
    math.load_state_dict(fused.state_dict())
    batch = (torch.randn(4, 6, 4), torch.randint(0, 3, (4,)))
    hessian = dense_hessian(copy.deepcopy(math).double(), cross_entropy, (batch[0].double(), batch[1]))
    lambda_max = float(torch.linalg.eigvalsh(hessian)[-1])
    with pytest.raises(SecondDerivativeError, match="_scaled_dot_product_flash_attention_for_cpu_backward.*hvp_method='auto'"):
        product_with(fused, batch, unit(hessian.shape[0]), "double_backward")
    for seed in range(3):
        v = unit(hessian.shape[0], seed)
        product, operator = product_with(fused, batch, v, "auto")
        assert operator.method == "finite_difference"
        assert "double backward failed" in operator.method_reason
        assert float((product.double() - hessian @ v.double()).norm()) < 1e-3 * lambda_max


def test_relu_network_is_refused_by_finite_differences_and_kept_exact_by_auto():
    torch.manual_seed(0)
    model, batch = cnn(nn.ReLU, nn.BatchNorm2d), image_batch()
    v = unit(sum(p.numel() for p in model.parameters()))
    with pytest.raises(NonSmoothLossError, match="gradient jumps.*hvp_method='auto'"):
        product_with(model, batch, v, "finite_difference")
    _, operator = product_with(model, batch, v, "auto")
    assert operator.method == "double_backward" and operator.product_error == 0.0


class OnceDifferentiableSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class ResidualNet(nn.Module):
    """Linear, a residual SiLU branch written in one of three ways, tanh, Linear."""

    def __init__(self, branch: str) -> None:
        super().__init__()
        self.branch = branch
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        if self.branch == "once_differentiable":
            h = h + OnceDifferentiableSiLU.apply(self.b(h))
        elif self.branch == "reentrant_checkpoint":
            h = h + checkpoint(lambda t: F.silu(self.b(t)), h, use_reentrant=True)
        else:
            h = h + F.silu(self.b(h))
        return self.c(torch.tanh(h))


@pytest.mark.parametrize("in_parts", [False, True], ids=["batch", "micro-batches"])
@pytest.mark.parametrize("branch", ["once_differentiable", "reentrant_checkpoint"])
def test_auto_measures_what_double_backward_gets_wrong_or_refuses(branch, in_parts):
    torch.manual_seed(0)
    model, plain = ResidualNet(branch), ResidualNet("plain")
    plain.load_state_dict(model.state_dict())
    whole = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    # two equal halves: the mean of their mean losses is the batch's
    batch = MicroBatches([(whole[0][:16], whole[1][:16]), (whole[0][16:], whole[1][16:])]) if in_parts else whole
    hessian = dense_hessian(copy.deepcopy(plain).double(), cross_entropy, (whole[0].double(), whole[1]))
    exact = torch.linalg.eigvalsh(hessian)
    result = hessian_eigenvalues(model, cross_entropy, batch, tol=1e-4, max_iter=hessian.shape[0])
    assert result.lambda_max == pytest.approx(float(exact[-1]), rel=1e-3)
    assert result.lambda_min == pytest.approx(float(exact[0]), abs=1e-3 * float(exact.abs().max()))
    _, operator = product_with(model, batch, unit(hessian.shape[0]), "auto")
    assert operator.method == "finite_difference"


def test_embedding_bag_works_with_every_method():
    """torch has neither a double backward nor a forward-mode rule for embedding_bag: the operator
    evaluates it as index-and-sum, so the exact methods run and "auto" keeps double backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(20, 5), nn.Tanh(), nn.Linear(5, 2))
    batch = (torch.randint(0, 20, (8, 4)), torch.randint(0, 2, (8,)))
    v = unit(sum(p.numel() for p in model.parameters()))
    reference = finite_difference_hvp(copy.deepcopy(model).double(), cross_entropy, batch, v.double())
    for method in ("double_backward", "forward_over_reverse", "finite_difference", "auto"):
        product, operator = product_with(model, batch, v, method)
        assert operator.method == ("double_backward" if method == "auto" else method)
        assert float((product.double() - reference).norm()) < 1e-4, method


def test_forward_over_reverse_failures_are_hessdiag_errors_with_advice_that_works():
    """On torch 2.14.1 forward-over-reverse through this GroupNorm/SiLU net raises "ZeroTensors are
    immutable"; wherever it fails, the error is ours and names finite differences."""
    torch.manual_seed(0)
    model, batch = cnn(nn.SiLU), image_batch()
    v = unit(sum(p.numel() for p in model.parameters()))
    try:
        product_with(model, batch, v, "forward_over_reverse")
    except RuntimeError as error:
        assert isinstance(error, SecondDerivativeError) and "hvp_method='finite_difference'" in str(error)
    product, operator = product_with(model, batch, v, "finite_difference")
    exact, _ = product_with(model, batch, v, "double_backward")
    assert float((product - exact).norm()) < 10 * operator.product_error


@pytest.mark.parametrize("branch", ["plain", "reentrant_checkpoint"])
def test_parameters_buffers_rng_and_grad_are_restored_bit_for_bit(branch):
    torch.manual_seed(0)
    model = nn.Sequential(ResidualNet(branch), nn.BatchNorm1d(3), nn.Dropout(0.2), nn.Linear(3, 3))
    batch = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    cross_entropy(model, batch).backward()
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    for _ in range(2):
        with HessianOperator(model, cross_entropy, batch, method="finite_difference") as operator:
            for seed in range(3):
                operator.matvec(unit(operator.dim, seed))
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    for p, g, value in zip(model.parameters(), grads, grad_values):
        assert p.grad is g and torch.equal(g, value)


def test_dropout_masks_are_the_same_in_every_gradient():
    """A product with fresh masks in each gradient would be noise: against the dense Hessian of
    the loss with the operator's masks (seed 0) it must be as accurate as without dropout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Dropout(0.3), nn.Linear(8, 3))
    batch = (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    hessian = dense_hessian(copy.deepcopy(model).double(), cross_entropy, (batch[0].double(), batch[1]), seed=0)
    v = unit(hessian.shape[0])
    product, _ = product_with(model, batch, v, "finite_difference")
    assert float((product.double() - hessian @ v.double()).norm()) < 1e-3 * float(torch.linalg.eigvalsh(hessian)[-1])


def test_checks_under_bf16_autocast_compute_in_float32():
    torch.manual_seed(0)
    model, batch = cnn(), image_batch()
    v = unit(sum(p.numel() for p in model.parameters()))
    plain, _ = product_with(model, batch, v, "finite_difference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = product_with(model, batch, v, "finite_difference")
    assert torch.equal(plain, autocast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused GPU attention kernels exist only with CUDA")
def test_finite_differences_keep_the_fused_cuda_attention():
    """On CUDA the products run on the memory-efficient kernel (no double backward) and agree with
    double backward through the math kernel."""
    torch.manual_seed(0)
    model = AttentionBlock(fused=None).cuda()
    batch = (torch.randn(4, 6, 4, device="cuda"), torch.randint(0, 3, (4,), device="cuda"))
    lambda_max = hessian_eigenvalues(model, cross_entropy, batch, which="top", hvp_method="double_backward").lambda_max
    v = unit(sum(p.numel() for p in model.parameters())).cuda()
    product, operator = product_with(model, batch, v, "finite_difference")
    exact, _ = product_with(model, batch, v, "double_backward")
    assert float((product - exact).norm()) < 1e-3 * lambda_max


@pytest.mark.parametrize("branch", ["plain", "once_differentiable"])
def test_monitor_cross_checks_on_cold_checks_and_reuses_the_verdict_on_warm_ones(branch):
    """Checks 1 and 6 are cold (cold_every=5): "auto" cross-checks there (six gradients for the finite
    differences and another forward for the graph); warm checks reuse an approval of double backward.
    A model whose double backward is incomplete is never approved: every check measures. Products on
    the whole batch, so that the closure's calls count the gradients and graphs alone."""
    from hessdiag.check.probe import CurvatureProbe
    from hessdiag.settings import DiagnosticsSettings

    torch.manual_seed(0)
    model = ResidualNet(branch)
    batch = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    calls = []

    def counted(m, b):
        calls.append(1)
        return cross_entropy(m, b)

    probe = CurvatureProbe(model, counted, DiagnosticsSettings(cold_every=5, product_parts=1))
    per_check, reasons = [], []
    for step in range(1, 8):
        calls.clear()
        check = probe.run(step, batch)
        per_check.append(len(calls))
        reasons.append((check.hvp_method, check.hvp_method_reason))
    if branch == "plain":
        assert [m for m, _ in reasons] == ["double_backward"] * 7
        warm = [n for i, n in enumerate(per_check) if i not in (0, 5)]
        assert per_check[0] == per_check[5] == warm[0] + 7 and len(set(warm)) == 1  # + 6 gradients and the graph
        assert "agrees with finite differences" in reasons[5][1] and "at step 1" in reasons[4][1]
    else:
        assert [m for m, _ in reasons] == ["finite_difference"] * 7 and min(per_check) >= 6
