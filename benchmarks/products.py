"""Cost of one Hessian-vector product: finite differences against double backward.

Per model, side by side in one run: a gradient, a double-backward product through the kept graph
(math attention, as hessdiag runs it), and a central-difference product (two gradients, no graph,
attention on the kernels PyTorch picks: flash / memory-efficient on a GPU, the flash CPU kernel
here). Prints times and peak memory as ratios to a gradient. Peak memory: CUDA allocator peak on
a GPU; on the CPU (Linux) the growth of the resident-set high-water mark in a fresh process per
method (coarse: it includes allocator slack).

The finite-difference product is timed as `HessianOperator` computes it; the ReLU + BatchNorm
ResNet-18 is not smooth, so a check would refuse finite differences on it (its figure is the
cost only).

    python benchmarks/products.py                  # CPU sizes of benchmarks/engine.py
    python benchmarks/products.py --size gpu       # ResNet-18 batch 128, GPT d=384 T=256 batch 32
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _report import save_report  # noqa: E402
from engine import SIZES, peak_bytes, timed  # noqa: E402
from models import GPT, classification_loss, image_batch, next_token_loss, resnet18_cifar, token_batch  # noqa: E402

from hessdiag.operator import HessianOperator  # noqa: E402

METHODS = ("gradient", "double_backward", "finite_difference")


def build(name: str, size: str, device: torch.device):
    """The model, loss and batch of benchmarks/engine.py at `size`."""
    torch.manual_seed(0)
    config = SIZES[size][name]
    if name == "resnet18":
        return resnet18_cifar().to(device), classification_loss, image_batch(config["batch"], device, 0), config
    model = GPT(d=config["d"], layers=config["layers"], heads=config["heads"], context=config["context"]).to(device)
    return model, next_token_loss, token_batch(config["batch"], config["context"], 512, device, 0), config


class FiniteDifferenceCost(HessianOperator):
    """The operator's finite-difference product without its smoothness check (which refuses the
    ReLU ResNet): the cost of a product is the same whether or not it would be trusted."""

    def _settle_method(self) -> None:
        self.method = "finite_difference"


def product_runner(method: str, model, loss_fn, batch):
    """A context manager yielding a zero-argument callable that does one unit of `method`."""
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    vector = torch.randn(dim, device=params[0].device)
    vector /= vector.norm()
    if method == "gradient":
        return _Plain(lambda: torch.autograd.grad(loss_fn(model, batch), params))
    if method == "double_backward":
        return _Opened(HessianOperator(model, loss_fn, batch, method="double_backward"), vector)
    return _Opened(FiniteDifferenceCost(model, loss_fn, batch, method="finite_difference"), vector)


class _Plain:
    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        return self.fn

    def __exit__(self, *exc):
        return None


class _Opened:
    def __init__(self, operator: HessianOperator, vector: torch.Tensor):
        self.operator, self.vector = operator, vector

    def __enter__(self):
        self.operator.__enter__()
        return lambda: self.operator.matvec(self.vector)

    def __exit__(self, *exc):
        self.operator.__exit__(*exc)


def cpu_peak_bytes(name: str, size: str, method: str) -> int:
    """Growth of the resident-set high-water mark for one product, in a fresh process."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_cpu_peak_in_child, (name, size, method))


def _cpu_peak_in_child(name: str, size: str, method: str) -> int:
    model, loss_fn, batch, _ = build(name, size, torch.device("cpu"))
    before = _resident_high_water()
    with product_runner(method, model, loss_fn, batch) as run:
        run()
    return _resident_high_water() - before


def _resident_high_water() -> int:
    """This process's peak resident set in bytes (Linux VmHWM: unlike getrusage's ru_maxrss, it
    does not inherit the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: CPU peak memory needs Linux")


def bench(name: str, size: str, device: torch.device, repeats: int) -> dict:
    model, loss_fn, batch, config = build(name, size, device)
    row: dict = {"model": name, "config": config, "params": sum(p.numel() for p in model.parameters())}
    for method in METHODS:
        with product_runner(method, model, loss_fn, batch) as run:
            row[f"{method}_seconds"] = timed(run, device, repeats)
        if device.type == "cuda":
            def once(method=method):
                with product_runner(method, model, loss_fn, batch) as run:
                    run()

            row[f"{method}_peak_bytes"] = peak_bytes(once, device)
        else:
            row[f"{method}_peak_bytes"] = cpu_peak_bytes(name, size, method)
    for method in METHODS[1:]:
        row[f"{method}_over_gradient"] = row[f"{method}_seconds"] / row["gradient_seconds"]
        row[f"{method}_peak_over_gradient"] = row[f"{method}_peak_bytes"] / max(row["gradient_peak_bytes"], 1)
    row["finite_difference_over_double_backward"] = row["finite_difference_seconds"] / row["double_backward_seconds"]
    row["finite_difference_peak_over_double_backward"] = row["finite_difference_peak_bytes"] / max(row["double_backward_peak_bytes"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default=None, help="default: gpu on CUDA, else cpu")
    parser.add_argument("--models", nargs="+", default=["resnet18", "gpt"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/products-<cpu|gpu>.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    rows = []
    for name in args.models:
        row = bench(name, size, device, args.repeats)
        rows.append(row)
        print(
            f"{name} ({row['params']:,} parameters, {row['config']}): gradient {row['gradient_seconds'] * 1e3:.1f} ms; "
            f"double backward {row['double_backward_over_gradient']:.2f}x time, {row['double_backward_peak_over_gradient']:.2f}x peak; "
            f"finite differences {row['finite_difference_over_gradient']:.2f}x time, "
            f"{row['finite_difference_peak_over_gradient']:.2f}x peak; FD / double backward "
            f"{row['finite_difference_over_double_backward']:.2f}x time, {row['finite_difference_peak_over_double_backward']:.2f}x peak"
        )
    peak = "CUDA allocator peak" if device.type == "cuda" else "growth of the process's max RSS (fresh process per method)"
    out = args.out or f"benchmarks/results/products-{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    save_report(out, device, size, rows, peak_memory=peak)


if __name__ == "__main__":
    main()
