"""`hessdiag.callbacks.flag_stopping`: `stop_on` stops on onsets (any rank's), `on_flag` sees every event."""

import contextlib

from hessdiag.callbacks.flag_stopping import FlagStopping
from hessdiag.flags import FlagEvent

ONSET = FlagEvent(
    "exploding", 5, "onset", "critical", evidence={"grad_norm": 123.456}, remedy="Clip gradients.", summary="Boom."
)
CLEARED = FlagEvent("exploding", 6, "cleared", "info")
PLATEAU = FlagEvent("plateau", 5, "onset", "warning")


def test_an_onset_in_stop_on_stops_with_its_evidence(fake_trainer):
    reason = FlagStopping(("exploding",), None).stop_if_flagged(fake_trainer, [PLATEAU, ONSET])
    assert fake_trainer.should_stop
    assert reason == (
        "hessdiag: stopping at step 7: `exploding` (in stop_on) raised at step 5. Boom. "
        "Evidence: grad_norm=123.5. Remedy: Clip gradients."
    )


def test_other_flags_clearances_and_an_empty_stop_on_do_not_stop(fake_trainer):
    assert FlagStopping(("exploding",), None).stop_if_flagged(fake_trainer, [PLATEAU, CLEARED]) is None
    assert FlagStopping((), None).stop_if_flagged(fake_trainer, [ONSET]) is None
    assert not fake_trainer.should_stop


def test_an_onset_on_another_rank_stops_this_one(fake_trainer):
    fake_trainer.strategy.other_ranks = True
    stopping = FlagStopping(("saddle", "exploding"), None)
    reason = stopping.stop_if_flagged(fake_trainer, [])
    assert fake_trainer.should_stop and stopping.stop_reason == reason
    assert reason == (
        "hessdiag: stopping at step 7: a flag in stop_on ('saddle', 'exploding') was raised on another rank."
    )


def test_on_flag_sees_every_event_in_order_each_under_the_guard(fake_trainer):
    seen, guarded = [], []

    @contextlib.contextmanager
    def guard(what):
        guarded.append(what)
        yield

    stopping = FlagStopping((), lambda event, trainer, module: seen.append((event, trainer, module)))
    stopping.call_on_flag([ONSET, CLEARED], fake_trainer, "module", guard)
    assert seen == [(ONSET, fake_trainer, "module"), (CLEARED, fake_trainer, "module")]
    assert guarded == ["the `on_flag` callable"] * 2
