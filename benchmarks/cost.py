"""What a curvature check costs a training run, in that run's own training steps.

For torchvision's ResNet-18 (no weights, small images) and a small GPT, in one process, side by side:
the median time of a training step (forward, backward, AdamW), then one cold check (lambda_max and
lambda_min, ``tol=1e-3``, random start) and one warm check (three steps later, from the cold check's
Ritz vectors), each in units of a step, with exact (double backward) and finite-difference products;
the peak memory of a check against a step's; and the largest ``sub_batch`` at which a warm check costs
at most three steps, with the relative difference of its lambda_max from the full batch's. With
``--fsdp2`` the same model is also sharded by FSDP2 over two gloo processes (blocks, then the root),
where the products are finite differences.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before; on a CPU
the process's resident-set high-water mark (``getrusage``) above the resident set before the first
step. The high-water mark never goes down, so a CPU check's figure is max(step, check): a ratio of
1.0 there means "at most a step's". Times are single medians beside each other in one process; on a
CPU torch runs on `--threads` threads (default 1, and 1 per FSDP2 process).

    python benchmarks/cost.py                 # CPU sizes (GPU sizes on CUDA)
    python benchmarks/cost.py --fsdp2         # and two gloo processes (CPU)
    python benchmarks/cost.py --quick         # fewer sizes: a few minutes on one GPU
    python benchmarks/cost.py --readings      # only the Monitor's kinds of reading (below)
    python benchmarks/cost.py --readings --accumulate 4   # those under gradient accumulation
    python benchmarks/cost.py --readings --product-parts 1   # those with products on the whole batch

The Monitor's kinds of reading, at its defaults (AdamW): a cold tracking reading (the first of a run:
a six-step Krylov space from a random vector, and the cross-check of "auto"), a cold full check (both
ends, the preconditioned sharpness, the cross-check of "auto", the noise scale), a warm full check of
the top end only (what the "auto" schedule runs while no detector needs the bottom end), a warm full
check of both ends, and a tracking reading (one or two products from the tracked top vector, see
hessdiag.check.tracking), each in training steps (timed in this process, a step beside each) and in
peak memory against a step's peak. On CUDA the allocator's peak; on a CPU each kind, and a step, runs
in a fresh process from the parent's trained state (parameters, AdamW state, warm-start vectors),
its peak taken as what a step holds throughout (parameters, optimizer state, batch) plus the growth
of the C allocator's bytes in use during it (glibc's mallinfo2, sampled every 0.2 ms; the resident
set where mallinfo2 is missing, which also counts code pages an op loads the first time it runs).
One more kind: a tracking reading with ``hvp_method="forward_over_reverse"`` (no gradient graph
held between products), to measure whether graph-free products hold less than double backward's
graph (on the CPU sizes they hold more, and take longer). With ``--accumulate k`` each step accumulates
k micro-batches of the batch and the readings measure the step's ``hessdiag.MicroBatches``: a step's
peak is then a micro-batch's, and so should a reading's be (products one micro-batch at a time).
``--product-parts`` sets the Monitor's ``product_parts`` (default 4, what the Monitor's "auto" takes on
an accelerator: products on parts of the batch where the loss allows, one part's graph at a time;
ResNet-18's BatchNorm keeps the whole batch). On CUDA each reading's probe is told the step's peak,
as a Monitor attached from the first step reads it from the allocator before its first reading (here
the counter is reset before each reading to measure that reading): a full check's Lanczos basis fills
the device up to it and spills the rest to host memory (hessdiag.check.footprint).

Writes benchmarks/results/cost-<device>.json (with --readings: cost-readings-<device>.json, with
-accumulate<k> and -parts<n> where those differ from 1 and 4).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _report import save_report  # noqa: E402
from models import GPT, classification_loss, image_batch, next_token_loss, token_batch  # noqa: E402

import hessdiag  # noqa: E402
from hessdiag.errors import HessdiagError, NonSmoothLossError  # noqa: E402

SIZES = {
    "cpu": {"resnet18": {"image": 32, "batch": 16}, "gpt": {"d": 128, "layers": 2, "heads": 4, "context": 64, "batch": 16}},
    "gpu": {"resnet18": {"image": 64, "batch": 128}, "gpt": {"d": 768, "layers": 12, "heads": 12, "context": 256, "batch": 32}},
    "quick": {"resnet18": {"image": 32, "batch": 128}, "gpt": {"d": 384, "layers": 6, "heads": 6, "context": 256, "batch": 32}},
}
STEPS_PER_CHECK = 3


def problem(name: str, config: dict, device: torch.device):
    """(model, loss_fn, batch) for `name` at `config`, seeded."""
    torch.manual_seed(0)
    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=10).to(device)
        images, labels = image_batch(config["batch"], device)
        size = config["image"]
        images = torch.nn.functional.interpolate(images, size=(size, size)) if images.shape[-1] != size else images
        return model, classification_loss, (images, labels)
    model = GPT(d=config["d"], layers=config["layers"], heads=config["heads"], context=config["context"]).to(device)
    return model, next_token_loss, token_batch(config["batch"], config["context"], 512, device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """Peak memory above a baseline: CUDA allocator statistics, or the CPU process's RSS high-water."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def micro_batches(batch: tuple, count: int):
    """`batch` cut into `count` equal micro-batches (a ``hessdiag.MicroBatches``), or itself for 1."""
    if count == 1:
        return batch
    return hessdiag.MicroBatches(zip(*(t.chunk(count) for t in batch)))


