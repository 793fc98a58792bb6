"""Synthetic metric streams shared by the detector tests, and the checks every detector must pass:
a state_dict round trip mid-story continues identically, and the verdicts do not depend on the
loss's units."""

import json
import math

import numpy as np


def healthy_stream(steps=2000, seed=0):
    """(step, loss, grad_norm): a decaying loss and gradient norm with 20% multiplicative noise."""
    noise = 1 + 0.2 * np.random.default_rng(seed).uniform(-1, 1, steps)
    for t in range(steps):
        yield t, 2.3 * math.exp(-t / 500) * noise[t] + 0.02, (math.exp(-t / 800) + 0.05) * noise[t]


def onsets(events):
    return [e for e in events if e.kind == "onset"]


def kinds(events):
    return [(e.kind, e.step) for e in events]


def layers(ratios):
    """Per-layer gradient and weight norms, shallow to deep, with the given gradient/weight ratios."""
    names = [f"layer{i}" for i in range(len(ratios))]
    weights = [2.0 + i for i in range(len(ratios))]
    return [(n, r * w) for n, r, w in zip(names, ratios, weights)], list(zip(names, weights))


STARVING = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-2, 1e-2]


def stuck(start, stop, level=0.9, grad=1e-3, seed=2):
    """A loss stuck at `level` with 20% noise and a collapsed gradient."""
    noise = 1 + 0.2 * np.random.default_rng(seed).uniform(-1, 1, stop - start)
    return [(t, level * noise[t - start], grad * noise[t - start]) for t in range(start, stop)]


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


def saturated_stream():
    """Checks on a saturated network: loss, gradient and curvature all small, flat points between saddle
    points whose curvature is small only in absolute terms (a spectral norm of 2e-5 against a loss of
    0.69; 1e-8 against 2.3 is flat)."""
    flat = (1e-9, 1e-8, -5e-9, True, 2.3, None)
    saddle = (1e-7, 2e-5, -1e-5, True, 0.69, -1e-4)
    keys = ("grad_norm", "lambda_max", "lambda_min", "negative_certified", "loss", "loss_change_along_bottom")
    return [dict(zip(keys, check)) for check in [flat, flat, saddle, saddle, flat, flat, flat]]


#: The loss scales every detector is swept over (with and without a shift of the loss).
SCALES = [(1e-6, 0.0), (1e-3, 0.0), (1e3, 0.0), (1e6, 0.0), (1.0, 20.0), (1e-3, 20.0)]


def edge_stream():
    return [{"sharpness": s, "threshold": 2.0} for s in (1.0, 1.9, 1.95, 2.1, 1.7, 1.5, 1.5, 1.9, 1.9, 1.0)]


def scaled(inputs, scale, shift):
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
    """An explosion a user sees: a steady loss at `start`, then a 100x gradient blow-up while it rises by 5."""
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


def assert_state_round_trip_continues_identically(make, stream, split):
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


def assert_verdicts_do_not_depend_on_the_loss_units(make, stream, scale, shift, *, floored=False, healthy=False):
    """The same stream with the loss x `scale` + `shift`: the same events at the same steps."""
    reference, other = make(), make(loss_floor=shift) if floored else make()
    expected = [(e.step, e.kind, e.severity) for t, x in enumerate(stream()) for e in reference.update(t, **x)]
    got = [(e.step, e.kind, e.severity) for t, x in enumerate(stream()) for e in other.update(t, **scaled(x, scale, shift))]
    assert got == expected
    if not healthy:
        assert any(kind == "onset" for _, kind, _ in expected)  # the stream has a verdict to keep


def assert_named_after_its_flag_and_quiet(detector, name):
    assert detector.name == name and not detector.active and detector.evidence == {}
    assert detector.remedy and "\n" not in detector.remedy
