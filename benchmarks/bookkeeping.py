"""Lanczos' own bookkeeping against its products, and a proven check against PyHessian, side by side.

On the digits MLP of `peers.py` (26 k parameters, products of a few milliseconds on a CPU, so that
whatever the solver does between products shows):

* the bookkeeping per Lanczos step (everything but the product: recurrence, reorthogonalisation,
  the tridiagonal's eigenpairs, the bounds) as a fraction of one product, from the same runs: the
  wall time of a run less the wall time spent inside its products, over its steps;
* the wall time of a proven lambda_max (``tol=1e-3``) cold, and warm 10 SGD steps later, against
  PyHessian's power iteration at the tolerance that reaches the same accuracy (1e-3 against a
  120-step reference, searched from loose to tight), with hessdiag's default ``hvp_method="auto"``
  (its cross-check included) and with ``"double_backward"`` (PyHessian's own product).

The methods run interleaved, `--repeats` times; medians are reported (the machine may be shared). On
a CPU torch runs on `--threads` threads (default 1: on a shared machine a second thread mostly waits
for a busy core, which inflates every small operation alike).

    pip install pyhessian==0.1
    python benchmarks/bookkeeping.py

Writes benchmarks/results/bookkeeping-<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _report import save_report
from peers import TARGET, errors, make_problem, reference, run_pyhessian, timed, train_steps

import hessdiag
from hessdiag.lanczos import lanczos
from hessdiag.operator import HessianOperator

PYHESSIAN_TOLS = (1e-3, 1e-4, 1e-5, 1e-6)


def bookkeeping(problem, repeats: int, v0=None) -> dict:
    """Median product time and median bookkeeping per step (run time less product time, per step)."""
    products, steps, per_step = [], [], []
    with HessianOperator(problem.model, problem.loss_fn, problem.batch, method="double_backward") as operator:
        inside = [0.0]

        def matvec(v: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            product = operator.matvec(v)
            seconds = time.perf_counter() - start
            inside[0] += seconds
            products.append(seconds)
            return product

        for _ in range(repeats):
            inside[0] = 0.0
            run, seconds = timed(
                lambda: lanczos(matvec, operator.dim, which="top", tol=TARGET, v0=v0, device=operator.device, dtype=operator.dtype)
            )
            steps.append(run.num_iterations)
            per_step.append((seconds - inside[0]) / run.num_iterations)
    product, step = statistics.median(products), statistics.median(per_step)
    return {"product_s": product, "bookkeeping_per_step_s": step, "fraction_of_product": step / product, "steps": statistics.median(steps)}


def pyhessian_tol(problem, ref) -> float:
    """The loosest PyHessian tolerance that reaches `TARGET` (same seeded start as the timed runs)."""
    for tol in PYHESSIAN_TOLS:
        torch.manual_seed(0)
        value, _, _ = run_pyhessian(problem, "top", tol)
        if errors(value, "top", ref) <= TARGET:
            return tol
    return PYHESSIAN_TOLS[-1]


def side_by_side(problem, ref, repeats: int, v0=None) -> tuple[dict, dict]:
    """Interleaved timings of hessdiag (auto, double_backward) and PyHessian at equal accuracy."""
    tol = pyhessian_tol(problem, ref)
    times: dict[str, list[float]] = {"hessdiag_auto": [], "hessdiag_double_backward": [], "pyhessian": []}
    outcome: dict[str, dict] = {}
    last = None
    for _ in range(repeats):
        for method in ("auto", "double_backward"):
            result, seconds = timed(
                lambda: hessdiag.hessian_eigenvalues(problem.model, problem.loss_fn, problem.batch, which="top", tol=TARGET, v0=v0, hvp_method=method)
            )
            times[f"hessdiag_{method}"].append(seconds)
            outcome[f"hessdiag_{method}"] = {"hvps": result.num_hvps, "error": errors(result.lambda_max, "top", ref)}
            last = result
        torch.manual_seed(0)
        (value, hvps, _), seconds = timed(lambda: run_pyhessian(problem, "top", tol))
        times["pyhessian"].append(seconds)
        outcome["pyhessian"] = {"hvps": hvps, "error": errors(value, "top", ref), "tol": tol}
    for name, runs in times.items():
        outcome[name]["seconds"] = statistics.median(runs)
    for method in ("auto", "double_backward"):
        outcome[f"hessdiag_{method}"]["speed_vs_pyhessian"] = outcome["pyhessian"]["seconds"] / outcome[f"hessdiag_{method}"]["seconds"]
    return outcome, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    problem = make_problem("mlp", device)
    ref = reference(problem, 120)
    row: dict = {"model": "mlp", "params": sum(p.numel() for p in problem.model.parameters()), "repeats": args.repeats}
    row["cold"], previous = side_by_side(problem, ref, args.repeats)
    row["bookkeeping_cold"] = bookkeeping(problem, args.repeats)
    train_steps(problem, args.lr)
    ref = reference(problem, 120)
    row["warm"], _ = side_by_side(problem, ref, args.repeats, v0=previous)
    row["bookkeeping_warm"] = bookkeeping(problem, args.repeats, v0=previous.warm_start())
    for phase in ("cold", "warm"):
        book = row[f"bookkeeping_{phase}"]
        print(f"{phase}: product {book['product_s'] * 1e3:.2f} ms, bookkeeping {book['bookkeeping_per_step_s'] * 1e6:.0f} us "
              f"per step = {book['fraction_of_product']:.1%} of a product ({book['steps']:.0f} steps)")  # fmt: skip
        for name, entry in row[phase].items():
            speed = f", {entry['speed_vs_pyhessian']:.2f}x PyHessian's speed" if "speed_vs_pyhessian" in entry else ""
            print(f"  {name:26s} {entry['hvps']:3d} HVPs, error {entry['error']:.1e}, {entry['seconds'] * 1e3:7.1f} ms{speed}")
    save_report(args.out or f"benchmarks/results/bookkeeping-{device.type}.json", device, device.type, [row], target=TARGET)


if __name__ == "__main__":
    main()