def train_step(model, loss_fn, optimizer, batch) -> None:
    """One optimizer step on `batch`; on a MicroBatches, with the gradients of its micro-batches accumulated."""
    optimizer.zero_grad(set_to_none=True)
    if isinstance(batch, hessdiag.MicroBatches):
        for micro in batch:
            (loss_fn(model, micro) / len(batch)).backward()
    else:
        loss_fn(model, batch).backward()
    optimizer.step()


class Run:
    """A model in training: its steps (timed) and checks on its batch (timed, in steps). `check_batch`:
    what its steps train on and its readings measure (the batch, or its micro-batches)."""

    def __init__(self, model, loss_fn, batch, device: torch.device, accumulate: int = 1) -> None:
        self.model, self.loss_fn, self.batch, self.device = model, loss_fn, batch, device
        self.check_batch = micro_batches(batch, accumulate)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.memory = Memory(device)
        self.step_times: list[float] = []
        self.memory.start()
        for _ in range(2):  # the first step allocates AdamW's state
            self.step()
        self.step_peak = self.memory.peak()

    def step(self) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        train_step(self.model, self.loss_fn, self.optimizer, self.check_batch)
        synchronize(self.device)
        self.step_times.append(time.perf_counter() - start)

    def check(self, method: str, v0=None, sub_batch: int | None = None) -> tuple[dict, object]:
        batch = self.batch if sub_batch is None else tuple(t[:sub_batch] for t in self.batch)
        self.memory.start()
        synchronize(self.device)
        start = time.perf_counter()
        result = hessdiag.hessian_eigenvalues(self.model, self.loss_fn, batch, which="both", v0=v0, hvp_method=method)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        self.step()  # a step beside each check: the step time is a median over the same period
        step = statistics.median(self.step_times[1:])
        entry = {"seconds": seconds, "in_steps": seconds / step, "hvps": result.num_hvps, "converged": result.converged,
                 "lambda_max": result.lambda_max, "lambda_min": result.lambda_min,
                 "peak_over_step_peak": self.memory.peak() / self.step_peak}  # fmt: skip
        return entry, result


