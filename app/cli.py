"""The ``hessdiag`` command: ``hessdiag demo`` and ``hessdiag summary LOGDIR``.

``summary`` reads TensorBoard event files with tensorboard's own reader, and only structured values:
scalars, the steps of entries, the JSON records of :data:`~hessdiag.reporting.tags.EVENT_RECORDS` and
:data:`~hessdiag.reporting.tags.LAYER_SHARES_RECORD`, and sentences it prints as they are; never the
dashboard's Markdown. ``demo`` runs one of the scenarios of :mod:`hessdiag.app.demo` (whose names it offers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hessdiag.app.demo import SCENARIO_NAMES, run_demo
from hessdiag.flags import FLAG_NAMES
from hessdiag.reporting.tags import (
    CHECK_FAILED,
    CHECK_SECONDS,
    EVENT_RECORDS,
    LAMBDA_MAX,
    LAMBDA_MAX_LOWER,
    RATIO_LOWER,
    TRACKING_SECONDS,
    LAMBDA_MIN,
    LAYER_SHARES_RECORD,
    LR_HEADROOM,
    MODULE_SHARPNESS_PREFIX,
    NOISE_SCALE_VERDICT,
    NUM_HVPS,
    is_hessdiag_tag,
    text_summary_tag,
)

_EVENT_FILE = "events.out.tfevents."


class SummaryError(Exception):
    """A log directory that cannot be summarised; the message says why."""


@dataclass
class Trajectory:
    """A scalar's course over a run: first and last value and the extremes, with their steps."""

    start: tuple[int, float]
    end: tuple[int, float]
    low: tuple[int, float]
    high: tuple[int, float]

    @classmethod
    def of(cls, points: list[tuple[int, float]]) -> Trajectory:
        finite = [p for p in points if math.isfinite(p[1])] or points
        return cls(points[0], points[-1], min(finite, key=lambda p: p[1]), max(finite, key=lambda p: p[1]))


@dataclass
class FlagHistory:
    """A flag's episodes, read from its events: (step raised, step cleared or None if still raised)."""

    name: str
    episodes: list[tuple[int, int | None]]
    evidence: str  # what was seen at the first onset

    @property
    def first_step(self) -> int:
        return self.episodes[0][0]


@dataclass
class RunSummary:
    """What one run's event files say."""

    run: str
    has_data: bool
    lambda_max: Trajectory | None
    lambda_min: Trajectory | None
    lambda_max_lower: Trajectory | None = None  # the proven lower bound at every reading, checks included
    ratio_lower: Trajectory | None = None  # the same for sharpness / stability threshold
    readings: int = 0  # tracking readings between the checks
    reading_seconds: float = 0.0
    flags: list[FlagHistory] = field(default_factory=list)
    checks: int = 0
    hvps: float = 0.0
    check_seconds: float = 0.0
    failed_checks: int = 0
    top_direction: list[tuple[int, str, float]] = field(default_factory=list)  # (step, module, share) per check
    lr_headroom: Trajectory | None = None
    noise_scale: str = ""  # the last check's noise scale against the batch, in a sentence
    sharpest_module: str = ""  # the last check's sharpest module (its own Hessian block), in a sentence
    session: str = ""  # with several event files in one directory: which one this is, in words


def event_files(logdir: Path) -> dict[Path, list[Path]]:
    """The event files under `logdir` by directory, in the order they were opened (their names
    start with the time), or the one file `logdir`."""
    if not logdir.exists():
        raise SummaryError(f"'{logdir}' does not exist.")
    if logdir.is_file():
        if _EVENT_FILE not in logdir.name:
            raise SummaryError(f"'{logdir}' is not a TensorBoard event file (expected a name with '{_EVENT_FILE}').")
        return {logdir.parent: [logdir]}
    files: dict[Path, list[Path]] = {}
    for path in sorted(logdir.rglob(f"{_EVENT_FILE}*")):
        if path.is_file():
            files.setdefault(path.parent, []).append(path)
    if not files:
        raise SummaryError(f"No TensorBoard event files under '{logdir}' (looked for '{_EVENT_FILE}*').")
    return dict(sorted(files.items()))


def event_directories(logdir: Path) -> list[Path]:
    """The directories holding event files under `logdir`, or that of the file `logdir`."""
    return list(event_files(logdir))


def _strings(accumulator, tag: str) -> list[tuple[int, str]]:
    """(step, string) of each entry of the string tensor `tag`, in step order."""
    if tag not in accumulator.Tags().get("tensors", []):
        return []
    entries = sorted(accumulator.Tensors(tag), key=lambda e: e.step)
    return [(e.step, e.tensor_proto.string_val[0].decode("utf-8", "replace")) for e in entries]


def texts(accumulator, tag: str) -> list[tuple[int, str]]:
    """(step, text) of each text entry of `tag`, in step order."""
    return _strings(accumulator, text_summary_tag(tag))


