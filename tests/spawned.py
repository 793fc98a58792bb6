"""Tests in two processes: a rank's process group, and Lightning's ddp_spawn.

Both meet the same teardown race. Gloo's worker threads can still be releasing the last collectives'
tensors after the ranks have finished (a barrier keeps references to the work in progress when it
started), and releasing a tensor made in Python needs the GIL. A thread that asks for the GIL while
the interpreter shuts down is ended by an unwinding that C++ cannot pass: the process aborts with
SIGABRT, "terminate called without an active exception", after it has done and saved all its work
(about 1 run in 8 of a two-process test on a loaded 2-core CPU machine, torch 2.14 with gloo).
"""

import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessExitedException


@contextlib.contextmanager
def rank_group(rank: int, world_size: int, init_file: str, timeout: timedelta | None = None) -> Iterator[None]:
    """This process as rank `rank` of a gloo group for the body; after a body that returned, the
    group is destroyed and the process leaves at once (``os._exit(0)``), without the interpreter's
    shutdown that races with gloo's threads. An exception in the body propagates, for mp.spawn to
    report."""
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, **options)
    try:
        yield
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fit_spawned(run, *fit_args, finished: list[str]) -> None:
    """``run.fit(*fit_args)`` under ddp_spawn, whose workers' exit Lightning owns.

    A worker that aborts at exit as described above is tolerated: when the signal is SIGABRT and
    every file in `finished`, written by the workers at the end of training, exists. The test then
    checks those files as usual.
    """
    try:
        run.fit(*fit_args)
    except ProcessExitedException as error:
        if error.signal_name != "SIGABRT" or not all(os.path.exists(path) for path in finished):
            raise
