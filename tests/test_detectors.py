"""Each detector on synthetic metric streams: fires on the pathology, quiet on healthy noise."""

import math
import random

import pytest

from hessdiag.detectors import (
    EdgeOfStabilityDetector,
    ExplodingGradientDetector,
    PlateauDetector,
    SaddleDetector,
    VanishingGradientDetector,
)
from hessdiag.flags import Hysteresis


def healthy_stream(steps=2000, seed=0):
    """A decaying loss and gradient norm with 20% multiplicative noise."""
    rng = random.Random(seed)
    for t in range(steps):
        noise = 1 + 0.2 * rng.uniform(-1, 1)
        yield t, 2.3 * math.exp(-t / 500) * noise + 0.02, (1.0 * math.exp(-t / 800) + 0.05) * noise


def onsets(events):
    return [e for e in events if e.kind == "onset"]


def test_hysteresis_needs_consecutive_triggers_and_clears_after_quiet():
    h = Hysteresis(onset=3, clear=2)
    assert [h.update(x) for x in (True, True, False, True, True, True)] == [None, None, None, None, None, "onset"]
    assert [h.update(x) for x in (False, True, False, False)] == [None, None, None, "cleared"]
    assert h.update(True, immediate=True) == "onset"
    restored = Hysteresis(onset=3, clear=2)
    restored.load_state_dict(h.state_dict())
    assert restored.active
    with pytest.raises(ValueError, match="`onset` must be an int >= 1, got 0"):
        Hysteresis(onset=0)


# -- exploding ----------------------------------------------------------------------------------
def test_exploding_quiet_on_a_healthy_stream():
    detector = ExplodingGradientDetector()
    events = [e for t, loss, g in healthy_stream() for e in detector.update(t, loss, g)]
    assert events == []


def test_exploding_ignores_growing_gradients_while_the_loss_falls():
    """Escaping a saddle from a tiny initialisation: the gradient grows 1000x, the loss drops."""
    detector = ExplodingGradientDetector()
    events = []
    for t in range(100):
        grad = 1e-4 * 1.1**t if t < 80 else 0.2
        events += detector.update(t, 20.0 * (0.97 ** max(0, t - 20)), grad)
    assert events == []


def test_exploding_fires_on_sustained_growth_not_on_one_spike():
    detector = ExplodingGradientDetector()
    events = []
    for t in range(100):
        events += detector.update(t, 1.0, 1.0 + 0.01 * (t % 3))
    events += detector.update(100, 1.0, 50.0)  # one spike: noise
    events += detector.update(101, 1.0, 1.0)
    assert events == []
    for t in range(102, 115):  # a run diverging: loss and gradient grow together
        events += detector.update(t, 1.5 ** (t - 100), 10.0 * 2 ** (t - 100))
    fired = onsets(events)
    assert len(fired) == 1 and fired[0].step == 109  # the eighth consecutive spike
    assert fired[0].evidence["ratio"] > 10 and fired[0].severity == "warning"
    for t in range(115, 140):
        events += detector.update(t, 1.0, 1.0)
    assert [e.kind for e in events] == ["onset", "cleared"]


def test_exploding_fires_at_once_on_non_finite_values():
    detector = ExplodingGradientDetector()
    assert detector.update(0, 1.0, 1.0) == []
    (event,) = detector.update(1, float("nan"), 1.0)
    assert event.kind == "onset" and event.severity == "critical"
    other = ExplodingGradientDetector()
    assert other.update(0, 1.0, 1.0, nonfinite_count=2)[0].evidence["nonfinite_tensors"] == 2


def test_exploding_watches_each_layer_against_its_own_median():
    detector = ExplodingGradientDetector(onset=1)
    events = []
    for t in range(30):
        events += detector.update(t, 1.0, 1.0, layer_ratios={"a": 1e-3, "b": 1e-2})
    events += detector.update(30, 1.5, 1.0, layer_ratios={"a": 0.5, "b": 1e-2})
    assert len(onsets(events)) == 1 and "Layer a" in events[0].summary


def test_exploding_state_round_trip_continues_identically():
    first, second = ExplodingGradientDetector(), ExplodingGradientDetector()
    stream = [(t, 1.0, 1.0 + (t % 5) * 0.1) for t in range(60)] + [(t, 2.0, 100.0) for t in range(60, 75)]
    for t, loss, g in stream[:50]:
        first.update(t, loss, g)
    second.load_state_dict(first.state_dict())
    assert [first.update(*x) for x in stream[50:]] == [second.update(*x) for x in stream[50:]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"factor": 0}, "`factor` must be a finite number > 0"), ({"window": 1}, "`window` must be an int >= 2"),
     ({"min_history": 60}, r"`min_history` \(60\) must be at most `window` \(50\)")],
)  # fmt: skip
def test_exploding_rejects_bad_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExplodingGradientDetector(**kwargs)


# -- vanishing ----------------------------------------------------------------------------------
def layers(ratios):
    names = [f"layer{i}" for i in range(len(ratios))]
    return list(zip(names, ratios)), [(n, 1.0) for n in names]


