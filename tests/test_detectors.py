"""Each detector on synthetic metric streams: fires on its pathology within a bounded number of steps,
stays quiet on healthy noisy streams and short blips, clears when the condition goes away, rejects bad
thresholds, and continues identically after a state_dict round trip."""

import json
import math

import numpy as np
import pytest

from hessdiag.detectors import (
    EdgeOfStabilityDetector,
    ExplodingGradientDetector,
    PlateauDetector,
    SaddleDetector,
    VanishingGradientDetector,
)
from hessdiag.flags import FLAG_NAMES, FlagEvent, Hysteresis


def healthy_stream(steps=2000, seed=0):
    """(step, loss, grad_norm): a decaying loss and gradient norm with 20% multiplicative noise."""
    noise = 1 + 0.2 * np.random.default_rng(seed).uniform(-1, 1, steps)
    for t in range(steps):
        yield t, 2.3 * math.exp(-t / 500) * noise[t] + 0.02, (math.exp(-t / 800) + 0.05) * noise[t]


def onsets(events):
    return [e for e in events if e.kind == "onset"]


def kinds(events):
    return [(e.kind, e.step) for e in events]


# -- flags --------------------------------------------------------------------------------------
def test_hysteresis_needs_consecutive_triggers_and_clears_after_quiet():
    h = Hysteresis(onset=3, clear=2)
    assert [h.update(x) for x in (True, True, False, True, True, True)] == [None, None, None, None, None, "onset"]
    assert h.active
    assert [h.update(x) for x in (False, True, False, False)] == [None, None, None, "cleared"]
    assert not h.active
    assert h.update(True, immediate=True) == "onset"


def test_hysteresis_state_round_trip_and_defaults():
    h = Hysteresis(onset=3, clear=2)
    for x in (True, True, True, False):
        h.update(x)
    restored = Hysteresis(onset=3, clear=2)
    restored.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert restored.active and restored.update(False) == h.update(False) == "cleared"
    restored.load_state_dict({})
    assert not restored.active and restored.state_dict() == Hysteresis(onset=3, clear=2).state_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"onset": 0, "clear": 1}, "`onset` must be an int >= 1, got 0"),
     ({"onset": 1, "clear": 1.5}, "`clear` must be an int >= 1, got 1.5"),
     ({"onset": True, "clear": 1}, "`onset` must be an int >= 1, got True")],
)  # fmt: skip
def test_hysteresis_rejects_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hysteresis(**kwargs)


def test_flag_event_is_primitive_data():
    event = FlagEvent("saddle", 7, "onset", "warning", {"lambda_min": np.float64(-0.5)}, "remedy", "summary")
    as_dict = event.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert type(as_dict["evidence"]["lambda_min"]) is float
    assert FlagEvent(**as_dict) == event
    with pytest.raises(ValueError, match="`name` must be one of"):
        FlagEvent("slow", 0, "onset", "info")
    with pytest.raises(ValueError, match="`severity` must be one of"):
        FlagEvent("saddle", 0, "onset", "fatal")


# -- exploding ----------------------------------------------------------------------------------
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


# -- vanishing ----------------------------------------------------------------------------------
def layers(ratios):
    """Per-layer gradient and weight norms, shallow to deep, with the given gradient/weight ratios."""
    names = [f"layer{i}" for i in range(len(ratios))]
    weights = [2.0 + i for i in range(len(ratios))]
    return [(n, r * w) for n, r, w in zip(names, ratios, weights)], list(zip(names, weights))


STARVING = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-2, 1e-2]


def test_vanishing_fires_when_shallow_layers_starve_and_clears():
    detector = VanishingGradientDetector()
    events = []
    for t in range(10):
        events += detector.update(t, *layers(STARVING))
    (fired,) = events
    assert fired.step == 4  # the fifth consecutive update
    assert fired.evidence["shallow_ratio"] == pytest.approx((1e-7 + 1e-6) / 2)  # median of the first quarter
    assert fired.evidence["depth_ratio"] < 1e-3 and fired.evidence["deep_ratio"] == pytest.approx(1e-2)
    for t in range(10, 20):  # e.g. normalisation layers added: the profile recovers
        events += detector.update(t, *layers([1e-3] * 8))
    assert kinds(events) == [("onset", 4), ("cleared", 14)]


