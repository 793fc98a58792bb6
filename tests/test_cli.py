"""`hessdiag demo` (every scenario raises exactly its flags) and `hessdiag summary`."""

import os
import re
import shlex
from types import SimpleNamespace

import pytest

from hessdiag.app.cli import main, summarize
from hessdiag.app.demo import SCENARIO_NAMES, SCENARIOS, check_table, tensorboard_command

pytest.importorskip("sklearn")


def test_the_command_offers_the_demos_scenarios_and_refuses_others(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "{" + ",".join(SCENARIOS) + "}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):
        main(["demo", "--scenario", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_demo_scenario_raises_its_flags(scenario, tmp_path, capsys):
    steps = {"healthy": 300}.get(scenario)  # the others need their full length to show the pathology
    argv = ["demo", "--scenario", scenario, "--logdir", str(tmp_path)] + (["--steps", str(steps)] if steps else [])
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    raised = set(re.findall(r"^  step +\d+  (\w+):", out, flags=re.MULTILINE))
    assert raised == set(SCENARIOS[scenario].expected)
    command = tensorboard_command(tmp_path)
    assert f"open the dashboard:  {command}" in out
    assert os.access(shlex.split(command)[0], os.X_OK)  # runs as printed, venv activated or not
    assert "it/s" not in captured.err  # no progress bar when stdout is not a terminal
    assert "lambda_max  largest Hessian eigenvalue" in out  # the table's legend
    summary = summarize(tmp_path)
    assert len(summary) == 1 and {flag.name for flag in summary[0].flags} == raised
    if scenario != "exploding":  # there the loss is inf before the first check
        assert summary[0].lambda_max is not None and summary[0].checks > 0


def test_summary_prints_trajectories_and_flags(tmp_path, capsys):
    main(["demo", "--scenario", "saddle", "--logdir", str(tmp_path), "--steps", "60"])
    capsys.readouterr()
    assert main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run: saddle/version_0" in out
    assert re.search(r"lambda_min: start -\d", out)
    assert "flag saddle: raised at step 20, still raised at the end" in out and "certified negative curvature" in out
    assert re.search(r"checks: 3, \d+ HVPs", out)
    assert re.search(r"top direction lies mostly in: `net\.\d+` \d+%", out)  # from the layer-shares records


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "No TensorBoard event files under"),
        (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "is not a TensorBoard event file"),
    ],
)
def test_summary_errors(tmp_path, capsys, make, message):
    assert main(["summary", str(make(tmp_path))]) == 2
    assert message in capsys.readouterr().err


def test_summary_of_a_damaged_event_file(tmp_path, capsys):
    (tmp_path / "events.out.tfevents.123.host").write_bytes(b"\x00garbage" * 10)
    assert main(["summary", str(tmp_path)]) == 0  # tensorboard's reader skips what it cannot parse
    assert "no hessdiag data (not a hessdiag run, or its event files are damaged)" in capsys.readouterr().out


def test_summary_names_a_run_once_when_logdir_names_the_scenario(tmp_path, capsys):
    main(["demo", "--scenario", "saddle", "--logdir", str(tmp_path / "saddle"), "--steps", "20"])
    capsys.readouterr()
    assert [s.run for s in summarize(tmp_path)] == ["saddle/version_0"]


def test_check_table_gives_a_failed_checks_reason_in_step_order():
    check = SimpleNamespace(
        step=20, loss=0.5, lambda_max=2.0, lambda_min=-1.0, stability_ratio=None, lr_headroom=None, num_hvps=7, seconds=0.1
    )
    monitor = SimpleNamespace(checks=[check], failed_checks=[(10, "RuntimeError: out of memory"), (30, "ValueError: nan")])
    rows = check_table(monitor).splitlines()[1:4]
    assert rows[0] == "    10  check failed: RuntimeError: out of memory"
    assert rows[1].split() == ["20", "0.5000", "2", "-1", "-", "-", "7", "0.100"]
    assert rows[2] == "    30  check failed: ValueError: nan"
    empty = SimpleNamespace(checks=[], failed_checks=[])
    assert "(no curvature check ran)" in check_table(empty)


def test_demo_path_errors_are_one_line_with_a_non_zero_exit(tmp_path, capsys):
    a_file = tmp_path / "README.md"
    a_file.write_text("not a directory")
    for logdir in (a_file, a_file / "below"):
        assert main(["demo", "--logdir", str(logdir), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hessdiag demo: error:") and "\n" not in err and str(a_file) in err


def test_summary_tells_apart_runs_written_into_one_directory(tmp_path, capsys):
    """Reruns into one log directory: each writer's event file is a run of its own, said so, instead
    of one run's curve beside the checks and products of all of them."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from hessdiag.flags import FlagEvent
    from hessdiag.reporting.tensorboard import TensorBoardWriter

    for run, checks in enumerate((2, 3)):
        summary_writer = SummaryWriter(tmp_path)
        writer = TensorBoardWriter(summary_writer)
        for check in range(1, checks + 1):
            writer.scalars(10 * check, {"hessdiag/lambda_max": float(run + check), "hessdiag/num_hvps": 10.0}, {})
        writer.events(10, [FlagEvent("saddle", 10, "onset", "warning", {"x": 1.0}, "act", f"seen in run {run}")])
        summary_writer.close()
        time.sleep(1.1)  # event file names carry the second they were opened
    summaries = summarize(tmp_path)
    assert [(s.checks, s.hvps, s.lambda_max.end[1]) for s in summaries] == [(2, 20.0, 2.0), (3, 30.0, 4.0)]
    assert [s.flags[0].evidence for s in summaries] == ["seen in run 0", "seen in run 1"]
    assert main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("event file 1 of 2 in this directory") == 1 and "event file 2 of 2" in out
