"""Hessian-vector products and eigenvalues of real models against known answers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import HessianOperator, hessian_eigenvalues, hessian_vector_product
from hessdiag.isolation import unwrap_model
from oracles import dense_hessian, finite_difference_hvp


class Quadratic(nn.Module):
    """f(x) = 0.5 x^T A x: the Hessian is A."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.x = nn.Parameter(torch.randn(a.shape[0], dtype=a.dtype, generator=torch.Generator().manual_seed(5)))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.x @ self.a @ self.x


def quadratic_loss(model, batch):
    return model()


def prescribed(eigenvalues: torch.Tensor) -> torch.Tensor:
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


SPECTRUM = torch.cat([torch.tensor([-3.0, -2.5]), torch.linspace(-1.0, 2.0, 96), torch.tensor([4.0, 7.0])]).double()


def test_quadratic_float64_both_ends_to_1e6():
    model = Quadratic(prescribed(SPECTRUM))
    result = hessian_eigenvalues(model, quadratic_loss, None, k=2, tol=1e-9, max_iter=100)
    assert result.top == pytest.approx([7.0, 4.0], abs=1e-6)
    assert result.bottom == pytest.approx([-3.0, -2.5], abs=1e-6)
    assert result.converged and result.negative_curvature_certified


def test_quadratic_float32_both_ends_to_1e4():
    model = Quadratic(prescribed(SPECTRUM).float())
    result = hessian_eigenvalues(model, quadratic_loss, None, tol=1e-6, max_iter=100)
    assert abs(result.lambda_max - 7.0) < 1e-4 * 7
    assert abs(result.lambda_min + 3.0) < 1e-4 * 7