def records(accumulator, tag: str) -> list[tuple[int, object]]:
    """(step, value) of each JSON record of `tag` (a records-plugin tensor, or a text where the
    writer could not write one), in step order."""
    found = _strings(accumulator, tag) or texts(accumulator, tag)
    return [(step, json.loads(payload)) for step, payload in found]


def flag_histories(accumulator) -> list[FlagHistory]:
    """Each flag's episodes, from the event records (exact steps of each onset and clearance; the flag
    scalars are only sampled at read-backs), in the order of the flags' first onsets."""
    histories: dict[str, FlagHistory] = {}
    events = sorted((event for _, batch in records(accumulator, EVENT_RECORDS) for event in batch), key=lambda e: e["step"])
    for event in events:
        history = histories.get(event["name"])
        if event["kind"] == "onset":
            if history is None:
                histories[event["name"]] = FlagHistory(event["name"], [(event["step"], None)], event["summary"])
            elif history.episodes[-1][1] is not None:
                history.episodes.append((event["step"], None))
        elif history is not None and history.episodes[-1][1] is None:
            history.episodes[-1] = (history.episodes[-1][0], event["step"])
    order = {name: i for i, name in enumerate(FLAG_NAMES)}
    return sorted(histories.values(), key=lambda h: order.get(h.name, len(order)))


def top_directions(accumulator) -> list[tuple[int, str, float]]:
    """(step, module, share) of the top eigenvector's largest module at each check, from the layer
    shares records."""
    return [(step, *shares["top"][0]) for step, shares in records(accumulator, LAYER_SHARES_RECORD) if shares["top"]]


def direction_spans(points: list[tuple[int, str, float]]) -> str:
    """Consecutive checks with the same top module, as "`net.2` 64-80% (steps 20-100), then ..."."""
    spans: list[list] = []
    for step, module, share in points:
        if spans and spans[-1][0] == module:
            spans[-1][2], spans[-1][3], spans[-1][4] = step, min(spans[-1][3], share), max(spans[-1][4], share)
        else:
            spans.append([module, step, step, share, share])
    parts = []
    for module, first, last, low, high in spans:
        shares = f"{low:.0%}" if low == high else f"{low:.0%}-{high:.0%}"
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        parts.append(f"`{module}` {shares} ({steps})")
    return ", then ".join(parts)


def sharpest_module(modules: dict[str, list[tuple[int, float]]], lambda_max: dict[int, float]) -> str:
    """The sharpest own block measured at the last check that measured any (`modules`: each
    module's ``hessdiag/module_sharpness/<module>`` series), against the whole lambda_max there."""
    last = max((step for points in modules.values() for step, _ in points), default=None)
    if last is None:
        return ""
    value, module = max((value, module) for module, points in modules.items() for step, value in points if step == last)
    whole = f" of the whole {lambda_max[last]:.4g}" if last in lambda_max else ""
    return f"sharpest module alone (its own Hessian block): `{module}`, lambda_max {value:.4g}{whole} (step {last})"


def summarize(logdir: str | Path) -> list[RunSummary]:
    """One summary per run under `logdir` (or for the one file `logdir`): per directory of event
    files, and per event file where a directory holds several (runs written into the same directory,
    whose steps start again: read together, their curves and counts would mix)."""
    logdir = Path(logdir)
    summaries = []
    for directory, files in event_files(logdir).items():
        run = str(directory.relative_to(logdir)) if directory != logdir and logdir.is_dir() else str(directory)
        if len(files) == 1:
            summaries.append(summarize_run(files[0], run))
            continue
        for number, path in enumerate(files, 1):
            summary = summarize_run(path, run)
            summary.session = (
                f"event file {number} of {len(files)} in this directory ({path.name}), summarised on its own: "
                "each is one writer's session, e.g. a rerun into the same log directory"
            )
            summaries.append(summary)
    return summaries