def test_vanishing_fires_when_gradients_are_negligible_everywhere():
    """Adapted when the rule became relative to the run's own peak (it was an absolute 1e-8, which
    depends on the loss's units): the ratios collapse to 1e-9 of what they were."""
    detector = VanishingGradientDetector()
    events = [e for t in range(5) for e in detector.update(t, *layers([1e-2] * 4))]
    events += [e for t in range(5, 10) for e in detector.update(t, *layers([1e-11] * 4))]
    assert kinds(events) == [("onset", 9)] and "negligible" in events[0].summary
    assert events[0].evidence["global_ratio"] == pytest.approx(1e-11)
    assert events[0].evidence["peak_global_ratio"] == pytest.approx(1e-2)


def test_vanishing_names_dead_layers_with_their_own_remedy():
    """A layer whose gradient is exactly 0 (dead ReLUs) is not a fading gradient: "use ReLU" would be wrong."""
    detector = VanishingGradientDetector()
    grads, weights = layers([1e-3] * 4)
    grads[1] = ("layer1", 0.0)
    events = [e for t in range(5) for e in detector.update(t, grads, weights)]
    (event,) = events
    assert event.step == 4 and event.evidence["dead_layers"] == 1
    assert "(layer1)" in event.summary and "dead" in event.summary
    assert "LeakyReLU/GELU" in event.remedy and "ReLU/GELU)" not in event.remedy
    healthy = VanishingGradientDetector(onset=1)
    assert healthy.update(0, *layers(STARVING))[0].remedy == VanishingGradientDetector.remedy


def test_vanishing_quiet_on_healthy_depth_profile_and_short_blips():
    detector = VanishingGradientDetector()
    rng = np.random.default_rng(0)
    events = []
    for t in range(2000):
        ratios = [1e-3 * (1 + 0.2 * rng.uniform(-1, 1)) * 0.5 ** (i / 2) for i in range(8)]
        if t % 50 < 4:  # a blip of four updates, one short of the onset
            ratios[0] = ratios[1] = 1e-9
        events += detector.update(t, *layers(ratios))
    assert events == []


def test_vanishing_leaves_out_layers_with_zero_weights():
    """A zero-initialised output layer has no ratio; it must not make the others look vanishing."""
    grads, weights = layers([1e-3, 1e-3, 1e-3])
    grads.append(("head", 0.5))
    weights.append(("head", 0.0))
    detector = VanishingGradientDetector(onset=1)
    assert detector.update(0, grads, weights) == []
    assert detector.evidence["depth_ratio"] == pytest.approx(1.0)


def test_vanishing_needs_two_layers_for_the_depth_rule():
    detector = VanishingGradientDetector(onset=1)
    assert detector.update(0, [("only", 1e-6)], [("only", 1.0)]) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"depth_ratio": 2.0}, r"`depth_ratio` must be a finite number in \(0, 1.0\), got 2.0"),
     ({"min_ratio": -1e-7}, r"`min_ratio` must be a finite number in \(0, 1.0\)"),
     ({"clear": 0}, "`clear` must be an int >= 1, got 0")],
)  # fmt: skip
def test_vanishing_rejects_bad_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VanishingGradientDetector(**kwargs)


# -- plateau ------------------------------------------------------------------------------------
def stuck(start, stop, level=0.9, grad=1e-3, seed=2):
    """A loss stuck at `level` with 20% noise and a collapsed gradient."""
    noise = 1 + 0.2 * np.random.default_rng(seed).uniform(-1, 1, stop - start)
    return [(t, level * noise[t - start], grad * noise[t - start]) for t in range(start, stop)]


def test_plateau_quiet_on_a_healthy_stream_and_at_the_floor():
    detector = PlateauDetector()
    assert [e for t, loss, g in healthy_stream(3000) for e in detector.update(t, loss, g)] == []
    # Converged: the loss came down to 0.4% of where it started above the floor, the gradient
    # collapsed, nothing moves. (Adapted: the floor margin was an absolute 0.05 in loss units; it is
    # now a fraction of the run's own largest loss above the floor.)
    floor = PlateauDetector()
    converged = list(healthy_stream(300)) + stuck(300, 1300, level=0.01, grad=1e-5)
    assert [e for t, loss, g in converged for e in floor.update(t, loss, g)] == []
    assert floor.evidence["loss_left"] < 0.02 and floor.evidence["relative_improvement"] < 0.01


