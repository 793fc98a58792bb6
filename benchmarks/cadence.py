"""Curvature all through a run: how often the defaults read the curvature, and what the whole run costs.

For a CNN of about 90 k parameters (batch 64, SGD with momentum) and the small GPT of
``benchmarks/cost.py`` (AdamW), each trained for `--steps` steps on fixed synthetic data, in one
process: the run with ``Monitor(model, loss_fn, optimizer=...)`` at its defaults against the same run
without hessdiag and the run with the per-step statistics alone (``check_every=0``). In each round the
three runs advance side by side in blocks of `--block` steps (A B C A B C ...), so that the shared
machine's drifts hit them alike; the rounds' fastest of each arm are compared, and so is each round's
own watched/plain ratio (its median over the rounds), with the spread of each arm. Also the steps
at which a curvature value was logged (full checks: lambda_max; tracking readings: a proven lower
bound on it), the largest gap after step 200, the curvature points per 1,000 steps, and the same after
a resume from a checkpoint taken halfway (a fresh Monitor loading the first half's state). On a
machine with CUDA the same runs go to the GPU, each block timed between synchronisations
(`benchmarks/gpu.sh` runs it there).

    python benchmarks/cadence.py                        # CNN 3,000 steps, GPT 1,000 steps, 3 rounds each
    python benchmarks/cadence.py --steps 3000 3000 --pairs 3   # the figures in the README
    python benchmarks/cadence.py --steps 3000 3000 --product-parts 4   # products on 4 parts (the accelerator's default)

Writes benchmarks/results/cadence-<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _report import save_report  # noqa: E402
from models import GPT, next_token_loss  # noqa: E402

import hessdiag  # noqa: E402

GPT_CONFIG = {"d": 128, "layers": 2, "heads": 4, "context": 64, "batch": 16}


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def image_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def problem(name: str, device: torch.device = torch.device("cpu")):
    """(model, optimizer, loss_fn, batches(step) -> batch) on `device`, seeded: the same run in every arm."""
    torch.manual_seed(0)
    if name == "cnn":
        model = cnn().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        images, labels = torch.randn(1024, 3, 16, 16).to(device), torch.randint(0, 10, (1024,)).to(device)

        def batch(step: int):
            index = torch.arange(step * 64, step * 64 + 64, device=device) % 1024
            return images[index], labels[index]

        return model, optimizer, image_loss, batch
    model = GPT(d=GPT_CONFIG["d"], layers=GPT_CONFIG["layers"], heads=GPT_CONFIG["heads"], context=GPT_CONFIG["context"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tokens = torch.randint(0, 512, (256, GPT_CONFIG["context"] + 1)).to(device)

    def batch(step: int):
        index = torch.arange(step * 16, step * 16 + 16, device=device) % 256
        return (tokens[index, :-1], tokens[index, 1:])

    return model, optimizer, next_token_loss, batch


class Arm:
    """One run of `name`, advanced block by block (:meth:`advance`) so that the arms of a round can
    take turns; `watched` False: no hessdiag; `readings` False: the Monitor's per-step statistics
    alone (``check_every=0``); with `resume_at`, the Monitor is replaced at that step by a fresh one
    that loads the first one's state (as a resumed job would)."""

    def __init__(
        self,
        name: str,
        watched: bool,
        readings: bool = True,
        resume_at: int | None = None,
        device: torch.device = torch.device("cpu"),
        product_parts: int | str = "auto",
    ) -> None:
        self.device = device
        self.options = {"product_parts": product_parts}
        self.model, self.optimizer, self.loss_fn, self.batch = problem(name, device)
        check_every = "auto" if readings else 0
        self.monitor = (
            hessdiag.Monitor(self.model, self.loss_fn, optimizer=self.optimizer, check_every=check_every, **self.options)
            if watched
            else None
        )
        self.resume_at = resume_at
        self.step = 0
        self.seconds = 0.0
        self.points: list[int] = []

    def advance(self, count: int) -> None:
        """Train `count` more steps, timed."""
        monitor, optimizer = self.monitor, self.optimizer
        synchronize(self.device)
        start = time.perf_counter()
        for step in range(self.step, self.step + count):
            if monitor is not None and step == self.resume_at:
                state = monitor.state_dict()
                self.points += _points(monitor)
                monitor.close()
                monitor = self.monitor = hessdiag.Monitor(self.model, self.loss_fn, optimizer=optimizer, **self.options)
                monitor.load_state_dict(state)
            data = self.batch(step)
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model, data)
            loss.backward()
            if monitor is not None:
                monitor.after_backward()
            optimizer.step()
            if monitor is not None:
                monitor.after_step(data, loss)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.step += count

    def result(self) -> dict:
        monitor = self.monitor
        if monitor is None:
            return {"seconds": self.seconds}
        return {
            "seconds": self.seconds,
            "points": sorted(set(self.points + _points(monitor))),
            "full_checks": [c.step for c in monitor.checks],
            "check_seconds": [round(c.seconds, 4) for c in monitor.checks],
            "reading_seconds": [round(r.seconds, 4) for r in monitor.readings],
            "statistics_seconds": monitor.schedule.state_dict()["statistics_seconds"],
            "failed": monitor.failed_checks,
        }


