"""The new quantities of a curvature check, through the Monitor, against known answers: where the
top and bottom directions live (a block-diagonal model, a mixed case against the dense eigenvector),
the curvature along the gradient and the headroom (dense Hessian; Adam's preconditioned version with
the stability module's scaling and threshold), the noise scale (equal to ``gradient_noise_scale`` on
the same batch, accumulated over checks, kept in checkpoints), the conditioning, the detectors'
evidence naming the module, the tags and text cards, and the run left bit-for-bit unchanged."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import hessdiag
from hessdiag import MicroBatches, Monitor, gradient_noise_scale, hessian_eigenvalues
from hessdiag.app.cli import format_summary, summarize
from hessdiag.detectors import CheckRecord, EdgeOfStabilityDetector, ExplodingGradientDetector
from hessdiag.settings import DiagnosticsSettings
from hessdiag.preconditioners import adam_preconditioner_sqrt
from hessdiag.stability import stability_threshold
from loops import one_step
from oracles import dense_hessian


class TwoBlocks(nn.Module):
    """Two independent linear regressions, losses added: the Hessian is block-diagonal, the steep
    block 100x the flat one (inputs scaled by 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.steep = nn.Linear(3, 1)
        self.flat = nn.Linear(3, 1)

    def forward(self, x):
        return self.steep(10 * x).squeeze(1), self.flat(x).squeeze(1)


def two_block_loss(model, batch):
    x, y = batch
    steep, flat = model(x)
    return F.mse_loss(steep, y[:, 0]) + F.mse_loss(flat, y[:, 1])


def two_block_batch(n=24):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randn(n, 2, generator=generator, dtype=torch.float64)


def mlp_problem(n=24, dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator)
    return model, (x, y)


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def flat_gradient(model, loss_fn, batch):
    grads = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def shares_by_hand(model, vector):
    """Per module, the share of `vector`'s squared norm, slicing it by ``named_parameters()``."""
    shares, offset = {}, 0
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        shares[owner] = shares.get(owner, 0.0) + float(vector[offset : offset + p.numel()].square().sum())
        offset += p.numel()
    total = sum(shares.values())
    return {name: value / total for name, value in shares.items()}


# -- where the curvature lives -------------------------------------------------------------------


def test_result_layer_shares_block_diagonal_and_without_vectors():
    model, batch = TwoBlocks().double(), two_block_batch()
    result = hessian_eigenvalues(model, two_block_loss, batch, tol=1e-10, hvp_method="double_backward")
    top, bottom = result.layer_shares("top"), result.layer_shares("bottom")
    assert list(top) == ["steep", "flat"] and top["steep"] == pytest.approx(1.0, abs=1e-8)
    assert list(bottom)[0] == "flat" and bottom["flat"] == pytest.approx(1.0, abs=1e-8)
    assert result.layer_shares() == top  # "top" by default
    with pytest.raises(ValueError, match="`which` must be 'top' or 'bottom'"):
        result.layer_shares("both")
    recurrence = hessian_eigenvalues(model, two_block_loss, batch, basis="recurrence", hvp_method="double_backward")
    assert recurrence.top_vectors is None
    with pytest.raises(ValueError, match="three-vector recurrence"):
        recurrence.layer_shares("top")


def test_result_layer_shares_over_chosen_parameters():
    model, batch = TwoBlocks().double(), two_block_batch()
    params = list(model.flat.parameters())
    result = hessian_eigenvalues(model, two_block_loss, batch, params=params, hvp_method="double_backward")
    assert result.layer_shares("top") == {"flat": pytest.approx(1.0)}


def test_a_check_of_the_block_diagonal_model_puts_the_top_direction_in_the_steep_module(tmp_path):
    model, batch = TwoBlocks().double(), two_block_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    writer = SummaryWriter(tmp_path)
    monitor = Monitor(model, two_block_loss, optimizer=optimizer, writer=writer, check_every=1, log_every=1, tol=1e-8)
    one_step(model, optimizer, two_block_loss, batch, monitor)
    writer.close()
    check = monitor.last_check
    assert check.top_shares[0][0] == "steep" and check.top_shares[0][1] == pytest.approx(1.0, abs=1e-6)
    assert check.bottom_shares[0][0] == "flat" and check.bottom_shares[0][1] == pytest.approx(1.0, abs=1e-6)
    card = texts(tmp_path, "hessdiag/layer_shares")[-1]
    assert card.startswith("The sharpest direction lies 100% in `steep`.")
    assert "| top (lambda_max) | `steep` 100%, `flat` 0% |" in card


def test_a_checks_shares_match_the_dense_eigenvector_in_a_mixed_case():
    model, batch = mlp_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, tol=1e-9, max_iter=80)
    one_step(model, optimizer, cross_entropy, batch, monitor)
    eigenvalues, vectors = torch.linalg.eigh(dense_hessian(model, cross_entropy, batch))
    assert eigenvalues[-1] - eigenvalues[-2] > 1e-3 * eigenvalues[-1]  # a distinct top eigenvector
    expected = shares_by_hand(model, vectors[:, -1])
    kept = dict(monitor.last_check.top_shares)
    assert len(kept) == min(5, len(expected)) and sum(v > 0.05 for v in kept.values()) >= 2  # mixed indeed
    for name, share in kept.items():
        assert share == pytest.approx(expected[name], abs=1e-5)
    assert list(kept) == sorted(expected, key=expected.get, reverse=True)[: len(kept)]