def test_plateau_quiet_on_slow_steady_progress_and_a_short_pause():
    detector = PlateauDetector()
    events = []
    for t in range(3000):  # 1/t-like decay: slow, but still moving more than 1% per window
        events += detector.update(t, 2.0 / (1 + t / 300), 0.01 / (1 + t / 300))
    for t in range(3000, 3100):  # a pause shorter than the window, then progress again
        events += detector.update(t, 0.18, 1e-4)
    for t in range(3100, 3600):
        events += detector.update(t, 0.18 * math.exp(-(t - 3100) / 200), 1e-3)
    assert events == []


def test_plateau_fires_on_a_stalled_run_above_its_floor_and_clears():
    detector = PlateauDetector()
    events = []
    for t, loss, g in list(healthy_stream(300)) + stuck(300, 1000):
        events += detector.update(t, loss, g)
    (fired,) = onsets(events)
    # At least a window of stalled losses and the onset; at 20% noise the stall shows within
    # two windows plus the onset (measured over 20 seeds: 248-468 steps).
    assert 300 + 200 + 49 <= fired.step <= 300 + 2 * 200 + 50
    assert fired.evidence["relative_improvement"] < 0.01 and fired.evidence["grad_norm"] < 0.1 * fired.evidence["peak_grad_norm"]
    assert fired.evidence["loss"] == pytest.approx(0.9, rel=0.05)
    for t in range(1000, 1300):  # the lr schedule kicks in: steady progress again
        events += detector.update(t, 0.9 * math.exp(-(t - 1000) / 100), 0.5)
    assert events[-1].kind == "cleared" and events[-1].step < 1100


@pytest.mark.parametrize("known", ["lambda_max", "grad_tol"])
def test_plateau_fires_on_a_run_stuck_from_the_start(known):
    """A deep sigmoid network at chance: the gradient is tiny and flat from the first step. It has no
    larger past to compare with: a curvature check's lambda_max says a gradient step could remove
    only g^2 / (2 lambda_max) = 1.25e-7 of the 2.3 left, or an absolute `grad_tol` says it is small.
    (Adapted: `grad_tol`, in gradient units, was on by default at 1e-3, which made the verdict depend
    on the loss's scale; now without either the run is not judged stuck.)"""
    assert [e for t, loss, g in stuck(0, 600, level=2.302, grad=5e-4) for e in PlateauDetector().update(t, loss, g)] == []
    detector = PlateauDetector(grad_tol=1e-3) if known == "grad_tol" else PlateauDetector()
    curvature = {"lambda_max": 1.0} if known == "lambda_max" else {}
    events = [e for t, loss, g in stuck(0, 600, level=2.302, grad=5e-4) for e in detector.update(t, loss, g, **curvature)]
    (fired,) = events
    assert fired.kind == "onset" and 199 + 49 <= fired.step <= 2 * 200 + 50
    assert fired.evidence["grad_norm"] == pytest.approx(5e-4, rel=0.2)  # small in absolute terms only


def test_plateau_respects_a_known_loss_floor():
    detector = PlateauDetector(loss_floor=0.88)
    assert [e for t, loss, g in stuck(0, 600, level=0.9) for e in detector.update(t, loss, g)] == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"window": 4}, "`window` must be an int >= 8, got 4"),
     ({"rel_improvement": 1.0}, r"`rel_improvement` must be a finite number in \(0, 1.0\)"),
     ({"grad_fraction": 0}, r"`grad_fraction` must be a finite number in \(0, 1.0\)"),
     ({"grad_tol": -1.0}, "`grad_tol` must be a finite number > 0"),
     ({"loss_floor": float("nan")}, "`loss_floor` must be a finite number, got nan"),
     ({"floor_margin": 0}, r"`floor_margin` must be a finite number in \(0, 1.0\)"),
     ({"grad_tol": 0}, "`grad_tol` must be a finite number > 0"),
     ({"critical_fraction": 0}, r"`critical_fraction` must be a finite number in \(0, 1.0\)")],
)  # fmt: skip
def test_plateau_rejects_bad_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlateauDetector(**kwargs)


# -- saddle -------------------------------------------------------------------------------------
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


# -- edge of stability --------------------------------------------------------------------------
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


