"""`hessdiag demo`: a Lightning run on real data (scikit-learn's digits) with `HessianDiagnostics`.

Each scenario reproduces one pathology on purpose, so a user can see what its flag looks like:

==================  ==============================================================  =====================
scenario            set-up                                                          expected flag(s)
==================  ==============================================================  =====================
healthy             MLP 64-64-10, ReLU, Adam 1e-3, batches of 64, 1500 steps        none
saddle              two-layer linear network from a 1e-4 initialisation, full batch  saddle
plateau             tanh MLP from a 1e-3 initialisation, full batch                  plateau
exploding           tanh MLP, squared error, full-batch SGD at lr 2 (2/lr = 1)       exploding
vanishing           10-layer sigmoid MLP from a 0.05 initialisation, full batch      vanishing, plateau
edge-of-stability   tanh MLP, squared error, full-batch GD at lr 0.2 (2/lr = 10)     edge_of_stability
==================  ==============================================================  =====================

The check table's ``headroom`` column tells the edge-of-stability story along the gradient: the
largest stable learning rate along the step's own direction falls towards the one in use (~1) as
the sharpness rises to 2/lr.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from hessdiag import HessdiagWarning, Monitor
from hessdiag.callbacks import HessianDiagnostics


@dataclass(frozen=True)
class Scenario:
    """One demo run: a model, its loss and optimizer, the batch size (None: full batch), the cadence."""

    build: Callable[[], nn.Module]
    loss: str  # "cross_entropy" or "squared_error"
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    batch_size: int | None
    steps: int
    check_every: int
    expected: tuple[str, ...]


def _mlp(widths: list[int], activation: type[nn.Module], init_std: float | None = None, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(fan_in, fan_out, bias=bias)
        if init_std is not None:
            nn.init.normal_(linear.weight, std=init_std)
            if bias:
                nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(widths) - 2 and activation is not nn.Identity:
            layers.append(activation())
    return nn.Sequential(*layers)


SCENARIOS: dict[str, Scenario] = {
    "healthy": Scenario(
        lambda: _mlp([64, 64, 10], nn.ReLU), "cross_entropy", lambda p: torch.optim.Adam(p, lr=1e-3), 64, 1500, 50, ()
    ),
    "saddle": Scenario(
        lambda: _mlp([64, 16, 10], nn.Identity, init_std=1e-4, bias=False), "squared_error",
        lambda p: torch.optim.SGD(p, lr=0.1), None, 400, 20, ("saddle",),
    ),  # fmt: skip
    "plateau": Scenario(
        lambda: _mlp([64, 32, 32, 10], nn.Tanh, init_std=1e-3), "cross_entropy",
        lambda p: torch.optim.SGD(p, lr=0.05), None, 500, 50, ("plateau",),
    ),  # fmt: skip
    "exploding": Scenario(
        lambda: _mlp([64, 64, 64, 10], nn.Tanh), "squared_error", lambda p: torch.optim.SGD(p, lr=2.0), None, 60, 20,
        ("exploding",),
    ),  # fmt: skip
    "vanishing": Scenario(
        lambda: _mlp([64] + [32] * 10 + [10], nn.Sigmoid, init_std=0.05), "cross_entropy",
        lambda p: torch.optim.SGD(p, lr=0.5), None, 400, 100, ("vanishing", "plateau"),
    ),  # fmt: skip
    "edge-of-stability": Scenario(
        lambda: _mlp([64, 64, 64, 10], nn.Tanh), "squared_error", lambda p: torch.optim.SGD(p, lr=0.2), None, 300, 20,
        ("edge_of_stability",),
    ),  # fmt: skip
}
#: The scenarios' names, in the order the CLI offers them.
SCENARIO_NAMES: tuple[str, ...] = tuple(SCENARIOS)


class DigitsModule(pl.LightningModule):
    """A scenario's network on the digits: cross-entropy on labels or half squared error on one-hot."""

    def __init__(self, scenario: Scenario) -> None:
        super().__init__()
        self.scenario = scenario
        self.net = scenario.build()

    def hessdiag_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        outputs = self.net(images)
        if self.scenario.loss == "cross_entropy":
            return F.cross_entropy(outputs, labels)
        return 0.5 * (outputs - F.one_hot(labels, 10).to(outputs.dtype)).pow(2).sum(dim=1).mean()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.hessdiag_loss(batch)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.scenario.optimizer(list(self.parameters()))


