"""The exploding-gradient detector on synthetic streams: quiet on healthy noise, catapults and
falling losses, fires on sustained growth with a rising loss and at once on non-finite values,
tolerates loss-scaler skips, and feeds from step records."""

import math

import pytest
from detector_streams import (
    SCALES,
    assert_named_after_its_flag_and_quiet,
    assert_state_round_trip_continues_identically,
    assert_verdicts_do_not_depend_on_the_loss_units,
    exploding_stream,
    healthy_stream,
    kinds,
    onsets,
    rising_loss_stream,
)

from hessdiag.detectors import CheckRecord, ExplodingGradientDetector, StepRecord

#: A curvature check: every detector of per-step statistics ignores it.
CHECK = CheckRecord(
    step=1, loss=1.0, grad_norm=1.0, lambda_max=2.0, lambda_min=-1.0, negative_curvature_certified=True,
    loss_change_along_bottom=-0.1, sharpness=2.0, stability_threshold=1.0,
)  # fmt: skip


def test_exploding_quiet_on_a_healthy_stream():
    detector = ExplodingGradientDetector()
    assert [e for t, loss, g in healthy_stream() for e in detector.update(t, loss, g)] == []


def test_exploding_ignores_growing_gradients_while_the_loss_falls():
    """Escaping a saddle from a tiny initialisation: the gradient grows 1000x, the loss drops."""
    detector = ExplodingGradientDetector()
    events = []
    for t in range(100):
        grad = 1e-4 * 1.1**t if t < 80 else 0.2
        events += detector.update(t, 20.0 * (0.97 ** max(0, t - 20)), grad)
    assert events == []


def test_exploding_fires_on_sustained_growth_not_on_one_spike_and_clears():
    detector = ExplodingGradientDetector()
    events = []
    for t in range(100):
        events += detector.update(t, 1.0, 1.0 + 0.01 * (t % 3))
    events += detector.update(100, 3.0, 50.0)  # one spike, loss and gradient together: noise
    events += detector.update(101, 1.0, 1.0)
    assert events == []
    for t in range(102, 115):  # a run diverging: loss and gradient grow together
        events += detector.update(t, 1.5 ** (t - 100), 10.0 * 2 ** (t - 100))
    fired = onsets(events)
    assert len(fired) == 1 and fired[0].step == 109  # the eighth consecutive spike
    assert fired[0].evidence["ratio"] > 10 and fired[0].severity == "warning"
    assert fired[0].evidence["median_grad_norm"] == pytest.approx(1.01)
    for t in range(115, 140):
        events += detector.update(t, 1.0, 1.0)
    assert kinds(events) == [("onset", 109), ("cleared", 134)]  # after 20 normal steps


def test_exploding_ignores_a_catapult_that_barely_lifts_a_deterministic_loss():
    """Full-batch GD at the edge of stability: a smooth descent 2.3 -> 0.17 (almost no spread), then the
    gradient jumps 15x for 12 steps while the loss rises 0.17 -> 0.18, 0.5% of the way it came down:
    significant against the spread, not material. The same lift after a flat stretch is an explosion."""
    def run(descent: bool) -> list:
        detector, events = ExplodingGradientDetector(), []
        for t in range(200):
            loss = 0.17 + 2.13 * math.exp(-t / 20) if descent else 0.17 + 1e-4 * (t % 2)
            events += detector.update(t, loss, 0.03)
        for t in range(200, 212):
            events += detector.update(t, 0.18, 0.45)
        return events
    assert run(descent=True) == []
    assert kinds(run(descent=False)) == [("onset", 207)]


def test_exploding_does_not_normalise_a_long_explosion():
    detector = ExplodingGradientDetector()
    events = []
    for t in range(60):
        events += detector.update(t, 1.0, 1.0)
    for t in range(60, 400):  # the loss jumps and stays high, the gradient stays 100x
        events += detector.update(t, 5.0, 100.0)
    assert kinds(events) == [("onset", 67)]
    assert detector.active and detector.evidence["median_grad_norm"] == 1.0


def test_exploding_fires_at_once_on_non_finite_values():
    detector = ExplodingGradientDetector()
    assert detector.update(0, 1.0, 1.0) == []
    (event,) = detector.update(1, float("nan"), 1.0)
    assert event.kind == "onset" and event.severity == "critical" and event.step == 1
    assert ExplodingGradientDetector().update(0, 1.0, float("inf"))[0].severity == "critical"
    (event,) = ExplodingGradientDetector().update(0, 1.0, 1.0, nonfinite_count=2)
    assert event.evidence["nonfinite_tensors"] == 2 and "2 gradient tensors" in event.summary


