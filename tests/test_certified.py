"""`converged` is a proof, negative curvature is certified only beyond rounding.

Known answers: matrices Q diag(d) Q^T with d from the spectra that break stopping rules (low rank,
power law, uniform, clustered top, outliers over a bulk, semicircle), many start seeds, float64 and
float32, against the prescribed d; a small attention block against its dense float64 Hessian.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessdiag import HessianOperator, hessian_eigenvalues
from hessdiag.estimators.eigen import eigenvalues_of
from hessdiag.lanczos import christoffel_sums, lanczos
from oracles import dense_hessian

DIM = 200
SEEDS = range(6)


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q


def spectrum(family: str, generator: torch.Generator) -> torch.Tensor:
    """Eigenvalues of one adversarial family, float64, spectral norm about 1."""
    u = torch.rand(DIM, generator=generator, dtype=torch.float64)
    if family == "low_rank":  # the Ritz gap over-estimates the true gap: a gap-based stop would be wrong
        return torch.cat([u[:20], torch.zeros(DIM - 20, dtype=torch.float64)])
    if family == "power_law":
        signs = torch.where(u < 0.2, -1.0, 1.0).double()
        return signs * torch.arange(1, DIM + 1, dtype=torch.float64) ** -1.0
    if family == "uniform":
        return 1.3 * u - 0.3
    if family == "clustered_top":
        return torch.cat([1.0 - 0.01 * u[:5], 0.7 * u[5:] - 0.2])
    if family == "outliers_over_bulk":  # Hessian-like: a few outliers, a bulk near zero of both signs
        return torch.cat([torch.tensor([1.0, 0.7, 0.5], dtype=torch.float64), 0.15 * u[3:] - 0.05])
    if family == "semicircle":
        g = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
        return torch.linalg.eigvalsh((g + g.T) / (2 * (2 * DIM) ** 0.5))
    raise ValueError(family)


FAMILIES = ("low_rank", "power_law", "uniform", "clustered_top", "outliers_over_bulk", "semicircle")


def _check_extreme(value: float, bound: float, d: torch.Tensor, extreme: float, scale: float, tol: float = 1e-3) -> None:
    """Proven: an eigenvalue lies within `bound` of `value`. Probable: it is the extreme one. The
    only failure allowed is the one no Krylov method can exclude from a finite run: the Ritz pair
    locked onto a near-degenerate neighbour (within 4 tol of the extreme) whose own eigenvalue the
    bound contains, a start whose component along the extreme eigenvector was small."""
    assert float((d - value).abs().min()) <= bound
    if abs(value - extreme) > tol * scale:
        nearest = float(d[(d - value).abs().argmin()])
        assert abs(nearest - extreme) <= 4 * tol * scale and abs(value - nearest) <= bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_converged_is_never_wrong_on_adversarial_spectra(family, dtype):
    """Over the seeds: every run converges, every error bound contains an eigenvalue, and the values
    are within `tol` of the extremes but for a near-degenerate neighbour (measured: 4 runs in 240,
    float64, errors up to 3 tol, README)."""
    generator = torch.Generator().manual_seed(FAMILIES.index(family))
    for seed in SEEDS:
        d = spectrum(family, generator)
        q = _orthogonal(DIM, generator)
        a_run = ((q * d) @ q.T).to(dtype)
        result = lanczos(lambda v: a_run @ v, DIM, which="both", max_iter=100, seed=seed, dtype=dtype)
        norm = float(d.abs().max())
        assert result.converged, (family, seed, result.num_iterations)
        _check_extreme(float(result.top[0]), float(result.top_error_bounds[0]), d, float(d.max()), abs(float(d.max())))
        _check_extreme(float(result.bottom[0]), float(result.bottom_error_bounds[0]), d, float(d.min()), norm)


def overtaken(gap: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bulk in [0, 0.5], the previous top eigenvector now second (1 / (1 + gap)), a new top 1.0
    orthogonal to it: an eigenvalue crossing, routine during progressive sharpening."""
    generator = torch.Generator().manual_seed(seed)
    d = 0.5 * torch.rand(DIM, generator=generator, dtype=torch.float64)
    d[-2:] = torch.tensor([1 / (1 + gap), 1.0], dtype=torch.float64)
    q = _orthogonal(DIM, generator)
    return (q * d) @ q.T, q[:, -2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [2, 3])
