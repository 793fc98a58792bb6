"""The saddle detector on curvature checks: classifies points, needs certified negative curvature
at a near-critical point, keeps its summaries in line with its numbers, and feeds from check records."""

import pytest
import torch
from detector_streams import (
    SCALES,
    assert_named_after_its_flag_and_quiet,
    assert_state_round_trip_continues_identically,
    assert_verdicts_do_not_depend_on_the_loss_units,
    kinds,
    near_critical_stream,
    saddle_stream,
    saturated_stream,
    scaled,
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
     ({"loss_floor": "0"}, "`loss_floor` must be a finite number, got '0'"),
     ({"window": 3}, "`window` must be an int >= 4, got 3"),
     ({"progress_fraction": 0.0}, r"`progress_fraction` must be a finite number in \(0, 1.0\)"),
     ({"pace_fraction": float("nan")}, r"`pace_fraction` must be a finite number in \(0, 1.0\)")],
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


def test_step_records_feed_the_loss_history_and_raise_nothing():
    detector = SaddleDetector()
    assert detector.observe(StepRecord(step=1, loss=1.0, grad_norm=1e-9)) == []
    assert detector.observe(StepRecord(step=2, loss=None, grad_norm=1e-9)) == []
    assert detector.observe(StepRecord(step=3, loss=float("nan"), grad_norm=1e-9)) == []
    assert detector.state_dict()["losses"] == [[1, 1.0]] and not detector.active


# A check with the geometry of a saddle and a small gradient: certified negative curvature at 10% of
# the spectral norm, an escape step that lowers the loss, ||g||^2 / (2 lambda_max) far below 1% of the
# loss. The rule without a loss history (and the rule before the loss history) flags it.
SADDLE_GEOMETRY = {"grad_norm": 0.2, "lambda_max": 47.0, "lambda_min": -4.7, "negative_certified": True}


def run_stream(detector, losses, check_every, escape=-0.01):
    """Feed per-step `losses` as step records and a saddle-like check every `check_every` steps."""
    events = []
    for step, loss in enumerate(losses, start=1):
        events += detector.observe(StepRecord(step=step, loss=loss, grad_norm=0.2))
        if step % check_every == 0:
            inputs = SADDLE_GEOMETRY | {"loss": loss, "loss_change_along_bottom": escape}
            events += detector.observe(check_record(step, inputs))
    return events