def measure(run: Run, methods: tuple[str, ...], sub_batches: bool) -> dict:
    row: dict = {}
    for method in methods:
        try:
            cold, previous = run.check(method)
        except NonSmoothLossError as error:  # finite differences on ReLU networks: refused, with the reason
            row[method] = {"refused": str(error).split(":")[0]}
            continue
        for _ in range(STEPS_PER_CHECK):
            run.step()
        warm, current = run.check(method, v0=previous)
        row[method] = {"cold": cold, "warm": warm}
    if sub_batches:
        full = current.lambda_max
        size, row["sub_batch"] = run.batch[0].shape[0], []
        while size > 1:
            size //= 2
            try:
                entry, _ = run.check(methods[-1], v0=current, sub_batch=size)
            except HessdiagError as error:  # e.g. BatchNorm on one sample: no training-mode loss there
                row["sub_batch"].append({"sub_batch": size, "refused": str(error).split(". ")[0]})
                break
            entry["sub_batch"] = size
            entry["lambda_max_relative_difference"] = abs(entry["lambda_max"] - full) / abs(full)
            row["sub_batch"].append(entry)
            if entry["in_steps"] <= STEPS_PER_CHECK:
                break
    row["step_seconds"] = statistics.median(run.step_times[1:])
    row["step_peak_bytes"] = run.step_peak
    return row


