"""Flags as data: the hysteresis every detector shares, and the flag event."""

import json

import numpy as np
import pytest

from hessdiag.flags import FlagEvent, Hysteresis


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
    assert FlagEvent("slow_loss", 0, "onset", "info").name == "slow_loss"  # a custom detector's flag
    with pytest.raises(ValueError, match="`name` must be a non-empty string"):
        FlagEvent("", 0, "onset", "info")
    with pytest.raises(ValueError, match="`severity` must be one of"):
        FlagEvent("saddle", 0, "onset", "fatal")
