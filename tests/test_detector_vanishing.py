"""The vanishing-gradient detector on per-layer norms: fires when shallow layers starve, when
gradients are negligible everywhere or when layers are dead (with its own remedy), stays quiet on
healthy depth profiles, and feeds from step records."""

import numpy as np
import pytest
from detector_streams import (
    SCALES,
    assert_named_after_its_flag_and_quiet,
    assert_state_round_trip_continues_identically,
    assert_verdicts_do_not_depend_on_the_loss_units,
    STARVING,
    dead_layer_stream,
    kinds,
    layers,
    negligible_stream,
    vanishing_stream,
)

import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import Monitor
from hessdiag.detectors import CheckRecord, VanishingGradientDetector, StepRecord
from loops import one_step

#: A curvature check: every detector of per-step statistics ignores it.
CHECK = CheckRecord(
    step=1, loss=1.0, grad_norm=1.0, lambda_max=2.0, lambda_min=-1.0, negative_curvature_certified=True,
    loss_change_along_bottom=-0.1, sharpness=2.0, stability_threshold=1.0,
)  # fmt: skip


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


def test_observe_judges_steps_with_gradients_as_update_does():
    by_record, by_update = VanishingGradientDetector(), VanishingGradientDetector()
    for t, inputs in enumerate(vanishing_stream()):
        record = StepRecord(
            step=t, loss=None, grad_norm=1.0, layer_grad_norms=tuple(inputs["layer_grad_norms"]),
            layer_weight_norms=tuple(inputs["layer_weight_norms"]),
        )  # fmt: skip
        assert by_record.observe(record) == by_update.update(t, **inputs)
    assert by_record.state_dict() == by_update.state_dict()


def test_observe_skips_steps_without_gradients_and_other_records():
    detector = VanishingGradientDetector()
    assert detector.observe(StepRecord(step=1, loss=1.0)) == [] and detector.observe(CHECK) == []
    assert detector.state_dict() == VanishingGradientDetector().state_dict()


UNIT_CASES = {
    "vanishing": vanishing_stream,
    "vanishing-dead": dead_layer_stream,
    "vanishing-negligible": negligible_stream,
}


def test_state_round_trip_continues_identically():
    assert_state_round_trip_continues_identically(VanishingGradientDetector, vanishing_stream, 2)


def test_named_after_its_flag_and_quiet_at_first():
    assert_named_after_its_flag_and_quiet(VanishingGradientDetector(), "vanishing")


@pytest.mark.parametrize(("scale", "shift"), SCALES)
@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_verdicts_do_not_depend_on_the_loss_units(case, scale, shift):
    """The same stream with the loss x 1e-6 .. x 1e6, + 20: the same events at the same steps."""
    assert_verdicts_do_not_depend_on_the_loss_units(
        VanishingGradientDetector, UNIT_CASES[case], scale, shift, floored=False, healthy="healthy" in case
    )


class PeftStyleLoRA(nn.Module):
    """A frozen Linear adapted as peft names it: ``lora_A.default`` (random) and ``lora_B.default``
    (zero at the start), each a module of its own."""

    def __init__(self, width: int, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = nn.Linear(width, width).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(width, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, width, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_an_adapter_s_two_factors_are_judged_as_one_layer():
    """With B = 0 at the start, A's gradient is zero and B's weight tiny: judged apart, shallow A's
    starve while deep B's race (under warm-up the depth rule fired within 5 steps of a healthy LoRA run). Together
    they are the adapted layer, and the same run raises nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(PeftStyleLoRA(64, 4), nn.Tanh()) for _ in range(6)), nn.Linear(64, 4))
    model[-1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    monitor = Monitor(model, optimizer=optimizer, detectors=["vanishing"], log_every=1, check_every=0)
    x, y = torch.randn(64, 64), torch.randint(0, 4, (64,))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 60))  # B grows slowly
    for _ in range(30):
        one_step(model, optimizer, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), monitor)
        warmup.step()
    assert monitor.events == [] and monitor.detectors["vanishing"].evidence["dead_layers"] == 0
    assert monitor.detectors["vanishing"].evidence["depth_ratio"] > 1e-3
