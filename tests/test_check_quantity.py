"""The check as a list of quantities: a quantity defined in one place reaches the check's record,
its scalars and texts and the writers; what is not due costs nothing; the needs set the order."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import Monitor
from hessdiag.check.probe import CurvatureProbe
from hessdiag.check.quantity import REGISTRY, Quantity, Skipped, ordered_quantities
from hessdiag.settings import DiagnosticsSettings
from oracles import dense_hessian


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    return model, batch


@pytest.fixture
def registered():
    """Quantities defined by a test are registered for that test only."""
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


class Capture:
    def __init__(self):
        self.scalars_seen, self.texts_seen = {}, {}

    def scalars(self, step, values, layers):
        self.scalars_seen.update(values)

    def text(self, step, tag, message):
        self.texts_seen[tag] = message

    def events(self, step, events): ...

    def density(self, step, density): ...

    def flush(self): ...


def test_a_new_quantity_defined_once_is_computed_recorded_and_logged(registered):
    class TopRayleighQuotient(Quantity):
        """v'Hv of the top Ritz vector, by one product on the check's open operator."""

        name = "top_rayleigh_quotient"

        def compute(self, context):
            v = context.spectrum.top_vectors[0]
            return float(v @ context.operator.matvec(v))

        @staticmethod
        def scalars(value, check):
            return {"hessdiag/test/top_rayleigh_quotient": value}

        @staticmethod
        def texts(value, check):
            return {"hessdiag/test/card": f"v'Hv = {value:.6g}"}

    model, batch = problem()
    writer = Capture()
    monitor = Monitor(model, cross_entropy, writer=writer, check_every=1, tol=1e-8)
    monitor.check_curvature(batch)
    check = monitor.checks[-1]
    dense = dense_hessian(model, cross_entropy, batch)
    assert check.values["top_rayleigh_quotient"] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)
    assert check.products["top_rayleigh_quotient"] == 1
    assert writer.scalars_seen["hessdiag/test/top_rayleigh_quotient"] == check.values["top_rayleigh_quotient"]
    assert writer.texts_seen["hessdiag/test/card"].startswith("v'Hv = ")


def test_a_quantity_not_due_is_absent_and_spends_no_product(registered):
    class NeverDue(Quantity):
        name = "never_due"

        def due(self, context):
            return False

        def compute(self, context):
            raise AssertionError("computed although not due")

    model, batch = problem()
    check = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(density_every=0)).run(1, batch)
    assert "never_due" not in check.values and "never_due" not in check.products
    assert "density" not in check.values and check.density is None and "conditioning" not in check.values
    assert sum(check.products.values()) == check.num_hvps  # every product is some quantity's


def test_a_skipped_quantity_says_why_once_and_logs_nothing(registered):
    class Refused(Quantity):
        name = "refused"

        def compute(self, context):
            return Skipped("No refusal measured: the test refuses it.")

        @staticmethod
        def scalars(value, check):
            raise AssertionError("a skipped quantity has no value to log")

    model, batch = problem()
    with pytest.warns(UserWarning, match="the test refuses it"):
        monitor = Monitor(model, cross_entropy, writer=Capture(), check_every=1)
        monitor.check_curvature(batch)
    assert monitor.checks[-1].skipped["refused"] == "No refusal measured: the test refuses it."
    assert monitor.checks[-1].values["refused"] is None


def test_quantities_come_after_what_they_need_and_a_cycle_is_refused(registered):
    names = [cls.name for cls in ordered_quantities()]
    for cls in ordered_quantities():
        assert all(names.index(need) < names.index(cls.name) for need in cls.needs)

    class First(Quantity):
        name = "first_of_cycle"
        needs = ("second_of_cycle",)

    class Second(Quantity):
        name = "second_of_cycle"
        needs = ("first_of_cycle",)

    with pytest.raises(ValueError, match="cycle"):
        ordered_quantities()