def test_with_k_values_per_end_every_bound_contains_an_eigenvalue(k, dtype):
    """Every family, every seed: each of the k Ritz values per end has an eigenvalue of the operator
    (as run, in its dtype) within its bound, converged or not."""
    for family in FAMILIES:
        generator = torch.Generator().manual_seed(100 * k + FAMILIES.index(family))
        for seed in SEEDS:
            d = spectrum(family, generator)
            q = _orthogonal(DIM, generator)
            a_run = ((q * d) @ q.T).to(dtype)
            eigenvalues = torch.linalg.eigvalsh(a_run.double())
            result = lanczos(lambda v: a_run @ v, DIM, k=k, which="both", max_iter=100, seed=seed, dtype=dtype)
            for values, bounds in ((result.top, result.top_error_bounds), (result.bottom, result.bottom_error_bounds)):
                assert values.numel() == k
                for value, bound in zip(values.tolist(), bounds.tolist()):
                    assert float((eigenvalues - value).abs().min()) <= bound, (family, seed, value, bound)


@pytest.mark.parametrize("gap", [0.005, 0.02, 0.1])
def test_a_warm_start_on_an_overtaken_top_finds_the_new_top_or_does_not_converge(gap):
    """Gaps beyond the near-degenerate range of `_check_extreme` (4 tol): no exception allowed."""
    for seed in range(10):
        a, old_top = overtaken(gap, seed)
        result = lanczos(lambda v: a @ v, DIM, which="top", v0=old_top, seed=seed, dtype=torch.float64)
        assert not result.converged or abs(float(result.top[0]) - 1.0) <= 1e-3, (gap, seed)
        assert result.top_limit >= 1.0  # the run also says how far above theta_max the top may be


