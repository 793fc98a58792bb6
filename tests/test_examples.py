"""Every example runs end to end in its smoke mode (a few steps on the CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(tmp_path, script, *args):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


def test_quickstart(tmp_path):
    out = run(tmp_path, "quickstart.py", "--steps", "20", "--every", "10")
    assert out.count("certified") == 3  # three checks, each stating what is certified


def test_plain_loop(tmp_path):
    assert "last check at step 20" in run(tmp_path, "plain_loop.py", "--smoke", "--logdir", str(tmp_path / "runs"))


def test_gpt_bf16(tmp_path):
    out = run(tmp_path, "gpt_bf16.py", "--smoke", "--logdir", str(tmp_path / "runs"))
    assert "step 6: lambda_max" in out and "preconditioned sharpness" in out


def test_lightning_resnet18(tmp_path):
    run(tmp_path, "lightning_resnet18.py", "--smoke", "--logdir", str(tmp_path / "runs"))
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def test_ddp_two_cpu_processes_and_reading_the_run_back(tmp_path):
    out = run(tmp_path, "ddp.py", "--smoke", "--accelerator", "cpu", "--devices", "2", "--logdir", str(tmp_path / "runs"))
    assert "rank 0 done: 2 curvature checks" in out
    summary = run(tmp_path, "read_run.py", str(tmp_path / "runs"))
    assert "checks: 2" in summary and "lambda_max by step: [(3," in summary


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_a_usage_docstring(script):
    text = (EXAMPLES / script).read_text()
    assert text.startswith('"""') and ("python examples/" in text or script == "models.py")