def fsdp2_worker(rank: int, name: str, config: dict, init: str, out: str) -> None:
    """One of two gloo processes: the model sharded by FSDP2 (blocks, then the root), half the batch each."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard

        model, loss_fn, batch = problem(name, config, torch.device("cpu"))
        blocks = model.blocks if name == "gpt" else [model.layer1, model.layer2, model.layer3, model.layer4]
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        half = batch[0].shape[0] // 2
        local = tuple(t[rank * half : (rank + 1) * half] for t in batch)
        row = measure(Run(model, loss_fn, local, torch.device("cpu")), ("finite_difference",), sub_batches=False)
        if rank == 0:
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def fsdp2_row(name: str, config: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "row.json")
        mp.spawn(fsdp2_worker, args=(name, config, os.path.join(folder, "init"), out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


READING_KINDS = ("tracking_cold", "full_cold", "full_warm_top", "full_warm_both", "tracking", "tracking_forward_over_reverse")


def reading_probe(model, loss_fn, kind: str, starts: dict | None, product_parts: int, training_peak: int = 0):
    """The probe a reading of `kind` runs on: the defaults but `product_parts`, and forward-over-reverse
    products for ``tracking_forward_over_reverse``; warm from `starts` (a probe's ``starts.state_dict()``)
    unless None; `training_peak`: the run's peak device memory in bytes, as a Monitor learns it."""
    from hessdiag.check.probe import CurvatureProbe
    from hessdiag.settings import DiagnosticsSettings

    forward = kind == "tracking_forward_over_reverse"
    settings = DiagnosticsSettings(hvp_method="forward_over_reverse" if forward else "auto", product_parts=product_parts)
    probe = CurvatureProbe(model, loss_fn, settings)
    probe.footprint.saw(training_peak)
    if starts is not None:
        probe.starts.load_state_dict(starts)
        probe.num_checks = 1
        if forward:
            probe.starts.method = None  # the method asked for, not the one the vectors were found with
    return probe


def reading(run: Run, kind: str, probe) -> dict:
    """One reading of `kind` by `probe` on `run`'s batch: its time in steps (a step beside it), products
    and, for a full check, where its Lanczos basis lived."""
    synchronize(run.device)
    start = time.perf_counter()
    where = {}
    if kind.startswith("tracking"):
        products = probe.track(100, run.check_batch, run.optimizer).num_hvps
    else:
        check = probe.run(100, run.check_batch, run.optimizer, bottom=kind != "full_warm_top")
        products, where = check.num_hvps, {"basis": check.basis}
    synchronize(run.device)
    seconds = time.perf_counter() - start
    run.step()
    step = statistics.median(run.step_times[1:])
    return {"in_steps": seconds / step, "hvps": products, "seconds": seconds, **where}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _allocated_bytes() -> Callable[[], int]:
    """What the process holds: the C allocator's bytes in use (glibc's ``mallinfo2``: heap chunks in
    use plus mapped blocks, where torch's CPU tensors live), else the resident set (which also
    counts code pages loaded the first time an op runs, and memory the allocator keeps after a free)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class MemoryPeak:
    """The process's allocated bytes (:func:`_allocated_bytes`) sampled every 0.2 ms on a thread:
    their peak above where they stood at :meth:`__enter__`."""

    def __enter__(self) -> MemoryPeak:
        import threading

        self._read = _allocated_bytes()
        self.start = self.peak = self._read()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def _sample(self) -> None:
        while not self._done.wait(0.0002):
            self.peak = max(self.peak, self._read())


def tensor_bytes(*groups) -> int:
    """Bytes of the tensors in `groups` (parameters, optimizer state, batch): what a step holds throughout."""
    total = 0
    for group in groups:
        for value in group:
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                total += tensor_bytes(value.values())
    return total


def memory_worker(name: str, config: dict, accumulate: int, product_parts: int, kind: str, state_file: str, out: str) -> None:
    """A fresh process from the parent's trained state (parameters, AdamW state, warm-start vectors):
    the allocated bytes' growth during one step, or one reading of `kind`, with nothing run before it."""
    torch.set_num_threads(1)
    model, loss_fn, batch = problem(name, config, torch.device("cpu"))
    check_batch = micro_batches(batch, accumulate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = torch.load(state_file)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    probe = reading_probe(model, loss_fn, kind, None if kind in ("full_cold", "tracking_cold") else state["starts"], product_parts)
    with MemoryPeak() as peak:
        if kind == "step":
            train_step(model, loss_fn, optimizer, check_batch)
        elif kind.startswith("tracking"):
            probe.track(100, check_batch, optimizer)
        else:
            probe.run(100, check_batch, optimizer, bottom=kind != "full_warm_top")
    held = tensor_bytes(model.parameters(), optimizer.state.values(), batch)
    Path(out).write_text(json.dumps({"growth": peak.growth, "held": held}))


def reading_memory(name: str, config: dict, accumulate: int, product_parts: int, run: Run, probe) -> dict:
    """Peak memory of each kind against a step's on a CPU, each in a fresh process (see
    :func:`memory_worker`): what the step holds throughout (parameters, optimizer state, batch) plus
    the allocated bytes' growth during the step or the reading."""
    peaks = {}
    with tempfile.TemporaryDirectory() as folder:
        state_file, out = os.path.join(folder, "state.pt"), os.path.join(folder, "row.json")
        state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "starts": probe.starts.state_dict()}
        torch.save(state, state_file)
        for kind in ("step", *READING_KINDS):
            Path(out).unlink(missing_ok=True)  # a failed worker must not leave the last kind's figure
            worker = mp.get_context("spawn").Process(target=memory_worker, args=(name, config, accumulate, product_parts, kind, state_file, out))
            worker.start()
            worker.join()
            if worker.exitcode != 0:
                raise RuntimeError(f"the memory worker for {name} {kind} failed (exit code {worker.exitcode})")
            measured = json.loads(Path(out).read_text())
            peaks[kind] = measured["held"] + measured["growth"]
    return {kind: peaks[kind] / peaks["step"] for kind in READING_KINDS}


def reading_costs(name: str, config: dict, device: torch.device, accumulate: int = 1, product_parts: int = 4) -> dict:
    """Each kind of reading's cost (see the module docstring); under gradient accumulation over
    `accumulate` micro-batches of the batch where more than 1; products on `product_parts` parts of
    the batch where the loss allows (the Monitor's setting)."""
    run = Run(*problem(name, config, device), device, accumulate)
    row = {}
    peak = run.memory.base + run.step_peak if device.type == "cuda" else 0
    probe = reading_probe(run.model, run.loss_fn, "full_cold", None, product_parts, peak)
    for kind in READING_KINDS:
        run.memory.start()
        # a cold tracking reading: its own probe, so the full checks after it still start cold
        if kind == "tracking_cold":
            row[kind] = reading(run, kind, reading_probe(run.model, run.loss_fn, kind, None, product_parts, peak))
        elif kind == "tracking_forward_over_reverse":  # from the vector the last tracking reading left
            starts = probe.starts.state_dict()
            row[kind] = reading(run, kind, reading_probe(run.model, run.loss_fn, kind, starts, product_parts, peak))
        else:
            row[kind] = reading(run, kind, probe)
        if device.type == "cuda":
            row[kind]["peak_over_step_peak"] = run.memory.peak() / run.step_peak
        for _ in range(STEPS_PER_CHECK if kind == "full_cold" else 0):
            run.step()
    if device.type == "cpu":
        for kind, ratio in reading_memory(name, config, accumulate, product_parts, run, probe).items():
            row[kind]["peak_over_step_peak"] = ratio
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "gpt"])
    parser.add_argument("--quick", action="store_true", help="GPU: smaller models (a few minutes on one GPU)")
    parser.add_argument("--fsdp2", action="store_true", help="also FSDP2 on two gloo processes (CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1: steadier on a shared machine)")
    parser.add_argument("--readings", action="store_true", help="only the Monitor's kinds of reading")
    parser.add_argument("--accumulate", type=int, default=1, help="with --readings: steps accumulate this many micro-batches of the batch")
    parser.add_argument("--product-parts", type=int, default=4, help="the Monitor's product_parts (default 4, 'auto' on an accelerator; 1: the whole batch)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    rows = []
    for name in args.models:
        config = SIZES[size][name]
        run = Run(*problem(name, config, device), device)
        row = {"model": name, "config": config, "params": sum(p.numel() for p in run.model.parameters())}
        row["readings"] = reading_costs(name, config, device, args.accumulate, args.product_parts)
        row["accumulate"], row["product_parts"] = args.accumulate, args.product_parts
        if not args.readings:
            row["dense"] = measure(run, ("finite_difference", "double_backward"), sub_batches=True)
        if args.fsdp2:
            row["fsdp2_two_gloo_processes"] = fsdp2_row(name, SIZES["cpu"][name])
        print_row(row)
        rows.append(row)
    name = "cost" if not args.readings else "cost-readings" if args.accumulate == 1 else f"cost-readings-accumulate{args.accumulate}"
    name += "" if args.product_parts == 4 else f"-parts{args.product_parts}"
    save_report(args.out or f"benchmarks/results/{name}-{device.type}.json", device, size, rows, steps_per_check=STEPS_PER_CHECK)


def print_row(row: dict) -> None:
    accumulating = f", steps of {row['accumulate']} micro-batches" if row.get("accumulate", 1) > 1 else ""
    print(f"\n== {row['model']} ({row['params']:,} parameters, {row['config']}{accumulating})")
    for kind, entry in row["readings"].items():
        basis = f", basis on the {entry['basis']}" if "basis" in entry else ""
        print(f"  Monitor reading {kind:15s}: {entry['in_steps']:6.1f} steps, {entry['hvps']:3d} HVPs, "
              f"peak memory {entry['peak_over_step_peak']:.2f}x a step's{basis}")  # fmt: skip
    for setting in ("dense", "fsdp2_two_gloo_processes"):
        if setting not in row:
            continue
        measured = row[setting]
        print(f"  {setting}: step {measured['step_seconds'] * 1e3:.1f} ms")
        for method in ("double_backward", "finite_difference"):
            for phase in ("cold", "warm"):
                entry = measured.get(method, {}).get(phase)
                if "refused" in measured.get(method, {}) and phase == "cold":
                    print(f"    {method:17s} refused: {measured[method]['refused']}")
                if entry:
                    print(f"    {method:17s} {phase}: {entry['in_steps']:6.1f} steps, {entry['hvps']:3d} HVPs, "
                          f"converged {entry['converged']}, peak memory {entry['peak_over_step_peak']:.2f}x a step's")  # fmt: skip
        for entry in measured.get("sub_batch", []):
            if "refused" in entry:
                print(f"    sub_batch {entry['sub_batch']:4d}: {entry['refused']}")
                continue
            print(f"    sub_batch {entry['sub_batch']:4d} (warm, exact): {entry['in_steps']:6.1f} steps, "
                  f"lambda_max {entry['lambda_max_relative_difference']:.1%} from the full batch's")  # fmt: skip


if __name__ == "__main__":
    main()
