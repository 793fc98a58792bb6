"""The edge-of-stability detector on sharpness / threshold ratios: hysteresis on count and value,
severity beyond the edge, quiet below it, and feeds from check records."""

import dataclasses

import numpy as np
import pytest
from detector_streams import (
    SCALES,
    assert_named_after_its_flag_and_quiet,
    assert_state_round_trip_continues_identically,
    assert_verdicts_do_not_depend_on_the_loss_units,
    edge_stream,
    kinds,
)

from hessdiag.detectors import CheckRecord, EdgeOfStabilityDetector, StepRecord

#: A curvature check: every detector of per-step statistics ignores it.
CHECK = CheckRecord(
    step=1, loss=1.0, grad_norm=1.0, lambda_max=2.0, lambda_min=-1.0, negative_curvature_certified=True,
    loss_change_along_bottom=-0.1, sharpness=2.0, stability_threshold=1.0,
)  # fmt: skip


def test_edge_of_stability_onset_hysteresis_and_severity():
    detector = EdgeOfStabilityDetector()
    events = []
    for t, sharpness in enumerate([1.0, 1.5, 1.85, 1.9, 2.05, 1.95, 1.7, 1.75, 1.5, 1.4]):
        events += detector.update(t, sharpness, threshold=2.0)
    # 1.7 and 1.75 (ratio 0.85, 0.875) stay above clear_ratio 0.8: the flag holds.
    assert kinds(events) == [("onset", 3), ("cleared", 9)]
    assert events[0].severity == "info" and events[0].evidence["ratio"] == pytest.approx(0.95)
    beyond = EdgeOfStabilityDetector()
    assert [e.severity for t in range(2) for e in beyond.update(t, 2.2, 2.0)] == ["warning"]


def test_edge_of_stability_quiet_below_the_edge_and_on_one_blip():
    detector = EdgeOfStabilityDetector()
    ratios = 0.6 + 0.1 * np.random.default_rng(0).uniform(-1, 1, 200)
    ratios[100] = 1.2  # one noisy estimate
    assert [e for t, r in enumerate(ratios) for e in detector.update(t, 10.0 * r, 10.0)] == []
    assert detector.update(201, float("nan"), 10.0) == [] and detector.update(202, 5.0, 0.0) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"ratio": 0}, "`ratio` must be a finite number > 0, got 0"),
     ({"clear_ratio": 0.95}, r"`clear_ratio` \(0.95\) must be at most `ratio` \(0.9\)")],
)  # fmt: skip
def test_edge_of_stability_rejects_bad_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EdgeOfStabilityDetector(**kwargs)


def test_observe_judges_checks_with_a_threshold_as_update_does():
    by_record, by_update = EdgeOfStabilityDetector(), EdgeOfStabilityDetector()
    for t, inputs in enumerate(edge_stream()):
        record = CheckRecord(
            step=t, loss=1.0, grad_norm=1.0, lambda_max=inputs["sharpness"], lambda_min=0.0,
            negative_curvature_certified=False, loss_change_along_bottom=None, sharpness=inputs["sharpness"],
            stability_threshold=inputs["threshold"],
        )  # fmt: skip
        assert by_record.observe(record) == by_update.update(t, **inputs)
    assert by_record.state_dict() == by_update.state_dict()


def test_observe_skips_checks_without_a_threshold_and_step_records():
    detector = EdgeOfStabilityDetector()
    without_threshold = dataclasses.replace(CHECK, sharpness=100.0, stability_threshold=None)
    assert detector.observe(without_threshold) == [] and detector.observe(StepRecord(step=1, loss=1.0)) == []
    assert detector.state_dict() == EdgeOfStabilityDetector().state_dict()


UNIT_CASES = {"edge_of_stability": edge_stream}


def test_state_round_trip_continues_identically():
    assert_state_round_trip_continues_identically(EdgeOfStabilityDetector, edge_stream, 2)


def test_named_after_its_flag_and_quiet_at_first():
    assert_named_after_its_flag_and_quiet(EdgeOfStabilityDetector(), "edge_of_stability")


@pytest.mark.parametrize(("scale", "shift"), SCALES)
@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_verdicts_do_not_depend_on_the_loss_units(case, scale, shift):
    """The same stream with the loss x 1e-6 .. x 1e6, + 20: the same events at the same steps."""
    assert_verdicts_do_not_depend_on_the_loss_units(
        EdgeOfStabilityDetector, UNIT_CASES[case], scale, shift, floored=False, healthy="healthy" in case
    )