def side_by_side(arms: list[Arm], steps: int, block: int) -> list[dict]:
    """Run `arms` for `steps` steps each, taking turns every `block` steps; their results."""
    for start in range(0, steps, block):
        for arm in arms:
            arm.advance(min(block, steps - start))
    return [arm.result() for arm in arms]


def _points(monitor: hessdiag.Monitor) -> list[int]:
    return [c.step for c in monitor.checks] + [r.step for r in monitor.readings]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a block's time is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gaps_after(points: list[int], start: int, steps: int) -> int:
    """The largest number of steps after `start` without a curvature point (to the run's end)."""
    marks = [start] + [p for p in points if p > start] + [steps]
    return max(b - a for a, b in zip(marks, marks[1:]))


def measure(name: str, steps: int, pairs: int, block: int, device: torch.device, product_parts: int | str = "auto") -> dict:
    plain, watched, statistics_only = [], [], []
    for _ in range(pairs):
        arms = [
            Arm(name, False, device=device),
            Arm(name, True, device=device, product_parts=product_parts),
            Arm(name, True, readings=False, device=device, product_parts=product_parts),
        ]
        plain_run, run, statistics_run = side_by_side(arms, steps, block)
        plain.append(plain_run["seconds"])
        watched.append(run["seconds"])
        statistics_only.append(statistics_run["seconds"])
    (resumed,) = side_by_side([Arm(name, True, resume_at=steps // 2, device=device, product_parts=product_parts)], steps, steps)
    step_seconds = min(plain) / steps
    row = {
        "model": name,
        "steps": steps,
        "product_parts": product_parts,
        "plain_seconds": [round(s, 2) for s in plain],
        "watched_seconds": [round(s, 2) for s in watched],
        "overhead": round(min(watched) / min(plain), 4),
        # each round's watched / plain, its arms side by side: the median over the rounds
        "overhead_paired": round(statistics.median(w / p for w, p in zip(watched, plain)), 4),
        "block": block,
        "spread_plain": round(max(plain) / min(plain) - 1, 3),
        "spread_watched": round(max(watched) / min(watched) - 1, 3),
        # the per-step statistics alone (check_every=0), the third arm of each round
        "statistics_seconds": [round(s, 2) for s in statistics_only],
        "statistics_overhead": round(min(statistics_only) / min(plain), 4),
        # the statistics' share of the watched run as the Monitor timed it for its budget
        "statistics_share_timed": round(run["statistics_seconds"] / run["seconds"], 4),
        "points": run["points"],
        "full_checks": run["full_checks"],
        "points_per_1000_steps": round(1000 * len(run["points"]) / steps, 1),
        "largest_gap_after_200": gaps_after(run["points"], 200, steps),
        # the readings' own share of the watched run, from their timed seconds (free of the machine's noise)
        "readings_share": round((sum(run["check_seconds"]) + sum(run["reading_seconds"])) / run["seconds"], 4),
        "full_check_steps": [round(s / step_seconds, 1) for s in run["check_seconds"]],
        "tracking_reading_steps": [round(s / step_seconds, 1) for s in run["reading_seconds"]],
        "failed": run["failed"],
        "resumed_at": steps // 2,
        "resumed_points": [p for p in resumed["points"] if p >= steps // 2],
        "largest_gap_after_resume": gaps_after(resumed["points"], steps // 2, steps),
    }
    print(
        f"{name}: {steps} steps, overhead {row['overhead']:.3f}x (fastest of {pairs} each; the rounds' own ratios: "
        f"median {row['overhead_paired']:.3f}x; spread {row['spread_plain']:.0%} "
        f"plain, {row['spread_watched']:.0%} watched; the readings themselves {row['readings_share']:.1%} of the run, the "
        f"per-step statistics alone {row['statistics_overhead']:.3f}x, timed by the Monitor "
        f"{row['statistics_share_timed']:.1%}); "
        f"{len(run['points'])} curvature points "
        f"({row['points_per_1000_steps']} per 1,000 steps, {len(run['full_checks'])} full checks), largest gap after "
        f"step 200: {row['largest_gap_after_200']} steps; after a resume at {steps // 2}: largest gap "
        f"{row['largest_gap_after_resume']}; full check {row['full_check_steps']} steps, tracking reading "
        f"{sorted(row['tracking_reading_steps'])[len(row['tracking_reading_steps']) // 2] if row['tracking_reading_steps'] else '-'} "
        "steps (median)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "gpt"], choices=["cnn", "gpt"])
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="steps per model (default 3000 CNN, 1000 GPT)")
    parser.add_argument("--pairs", type=int, default=3, help="rounds per model, each of the three arms side by side")
    parser.add_argument("--block", type=int, default=250, help="steps each arm takes in its turn within a round")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1: steadier on a shared machine)")
    parser.add_argument(
        "--product-parts", default="auto", type=lambda value: value if value == "auto" else int(value),
        help="the Monitor's product_parts ('auto', the default: the whole batch on a CPU, 4 parts on an accelerator)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    defaults = {"cnn": 3000, "gpt": 1000}
    steps = args.steps or [defaults[name] for name in args.models]
    rows = [measure(name, n, args.pairs, args.block, device, args.product_parts) for name, n in zip(args.models, steps)]
    save_report(args.out or Path(__file__).parent / "results" / f"cadence-{device.type}.json", device, device.type, rows)


if __name__ == "__main__":
    main()
