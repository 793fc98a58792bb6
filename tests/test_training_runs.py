"""Real tiny training runs on the CPU: each pathology raises its flag, and only it.

Data: scikit-learn's handwritten digits (ships with the package) or closed-form regressions.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import Monitor
from hessdiag.detectors import ExplodingGradientDetector, PlateauDetector
from hessdiag.errors import HessdiagWarning

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits():
    data = sklearn_datasets.load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def half_squared_error(model, batch):
    return 0.5 * (model(batch[0]) - batch[1]).pow(2).sum(dim=1).mean()


def train(model, optimizer, loss_fn, batches, steps, check_loss=None, **monitor_options):
    monitor = Monitor(model, check_loss or loss_fn, optimizer=optimizer, **monitor_options)
    for step in range(steps):
        batch = batches(step)
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(batch, loss)
    monitor.flush()
    return monitor


def raised(monitor):
    return {event.name for event in monitor.events if event.kind == "onset"}


def minibatches(data, size=64, seed=0):
    x, y = data
    generator = torch.Generator().manual_seed(seed)

    def batch(step):
        index = torch.randint(0, len(x), (size,), generator=generator)
        return x[index], y[index]

    return batch


def test_healthy_adam_on_digits_raises_nothing(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = train(model, optimizer, cross_entropy, minibatches(digits), 600, check_every=50, log_every=10)
    assert raised(monitor) == set()
    assert len(monitor.checks) == 12 and monitor.checks[-1].loss < 0.5
    assert monitor.checks[-1].stability.preconditioned  # Adam: the preconditioned sharpness


def test_deep_sigmoid_network_with_small_init_vanishes_and_plateaus(digits):
    torch.manual_seed(0)
    layers = []
    for i in range(10):
        layers += [nn.Linear(64 if i == 0 else 32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 10))
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.05)
            nn.init.zeros_(module.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    full_batch = (digits[0][:512], digits[1][:512])
    monitor = train(model, optimizer, cross_entropy, lambda step: full_batch, 400, check_every=100, log_every=10)
    assert raised(monitor) == {"vanishing", "plateau"}
    first = {e.name: e.step for e in monitor.events if e.kind == "onset"}
    assert first["vanishing"] <= 60 and first["plateau"] <= 300
    assert monitor.detectors["vanishing"].evidence["depth_ratio"] < 1e-3


def test_too_large_a_learning_rate_explodes(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    data = (digits[0][:500], F.one_hot(digits[1][:500], 10).float())
    with pytest.warns(UserWarning, match="curvature check at step 20 failed"):
        monitor = train(model, optimizer, half_squared_error, lambda step: data, 40, check_every=20, log_every=5)
    assert raised(monitor) == {"exploding"}
    onset = next(e for e in monitor.events if e.name == "exploding")
    assert onset.step <= 20 and onset.severity == "critical"


def test_two_layer_linear_network_from_tiny_init_sits_at_a_saddle_then_escapes():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=generator)
    y = x @ torch.randn(5, 10, generator=generator).T
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8, bias=False), nn.Linear(8, 5, bias=False))
    for module in model:
        nn.init.normal_(module.weight, std=1e-4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = train(model, optimizer, half_squared_error, lambda step: (x, y), 300, check_every=5, log_every=5)
    assert raised(monitor) == {"saddle"}
    first = monitor.events[0]
    assert first.name == "saddle" and first.step == 5
    # At the origin the Hessian is symmetric around 0 and a step along the bottom vector helps.
    assert first.evidence["curvature_ratio"] < -0.9 and first.evidence["loss_change_along_bottom"] < 0
    assert not monitor.detectors["saddle"].active  # escaped
    assert monitor.checks[-1].loss < 1e-3 * monitor.checks[0].loss


def test_full_batch_gradient_descent_sharpens_to_the_edge_of_stability(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)  # 2 / lr = 10
    data = (digits[0][:500], F.one_hot(digits[1][:500], 10).float())
    monitor = train(model, optimizer, half_squared_error, lambda step: data, 300, check_every=20, log_every=10)
    assert raised(monitor) == {"edge_of_stability"}
    sharpness = [check.sharpness for check in monitor.checks]
    assert sharpness[0] < 0.9 * 10 and max(sharpness) > 10  # progressive sharpening up to 2/lr
    assert monitor.checks[0].stability.threshold == pytest.approx(10.0)


def test_diagnostics_leave_training_untouched(digits):
    """Same run with and without the Monitor: parameters, buffers, optimizer state and RNG bit-identical."""

    def run(with_monitor):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        monitor = (
            Monitor(model, cross_entropy, optimizer=optimizer, check_every=7, log_every=3, update_ratios=True)
            if with_monitor
            else None
        )
        batches = minibatches(digits, seed=1)
        for step in range(30):
            batch = batches(step)
            optimizer.zero_grad()
            loss = cross_entropy(model, batch)
            loss.backward()
            if monitor:
                monitor.after_backward()
            optimizer.step()
            if monitor:
                monitor.after_step(batch, loss)
        return model, optimizer, torch.get_rng_state(), monitor

    plain_model, plain_optimizer, plain_rng, _ = run(False)
    model, optimizer, rng, monitor = run(True)
    assert len(monitor.checks) == 4
    assert torch.equal(rng, plain_rng)
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(plain_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a)
    for a, b in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)


class RecordingWriter:
    """Keeps every scalar the monitor logs, by tag and step, and every per-layer value, by quantity,
    module and step."""

    def __init__(self):
        self.logged = {}
        self.layers = {}

    def scalars(self, step, values, layers):
        for tag, value in values.items():
            self.logged.setdefault(tag, {})[step] = value
        for family, by_layer in layers.items():
            for module, value in by_layer.items():
                self.layers.setdefault(family, {}).setdefault(module, {})[step] = value

    def events(self, step, events): ...

    def density(self, step, density): ...

    def text(self, step, tag, message): ...

    def flush(self): ...


def test_update_ratios_are_the_relative_step_sgd_took(digits):
    """||delta theta|| / ||theta|| of a layer equals lr ||g|| / ||theta|| for plain SGD, step by step;
    the logged weight norm is that of the parameters at the read-back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = RecordingWriter()
    monitor = Monitor(model, writer=writer, check_every=0, log_every=4, update_ratios=True)
    batches, expected = minibatches(digits), {}
    for step in range(1, 13):
        batch = batches(step)
        optimizer.zero_grad()
        cross_entropy(model, batch).backward()
        monitor.after_backward()
        first_layer = list(model[0].parameters())
        weight_norm = torch.cat([p.detach().flatten() for p in first_layer]).norm()
        grad_norm = torch.cat([p.grad.flatten() for p in first_layer]).norm()
        expected[step + 1] = (0.05 * grad_norm / weight_norm).item()  # seen at the next observe
        optimizer.step()
        monitor.after_step(batch, cross_entropy(model, batch).detach())
    logged = writer.layers["layer_update_ratio"]["0"]
    assert sorted(logged) == [4, 8, 12]
    for step, value in logged.items():
        assert value == pytest.approx(expected[step], rel=1e-5)
    assert "2" in writer.layers["layer_update_ratio"]
    final_weight_norm = torch.cat([p.detach().flatten() for p in model[0].parameters()]).norm().item()
    assert writer.layers["layer_weight_norm"]["0"][12] == pytest.approx(final_weight_norm, rel=1e-6)


