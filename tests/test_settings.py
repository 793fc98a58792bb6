"""`DiagnosticsSettings` and `CallbackSettings`: every argument is checked once, here, by name, and
the public signatures of `Monitor` and `HessianDiagnostics` carry the defaults declared there."""

import dataclasses
import inspect

import pytest
import torch

import hessdiag
from hessdiag.callbacks import HessianDiagnostics
from hessdiag.callbacks.settings import CallbackSettings, validate_flag_names
from hessdiag.detectors import PlateauDetector
from hessdiag.flags import FLAG_NAMES
from hessdiag.settings import DiagnosticsSettings, resolve_detectors

ENGINE_ERRORS = [
    ({"check_every": -1}, r"`check_every` must be an int >= 0 or 'auto', got -1"),
    ({"check_every": "often"}, r"`check_every` must be an int >= 0 or 'auto', got 'often'"),
    ({"overhead_budget": 0}, r"`overhead_budget` must be a number in \(0, 1\), got 0"),
    ({"overhead_budget": "5%"}, r"`overhead_budget` must be a number in \(0, 1\), got '5%'"),
    ({"sub_batch": 0}, r"`sub_batch` must be a positive int or None, got 0"),
    ({"k": 0}, r"`k` must be a positive int, got 0"),
    ({"k": True}, r"`k` must be a positive int, got True"),
    ({"tol": 1.0}, r"`tol` must be a number in \(0, 1\), got 1.0"),
    ({"tol": True}, r"`tol` must be a number in \(0, 1\), got True"),
    ({"max_iter": 0}, r"`max_iter` must be a positive int or None, got 0"),
    ({"cold_every": -1}, r"`cold_every` must be an int >= 0, got -1"),
    ({"density_every": 1.5}, r"`density_every` must be an int >= 0, got 1.5"),
    ({"mode": "bogus"}, r"`mode` must be one of \(.*\), got 'bogus'"),
    ({"hvp_method": "bogus"}, r"`hvp_method` must be one of \(.*\), got 'bogus'"),
    ({"rank_weighting": "bogus"}, r"`rank_weighting` must be 'equal' or 'samples', got 'bogus'"),
    ({"update_ratios": 1}, r"`update_ratios` must be a bool, got 1"),
    ({"strict": "yes"}, r"`strict` must be a bool, got 'yes'"),
]


@pytest.mark.parametrize(("kwargs", "match"), [*ENGINE_ERRORS, ({"log_every": 0}, r"`log_every` must be an int >= 1, got 0")])
def test_diagnostics_settings_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiagnosticsSettings(**kwargs)


CALLBACK_ERRORS = [
    ({"check_every": -1}, r"`check_every` must be an int >= 0 or 'auto', got -1"),
    ({"log_every": 0}, r"`log_every` must be a positive int or None, got 0"),
    ({"log_every": 2.0}, r"`log_every` must be a positive int or None, got 2.0"),
    ({"loss_fn": 3}, r"`loss_fn` must be callable as loss_fn\(pl_module, batch\), got int"),
    ({"detectors": ["bogus"]}, r"`detectors`: unknown flag name 'bogus'"),
    ({"detectors": "plateau"}, r"`detectors` must be a list of flag names or detectors, got str"),
    ({"detectors": [object()]}, r"`detectors` must hold flag names .* or hessdiag detectors .*got object"),
    ({"detectors": ["plateau", PlateauDetector()]}, r"`detectors` names a flag twice: \['plateau', 'plateau'\]"),
    ({"on_flag": "print"}, r"`on_flag` must be callable as on_flag\(event, trainer, pl_module\), got str"),
    ({"stop_on": "exploding"}, r"`stop_on` must be a sequence of flag names"),
    ({"stop_on": ("exploding", "explosion")}, r"`stop_on`: unknown flag name\(s\) \['explosion'\]; the names are"),
]


@pytest.mark.parametrize(("kwargs", "match"), [*ENGINE_ERRORS[2:], *CALLBACK_ERRORS])
def test_callback_settings_reject_bad_values(kwargs, match):
    # The engine's own values but `check_every` (listed with the callback's), and the callback's.
    with pytest.raises(ValueError, match=match):
        CallbackSettings(**kwargs)


