"""The saddle detector on curvature checks: classifies points, needs certified negative curvature
at a near-critical point, keeps its summaries in line with its numbers, and feeds from check records."""

import pytest
from detector_streams import (
    assert_named_after_its_flag_and_quiet,
    assert_state_round_trip_continues_identically,
    assert_verdicts_do_not_depend_on_the_loss_units,
    kinds,
    near_critical_stream,
    saddle_stream,
)

from hessdiag.detectors import CheckRecord, SaddleDetector, StepRecord


def test_saddle_classifies_points():
    detector = SaddleDetector()
    # ||g||^2 / (2 lambda_max) = 0.25 of a loss of 1.0: a gradient step still does a lot.
    assert detector.update(0, 1.0, 2.0, -1.0, True, 1.0) == []
    assert detector.classification == "not critical"
    (event,) = detector.update(1, 1e-2, 2.0, -1.0, True, 1.0, loss_change_along_bottom=-0.01)
    assert detector.classification == "saddle" and event.kind == "onset" and event.step == 1
    assert event.evidence["loss_change_along_bottom"] == -0.01 and event.evidence["curvature_ratio"] == -0.5
    detector.update(2, 1e-2, 2.0, -0.01, True, 1.0)
    assert detector.classification == "minimum-like"  # -0.5% of the spectral norm is not significant
    assert detector.update(3, 1e-7, 1e-8, -1e-8, True, 1.0)[0].kind == "cleared"
    assert detector.classification == "degenerate"


def test_saddle_flat_points_are_degenerate_not_saddles():
    detector = SaddleDetector()
    for t in range(5):  # certified but tiny negative curvature, as on a dead (all-flat) network
        assert detector.update(t, 1e-5, 1e-7, -5e-7, True, 2.3) == []
    assert detector.classification == "degenerate" and not detector.active


def test_saddle_near_critical_is_relative_to_the_loss_left():
    detector = SaddleDetector(loss_floor=0.5)
    detector.update(0, 0.05, 1.0, -0.5, True, 0.6)  # gain 1.25e-3 > 1% of 0.1
    assert detector.classification == "not critical"
    detector.update(1, 0.01, 1.0, -0.5, True, 0.6)  # gain 5e-5 <= 1e-3
    assert detector.classification == "saddle"


def test_saddle_needs_certified_negative_curvature():
    detector = SaddleDetector()
    assert detector.update(0, 1e-4, 2.0, -1.0, False, 1.0) == []
    assert detector.classification == "minimum-like"


def test_saddle_one_other_check_does_not_clear_it():
    detector = SaddleDetector()
    events = []
    for t, lambda_min in enumerate([-1.0, -1.0, -0.001, -1.0, -0.001, -0.001, -0.001]):
        events += detector.update(t, 1e-3, 2.0, lambda_min, True, 1.0)
    assert kinds(events) == [("onset", 0), ("cleared", 5)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tau": 0}, r"`tau` must be a finite number in \(0, 1.0\), got 0"),
     ({"critical_fraction": 1.5}, r"`critical_fraction` must be a finite number in \(0, 1.0\)"),
     ({"flat_tol": -1.0}, "`flat_tol` must be a finite number > 0"),
     ({"loss_floor": "0"}, "`loss_floor` must be a finite number, got '0'")],
)  # fmt: skip
def test_saddle_rejects_bad_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SaddleDetector(**kwargs)


@pytest.mark.parametrize(
    ("lambda_min", "certified", "words"),
    [
        (-1.0, True, "|lambda_min| is 100% of the spectral norm"),
        (-0.005, True, "the negative curvature is small: |lambda_min| is 0.5% of the spectral norm"),
        (-1e-7, False, "negative curvature is not certified beyond rounding"),
        (0.2, False, "no negative curvature found"),
    ],
)
def test_saddle_summaries_never_contradict_their_numbers(lambda_min, certified, words):
    detector = SaddleDetector()
    detector.update(0, grad_norm=1e-6, lambda_max=1.0, lambda_min=lambda_min, negative_certified=certified, loss=1.0)
    assert words in detector.summary and "-100" not in detector.summary and "minimum-like" not in detector.summary


def check_record(step, inputs):
    return CheckRecord(
        step=step, loss=inputs["loss"], grad_norm=inputs["grad_norm"], lambda_max=inputs["lambda_max"],
        lambda_min=inputs["lambda_min"], negative_curvature_certified=inputs["negative_certified"],
        loss_change_along_bottom=inputs.get("loss_change_along_bottom"), sharpness=inputs["lambda_max"],
        stability_threshold=None,
    )  # fmt: skip


def test_observe_judges_checks_as_update_does():
    by_record, by_update = SaddleDetector(), SaddleDetector()
    for t, inputs in enumerate(near_critical_stream() + saddle_stream()):
        assert by_record.observe(check_record(t, inputs)) == by_update.update(t, **inputs)
    assert by_record.state_dict() == by_update.state_dict()


def test_observe_skips_step_records():
    detector = SaddleDetector()
    assert detector.observe(StepRecord(step=1, loss=1.0, grad_norm=1e-9)) == []
    assert detector.state_dict() == SaddleDetector().state_dict()


UNIT_CASES = {
    "saddle": saddle_stream,
    "saddle-near-critical": near_critical_stream,
}


def test_state_round_trip_continues_identically():
    assert_state_round_trip_continues_identically(SaddleDetector, saddle_stream, 1)


def test_named_after_its_flag_and_quiet_at_first():
    assert_named_after_its_flag_and_quiet(SaddleDetector(), "saddle")


@pytest.mark.parametrize(("scale", "shift"), [(1e-3, 0.0), (1e3, 0.0), (1.0, 20.0), (1e-3, 20.0)])
@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_verdicts_do_not_depend_on_the_loss_units(case, scale, shift):
    """The same stream with the loss x 1e-3, x 1e3, + 20: the same events at the same steps."""
    assert_verdicts_do_not_depend_on_the_loss_units(
        SaddleDetector, UNIT_CASES[case], scale, shift, floored=True, healthy="healthy" in case
    )