def falling_curves(seed):
    """Losses that fall steadily, as in healthy runs: a warm-up then an exponential fall, a power law
    (slow, ever slower), a slow linear fall onto an irreducible floor (a diffusion loss), each with
    mini-batch noise of 0%, 2% or 10%."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(1, 601, dtype=torch.float64)
    shapes = {
        # the pace ramps up over a 20-step warm-up, then decays with the learning rate
        "warm-up then exponential": 3.7 - 0.004 * (torch.clamp(t, max=20) ** 2 / 40 + 300 * (1 - torch.exp(-torch.clamp(t - 20, min=0) / 300))),
        "power law": 3.7 * (t / 10) ** -0.15,
        "onto a floor": 0.9 + 0.1 * (1 - t / 1200),
    }
    curves = {}
    for name, shape in shapes.items():
        for noise in (0.0, 0.02, 0.1):
            noisy = shape * (1 + noise * torch.randn(600, generator=generator, dtype=torch.float64))
            curves[f"{name}, noise {noise}"] = noisy.tolist()
    return curves


@pytest.mark.parametrize("seed", range(5))
def test_never_fires_on_a_run_whose_loss_falls_at_its_recent_pace(seed):
    without_history = SaddleDetector()
    assert without_history.update(0, loss=3.7, loss_change_along_bottom=-0.01, **SADDLE_GEOMETRY)  # the old alarm
    for name, losses in falling_curves(seed).items():
        for check_every in (25, 100):
            detector = SaddleDetector()
            assert run_stream(detector, losses, check_every) == [], name
            assert detector.classification == "progressing", name


def test_fires_on_a_run_slowed_at_a_saddle():
    flat = [2.3 + 1e-7 * (step % 3) for step in range(200)]  # stuck from the start (a tiny initialisation)
    detector = SaddleDetector()
    (onset,) = run_stream(detector, flat, 25)
    assert onset.step == 25 and onset.kind == "onset" and abs(onset.evidence["loss_drop_over_window"]) < 1e-6
    assert "lowered the loss by 0.01" in onset.remedy and "Slowed near a point" in onset.summary
    # Falls for 300 steps, then stalls: the recent pace is a small fraction of the one before.
    stalls = [2.0 - 0.002 * min(step, 300) for step in range(1, 501)]
    events = run_stream(SaddleDetector(), stalls, 50)
    assert [(event.kind, event.step) for event in events] == [("onset", 350)]
    assert events[0].evidence["pace_ratio"] < 0.25


def test_no_escape_no_saddle_and_words_that_match_the_evidence():
    """The LoRA case: certified negative curvature, but a step along the bottom eigenvector raises the loss."""
    flat = [0.7] * 100
    detector = SaddleDetector()
    assert run_stream(detector, flat, 25, escape=0.003) == []
    assert detector.classification == "no escape" and not detector.active
    assert "raises the loss by 0.003" in detector.summary and "lowers" not in detector.summary
    unmeasured = SaddleDetector()
    (onset,) = run_stream(unmeasured, flat, 25, escape=None)
    assert "lower" not in onset.remedy and "lower" not in onset.summary  # never claims what was not measured


UNIT_CASES = {
    "saddle": saddle_stream,
    "saddle-near-critical": near_critical_stream,
    "saddle-saturated": saturated_stream,
}


def test_state_round_trip_continues_identically():
    assert_state_round_trip_continues_identically(SaddleDetector, saddle_stream, 1)


def test_named_after_its_flag_and_quiet_at_first():
    assert_named_after_its_flag_and_quiet(SaddleDetector(), "saddle")


@pytest.mark.parametrize(("scale", "shift"), SCALES)
@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_verdicts_do_not_depend_on_the_loss_units(case, scale, shift):
    """The same stream with the loss x 1e-6 .. x 1e6, + 20: the same events at the same steps."""
    assert_verdicts_do_not_depend_on_the_loss_units(
        SaddleDetector, UNIT_CASES[case], scale, shift, floored=True, healthy="healthy" in case
    )


@pytest.mark.parametrize(("scale", "shift"), SCALES)
def test_flatness_is_judged_against_the_loss_left(scale, shift):
    """A saturated network's checks get the same classification whatever the loss's units: flat
    points stay "degenerate" at x 1e6, tiny-but-real saddles stay "saddle" at x 1e-6."""

    def classify(detector, stream):
        return [(detector.update(t, **inputs), detector.classification)[1] for t, inputs in enumerate(stream)]

    expected = classify(SaddleDetector(), saturated_stream())
    assert expected == ["degenerate"] * 2 + ["saddle"] * 2 + ["degenerate"] * 3
    got = classify(SaddleDetector(loss_floor=shift), [scaled(x, scale, shift) for x in saturated_stream()])
    assert got == expected


def test_a_loss_too_noisy_to_measure_is_not_called_stalled_nor_progressing():
    """Mini-batch noise around a flat loss: no flag, and the summary says the pace could not be
    measured rather than that the run progresses (its loss may well have risen over the window)."""
    generator = torch.Generator().manual_seed(3)
    noisy_flat = (4.6 * (1 + 0.05 * torch.randn(100, generator=generator, dtype=torch.float64))).tolist()
    detector = SaddleDetector()
    assert run_stream(detector, noisy_flat, 25) == []
    assert detector.summary.startswith("Not called stalled: the loss is too noisy") and "window" in detector.summary
    steady = [2.0 - 0.002 * step for step in range(1, 101)]
    run_stream(detector := SaddleDetector(), steady, 25)
    assert detector.summary.startswith("The run is making progress: the loss fell")
