"""How close the curvature readings of a run at the defaults come to the sharpness they bound.

For the CNN (SGD with momentum) and the small GPT (AdamW) of ``benchmarks/cadence.py``, trained with
``Monitor(model, loss_fn, optimizer=...)`` at its defaults: right after every reading, the same
step's sharpness on the same batch and parameters, converged (Lanczos to `--tol`, outside the
Monitor: its readings never see it). The sharpness is the one the edge-of-stability rule compares
with its threshold and the readings bound: lambda_max of the Hessian under SGD, lambda_max of the
preconditioned ``D H D`` under AdamW. Each reading's proven lower bound is checked against it (a
bound above the converged value plus its error bound is a broken promise, counted) and reported
as a fraction of it: how much of the sharpness the logged curve shows. With `--trackers`, beside the
Monitor's readings, trackers of their own (one chain of vectors each) read the same steps with Krylov
spaces of the given numbers of products, from a cold Krylov space at the first reading: what another
size of reading would show on the same trajectory. With `--same-start`, Krylov spaces of other sizes
read from the very vector the first tracker reads (before its reading moves it): other sizes of
reading from the same vectors.

    python benchmarks/tracking.py                          # CNN 3,000 steps, GPT 1,000 steps
    python benchmarks/tracking.py --steps 3000 3000        # the figures in docs/benchmarks.md
    python benchmarks/tracking.py --models cnn --steps 1500 --trackers 1 2 3
    python benchmarks/tracking.py --models cnn --steps 3000 --trackers 2 --same-start 3   # 2 and 3 products, same vectors

Writes benchmarks/results/tracking-<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import save_report  # noqa: E402
from cadence import problem  # noqa: E402

import hessdiag  # noqa: E402
from hessdiag.check.quantities.stability import stability_diagonal, stability_rule  # noqa: E402
from hessdiag.check.tracking import COLD_KRYLOV_STEPS, ritz_bound  # noqa: E402
from hessdiag.lanczos import lanczos  # noqa: E402
from hessdiag.vectors import random_generator, random_unit_vector  # noqa: E402


def converged_sharpness(
    model, loss_fn, batch, optimizer, tol: float, trackers: dict, same_start: tuple[int, ...] = ()
) -> tuple[float, float, dict]:
    """(the sharpness the readings bound, its proven error bound, each tracker's lower bound) at the
    current parameters on `batch`: lambda_max of H, or of D H D under a preconditioned stability rule
    (AdamW). `trackers`: products per reading -> the vector that tracker follows (None: a cold start),
    moved here by its reading. `same_start`: sizes of Krylov spaces read from the vector the first
    tracker reads, before its reading moves it (keys "<size>@<first>"), none of them moving it."""
    with hessdiag.HessianOperator(model, loss_fn, batch, method="double_backward") as operator:
        rule = stability_rule(optimizer, operator)
        scale = getattr(rule, "scale", None)
        if scale is None:
            matvec = operator.matvec
        else:
            def matvec(v):
                return scale * operator.matvec(scale * v)
        run = lanczos(matvec, operator.dim, which="top", tol=tol, max_iter=300, device=operator.device, dtype=operator.dtype)
        found = stability_diagonal(optimizer, operator)
        diagonal = None if not isinstance(found, tuple) else found[1]
        lower = {}
        first = next(iter(trackers), None)
        if first is not None and trackers[first] is not None:
            for size in same_start:
                lower[f"{size}@{first}"] = ritz_bound(operator, trackers[first], diagonal, size).lower_bound
        for products, vector in trackers.items():
            if vector is None:
                generator = random_generator(0, None, operator.device)
                vector = random_unit_vector(operator.size, generator, operator.device, operator.dtype, None)
            reading = ritz_bound(operator, vector, diagonal, products if trackers[products] is not None else COLD_KRYLOV_STEPS)
            trackers[products], lower[products] = reading.next_vector, reading.lower_bound
        return float(run.top[0]), float(run.top_error_bounds[0]), lower


def check_lower_bound(check) -> float:
    """A full check's proven lower bound on the same sharpness: its top Ritz value of D H D under a
    preconditioned rule (interlacing), else lambda_max less its error bound."""
    stability = check.values.get("stability")
    if getattr(stability, "scale", None) is not None:
        return stability.sharpness
    return check.lambda_max - check.error_bound_max


def measure(
    name: str, steps: int, tol: float, device: torch.device, tracker_sizes: list[int], same_start: tuple[int, ...] = ()
) -> dict:
    """Train `name` for `steps` steps at the Monitor's defaults; each reading against the converged value."""
    model, optimizer, loss_fn, batch = problem(name, device)
    trackers = {products: None for products in tracker_sizes}
    monitor = hessdiag.Monitor(model, loss_fn, optimizer=optimizer)
    seen_readings = seen_checks = 0
    points = []
    for step in range(steps):
        data = batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, data)
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(data, loss)
        fresh = [("tracking", r.step, r.sharpness_lower_bound) for r in monitor.readings[seen_readings:]]
        fresh += [("check", c.step, check_lower_bound(c)) for c in monitor.checks[seen_checks:]]
        seen_readings, seen_checks = len(monitor.readings), len(monitor.checks)
        for kind, at, lower in fresh:
            value, bound, others = converged_sharpness(model, loss_fn, data, optimizer, tol, trackers, same_start)
            points.append({"kind": kind, "step": at, "lower_bound": lower, "converged": value, "error_bound": bound,
                           "trackers": {str(k): v for k, v in others.items()}})  # fmt: skip
            shown = "".join(f"  {k} products {v / value:.3f}" for k, v in others.items())
            print(f"{name} step {at:5d} {kind:8s} lower bound {lower:10.4g}  converged {value:10.4g} "
                  f"(+-{bound:.1e})  fraction {lower / value:.3f}{shown}", flush=True)  # fmt: skip
    monitor.close()
    tracking = [p["lower_bound"] / p["converged"] for p in points if p["kind"] == "tracking" and p["converged"] > 0]
    later = [p["lower_bound"] / p["converged"] for p in points if p["kind"] == "tracking" and p["step"] > 200 and p["converged"] > 0]
    return {
        "model": name,
        "steps": steps,
        "tol": tol,
        "points": points,
        "broken": sum(p["lower_bound"] > p["converged"] + p["error_bound"] for p in points),
        "fraction_median": statistics.median(tracking) if tracking else None,
        "fraction_min": min(tracking) if tracking else None,
        "fraction_median_after_200": statistics.median(later) if later else None,
        "fraction_min_after_200": min(later) if later else None,
        "trackers_after_200": {
            k: [round(p["trackers"][k] / p["converged"], 3) for p in points if p["step"] > 200 and p["converged"] > 0 and k in p["trackers"]]
            for k in [str(size) for size in tracker_sizes] + [f"{size}@{tracker_sizes[0]}" for size in same_start if tracker_sizes]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "gpt"], choices=["cnn", "gpt"])
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="steps per model (default 3000 CNN, 1000 GPT)")
    parser.add_argument("--tol", type=float, default=1e-5, help="relative tolerance of the converged sharpness")
    parser.add_argument("--trackers", type=int, nargs="*", default=[], help="products per reading of extra trackers")
    parser.add_argument("--same-start", type=int, nargs="*", default=[],
                        help="also Krylov spaces of these numbers of products from the vector the first tracker reads")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or [{"cnn": 3000, "gpt": 1000}[name] for name in args.models]
    rows = [measure(name, n, args.tol, device, args.trackers, tuple(args.same_start)) for name, n in zip(args.models, steps)]
    for row in rows:
        share = {key: "-" if row[key] is None else f"{row[key]:.3f}" for key in row if key.startswith("fraction")}
        print(f"{row['model']}: {len(row['points'])} readings, broken bounds {row['broken']}; tracking lower bound / "
              f"converged sharpness: median {share['fraction_median']}, min {share['fraction_min']} "
              f"(after step 200: median {share['fraction_median_after_200']}, min {share['fraction_min_after_200']})")  # fmt: skip
        for k, fractions in row["trackers_after_200"].items():
            size, _, chain = k.partition("@")
            what = f"{size} products from the {chain}-product tracker's vector" if chain else f"a tracker of {size} products"
            print(f"  {what}, after step 200: median {statistics.median(fractions):.3f}, min {min(fractions):.3f}, "
                  f"max {max(fractions):.3f}" if fractions else f"  {what}: no reading after step 200")  # fmt: skip
    save_report(args.out or Path(__file__).parent / "results" / f"tracking-{device.type}.json", device, device.type, rows)


if __name__ == "__main__":
    main()
