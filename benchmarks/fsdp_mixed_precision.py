"""FSDP2 with MixedPrecisionPolicy(param_dtype=bfloat16): why curvature checks refuse it, in figures.

Two gloo processes on the CPU shard a tanh MLP (float32 masters) with and without the bf16 policy and
run ``hessian_eigenvalues`` (finite differences, the only products FSDP2 allows) against the dense
float64 Hessian of the union batch. The bf16 runs bypass hessdiag's refusal on purpose (that is what
is measured), once with the float32 step and once with a step sized for bfloat16 (eps^(1/3)).

    python benchmarks/fsdp_mixed_precision.py --widths 16 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed import fsdp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _report import save_report  # noqa: E402
from oracles import dense_hessian  # noqa: E402

import hessdiag.operator.finite_difference as finite_difference  # noqa: E402
import hessdiag.operator.hessian as hessian  # noqa: E402
from hessdiag import hessian_eigenvalues  # noqa: E402

PER_RANK = 8
VARIANTS = ("float32", "bf16_float32_step", "bf16_bf16_step")


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2 * PER_RANK, 6, generator=generator), torch.randint(0, 3, (2 * PER_RANK,), generator=generator)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _worker(rank: int, width: int, variant: str, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, y = make_data()
        batch = (x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK])
        model = make_model(width)
        bf16 = variant != "float32"
        policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fsdp.fully_shard(layer, mp_policy=policy)
        fsdp.fully_shard(model, mp_policy=policy)
        if bf16:  # measure what the refusal prevents
            hessian.refuse_coarse_compute = lambda *args: None
        if variant == "bf16_bf16_step":
            float32_step = finite_difference.step_size
            finite_difference.step_size = lambda params, dtype, shard=None: float32_step(params, torch.bfloat16, shard)
        start = time.perf_counter()
        row: dict = {"variant": variant, "width": width}
        try:
            result = hessian_eigenvalues(model, loss_fn, batch, tol=1e-3, max_iter=60, hvp_method="finite_difference")
            row |= {
                "lambda_max": float(result.top[0]), "lambda_min": float(result.bottom[0]),
                "bound_max": float(result.error_bounds["top"][0]), "bound_min": float(result.error_bounds["bottom"][0]),
                "converged": result.converged, "num_hvps": result.num_hvps,
            }  # fmt: skip
        except Exception as error:  # the failure is the measurement
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        row["seconds"] = time.perf_counter() - start
        masters = {name: value.full_tensor() for name, value in model.state_dict().items()}
        if rank == 0:
            reference = make_model(width).double()
            reference.load_state_dict({name: value.double() for name, value in masters.items()})

            def union(m: nn.Module, _: object) -> torch.Tensor:  # FSDP averages the ranks' mean losses
                halves = zip(x.double().split(PER_RANK), y.split(PER_RANK))
                return sum(loss_fn(m, half) for half in halves) / 2

            eigenvalues = torch.linalg.eigvalsh(dense_hessian(reference, union, None))
            row |= {"params": sum(p.numel() for p in reference.parameters()),
                    "true_max": float(eigenvalues[-1]), "true_min": float(eigenvalues[0])}  # fmt: skip
            torch.save(row, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--out", default="benchmarks/results/fsdp-mixed-precision-cpu.json")
    args = parser.parse_args()
    rows = []
    for width in args.widths:
        for variant in VARIANTS:
            folder = tempfile.mkdtemp()
            mp.spawn(_worker, args=(width, variant, f"{folder}/init", f"{folder}/row.pt"), nprocs=2, join=True)
            row = torch.load(f"{folder}/row.pt")
            rows.append(row)
            print(row, flush=True)
    save_report(args.out, torch.device("cpu"), "cpu, two gloo processes", rows)


if __name__ == "__main__":
    main()