# -- what limits the step ----------------------------------------------------------------------


def test_curvature_along_the_gradient_and_headroom_in_a_check_match_the_dense_hessian():
    model, batch = mlp_problem()
    lr = 0.05
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, tol=1e-9, max_iter=80)
    one_step(model, optimizer, cross_entropy, batch, monitor)
    hessian = dense_hessian(model, cross_entropy, batch)
    g = flat_gradient(model, cross_entropy, batch)
    expected = float(g @ hessian @ g / (g @ g))
    check = monitor.last_check
    assert check.gradient_curvature == pytest.approx(expected, rel=1e-9)
    assert check.lr_headroom == pytest.approx((2 / lr) / expected, rel=1e-9)  # largest stable lr / lr
    lambda_max = float(torch.linalg.eigvalsh(hessian)[-1])
    assert check.gradient_alignment == pytest.approx(expected / lambda_max, rel=1e-6)
    latest = monitor.latest
    assert latest["hessdiag/gradient_curvature"] == check.gradient_curvature
    assert latest["hessdiag/lr_headroom"] == check.lr_headroom
    assert latest["hessdiag/gradient_alignment"] == check.gradient_alignment


def test_under_adam_the_curvature_is_along_the_preconditioned_gradient_against_adams_threshold():
    model, batch = mlp_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=2, log_every=1, tol=1e-9, max_iter=80)
    for _ in range(2):
        one_step(model, optimizer, cross_entropy, batch, monitor)
    check = monitor.last_check
    d = adam_preconditioner_sqrt(optimizer, list(model.parameters())).double()
    threshold = stability_threshold(optimizer).threshold
    scaled = torch.diag(d) @ dense_hessian(model, cross_entropy, batch) @ torch.diag(d)
    u = d * flat_gradient(model, cross_entropy, batch)
    expected = float(u @ scaled @ u / (u @ u))
    assert check.stability.preconditioned and check.stability.threshold == pytest.approx(threshold)
    assert check.gradient_curvature == pytest.approx(expected, rel=1e-8)
    assert check.lr_headroom == pytest.approx(threshold / expected, rel=1e-8)
    assert check.sharpness == pytest.approx(float(torch.linalg.eigvalsh(scaled)[-1]), rel=1e-6)
    assert check.gradient_alignment == pytest.approx(expected / check.sharpness)
    assert 0 < check.gradient_alignment <= 1 + 1e-9