def test_least_squares_hessian_is_exact():
    """MSELoss(mean) of a linear model: H = 2 [X 1]^T [X 1] / n (the factor 2 of the square)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1).double()
    design = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], dim=1)  # weight then bias
    expected = 2 * design.T @ design / 50

    def loss_fn(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    vector = torch.randn(7, generator=generator, dtype=torch.float64)
    product = torch.cat([t.reshape(-1) for t in hessian_vector_product(model, loss_fn, (x, y), vector)])
    torch.testing.assert_close(product, expected @ vector, atol=1e-12, rtol=1e-12)
    result = hessian_eigenvalues(model, loss_fn, (x, y), tol=1e-10, max_iter=7)
    exact = torch.linalg.eigvalsh(expected)
    assert result.lambda_max == pytest.approx(float(exact[-1]), rel=1e-10)
    assert result.lambda_min == pytest.approx(float(exact[0]), rel=1e-8)
    assert not result.negative_curvature_certified


def test_two_layer_linear_network_at_the_origin_is_a_saddle():
    """L = |Y - W2 W1 X|^2 / 2n at W1 = W2 = 0: gradient 0, eigenvalues +-sigma_i(Y X^T / n), h-fold."""
    generator = torch.Generator().manual_seed(2)
    d, h, o, n = 5, 3, 4, 40
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, o, generator=generator, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(d, h, bias=False), nn.Linear(h, o, bias=False)).double()
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[1].weight)

    def loss_fn(m, batch):
        return 0.5 * (batch[1] - m(batch[0])).pow(2).sum(dim=1).mean()

    sigma = torch.linalg.svdvals(y.T @ x / n)
    spectrum = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, (x, y)))
    assert spectrum.numel() == h * (d + o)
    for s in sigma:  # each +-sigma_i appears h times, the rest are 0
        assert int((spectrum - s).abs().lt(1e-10).sum()) == h
        assert int((spectrum + s).abs().lt(1e-10).sum()) == h
    assert int(spectrum.abs().lt(1e-10).sum()) == h * (d + o) - 2 * h * sigma.numel()

    result = hessian_eigenvalues(model, loss_fn, (x, y), k=2, tol=1e-10, max_iter=h * (d + o))
    assert result.grad_norm == 0.0
    # A single-vector Krylov space holds each distinct eigenvalue once: the two largest distinct.
    assert result.top == pytest.approx(sigma[:2].tolist(), abs=1e-10)
    assert result.bottom == pytest.approx((-sigma[:2]).tolist(), abs=1e-10)
    assert result.negative_curvature_certified


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.tanh(self.bn(self.conv(x)))).flatten(1))


def cnn_setup(dtype=torch.float64):
    torch.manual_seed(0)
    model = SmallCNN().to(dtype)
    generator = torch.Generator().manual_seed(3)
    batch = (torch.randn(8, 1, 6, 6, generator=generator, dtype=dtype), torch.randint(0, 3, (8,), generator=generator))
    return model, batch


def cross_entropy(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def test_cnn_batchnorm_dropout_matches_dense_hessian_and_leaves_no_trace():
    model, batch = cnn_setup()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    grads_before = [p.grad.clone() for p in model.parameters()]
    grad_objects = [p.grad for p in model.parameters()]
    params_before = [p.detach().clone() for p in model.parameters()]
    buffers_before = {name: b.clone() for name, b in model.named_buffers()}
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    model.eval()  # the estimate runs in train mode as asked and must restore this

    result = hessian_eigenvalues(model, cross_entropy, batch, k=2, tol=1e-10, max_iter=200, mode="train")

    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not model.training and not model.bn.training
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers_before[name]), name
    for p, g, obj, before in zip(model.parameters(), grads_before, grad_objects, params_before):
        assert p.grad is obj and torch.equal(p.grad, g) and torch.equal(p.detach(), before)

    spectrum = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batch, seed=0))
    assert result.top == pytest.approx(spectrum.flip(0)[:2].tolist(), abs=1e-8)
    assert result.bottom == pytest.approx(spectrum[:2].tolist(), abs=1e-8)


def test_cnn_operator_is_symmetric_and_methods_agree():
    model, batch = cnn_setup(torch.float32)
    generator = torch.Generator().manual_seed(4)
    with HessianOperator(model, cross_entropy, batch) as hessian:
        u, v = torch.randn(2, hessian.dim, generator=generator)
        u_hv, v_hu = torch.dot(u, hessian.matvec(v)), torch.dot(v, hessian.matvec(u))
        double_backward = hessian.matvec(v)
    assert float((u_hv - v_hu).abs()) <= 1e-5 * float(u_hv.abs())
    with HessianOperator(model, cross_entropy, batch, method="forward_over_reverse") as hessian:
        forward_over_reverse = hessian.matvec(v)
    torch.testing.assert_close(forward_over_reverse, double_backward, rtol=1e-4, atol=1e-5)


def test_eval_mode_is_a_different_operator():
    model, batch = cnn_setup()
    with torch.no_grad():
        model.bn.running_var.fill_(2.0)
    dense_eval = dense_hessian(model, cross_entropy, batch, mode="eval")
    result = hessian_eigenvalues(model, cross_entropy, batch, mode="eval", tol=1e-10, max_iter=200)
    assert result.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(dense_eval)[-1]), abs=1e-8)


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


def next_token_loss(m, batch):
    logits = m(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def test_transformer_block_with_fused_attention_matches_finite_differences():
    """On this CPU the default SDPA kernel has no double backward; the engine must switch to math."""
    torch.manual_seed(0)
    model = TransformerBlock().double()
    generator = torch.Generator().manual_seed(6)
    batch = (torch.randn(2, 5, 8, generator=generator, dtype=torch.float64), torch.randint(0, 5, (2, 5), generator=generator))
    with HessianOperator(model, next_token_loss, batch) as hessian:
        u, v = torch.randn(2, hessian.dim, generator=generator, dtype=torch.float64)
        hv = hessian.matvec(v)
        hu = hessian.matvec(u)
    assert float((torch.dot(u, hv) - torch.dot(v, hu)).abs()) <= 1e-10 * float(torch.dot(u, hv).abs())
    reference = finite_difference_hvp(model, next_token_loss, batch, v)
    torch.testing.assert_close(hv, reference, rtol=1e-6, atol=1e-8)
    result = hessian_eigenvalues(model, next_token_loss, batch)
    assert result.converged and math.isfinite(result.lambda_max)


@pytest.mark.parametrize("nested", [False, True], ids=["compiled model", "compiled submodule"])
def test_torch_compiled_models_get_eager_hvps(nested):
    """A compiled graph has no double backward (AOTAutograd donates its buffers): the engine runs
    torch.compile'd code eagerly inside an estimate, and sees through the OptimizedModule wrapper."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    if nested:
        model = nn.Sequential(torch.compile(eager[0], backend="aot_eager"), eager[1], eager[2])
    else:
        model = torch.compile(eager, backend="aot_eager")
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    loss_fn(model, (x, y)).backward()  # the compiled model trains as usual
    expected = hessian_eigenvalues(eager, loss_fn, (x, y), tol=1e-10, max_iter=200)
    result = hessian_eigenvalues(model, loss_fn, (x, y), tol=1e-10, max_iter=200)
    assert result.lambda_max == pytest.approx(expected.lambda_max, rel=1e-6)
    assert result.lambda_min == pytest.approx(expected.lambda_min, rel=1e-6)
    if not nested:
        assert unwrap_model(model) is eager


