"""`hessdiag demo` (every scenario raises exactly its flags) and `hessdiag summary`."""

import re

import pytest

from hessdiag.callbacks.demo import SCENARIOS
from hessdiag.cli import SCENARIO_NAMES, main, summarize

pytest.importorskip("sklearn")


def test_scenario_names_match_the_demo():
    assert SCENARIO_NAMES == tuple(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_demo_scenario_raises_its_flags(scenario, tmp_path, capsys):
    steps = {"healthy": 300}.get(scenario)  # the others need their full length to show the pathology
    argv = ["demo", "--scenario", scenario, "--logdir", str(tmp_path)] + (["--steps", str(steps)] if steps else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    raised = set(re.findall(r"^  step +\d+  (\w+):", out, flags=re.MULTILINE))
    assert raised == set(SCENARIOS[scenario].expected)
    assert f"tensorboard --logdir {tmp_path}" in out
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
    assert "flag saddle: first step 20" in out and "certified negative curvature" in out
    assert re.search(r"checks: 3, \d+ HVPs", out)


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