@pytest.mark.parametrize("with_scaler", [True, False])
def test_loss_scaler_overflow_skips_are_not_explosions(digits, with_scaler):
    """An fp16-style loop with a GradScaler whose gradients overflow on three steps: the scaler skips
    them. Told about the scaler, the monitor counts the skips and raises nothing; not told, a
    non-finite gradient is an explosion."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    writer = RecordingWriter()
    monitor = Monitor(
        model, cross_entropy, optimizer=optimizer, writer=writer, check_every=0, log_every=5,
        grad_scaler=scaler if with_scaler else None,
    )  # fmt: skip
    batches = minibatches(digits)
    for step in range(1, 41):
        batch = batches(step)
        optimizer.zero_grad()
        loss = cross_entropy(model, batch)
        scaler.scale(loss).backward()
        if step in (3, 4, 17):  # an fp16 overflow somewhere in the backward pass
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)
        monitor.after_backward()
        scaler.step(optimizer)
        scaler.update()
        monitor.after_step(batch, loss.detach())
    monitor.flush()
    assert scaler.get_scale() == 2.0**10 / 8  # the scaler did skip the three steps
    if with_scaler:
        assert raised(monitor) == set() and monitor.overflow_skips == 3
        assert writer.logged["hessdiag/overflow_skips"][40] == 3
    else:
        assert raised(monitor) == {"exploding"} and monitor.events[0].step == 3


class BrokenWriter(RecordingWriter):
    """A writer whose disk is full."""

    def scalars(self, step, values, layers):
        raise OSError("No space left on device")


class BrokenDetector(PlateauDetector):
    def observe(self, record):
        raise ZeroDivisionError("a bug in a custom detector")


def test_faults_inside_the_diagnostics_never_stop_training(digits):
    """A failing writer, a raising detector and malformed losses: each is reported once, the rest of
    the diagnostics go on, and the run ends exactly as without them."""

    def run(monitored=True, **monitor_options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=10, log_every=5, **monitor_options)
        batches = minibatches(digits)
        for step in range(30):
            batch = batches(step)
            optimizer.zero_grad()
            losses = F.cross_entropy(model(batch[0]), batch[1], reduction="none")
            losses.mean().backward()
            if monitored:
                monitor.after_backward()
            optimizer.step()
            if monitored:  # malformed losses: per-sample losses at step 8, a mapping without "loss" at step 9
                loss = {7: losses.detach(), 8: {"total": losses.mean()}}.get(step, losses.mean().detach())
                monitor.after_step(batch, loss)
        monitor.flush()
        return model, monitor

    healthy = RecordingWriter()
    detectors = [BrokenDetector(), ExplodingGradientDetector()]
    with pytest.warns(HessdiagWarning) as caught:
        model, monitor = run(writer=[BrokenWriter(), healthy], detectors=detectors)
    messages = [str(w.message) for w in caught]
    assert sum("BrokenWriter.scalars failed" in m for m in messages) == 1
    assert sum("plateau detector failed" in m for m in messages) == 1
    assert sum("got shape (64,); its mean is used" in m for m in messages) == 1
    assert sum("a mapping with a 'loss' entry; got a mapping with keys ['total']" in m for m in messages) == 1
    assert len(monitor.checks) == 3 and [s for s in healthy.logged["hessdiag/lambda_max"]] == [10, 20, 30]
    plain, _ = run(monitored=False)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(OSError, match="No space left"):
        run(writer=BrokenWriter(), strict=True)


def test_monitor_state_round_trip_continues_identically(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = train(model, optimizer, cross_entropy, minibatches(digits), 40, check_every=10, log_every=5)
    second = Monitor(copy.deepcopy(model), cross_entropy, check_every=10, log_every=5)
    second.load_state_dict(first.state_dict())
    assert second.step == 40 and second.events == first.events
    assert torch.equal(second.probe.starts.warm_vectors, first.probe.starts.warm_vectors.cpu())
    assert second.detectors["plateau"].state_dict() == first.detectors["plateau"].state_dict()


def test_out_of_memory_in_a_check_retries_on_a_smaller_sub_batch(digits):
    def hungry(model, batch):
        if batch[0].shape[0] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return cross_entropy(model, batch)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="Out of memory in a curvature check; retrying on 32 samples"):
        monitor = train(
            model, optimizer, cross_entropy, minibatches(digits, size=64), 20, check_loss=hungry, check_every=10, log_every=5
        )
    assert [c.batch_size for c in monitor.checks] == [16, 16]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"check_every": -1}, "`check_every` must be an int >= 0 or 'auto'"),
        ({"overhead_budget": 1.5}, r"`overhead_budget` must be a number in \(0, 1\)"),
        ({"log_every": 0}, "`log_every` must be an int >= 1"),
        ({"loss_fn": None}, "`loss_fn` is required for curvature checks"),
        ({"writer": object()}, "`writer` must be a SummaryWriter"),
        ({"sub_batch": 0}, "`sub_batch` must be a positive int"),
        ({"tol": 0.0}, r"`tol` must be a number in \(0, 1\)"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs, match):
    options = {"loss_fn": cross_entropy} | kwargs
    with pytest.raises(ValueError, match=match):
        Monitor(nn.Linear(2, 2), options.pop("loss_fn"), **options)


class TinyTransformer(nn.Module):
    """One pre-norm attention block with a token embedding and an output head (GPT-like, causal)."""

    def __init__(self, vocab=16, width=16, heads=2, length=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.norm1, self.norm2, self.norm_out = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(length, length, dtype=torch.bool), 1))

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=self.mask[: tokens.shape[1], : tokens.shape[1]], need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm_out(x))


def next_token(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


class LoRALinear(nn.Module):
    """A frozen linear map plus a low-rank adapter B A with B = 0 at initialisation (as LoRA starts)."""

    def __init__(self, base: nn.Linear, rank=2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Parameter(0.1 * torch.randn(rank, base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.T @ self.b.T


def healthy_runs():
    """Runs whose loss falls steadily: an Adam-trained transformer with warm-up, a LoRA adapter from its
    zero initialisation, and a regression whose loss has an irreducible noise floor."""
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 16, (256, 9), generator=generator)
    sequences[:, 1::2] = (sequences[:, 0::2][:, :4] * 3 + 1) % 16  # a learnable rule on every other token

    def transformer():
        torch.manual_seed(0)
        model = TinyTransformer()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 40))
        return model, optimizer, warmup, next_token, lambda step: sequences[(step * 32) % 256 :][:32]

    x = torch.randn(512, 12, generator=generator)
    teacher = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 4))
    torch.manual_seed(1)
    teacher_base = nn.Linear(12, 4)
    y_lora = teacher_base(x).detach() + 0.5 * (x[:, :2] @ torch.randn(2, 4, generator=generator))

    def lora():
        torch.manual_seed(2)
        base = copy.deepcopy(teacher_base)
        model = nn.Sequential(LoRALinear(base))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, optimizer, None, half_squared_error, lambda step: (x[(step * 64) % 512 :][:64], y_lora[(step * 64) % 512 :][:64])

    y_noisy = teacher(x).detach() + 0.3 * torch.randn(512, 4, generator=generator)

    def noise_floor():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        return model, optimizer, None, half_squared_error, lambda step: (x[(step * 64) % 512 :][:64], y_noisy[(step * 64) % 512 :][:64])

    return {"transformer-adamw-warmup": transformer, "lora-zero-init": lora, "regression-noise-floor": noise_floor}


@pytest.mark.parametrize("name", list(healthy_runs()))
def test_no_saddle_on_a_run_whose_loss_falls(name):
    """Every check finds certified negative curvature (the geometry of a saddle), but the loss history
    says the run is not slowed: no saddle flag."""
    model, optimizer, scheduler, loss_fn, batches = healthy_runs()[name]()
    monitor = Monitor(model, loss_fn, optimizer=optimizer, check_every=25, log_every=5, density_every=0)
    losses = []
    for step in range(150):
        batch = batches(step)
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        monitor.after_step(batch, loss)
        losses.append(loss.item())
    assert sum(losses[-25:]) < 0.9 * sum(losses[:25])  # the loss did fall
    assert any(check.negative_curvature_certified for check in monitor.checks)
    assert "saddle" not in {event.name for event in monitor.events}