@pytest.mark.parametrize("steps", [3, 8, 20])
def test_the_christoffel_function_bounds_the_start_weight_of_every_eigenvalue(steps):
    """The inequality the probable limits rest on: c_i^2 sum_{j<m} p_j(lambda_i)^2 <= 1 for every
    eigenvalue, c_i the start's component along its eigenvector (A diagonal: c = the start)."""
    generator = torch.Generator().manual_seed(steps)
    d = torch.cat([torch.tensor([1.0, 0.9, 0.85], dtype=torch.float64), 0.5 * torch.rand(DIM - 3, generator=generator, dtype=torch.float64)])
    start = torch.randn(DIM, generator=generator, dtype=torch.float64)
    start[:3] *= 1e-3  # the top three nearly unseen: the bound must still hold there
    start /= start.norm()
    result = lanczos(lambda v: d * v, DIM, tol=0.0, max_iter=steps, v0=start, warm_random=0.0, dtype=torch.float64)
    sums = christoffel_sums(result.alphas.tolist(), result.betas.tolist(), d)
    assert float((start**2 * sums).max()) <= 1 + 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_probable_limits_contain_the_spectrum(family, dtype):
    """Cold, and warm from a vector that is not an eigenvector: no eigenvalue beyond the limits (each
    is allowed to fail with probability 1% over the start; the bound is conservative and no run does),
    and where the ends are resolved (outliers over a bulk) the top limit is tight."""
    generator = torch.Generator().manual_seed(10 + FAMILIES.index(family))
    for seed in SEEDS:
        d = spectrum(family, generator)
        q = _orthogonal(DIM, generator)
        a_run = ((q * d) @ q.T).to(dtype)
        for v0 in (None, q[:, d.argsort()[DIM // 2]].to(dtype)):  # warm: a mid-spectrum eigenvector
            result = lanczos(lambda v: a_run @ v, DIM, which="both", max_iter=100, seed=seed, v0=v0, dtype=dtype)
            assert result.bottom_limit <= float(d.min()) and float(d.max()) <= result.top_limit, (family, seed, v0 is None)
            if family == "outliers_over_bulk" and v0 is None:
                assert result.top_limit - float(result.top[0]) <= 1e-3 * float(d.max())


def test_the_probable_limits_are_infinite_without_a_random_part_and_exact_on_an_exhausted_space():
    q = torch.nn.functional.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64), dim=0)
    rank_one = 5 * torch.outer(q, q)
    exhausted = lanczos(lambda v: rank_one @ v, DIM, tol=0.0, max_iter=6, dtype=torch.float64)
    slack = exhausted.interlacing_slack
    assert exhausted.top_limit == float(exhausted.top[0]) + slack and exhausted.bottom_limit == float(exhausted.bottom[0]) - slack
    assert abs(exhausted.top_limit - 5.0) < 1e-12 and abs(exhausted.bottom_limit) < 1e-12
    small = lanczos(lambda v: 3 * v, 1, dtype=torch.float64)  # one dimension: the whole space after one step
    assert small.top_limit - small.interlacing_slack == small.bottom_limit + small.interlacing_slack == 3.0
    d = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    no_random = lanczos(lambda v: d * v, DIM, v0=torch.ones(DIM, dtype=torch.float64), warm_random=0.0, dtype=torch.float64)
    assert no_random.top_limit == float("inf") and no_random.bottom_limit == float("-inf")


def test_float32_least_squares_is_never_certified_negative():
    """H = 2 X^T X / n with more features than samples: PSD, singular; float32 rounding alone
    gives slightly negative Ritz values, which must not pass for a certificate."""
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(30, 120, generator=generator)
        result = lanczos(lambda v: 2 * x.T @ (x @ v) / 30, 120, which="bottom", max_iter=60, seed=seed)
        assert not result.negative_curvature_certified, (seed, float(result.bottom[0]))


def test_float64_rank_one_is_never_certified_negative():
    q = torch.nn.functional.normalize(torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=0)
    a = 5 * torch.outer(q, q)
    for seed in range(10):
        result = lanczos(lambda v: a @ v, 200, seed=seed, dtype=torch.float64)
        assert not result.negative_curvature_certified


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_true_negative_curvature_is_certified(dtype):
    """The threshold is rounding-sized, not a blanket margin: lambda_min = -1e-3 ||A|| is certified."""
    d = torch.cat([torch.tensor([-1e-3], dtype=torch.float64), torch.linspace(0, 1, DIM - 1, dtype=torch.float64)])
    q = _orthogonal(DIM, torch.Generator().manual_seed(1))
    a = ((q * d) @ q.T).to(dtype)
    result = lanczos(lambda v: a @ v, DIM, which="bottom", tol=1e-5, max_iter=150, dtype=dtype)
    assert result.negative_curvature_certified
    assert float(result.bottom[0]) + result.interlacing_slack < 0


def test_product_errors_widen_the_bounds_and_the_certificate():
    """Products off by a symmetric E with ||E|| = e: bounds that include e still contain an eigenvalue
    of A, and a PSD A is not certified negative although the perturbed operator is indefinite."""
    generator = torch.Generator().manual_seed(2)
    d = torch.cat([torch.zeros(DIM // 2, dtype=torch.float64), torch.rand(DIM - DIM // 2, generator=generator, dtype=torch.float64)])
    q = _orthogonal(DIM, generator)
    a = (q * d) @ q.T
    e = 1e-3
    noise = _orthogonal(DIM, generator)
    perturbation = e * (noise * torch.linspace(-1, 1, DIM, dtype=torch.float64)) @ noise.T
    plain = lanczos(lambda v: (a + perturbation) @ v, DIM, tol=1e-4, max_iter=150, dtype=torch.float64)
    assert plain.negative_curvature_certified  # without the error bound: a false certificate
    honest = lanczos(lambda v: (a + perturbation) @ v, DIM, tol=1e-4, max_iter=150, dtype=torch.float64, matvec_error=lambda: e)
    assert not honest.negative_curvature_certified
    for value, bound in ((honest.top[0], honest.top_error_bounds[0]), (honest.bottom[0], honest.bottom_error_bounds[0])):
        assert float((d - value).abs().min()) <= float(bound)


def _aliasing_matvecs(a: torch.Tensor):
    out = torch.empty(a.shape[0], dtype=a.dtype)

    def reused_output(v):
        return torch.mv(a, v, out=out)

    def in_place(v):
        return v.copy_(a @ v)

    return {"reused_output": reused_output, "in_place": in_place}


@pytest.mark.parametrize("kind", ["reused_output", "in_place"])
def test_a_matvec_that_aliases_its_output_gives_the_same_answer(kind):
    d = torch.linspace(0.1, 1.0, DIM, dtype=torch.float64)  # positive definite
    q = _orthogonal(DIM, torch.Generator().manual_seed(3))
    a = (q * d) @ q.T
    clean = lanczos(lambda v: a @ v, DIM, dtype=torch.float64)
    aliased = lanczos(_aliasing_matvecs(a)[kind], DIM, dtype=torch.float64)
    torch.testing.assert_close(aliased.ritz_values, clean.ritz_values, rtol=0, atol=1e-12)
    assert not aliased.negative_curvature_certified


@pytest.mark.parametrize("bad", [[math.nan], [math.inf], [math.inf, -math.inf], [-math.inf]], ids=str)
def test_a_non_finite_product_is_a_clear_error(bad):
    """Even a single non-finite coordinate, and infinities of both signs (whose sum is NaN)."""
    calls = []

    def matvec(v):
        calls.append(1)
        w = v.clone()
        if len(calls) == 3:
            w[: len(bad)] = torch.tensor(bad, dtype=w.dtype)
        return w

    with pytest.raises(FloatingPointError, match="NaN or infinity at Lanczos step 3"):
        lanczos(matvec, 20)


def test_a_product_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`matvec` must return a tensor of shape \(20,\)"):
        lanczos(lambda v: v[:10], 20)


@pytest.mark.parametrize("matvec_error", [-1.0, float("nan"), "0.1"])
def test_bad_matvec_error(matvec_error):
    with pytest.raises(ValueError, match="`matvec_error` must be a finite number >= 0"):
        lanczos(lambda v: v, 10, matvec_error=matvec_error)


class AttentionBlock(nn.Module):
    """One pre-norm self-attention block with a linear read-out, tiny enough for a dense Hessian."""

    def __init__(self, d: int = 4, heads: int = 2, fused: bool = False) -> None:
        super().__init__()
        self.fused, self.heads = fused, heads
        self.norm = nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, heads, bias=False, batch_first=True)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.fused:
            b, t, d = h.shape
            q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(h).chunk(3, dim=-1))
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        else:
            mixed, _ = self.attention(h, h, h, need_weights=False)
        return self.out(x + mixed).mean(dim=1)


def attention_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("fused", [False, True])
def test_attention_block_lambda_min_against_its_dense_hessian(fused):
    torch.manual_seed(0)
    model = AttentionBlock(fused=fused).double()
    for p in (model.qkv if fused else model.attention).parameters():
        p.requires_grad_(True)
    unused = model.attention if fused else model.qkv
    for p in unused.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 5, 4, generator=generator, dtype=torch.float64), torch.randint(0, 4, (6,), generator=generator))
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no second derivative
        truth = torch.linalg.eigvalsh(dense_hessian(model, attention_loss, batch))
    norm = float(truth.abs().max())
    assert float(truth[0]) < -1e-3 * norm  # the block has negative curvature to find
    for seed in range(2):
        result = hessian_eigenvalues(model, attention_loss, batch, seed=seed)
        assert result.converged
        assert abs(result.lambda_max - float(truth[-1])) <= 1e-3 * float(truth[-1])
        assert abs(result.lambda_min - float(truth[0])) <= 1e-3 * norm
        assert result.negative_curvature_certified