def test_without_an_optimizer_the_curvature_is_logged_without_headroom():
    model, batch = mlp_problem()
    monitor = Monitor(model, cross_entropy, check_every=1, log_every=1)
    loss = cross_entropy(model, batch)
    loss.backward()
    monitor.after_backward()
    monitor.after_step(batch, loss)
    check = monitor.last_check
    assert check.gradient_curvature is not None and check.lr_headroom is None
    assert "hessdiag/lr_headroom" not in monitor.latest and "hessdiag/gradient_curvature" in monitor.latest


# -- how much batch the run can use ------------------------------------------------------------


def test_the_noise_scale_of_a_check_equals_gradient_noise_scale_on_the_same_batch_and_accumulates():
    model, batch = mlp_problem(n=26)  # cut to 24 samples: 4 parts of 6
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, noise_scale_parts=4)
    estimates = []
    for _ in range(3):
        one_step(model, optimizer, cross_entropy, batch, monitor)
        cut = (batch[0][:24], batch[1][:24])
        estimates.append(gradient_noise_scale(model, cross_entropy, cut, num_parts=4))
        noise = monitor.last_check.noise
        assert noise.noise_scale == pytest.approx(estimates[-1].noise_scale, rel=1e-10)
        assert noise.trace_covariance_se == pytest.approx(estimates[-1].trace_covariance_se, rel=1e-10)
        assert (noise.small_batch, noise.big_batch) == (6, 24)
    running = hessdiag.RunningNoiseScale()
    for estimate in estimates:
        running.update(estimate)
    check = monitor.last_check
    assert check.noise_scale == pytest.approx(running.noise_scale, rel=1e-10)
    assert check.noise_scale_se == pytest.approx(running.noise_scale_se, rel=1e-10)
    assert check.step_batch_size == 26
    assert monitor.latest["hessdiag/noise_scale"] == check.noise_scale
    assert monitor.latest["hessdiag/noise_scale_se"] == check.noise_scale_se
    # Checkpoints keep the running sums; an older checkpoint without them starts afresh.
    state = monitor.state_dict()
    restored = Monitor(model, cross_entropy, optimizer=optimizer, check_every=1)
    restored.load_state_dict(state)
    assert restored.probe.noise_scale.noise_scale == pytest.approx(running.noise_scale, rel=1e-12)
    old = dict(state, probe={key: value for key, value in state["probe"].items() if key != "noise_scale"})
    restored.load_state_dict(old)
    assert restored.probe.noise_scale.count == 0 and math.isnan(restored.probe.noise_scale.noise_scale)


def test_under_accumulation_the_noise_scale_comes_from_the_first_micro_batch():
    model, batch = mlp_problem()
    micro = MicroBatches([(batch[0][:12], batch[1][:12]), (batch[0][12:], batch[1][12:])])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, noise_scale_parts=4)
    optimizer.zero_grad()
    loss = (cross_entropy(model, micro[0]) + cross_entropy(model, micro[1])) / 2
    loss.backward()
    monitor.after_backward()
    optimizer.step()
    monitor.after_step(micro, loss)
    expected = gradient_noise_scale(model, cross_entropy, micro[0], num_parts=4)
    check = monitor.last_check
    assert check.noise.trace_covariance == pytest.approx(expected.trace_covariance, rel=1e-10)
    assert check.step_batch_size == 24 and check.skipped == {}


def test_the_noise_scale_is_skipped_with_a_reason_said_once():
    model, batch = mlp_problem()
    batch = batch[0][:3], batch[1][:3]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, noise_scale_parts=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            one_step(model, optimizer, cross_entropy, batch, monitor)
    said = [w for w in caught if "No gradient noise scale" in str(w.message)]
    assert len(said) == 1 and "the check batch has 3 samples, fewer than the 4 parts the noise scale cuts it in" in str(said[0].message)
    assert len(monitor.checks) == 2 and all(check.noise is None for check in monitor.checks)
    assert "hessdiag/noise_scale" not in monitor.latest
    assert monitor.last_check.gradient_curvature is not None  # the rest of the check is unaffected