def test_sparse_embedding_gradients_give_the_dense_answer():
    """nn.Embedding(sparse=True) makes sparse gradients; the HVP densifies them and must agree with
    the same model with a dense embedding."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Tanh(), nn.Linear(12, 3))
    sparse = nn.Sequential(nn.Embedding(50, 4, sparse=True), nn.Flatten(), nn.Tanh(), nn.Linear(12, 3))
    sparse.load_state_dict(dense.state_dict())
    batch = (torch.randint(0, 50, (16, 3)), torch.randint(0, 3, (16,)))

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    v = torch.randn(sum(p.numel() for p in dense.parameters()))
    expected = hessian_vector_product(dense, loss_fn, batch, v)
    for got, want in zip(hessian_vector_product(sparse, loss_fn, batch, v), expected, strict=True):
        assert not got.is_sparse and torch.allclose(got, want, atol=1e-6)
    assert expected[0].abs().sum() > 0  # the embedding rows of the batch have curvature


def test_tied_weights_are_one_parameter_for_every_product_method():
    """A language model whose output layer shares the embedding matrix (weight tying): the Hessian is
    over the shared matrix once, with both uses' curvature in it; every method must match the dense
    Hessian, and the tie must survive the estimate (finite differences move the parameters)."""

    class TiedLanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.mix = nn.Embedding(7, 4), nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.mix(self.embed(tokens))))

    torch.manual_seed(0)
    model = TiedLanguageModel().double()
    batch = (torch.randint(0, 7, (32,)), torch.randint(0, 7, (32,)))
    spectrum = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batch))
    assert spectrum.numel() == 7 * 4 + 4 * 4 + 4  # the shared matrix counted once
    for method, accuracy in [("double_backward", 1e-10), ("forward_over_reverse", 1e-10), ("finite_difference", 1e-7), ("auto", 1e-10)]:
        result = hessian_eigenvalues(model, cross_entropy, batch, hvp_method=method, tol=1e-8, max_iter=60)
        assert result.converged, method
        assert abs(result.lambda_max - float(spectrum[-1])) <= accuracy * float(spectrum.abs().max()), method
        assert abs(result.lambda_min - float(spectrum[0])) <= accuracy * float(spectrum.abs().max()), method
        assert model.head.weight is model.embed.weight


class ReassignedBuffer(nn.Module):
    """A forward that replaces its buffer by a new tensor instead of updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(2))

    def forward(self, x):
        y = self.linear(x)
        self.running = 0.9 * self.running + y.detach().mean(0)
        return y


def test_a_buffer_the_forward_reassigns_is_put_back():
    torch.manual_seed(0)
    model = ReassignedBuffer()
    before = model.running
    hessian_eigenvalues(model, cross_entropy, (torch.randn(8, 3), torch.randint(0, 2, (8,))))
    assert model.running is before and torch.equal(before, torch.zeros(2))


def test_by_default_a_frozen_eval_mode_backbone_stays_in_eval_as_in_the_callback():
    """The loss the optimizer sees: a BatchNorm backbone frozen in eval mode uses its running statistics."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh()).requires_grad_(False).eval()
    with torch.no_grad():
        backbone[1].running_mean.normal_(0, 1.0)
        backbone[1].running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(backbone, nn.Linear(6, 3))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    exact = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batch, mode="eval"))
    result = hessian_eigenvalues(model, cross_entropy, batch, tol=1e-6, max_iter=exact.numel())
    assert result.lambda_max == pytest.approx(float(exact[-1]), rel=1e-4)
    assert not backbone.training and model[1].training


def test_the_error_bounds_include_product_error_and_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    for method in ("double_backward", "finite_difference"):
        result = hessian_eigenvalues(model, cross_entropy, batch, hvp_method=method)
        for end in ("top", "bottom"):
            assert all(bound > residual for bound, residual in zip(result.error_bounds[end], result.residuals[end]))


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_every_value_of_the_result_is_a_plain_float(method):
    """lambda_max is a float: so are the values, residuals, bounds and limits beside it (no tensor among them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    result = hessian_eigenvalues(model, cross_entropy, batch, k=2, hvp_method=method)
    lists = [result.top, result.bottom, *result.error_bounds.values(), *result.residuals.values()]
    assert all(type(values) is list and len(values) == 2 for values in lists)
    numbers = [x for values in lists for x in values] + [*result.probable_limits.values(), result.loss, result.grad_norm]
    assert all(type(x) is float for x in numbers)
    assert result.lambda_max == result.top[0] and float(result.error_bounds["top"][0]) == result.error_bounds["top"][0]


def test_a_curvature_check_carries_the_full_error_bounds():
    from hessdiag.check.probe import CurvatureProbe
    from hessdiag.settings import DiagnosticsSettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    settings = DiagnosticsSettings(hvp_method="finite_difference", product_parts=1)  # the products the estimate takes
    check = CurvatureProbe(model, cross_entropy, settings).run(1, batch)
    result = hessian_eigenvalues(model, cross_entropy, batch, hvp_method="finite_difference")
    assert check.error_bound_max == pytest.approx(float(result.error_bounds["top"][0]), rel=1e-6)
    assert check.error_bound_min == pytest.approx(float(result.error_bounds["bottom"][0]), rel=1e-6)
    assert check.error_bound_max > check.residual_max
