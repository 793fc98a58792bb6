"""Benchmark of the curvature engine: HVP cost, Lanczos iterations to 1e-3, cold and warm.

Prints, per model: HVP time / gradient time (target <= 4x), HVP peak memory / gradient peak memory
(target <= 2.5x, CUDA only), Lanczos products and seconds to lambda_max within 1e-3 (relative) and to
lambda_min within 1e-3 of the spectral norm, cold and warm (after a few training steps), and the
share of a Lanczos run spent outside HVPs and the graph build (target < 10%). Errors are against a long fully
reorthogonalised reference run. Saves the figures as JSON.

    python benchmarks/engine.py                    # CPU-sized models (or GPU-sized on a GPU)
    python benchmarks/engine.py --size gpu         # ResNet-18 batch 128, GPT d=384 T=256 batch 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _report import save_report  # noqa: E402
from models import GPT, classification_loss, image_batch, next_token_loss, resnet18_cifar, token_batch  # noqa: E402

from hessdiag import HessianOperator  # noqa: E402
from hessdiag.lanczos import lanczos  # noqa: E402

SIZES = {
    "cpu": {"resnet18": {"batch": 16}, "gpt": {"d": 128, "layers": 2, "heads": 4, "context": 64, "batch": 8}},
    "gpu": {"resnet18": {"batch": 128}, "gpt": {"d": 384, "layers": 6, "heads": 6, "context": 256, "batch": 32}},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn, device) -> int | None:
    """Peak CUDA memory above what was allocated before `fn` (None on the CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


class TimedOperator(HessianOperator):
    """Accumulates the wall time of each product (synchronised), to split a run's time."""

    hvp_seconds = 0.0
    build_seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        start = time.perf_counter()
        entered = super().__enter__()
        synchronize(self.device)
        self.build_seconds = time.perf_counter() - start
        return entered

    def matvec(self, vector):
        synchronize(self.device)
        start = time.perf_counter()
        product = super().matvec(vector)
        synchronize(self.device)
        self.hvp_seconds += time.perf_counter() - start
        return product


def estimate(model, loss_fn, batch, *, which, tol, max_iter=None, v0=None):
    """One estimate as `hessian_eigenvalues` does it, with its time split into HVPs and the rest."""
    synchronize(batch[0].device)
    start = time.perf_counter()
    with TimedOperator(model, loss_fn, batch) as operator:
        result = lanczos(
            operator.matvec, operator.dim, which=which, tol=tol, max_iter=max_iter, v0=v0,
            device=operator.device, dtype=operator.dtype,
        )  # fmt: skip
    synchronize(batch[0].device)
    total = time.perf_counter() - start
    return result, {"seconds": total, "hvp_seconds": operator.hvp_seconds, "graph_build_seconds": operator.build_seconds}


def bench_model(name, model, loss_fn, make_batch, device, args):
    batch = make_batch(0)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient():
        torch.autograd.grad(loss_fn(model, batch), params)

    vector = torch.randn(sum(p.numel() for p in params), device=device)
    row = {"model": name, "params": sum(p.numel() for p in params)}
    row["gradient_seconds"] = timed(gradient, device, args.repeats)
    with HessianOperator(model, loss_fn, batch) as operator:
        row["hvp_seconds"] = timed(lambda: operator.matvec(vector), device, args.repeats)

    def first_hvp():
        with HessianOperator(model, loss_fn, batch) as op:
            op.matvec(vector)

    row["graph_and_first_hvp_seconds"] = timed(first_hvp, device, args.repeats)
    row["hvp_over_gradient"] = row["hvp_seconds"] / row["gradient_seconds"]
    grad_peak, hvp_peak = peak_bytes(gradient, device), peak_bytes(first_hvp, device)
    row["gradient_peak_bytes"], row["hvp_peak_bytes"] = grad_peak, hvp_peak
    row["hvp_peak_over_gradient_peak"] = hvp_peak / grad_peak if grad_peak else None

    reference, _ = estimate(model, loss_fn, batch, which="both", tol=0.0, max_iter=args.reference_iter)
    lam_max, lam_min = float(reference.top[0]), float(reference.bottom[0])
    norm = max(abs(lam_max), abs(lam_min))
    row["reference"] = {"lambda_max": lam_max, "lambda_min": lam_min, "iterations": reference.num_iterations}

    def run(which, v0=None, ref=(lam_max, lam_min, norm)):
        result, cost = estimate(model, loss_fn, batch_now[0], which=which, tol=1e-3, v0=v0)
        value = float(result.top[0] if which == "top" else result.bottom[0])
        error = abs(value - (ref[0] if which == "top" else ref[1])) / (abs(ref[0]) if which == "top" else ref[2])
        return result, {
            "hvps": result.num_iterations, "seconds": cost["seconds"], "value": value, "error": error,
            "converged": result.converged,
            # Lanczos' own work (reorthogonalisation, tridiagonal solves): neither HVPs nor the graph build.
            "outside_hvp_share": 1 - (cost["hvp_seconds"] + cost["graph_build_seconds"]) / cost["seconds"],
            "graph_build_seconds": cost["graph_build_seconds"],
        }  # fmt: skip

    batch_now = [batch]
    cold_top, row["cold_lambda_max"] = run("top")
    cold_bottom, row["cold_lambda_min"] = run("bottom")

    # A few training steps, then warm starts from the previous Ritz vectors on the same batch.
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    for step in range(args.train_steps):
        optimizer.zero_grad()
        loss_fn(model, make_batch(step + 1)).backward()
        optimizer.step()
    reference, _ = estimate(model, loss_fn, batch, which="both", tol=0.0, max_iter=args.reference_iter)
    ref = (float(reference.top[0]), float(reference.bottom[0]))
    ref = (*ref, max(abs(ref[0]), abs(ref[1])))
    _, row["cold_after_training_lambda_max"] = run("top", ref=ref)
    _, row["warm_lambda_max"] = run("top", v0=cold_top.top_vectors, ref=ref)
    _, row["warm_lambda_min"] = run("bottom", v0=cold_bottom.bottom_vectors, ref=ref)
    row["reference_after_training"] = {"lambda_max": ref[0], "lambda_min": ref[1]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default=None, help="default: gpu on CUDA, else cpu")
    parser.add_argument("--models", nargs="+", default=["resnet18", "gpt"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-iter", type=int, default=120)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        config = SIZES[size][name]
        if name == "resnet18":
            model = resnet18_cifar().to(device)
            row = bench_model(name, model, classification_loss, lambda s: image_batch(config["batch"], device, s), device, args)
        else:
            model = GPT(d=config["d"], layers=config["layers"], heads=config["heads"], context=config["context"]).to(device)
            row = bench_model(
                name, model, next_token_loss, lambda s: token_batch(config["batch"], config["context"], 512, device, s), device, args
            )
        row["config"] = config
        rows.append(row)
        print_row(row)
    save_report(args.out, device, size, rows)


def print_row(row: dict) -> None:
    print(f"\n== {row['model']} ({row['params']:,} parameters, {row['config']})")
    print(f"gradient {row['gradient_seconds'] * 1e3:.1f} ms; HVP through the kept graph {row['hvp_seconds'] * 1e3:.1f} ms "
          f"= {row['hvp_over_gradient']:.2f}x (target <= 4x); graph + first HVP {row['graph_and_first_hvp_seconds'] * 1e3:.1f} ms")
    if row["hvp_peak_over_gradient_peak"] is not None:
        print(f"peak memory: gradient {row['gradient_peak_bytes'] / 2**30:.2f} GiB, HVP {row['hvp_peak_bytes'] / 2**30:.2f} GiB "
              f"= {row['hvp_peak_over_gradient_peak']:.2f}x (target <= 2.5x)")
    print(f"reference ({row['reference']['iterations']} iterations): lambda_max {row['reference']['lambda_max']:.5g}, "
          f"lambda_min {row['reference']['lambda_min']:.5g}")
    for key in ("cold_lambda_max", "cold_lambda_min", "cold_after_training_lambda_max", "warm_lambda_max", "warm_lambda_min"):
        r = row[key]
        print(f"{key:32s} {r['hvps']:3d} HVPs {r['seconds']:7.3f} s  error {r['error']:.1e}  converged {r['converged']}  "
              f"Lanczos overhead {100 * r['outside_hvp_share']:4.1f}% (+ graph build {r['graph_build_seconds']:.3f} s)")


if __name__ == "__main__":
    main()