def test_no_noise_scale_when_switched_off():
    model, batch = mlp_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, noise_scale_parts=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(model, optimizer, cross_entropy, batch, monitor)
    assert monitor.last_check.noise is None and monitor.last_check.skipped == {}


@pytest.mark.parametrize("value", [1, -1, True, 2.0, None])
def test_noise_scale_parts_is_validated(value):
    with pytest.raises(ValueError, match="`noise_scale_parts` must be 0 \\(no noise scale\\) or an int >= 2"):
        DiagnosticsSettings(noise_scale_parts=value)
    with pytest.raises(ValueError, match="`noise_scale_parts`"):
        Monitor(nn.Linear(2, 2), cross_entropy, noise_scale_parts=value)


# -- conditioning ---------------------------------------------------------------------------


def test_conditioning_at_density_checks_only_with_the_hutchpp_trace_against_the_dense_one():
    # Six parameters: a Hessian of rank <= 6, which Hutch++'s 18 products take exactly (the
    # density's mean eigenvalue, Hutchinson's estimate with two probes, would not).
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    _, batch = mlp_problem()
    batch = (batch[0][:, :2], batch[1] % 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, density_every=2, tol=1e-10)
    for _ in range(2):
        one_step(model, optimizer, cross_entropy, batch, monitor)
    first, second = monitor.checks
    assert first.density is None and first.conditioning is None
    hessian = dense_hessian(model, cross_entropy, batch)
    lambda_max = float(torch.linalg.eigvalsh(hessian)[-1])
    assert second.conditioning == pytest.approx(lambda_max / (float(hessian.trace()) / 6), rel=1e-8)
    assert second.conditioning != pytest.approx(second.lambda_max / second.density.moment(1), rel=1e-3)
    assert monitor.latest["hessdiag/conditioning"] == second.conditioning


# -- the detectors name the module ---------------------------------------------------------------


def record(step, sharpness, module="layer4.1.conv2", share=0.71):
    return CheckRecord(
        step=step, loss=1.0, grad_norm=1.0, lambda_max=sharpness, lambda_min=0.0, negative_curvature_certified=False,
        loss_change_along_bottom=None, sharpness=sharpness, stability_threshold=10.0, top_module=module,
        top_module_share=share,
    )  # fmt: skip


def test_edge_of_stability_evidence_names_the_module_and_the_remedy_says_what_to_do_with_it():
    detector = EdgeOfStabilityDetector(onset=1)
    (event,) = detector.observe(record(10, 11.0))
    assert "The sharpest direction lies 71% in `layer4.1.conv2`." in event.summary
    assert event.evidence["top_module_share"] == pytest.approx(0.71)
    for words in ("`layer4.1.conv2` a lower learning rate", "normalise", "warm up"):
        assert words in event.remedy
    plain = EdgeOfStabilityDetector(onset=1).update(10, 11.0, 10.0)[0]  # no module known: the general remedy
    assert plain.remedy == EdgeOfStabilityDetector.remedy and "top_module_share" not in plain.evidence


def test_an_explosion_names_the_module_of_the_latest_checks_top_direction():
    from hessdiag.detectors import StepRecord

    detector = ExplodingGradientDetector()
    assert detector.observe(record(5, 1.0, module="", share=0.9)) == []  # a check says nothing by itself
    (event,) = detector.observe(StepRecord(step=6, loss=float("nan"), grad_norm=1.0))
    assert "lies 90% in `(root)`" in event.summary and "Start with `(root)`" in event.remedy
    assert event.evidence["top_module_share"] == pytest.approx(0.9)
    restored = ExplodingGradientDetector()
    restored.load_state_dict(detector.state_dict())
    assert restored.top_module == ("", 0.9)
    old = {key: value for key, value in detector.state_dict().items() if key != "top_module"}
    restored.load_state_dict(old)
    assert restored.top_module is None


# -- what the dashboard and the summary show ------------------------------------------------------


def texts(logdir, tag):
    accumulator = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return [e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors(f"{tag}/text_summary")]