def test_settings_are_frozen():
    settings = CallbackSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.tol = 1e-2  # type: ignore[misc]


def test_callback_settings_give_the_engine_its_part_with_the_trainers_cadence():
    settings = CallbackSettings(check_every=7, tol=1e-4, stop_on=["plateau"], loss_fn=lambda m, b: 0)
    assert settings.stop_on == ("plateau",)  # held as a tuple, whatever sequence was given
    engine = settings.diagnostics(trainer_log_every=50)
    assert type(engine) is DiagnosticsSettings
    assert (engine.check_every, engine.tol, engine.log_every) == (7, 1e-4, 50)
    assert CallbackSettings(log_every=3).diagnostics(trainer_log_every=50).log_every == 3


def test_construction_draws_no_random_number():
    state = torch.get_rng_state()
    CallbackSettings(detectors=["plateau", "saddle"], stop_on=FLAG_NAMES)
    DiagnosticsSettings(check_every=10)
    assert torch.equal(torch.get_rng_state(), state)


def test_flag_names_and_detectors_resolve_to_what_they_name():
    assert validate_flag_names("stop_on", {"saddle"}) == ("saddle",)
    assert sorted(d.name for d in resolve_detectors(None)) == sorted(FLAG_NAMES)
    plateau = PlateauDetector()
    assert resolve_detectors(["saddle", plateau])[1] is plateau  # instances are used as they are


def test_check_every_zero_means_never_in_the_monitor_and_the_callback_alike():
    assert DiagnosticsSettings(check_every=0).check_every == CallbackSettings(check_every=0).check_every == 0


class NamedOtherwise:
    """A custom detector: any name, the FlagDetector interface."""

    name = "loss_spike"
    active = False

    def observe(self, record):
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_custom_detector_objects_of_any_name_are_accepted_names_must_be_known():
    custom = NamedOtherwise()
    assert CallbackSettings(detectors=["plateau", custom]).detectors[1] is custom
    with pytest.raises(ValueError, match=r"unknown flag name 'bogus'; the names are \('plateau'"):
        CallbackSettings(detectors=["bogus"])


def _defaults(settings_class):
    return {field.name: field.default for field in dataclasses.fields(settings_class)}


def _signature_defaults(cls):
    return {name: parameter.default for name, parameter in inspect.signature(cls).parameters.items()}


def test_the_monitors_signature_carries_every_setting_with_its_declared_default():
    signature = _signature_defaults(hessdiag.Monitor)
    assert {name: signature.get(name, "missing") for name in _defaults(DiagnosticsSettings)} == _defaults(DiagnosticsSettings)


def test_the_callbacks_signature_carries_every_setting_with_its_declared_default():
    signature = _signature_defaults(HessianDiagnostics)
    assert {name: signature.get(name, "missing") for name in _defaults(CallbackSettings)} == _defaults(CallbackSettings)
    # The engine's defaults hold in the callback too, but `log_every`: None there is the trainer's cadence.
    engine = _defaults(DiagnosticsSettings)
    assert {name: default for name, default in _defaults(CallbackSettings).items() if name in engine} == engine | {
        "log_every": None
    }


def test_the_signatures_pass_every_setting_through():
    # A value other than the default for each field reaches the settings object: none is dropped on the way.
    chosen = {
        "check_every": 7, "overhead_budget": 0.1, "sub_batch": 3, "product_parts": 2, "k": 2, "tol": 1e-4, "max_iter": 30, "cold_every": 2,
        "density_every": 0, "noise_scale_parts": 2, "module_sharpness": 1, "mode": "eval", "hvp_method": "double_backward",
        "rank_weighting": "samples", "update_ratios": True, "strict": True, "log_every": 3,
    }  # fmt: skip
    assert set(chosen) == set(_defaults(DiagnosticsSettings))
    monitor = hessdiag.Monitor(torch.nn.Linear(2, 1), lambda model, batch: model(batch).sum(), **chosen)
    assert dataclasses.asdict(monitor.settings) == chosen
    callback = HessianDiagnostics(**chosen, progress_bar=False, stop_on=["plateau"])
    assert {name: getattr(callback.settings, name) for name in chosen} == chosen
    assert (callback.settings.progress_bar, callback.settings.stop_on) == (False, ("plateau",))
    monitor.close()