def digits_loader(batch_size: int | None, seed: int) -> torch.utils.data.DataLoader:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit("The demo trains on scikit-learn's digits: pip install 'hessdiag[demo]'") from error
    digits = load_digits()
    data = torch.utils.data.TensorDataset(
        torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    )
    generator = torch.Generator().manual_seed(seed)
    size = batch_size or len(data)
    return torch.utils.data.DataLoader(data, batch_size=size, shuffle=batch_size is not None, generator=generator)


def tensorboard_command(logdir: str | Path) -> str:
    """A command that opens TensorBoard on `logdir` as printed: this interpreter's own ``tensorboard``
    script when it has one (a virtual environment need not be activated), else ``python -m``."""
    script = Path(sys.executable).with_name("tensorboard")
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "tensorboard.main"]
    return shlex.join([*launcher, "--logdir", str(Path(logdir).resolve())])


CHECK_TABLE_LEGEND = """\
  step        optimizer step of the check
  loss        training loss on the check's batch
  lambda_max  largest Hessian eigenvalue of the loss (steepest curvature)
  lambda_min  smallest Hessian eigenvalue found (the true one is at most this; negative: the loss curves down)
  sharp/thr   sharpness / stability threshold (2/lr for plain gradient descent); >= 1: edge of stability
  headroom    largest stable learning rate along the gradient / the one in use; near 1: the step along the
              gradient is at its stability limit, below 1 it overshoots (inf: no upward curvature along it)
  HVPs        Hessian-vector products the check took (each costs about 2-4 gradients)
  seconds     wall time of the check"""


def check_table(monitor: Monitor) -> str:
    """The checks of a run in step order, one line each; a failed check's line gives its reason."""
    rows: list[tuple[int, str]] = []
    for check in monitor.checks:
        ratio = f"{check.stability_ratio:9.2f}" if check.stability_ratio is not None else f"{'-':>9}"
        headroom = f"{check.lr_headroom:8.3g}" if check.lr_headroom is not None else f"{'-':>8}"
        rows.append(
            (
                check.step,
                f"{check.step:6d} {check.loss:8.4f} {check.lambda_max:11.4g} {check.lambda_min:11.4g} {ratio} "
                f"{headroom} {check.num_hvps:5d} {check.seconds:8.3f}",
            )
        )
    rows += [(step, f"{step:6d}  check failed: {reason}") for step, reason in monitor.failed_checks]
    header = (
        f"{'step':>6} {'loss':>8} {'lambda_max':>11} {'lambda_min':>11} {'sharp/thr':>9} {'headroom':>8} {'HVPs':>5} "
        f"{'seconds':>8}"
    )
    body = "\n".join(row for _, row in sorted(rows, key=lambda r: r[0])) or "  (no curvature check ran)"
    return f"{header}\n{body}\n\n{CHECK_TABLE_LEGEND}"


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """The demo's output is its story: Lightning's tips and info lines and the warnings of the libraries
    it drives (worker counts, deprecations) are silenced while it trains; hessdiag's own warnings stay."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("default", HessdiagWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_demo(scenario_name: str, logdir: str, steps: int | None, seed: int) -> int:
    """Train the scenario, print the curvature trajectory and the flags; returns an exit code."""
    scenario = SCENARIOS[scenario_name]
    pl.seed_everything(seed, verbose=False)
    callback = HessianDiagnostics(check_every=scenario.check_every, log_every=10)
    # Runs go to LOGDIR/<scenario>/version_<n>, unless LOGDIR already names the scenario.
    logger = TensorBoardLogger(logdir, name="" if Path(logdir).name == scenario_name else scenario_name)
    with third_party_quiet():
        trainer = pl.Trainer(
            accelerator="auto", devices=1, max_steps=steps or scenario.steps, max_epochs=-1, limit_val_batches=0,
            log_every_n_steps=10, logger=logger, enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=sys.stdout.isatty(), callbacks=[callback],
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(DigitsModule(scenario), digits_loader(scenario.batch_size, seed))
    seconds = time.perf_counter() - start
    monitor = callback.monitor
    assert monitor is not None
    print(f"\nscenario {scenario_name!r}: {monitor.step} steps in {seconds:.0f} s on {trainer.strategy.root_device}")
    print(f"curvature checks:\n{check_table(monitor)}")
    onsets = [event for event in monitor.events if event.kind == "onset"]
    print("\nflags raised:" if onsets else "\nflags raised: none")
    for event in onsets:
        print(f"  step {event.step:5d}  {event.name}: {event.summary}\n              remedy: {event.remedy}")
    expected = ", ".join(scenario.expected) or "none"
    print(f"\nexpected for this scenario: {expected}")
    print(f"open the dashboard:  {tensorboard_command(logdir)}")
    return 0