def test_tags_charts_and_summary_of_the_new_quantities(tmp_path, capsys):
    model, (x, _) = mlp_problem(n=64)
    batch = x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # a learnable target: a gradient above its noise
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = SummaryWriter(tmp_path)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, writer=writer, check_every=2, log_every=1, density_every=2)
    for _ in range(6):
        one_step(model, optimizer, cross_entropy, batch, monitor)
    monitor.flush()
    writer.close()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    new = {"gradient_curvature", "gradient_alignment", "lr_headroom", "lr_headroom_limit", "noise_scale", "noise_scale_se", "conditioning"}
    assert {f"hessdiag/{name}" for name in new} <= tags
    assert [e.step for e in accumulator.Scalars("hessdiag/lr_headroom")] == [2, 4, 6]
    verdict = texts(tmp_path, "hessdiag/noise_scale_verdict")[-1]
    assert verdict.startswith("noise scale ~") and "vs batch 64: " in verdict
    (summary,) = summarize(tmp_path)
    out = format_summary(summary)
    assert "top direction lies mostly in: `" in out
    top = monitor.last_check.top_shares[0][0]
    assert f"`{top}`" in out.split("top direction lies mostly in: ")[1].splitlines()[0]
    headroom = [c.lr_headroom for c in monitor.checks]
    assert f"end {headroom[-1]:.3g} (step 6)" in out and f"min {min(headroom):.3g}" in out
    assert f"{verdict} (step 6)" in out


@pytest.mark.parametrize(
    ("scale", "se", "batch", "meaning"),
    [
        (2134.0, 310.0, 512, "noise scale ~2,100 samples (+- 310) vs batch 512: a larger batch would cost little sample efficiency"),
        (40.0, 4.0, 512, "noise scale ~40 samples (+- 4) vs batch 512: a smaller batch would reach the same loss on fewer samples"),
        (600.0, 100.0, 512, "the batch is near the noise scale"),
    ],
)
def test_noise_scale_verdict(scale, se, batch, meaning):
    from hessdiag.noise.verdict import noise_scale_verdict

    assert meaning in noise_scale_verdict(scale, se, batch)


def test_an_unresolved_noise_scale_is_said_not_logged(tmp_path):
    model, batch = mlp_problem(n=32)  # random labels: ||G||^2 estimates below zero at this batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    writer = SummaryWriter(tmp_path)
    monitor = Monitor(model, cross_entropy, optimizer=optimizer, writer=writer, check_every=1, log_every=1)
    one_step(model, optimizer, cross_entropy, batch, monitor)
    writer.close()
    assert monitor.last_check.noise.grad_sq_norm < 0 and monitor.last_check.noise_scale is None
    assert "hessdiag/noise_scale" not in monitor.latest
    assert texts(tmp_path, "hessdiag/noise_scale_verdict")[-1].startswith("noise scale not resolved yet")


# -- zero observer effect ----------------------------------------------------------------------


def test_the_new_quantities_leave_an_adam_run_with_dropout_bit_for_bit_unchanged():
    def run(watch):
        model, batch = mlp_problem(n=24, dropout=0.3)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        monitor = None
        if watch:
            monitor = Monitor(model, cross_entropy, optimizer=optimizer, check_every=2, log_every=1, density_every=2)
        for _ in range(6):
            one_step(model, optimizer, cross_entropy, batch, monitor)
        if monitor is not None:
            assert len(monitor.checks) == 3 and all(c.noise is not None and c.top_shares for c in monitor.checks)
        return model.state_dict(), optimizer.state_dict()["state"], torch.get_rng_state(), [p.grad for p in model.parameters()]

    plain, watched = run(False), run(True)
    assert torch.equal(plain[2], watched[2])
    for name, value in plain[0].items():
        assert torch.equal(watched[0][name], value), name
    for index, state in plain[1].items():
        assert all(torch.equal(watched[1][index][k], v) for k, v in state.items())
    for a, b in zip(plain[3], watched[3]):
        assert torch.equal(a, b)