def test_exploding_tolerates_loss_scaler_skips_but_not_a_long_run_of_them():
    """fp16 AMP: overflowing steps are skipped by the scaler; a few are normal, 20 in a row are not."""
    detector = ExplodingGradientDetector()
    events = []
    for t in range(30):
        events += detector.update(t, 1.0, 1.0)
    inf = float("inf")
    for t in range(30, 49):  # 19 consecutive skips: the scale settling, however long
        events += detector.update(t, 1.0, inf, nonfinite_count=3, overflow_skip=True)
    events += detector.update(49, 1.0, 1.0)  # a step that went through resets the run
    assert events == [] and list(detector.norms)[-1] == 1.0 and inf not in detector.norms
    for t in range(50, 70):
        events += detector.update(t, 1.0, inf, nonfinite_count=3, overflow_skip=True)
    (event,) = events
    assert event.step == 69 and event.severity == "critical"
    assert event.evidence["consecutive_overflow_skips"] == 20 and "2^20" in event.summary
    restored = ExplodingGradientDetector()
    restored.load_state_dict(detector.state_dict())
    assert restored.overflow_skips == 20 and restored.active
    with pytest.raises(ValueError, match="`max_overflow_skips` must be an int >= 1"):
        ExplodingGradientDetector(max_overflow_skips=0)


def test_exploding_watches_each_layer_against_its_own_median():
    detector = ExplodingGradientDetector(onset=1)
    events = []
    for t in range(30):
        events += detector.update(t, 1.0, 1.0, layer_ratios={"a": 1e-3, "b": 1e-2})
    events += detector.update(30, 1.0, 1.0, layer_ratios={"a": 0.5, "b": 1e-2})  # loss flat: not yet
    assert events == []
    events += detector.update(31, 1.5, 1.0, layer_ratios={"a": 0.5, "b": 1e-2})
    assert len(onsets(events)) == 1 and "Layer a" in events[0].summary
    assert events[0].evidence["layer_ratio_multiple"] == pytest.approx(500)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"factor": 0}, r"`factor` must be a finite number > 0, got 0"),
     ({"layer_factor": float("inf")}, "`layer_factor` must be a finite number > 0"),
     ({"loss_spread": 0}, "`loss_spread` must be a finite number > 0, got 0"),
     ({"window": 1}, "`window` must be an int >= 2, got 1"),
     ({"min_history": 60}, r"`min_history` \(60\) must be at most `window` \(50\)"),
     ({"onset": 0}, "`onset` must be an int >= 1")],
)  # fmt: skip
def test_exploding_rejects_bad_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExplodingGradientDetector(**kwargs)


def test_observe_judges_steps_with_a_loss_as_update_does():
    by_record, by_update = ExplodingGradientDetector(), ExplodingGradientDetector()
    for t, inputs in enumerate(exploding_stream()):
        record = StepRecord(
            step=t, loss=inputs["loss"], grad_norm=inputs["grad_norm"], layer_ratios=tuple(inputs["layer_ratios"].items())
        )
        assert by_record.observe(record) == by_update.update(t, **inputs)
    assert by_record.state_dict() == by_update.state_dict()


def test_observe_skips_what_was_not_measured_and_other_records():
    detector = ExplodingGradientDetector()
    assert detector.observe(StepRecord(step=1, grad_norm=1e9)) == []  # no loss: not judged
    assert detector.observe(StepRecord(step=2, loss=1.0)) == []  # no gradients: only a non-finite loss is judged
    assert detector.observe(CHECK) == [] and detector.state_dict() == ExplodingGradientDetector().state_dict()
    (event,) = detector.observe(StepRecord(step=3, loss=math.nan))
    assert (event.step, event.severity) == (3, "critical")


UNIT_CASES = {
    "exploding": exploding_stream,
    "exploding-healthy": lambda: [{"loss": loss, "grad_norm": g} for _, loss, g in healthy_stream()],
    "exploding-rise-1-to-6": lambda: rising_loss_stream(1.0),
    "exploding-rise-100-to-105": lambda: rising_loss_stream(100.0),
}


def test_state_round_trip_continues_identically():
    assert_state_round_trip_continues_identically(ExplodingGradientDetector, exploding_stream, 55)


def test_named_after_its_flag_and_quiet_at_first():
    assert_named_after_its_flag_and_quiet(ExplodingGradientDetector(), "exploding")


@pytest.mark.parametrize(("scale", "shift"), SCALES)
@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_verdicts_do_not_depend_on_the_loss_units(case, scale, shift):
    """The same stream with the loss x 1e-6 .. x 1e6, + 20: the same events at the same steps."""
    assert_verdicts_do_not_depend_on_the_loss_units(
        ExplodingGradientDetector, UNIT_CASES[case], scale, shift, floored=False, healthy="healthy" in case
    )