# -- all detectors ------------------------------------------------------------------------------
def exploding_stream():
    normal = [{"loss": 1.0, "grad_norm": 1.0 + 0.1 * (t % 5), "layer_ratios": {"a": 1e-3}} for t in range(60)]
    diverging = [{"loss": 2.0, "grad_norm": 100.0, "layer_ratios": {"a": 1.0}} for _ in range(15)]
    return normal + diverging + normal[:30]


def vanishing_stream():
    starving, healthy = layers(STARVING), layers([1e-3] * 8)
    return [dict(zip(("layer_grad_norms", "layer_weight_norms"), s)) for s in [starving] * 10 + [healthy] * 10]


def plateau_stream():
    steps = list(healthy_stream(300)) + stuck(300, 700) + [(t, 0.9 * math.exp(-(t - 700) / 100), 0.5) for t in range(700, 800)]
    return [{"loss": loss, "grad_norm": g} for _, loss, g in steps]


def saddle_stream():
    saddle, minimum = (1e-3, 2.0, -1.0, True, 1.0), (1e-3, 2.0, 0.0, False, 1.0)
    checks = [minimum, saddle, saddle, minimum, saddle, minimum, minimum, minimum]
    keys = ("grad_norm", "lambda_max", "lambda_min", "negative_certified", "loss")
    return [dict(zip(keys, check)) for check in checks]


def edge_stream():
    return [{"sharpness": s, "threshold": 2.0} for s in (1.0, 1.9, 1.95, 2.1, 1.7, 1.5, 1.5, 1.9, 1.9, 1.0)]


@pytest.mark.parametrize(
    ("make", "stream", "split"),
    [(ExplodingGradientDetector, exploding_stream, 55), (VanishingGradientDetector, vanishing_stream, 2),
     (PlateauDetector, plateau_stream, 250), (SaddleDetector, saddle_stream, 1),
     (EdgeOfStabilityDetector, edge_stream, 2)],
)  # fmt: skip
def test_state_round_trip_continues_identically(make, stream, split):
    inputs = stream()
    first, second = make(), make()
    for t, kwargs in enumerate(inputs[:split]):
        first.update(t, **kwargs)
    state = json.loads(json.dumps(first.state_dict()))  # primitives and lists of floats only
    second.load_state_dict(state)
    rest = list(enumerate(inputs))[split:]
    events = [first.update(t, **kwargs) for t, kwargs in rest]
    assert events == [second.update(t, **kwargs) for t, kwargs in rest]
    assert {e.kind for step in events for e in step} == {"onset", "cleared"}  # the split is mid-story
    assert first.state_dict() == second.state_dict()
    fresh = make()
    fresh.load_state_dict({})  # an older checkpoint without this detector's keys
    assert fresh.state_dict() == make().state_dict()


@pytest.mark.parametrize(
    "detector",
    [ExplodingGradientDetector(), VanishingGradientDetector(), PlateauDetector(), SaddleDetector(), EdgeOfStabilityDetector()],
)
def test_detectors_are_named_after_their_flag_and_start_quiet(detector):
    assert detector.name in FLAG_NAMES and not detector.active and detector.evidence == {}
    assert detector.remedy and "\n" not in detector.remedy


# -- units: the verdicts do not depend on the loss's scale or offset --------------------------------
def scaled(name, inputs, scale, shift):
    """The inputs a detector sees when the loss is `scale` x loss + `shift` (the same run: gradients and
    curvature scale with the loss; for the edge of stability the learning rate is divided by `scale`
    so that the run is the same, and the threshold in units of 1/lr scales with it)."""
    out = dict(inputs)
    for key in ("grad_norm", "lambda_max", "lambda_min", "sharpness", "threshold", "loss_change_along_bottom"):
        if out.get(key) is not None:
            out[key] = scale * out[key]
    if "loss" in out:
        out["loss"] = scale * out["loss"] + shift
    if "layer_ratios" in out:
        out["layer_ratios"] = {layer: scale * r for layer, r in out["layer_ratios"].items()}
    if "layer_grad_norms" in out:
        out["layer_grad_norms"] = [(layer, scale * g) for layer, g in out["layer_grad_norms"]]
    return out