def test_eigenvalues_of_reads_the_operators_product_error():
    """`HessianOperator.product_error` (set by inexact products) widens the proven bounds and the
    certificate, read at every stopping test."""
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 5, generator=generator, dtype=torch.float64), torch.randn(40, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(5, 1).double()

    def loss_fn(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    with HessianOperator(model, loss_fn, (x, y)) as operator:
        exact = eigenvalues_of(operator)
        operator.product_error = 0.05
        widened = eigenvalues_of(operator)
    assert float(exact.error_bounds["top"][0]) < 1e-6
    for end in ("top", "bottom"):
        assert float(widened.error_bounds[end][0]) >= 0.05
    assert widened.lanczos.interlacing_slack >= 0.05


@pytest.mark.parametrize("which", ["top", "both"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_cost_what_float32_costs_with_bounds_that_include_their_rounding(dtype, which):
    """A bfloat16/float16 model: products carry the dtype's rounding (bfloat16: lambda_max was 1.4e-4
    off with a claimed bound of 7e-5 before), so tol=1e-3 cannot be proven; it used to run every check
    to max_iter (64 products against 11 in float32). Now `tol` is raised once to the precision floor,
    with a warning: at most 1.5x float32's products, and the bounds contain the float64 Hessian's
    extreme eigenvalues at the same parameters, over several models."""
    import warnings

    from hessdiag import HessdiagWarning, Monitor
    from hessdiag.operator import PRECISION_FLOOR

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    for seed in range(3):
        torch.manual_seed(seed)
        base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 10))
        x, y = torch.randn(128, 16), torch.randint(0, 10, (128,))
        model, batch = copy.deepcopy(base).to(dtype), (x.to(dtype), y)
        truth = torch.linalg.eigvalsh(dense_hessian(copy.deepcopy(model).double(), loss_fn, (batch[0].double(), y)))
        with pytest.warns(HessdiagWarning, match=f"`tol`=0.001 is below what the bounds of this {dtype} model"):
            result = hessian_eigenvalues(model, loss_fn, batch, tol=1e-3, which=which)
        float32 = hessian_eigenvalues(base, loss_fn, (x, y), tol=1e-3, which=which)
        assert result.converged and result.tol == PRECISION_FLOOR * torch.finfo(dtype).eps
        assert result.num_hvps <= 1.5 * float32.num_hvps, (seed, result.num_hvps, float32.num_hvps)
        assert abs(result.lambda_max - float(truth[-1])) <= float(result.error_bounds["top"][0])
        assert abs(result.lambda_min - float(truth[0])) <= float(result.error_bounds["bottom"][0])
    with pytest.warns(HessdiagWarning, match="cannot be proven: the checks use"):
        Monitor(model, loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HessdiagWarning)
        Monitor(model, loss_fn, tol=0.1)  # a tolerance above the floor: no warning
        hessian_eigenvalues(model, loss_fn, batch, tol=0.1)


def test_a_float16_model_with_curvature_past_its_range_squared_is_solved_in_float32():
    """||H v|| of 400 squares to 1.6e5, past float16's largest number (65504): the solver's vectors
    and inner products are float32 (the products alone run in float16), so the check neither
    overflows nor loses its bounds."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = 40 * torch.randn(64, 8), torch.randint(0, 4, (64,))

    def loss_fn(m, batch):
        return 30 * F.cross_entropy(m(batch[0]), batch[1])

    model, batch = copy.deepcopy(base).half(), (x.half(), y)
    truth = torch.linalg.eigvalsh(dense_hessian(copy.deepcopy(model).double(), loss_fn, (batch[0].double(), y)))
    assert float(truth.abs().max()) > 400
    result = hessian_eigenvalues(model, loss_fn, batch, tol=0.1)
    assert result.converged and result.lanczos.top_vectors.dtype == torch.float32
    assert abs(result.lambda_max - float(truth[-1])) <= float(result.error_bounds["top"][0])
    assert abs(result.lambda_min - float(truth[0])) <= float(result.error_bounds["bottom"][0])
