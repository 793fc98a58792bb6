"""Read a run back in Python: the summary `hessdiag summary` prints, and the raw curves as lists.

    python examples/read_run.py runs/hessdiag-demo
"""

from __future__ import annotations

import argparse

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pathlib import Path

from hessdiag.app.cli import event_directories, format_summary, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    args = parser.parse_args()
    for run in summarize(args.logdir):
        print(format_summary(run))
    # The raw curves of each run: any tag, as (step, value) pairs.
    for directory in event_directories(Path(args.logdir)):
        accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "hessdiag/lambda_max" in accumulator.Tags()["scalars"]:
            curve = [(event.step, round(event.value, 6)) for event in accumulator.Scalars("hessdiag/lambda_max")]
            print(f"{directory}: lambda_max by step: {curve}")


if __name__ == "__main__":
    main()