def test_vanishing_fires_when_shallow_layers_starve():
    detector = VanishingGradientDetector()
    events = []
    for t in range(10):
        events += detector.update(t, *layers([1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-2, 1e-2]))
    fired = onsets(events)
    assert len(fired) == 1 and fired[0].step == 4
    assert fired[0].evidence["depth_ratio"] < 1e-3


def test_vanishing_quiet_on_healthy_depth_profile_and_short_blips():
    detector = VanishingGradientDetector()
    rng = random.Random(0)
    events = []
    for t in range(500):
        ratios = [1e-3 * (1 + 0.5 * rng.uniform(-1, 1)) * 0.5 ** (i / 2) for i in range(8)]
        if t % 50 == 0:  # a blip shorter than the onset
            ratios[0] = 1e-9
        events += detector.update(t, *layers(ratios))
    assert events == []


def test_vanishing_rejects_bad_thresholds():
    with pytest.raises(ValueError, match=r"`depth_ratio` must be a finite number in \(0, 1.0\)"):
        VanishingGradientDetector(depth_ratio=2.0)


# -- plateau ------------------------------------------------------------------------------------
def test_plateau_quiet_on_a_healthy_stream_and_at_the_floor():
    detector = PlateauDetector()
    assert [e for t, loss, g in healthy_stream(3000) for e in detector.update(t, loss, g)] == []
    floor = PlateauDetector()
    rng = random.Random(1)
    assert [e for t in range(1000) for e in floor.update(t, 0.01 * (1 + 0.2 * rng.random()), 1e-4)] == []


def test_plateau_fires_on_a_stalled_run_above_its_floor():
    detector = PlateauDetector()
    rng = random.Random(2)
    events = []
    for t, loss, g in healthy_stream(300):
        events += detector.update(t, loss, g)
    for t in range(300, 1000):  # stuck at 0.9 with a collapsed gradient
        events += detector.update(t, 0.9 * (1 + 0.1 * rng.uniform(-1, 1)), 1e-3 * (1 + 0.1 * rng.random()))
    fired = onsets(events)
    assert len(fired) == 1 and 300 < fired[0].step < 300 + 200 + 50 + 60
    assert fired[0].evidence["relative_improvement"] < 0.01  # flat or worse
    for t in range(1000, 1300):  # the lr schedule kicks in: steady progress again
        events += detector.update(t, 0.9 * math.exp(-(t - 1000) / 100), 0.5)
    assert events[-1].kind == "cleared"


def test_plateau_fires_on_a_run_stuck_from_the_start():
    detector = PlateauDetector()
    events = [e for t in range(400) for e in detector.update(t, 2.302 + 1e-3 * math.sin(t), 5e-4)]
    assert len(onsets(events)) == 1


def test_plateau_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="`window` must be an int >= 8"):
        PlateauDetector(window=4)
    with pytest.raises(ValueError, match="`loss_floor` must be a finite number"):
        PlateauDetector(loss_floor=float("nan"))


# -- saddle -------------------------------------------------------------------------------------
def test_saddle_classifies_points():
    detector = SaddleDetector()
    # ||g||^2 / (2 lambda_max) = 0.25 of a loss of 1.0: a gradient step still does a lot.
    assert detector.update(0, 1.0, 2.0, -1.0, True, 1.0) == []
    assert detector.classification == "not critical"
    (event,) = detector.update(1, 1e-2, 2.0, -1.0, True, 1.0, loss_change_along_bottom=-0.01)
    assert detector.classification == "saddle" and event.kind == "onset"
    assert event.evidence["loss_change_along_bottom"] == -0.01
    detector.update(2, 1e-2, 2.0, -0.01, True, 1.0)
    assert detector.classification == "minimum-like"  # -0.5% of the spectral norm is not significant
    assert detector.update(3, 1e-4, 1e-8, -1e-8, True, 1.0)[0].kind == "cleared"
    assert detector.classification == "degenerate"


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


def test_saddle_rejects_bad_thresholds():
    with pytest.raises(ValueError, match=r"`tau` must be a finite number in \(0, 1.0\)"):
        SaddleDetector(tau=0)


# -- edge of stability --------------------------------------------------------------------------
def test_edge_of_stability_onset_hysteresis_and_severity():
    detector = EdgeOfStabilityDetector()
    events = []
    for t, sharpness in enumerate([1.0, 1.5, 1.85, 1.9, 2.05, 1.95, 1.7, 1.75, 1.5, 1.4]):
        events += detector.update(t, sharpness, threshold=2.0)
    assert [(e.kind, e.step) for e in events] == [("onset", 3), ("cleared", 9)]
    assert events[0].severity == "info" and events[0].evidence["ratio"] == pytest.approx(0.95)


def test_edge_of_stability_rejects_bad_thresholds():
    with pytest.raises(ValueError, match=r"`clear_ratio` \(0.95\) must be at most `ratio` \(0.9\)"):
        EdgeOfStabilityDetector(clear_ratio=0.95)