def summarize_run(path: Path, run: str) -> RunSummary:
    """What the event file `path` says."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    try:
        accumulator.Reload()
    except Exception as error:  # tensorboard raises several kinds on a damaged file
        raise SummaryError(f"Could not read the event file '{path}': {error}") from error
    tags = set(accumulator.Tags().get("scalars", []))

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in accumulator.Scalars(tag)] if tag in tags else []

    lambda_max, lambda_min, headroom = series(LAMBDA_MAX), series(LAMBDA_MIN), series(LR_HEADROOM)
    lower, ratio_lower, reading_seconds = series(LAMBDA_MAX_LOWER), series(RATIO_LOWER), series(TRACKING_SECONDS)
    verdicts = texts(accumulator, NOISE_SCALE_VERDICT)
    modules = {tag.removeprefix(MODULE_SHARPNESS_PREFIX): series(tag) for tag in tags if tag.startswith(MODULE_SHARPNESS_PREFIX)}
    return RunSummary(
        run=run,
        has_data=any(is_hessdiag_tag(tag) for tag in tags),
        lambda_max=Trajectory.of(lambda_max) if lambda_max else None,
        lambda_min=Trajectory.of(lambda_min) if lambda_min else None,
        lambda_max_lower=Trajectory.of(lower) if lower else None,
        ratio_lower=Trajectory.of(ratio_lower) if ratio_lower else None,
        readings=len(reading_seconds),
        reading_seconds=sum(v for _, v in reading_seconds),
        flags=flag_histories(accumulator),
        checks=len(lambda_max),
        hvps=sum(v for _, v in series(NUM_HVPS)),
        check_seconds=sum(v for _, v in series(CHECK_SECONDS)),
        failed_checks=sum(1 for _, v in series(CHECK_FAILED) if v > 0),
        top_direction=top_directions(accumulator),
        lr_headroom=Trajectory.of(headroom) if headroom else None,
        noise_scale=f"{verdicts[-1][1]} (step {verdicts[-1][0]})" if verdicts else "",
        sharpest_module=sharpest_module(modules, dict(lambda_max)),
    )


def format_summary(summary: RunSummary) -> str:
    lines = [f"run: {summary.run}"] + ([f"  {summary.session}"] if summary.session else [])
    if not summary.has_data:
        return "\n".join(lines) + "\n  no hessdiag data (not a hessdiag run, or its event files are damaged)"
    if summary.lambda_max is None:
        lines.append("  no curvature checks logged")
    curves = (
        ("lambda_max", summary.lambda_max),
        ("lambda_min", summary.lambda_min),
        ("lambda_max >= (proven, every reading)", summary.lambda_max_lower),
        ("sharpness / threshold >= (proven, every reading)", summary.ratio_lower),
    )
    for label, trajectory in curves:
        if trajectory is not None:
            t = trajectory
            lines.append(
                f"  {label}: start {t.start[1]:.4g} (step {t.start[0]}), end {t.end[1]:.4g} (step {t.end[0]}), "
                f"min {t.low[1]:.4g} (step {t.low[0]}), max {t.high[1]:.4g} (step {t.high[0]})"
            )
    if summary.checks:
        lines.append(
            f"  checks: {summary.checks}, {summary.hvps:.0f} HVPs, {summary.check_seconds:.2f} s in all "
            f"({summary.check_seconds / summary.checks:.3f} s each)"
            + (f", {summary.failed_checks} failed" if summary.failed_checks else "")
        )
    if summary.readings:
        lines.append(
            f"  tracking readings between checks: {summary.readings}, {summary.reading_seconds:.2f} s in all "
            f"({summary.reading_seconds / summary.readings:.3f} s each)"
        )
    if summary.top_direction:
        lines.append(f"  top direction lies mostly in: {direction_spans(summary.top_direction)}")
    if summary.sharpest_module:
        lines.append(f"  {summary.sharpest_module}")
    if summary.lr_headroom is not None:
        t = summary.lr_headroom
        overshoot = " (below 1: the step along the gradient overshoots)" if t.low[1] < 1 else ""
        lines.append(
            f"  lr headroom along the gradient (largest stable lr / lr in use): start {t.start[1]:.3g} (step "
            f"{t.start[0]}), end {t.end[1]:.3g} (step {t.end[0]}), min {t.low[1]:.3g} (step {t.low[0]}){overshoot}"
        )
    if summary.noise_scale:
        lines.append(f"  {summary.noise_scale}")
    if not summary.flags:
        lines.append("  flags: none")
    for flag in summary.flags:
        episodes = "; ".join(
            f"raised at step {raised}, " + (f"cleared at step {cleared}" if cleared is not None else "still raised at the end")
            for raised, cleared in flag.episodes
        )
        lines.append(f"  flag {flag.name}: {episodes}")
        if flag.evidence:
            lines.append(f"    {flag.evidence}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hessdiag", description="Hessian curvature and training-health diagnostics.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small network on scikit-learn's digits with the diagnostics")
    demo.add_argument("--scenario", choices=SCENARIO_NAMES, default="healthy", help="pathology to reproduce")
    demo.add_argument("--logdir", default="runs/hessdiag-demo", help="TensorBoard log directory")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per scenario)")
    demo.add_argument("--seed", type=int, default=0)
    summary = commands.add_parser("summary", help="summarise the curvature, checks and flag events of logged runs")
    summary.add_argument("logdir", help="a log directory (searched recursively) or one event file")
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.steps is not None and args.steps < 1:
            parser.error(f"--steps must be a positive int, got {args.steps}")
        if Path(args.logdir).exists() and not Path(args.logdir).is_dir():
            print(f"hessdiag demo: error: --logdir '{args.logdir}' is a file, not a directory", file=sys.stderr)
            return 2
        try:
            return run_demo(args.scenario, args.logdir, args.steps, args.seed)
        except OSError as error:  # a log directory that cannot be created or written
            print(f"hessdiag demo: error: cannot write the run to '{args.logdir}': {error.strerror or error}", file=sys.stderr)
            return 2
    try:
        summaries = summarize(args.logdir)
    except SummaryError as error:
        print(f"hessdiag summary: error: {error}", file=sys.stderr)
        return 2
    print("\n\n".join(format_summary(s) for s in summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