def rising_loss_stream(start):
    """The issue's case: a steady loss at `start`, then a 100x gradient blow-up while it rises by 5."""
    noise = 1 + 0.05 * np.random.default_rng(3).uniform(-1, 1, 80)
    steady = [{"loss": start + 0.01 * noise[t], "grad_norm": noise[t]} for t in range(60)]
    return steady + [{"loss": start + 5.0, "grad_norm": 100.0} for _ in range(20)]


def stuck_from_start_stream():
    """Stuck from the first step; a curvature check at step 100 measures lambda_max."""
    steps = stuck(0, 600, level=2.3, grad=5e-4)
    return [{"loss": loss, "grad_norm": g} | ({"lambda_max": 1.0} if t == 100 else {}) for t, loss, g in steps]


def near_critical_stream():
    """Checks whose gradient is small only relative to the loss left, and one that is small absolutely."""
    keys = ("grad_norm", "lambda_max", "lambda_min", "negative_certified", "loss", "loss_change_along_bottom")
    checks = [(0.05, 1.0, -0.5, True, 0.6, -0.01), (0.01, 1.0, -0.5, True, 0.6, -0.01), (2e-4, 1.0, -0.5, True, 1e-6, -1e-9),
              (0.01, 1.0, -0.5, True, 0.6, -0.01), (0.3, 1.0, -0.5, True, 0.6, None), (0.3, 1.0, -0.5, True, 0.6, None)]
    return [dict(zip(keys, check)) for check in checks]


def dead_layer_stream():
    grads, weights = layers([1e-3] * 6)
    dead = [("layer0", 0.0)] + grads[1:]
    return [{"layer_grad_norms": g, "layer_weight_norms": weights} for g in [grads] * 3 + [dead] * 8 + [grads] * 6]


def negligible_stream():
    return [dict(zip(("layer_grad_norms", "layer_weight_norms"), layers([r] * 4))) for r in [1e-2] * 5 + [1e-11] * 8]


UNIT_CASES = {
    "exploding": (ExplodingGradientDetector, exploding_stream),
    "exploding-healthy": (ExplodingGradientDetector, lambda: [{"loss": loss, "grad_norm": g} for _, loss, g in healthy_stream()]),
    "exploding-rise-1-to-6": (ExplodingGradientDetector, lambda: rising_loss_stream(1.0)),
    "exploding-rise-100-to-105": (ExplodingGradientDetector, lambda: rising_loss_stream(100.0)),
    "vanishing": (VanishingGradientDetector, vanishing_stream),
    "vanishing-dead": (VanishingGradientDetector, dead_layer_stream),
    "vanishing-negligible": (VanishingGradientDetector, negligible_stream),
    "plateau": (PlateauDetector, plateau_stream),
    "plateau-stuck-from-start": (PlateauDetector, stuck_from_start_stream),
    "plateau-healthy": (PlateauDetector, lambda: [{"loss": loss, "grad_norm": g} for _, loss, g in healthy_stream(3000)]),
    "saddle": (SaddleDetector, saddle_stream),
    "saddle-near-critical": (SaddleDetector, near_critical_stream),
    "edge_of_stability": (EdgeOfStabilityDetector, edge_stream),
}
FLOORED = (PlateauDetector, SaddleDetector)  # their `loss_floor` moves with the shift


@pytest.mark.parametrize(("scale", "shift"), [(1e-3, 0.0), (1e3, 0.0), (1.0, 20.0), (1e-3, 20.0)])
@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_verdicts_do_not_depend_on_the_loss_units(case, scale, shift):
    """The same stream with the loss x 1e-3, x 1e3, + 20: the same events at the same steps."""
    make, stream = UNIT_CASES[case]
    reference, other = make(), make(loss_floor=shift) if make in FLOORED else make()
    expected = [(e.step, e.kind, e.severity) for t, x in enumerate(stream()) for e in reference.update(t, **x)]
    got = [(e.step, e.kind, e.severity) for t, x in enumerate(stream()) for e in other.update(t, **scaled(case, x, scale, shift))]
    assert got == expected
    if "healthy" not in case:
        assert any(kind == "onset" for _, kind, _ in expected)  # the stream has a verdict to keep


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


def test_plateau_summary_says_how_the_loss_changed_in_words():
    from hessdiag.detectors.plateau import _change_in_words

    assert _change_in_words(1.7e-8) == "changed by less than 0.01%"
    assert _change_in_words(0.0042) == "improved by 0.42%"
    assert _change_in_words(-0.03) == "rose by 3%"
