"""Overhead of hessdiag on a real training run: throughput and peak memory, with and without it.

Three arms train identical copies of the model side by side, interleaved in blocks of steps so
that drifts of the machine hit all of them alike: no diagnostics; per-step gradient statistics only
(`check_every=0`); everything at the default settings (`check_every="auto"`: curvature checks
spaced to at most 5% of the wall time, on the whole batch). Prints each arm's steps per second relative to the plain one, and on a GPU
the peak memory ratio. The Lightning callback is a thin adapter over the same `Monitor`.

    python benchmarks/overhead.py                 # CPU-sized ResNet-18 and GPT
    python benchmarks/overhead.py --size gpu      # ResNet-18 batch 128, GPT d=384 T=256 batch 32
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _report import save_report  # noqa: E402
from models import GPT, classification_loss, image_batch, next_token_loss, resnet18_cifar, token_batch  # noqa: E402

from hessdiag import Monitor  # noqa: E402

SIZES = {
    "cpu": {"resnet18": {"batch": 16}, "gpt": {"d": 128, "layers": 2, "heads": 4, "context": 64, "batch": 8}},
    "gpu": {"resnet18": {"batch": 128}, "gpt": {"d": 384, "layers": 6, "heads": 6, "context": 256, "batch": 32}},
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default=None)
    parser.add_argument("--models", nargs="+", default=["resnet18", "gpt"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--check-every", default="auto", type=lambda v: v if v == "auto" else int(v))
    parser.add_argument("--sub-batch", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    rows = []
    for name in args.models:
        config = SIZES[size][name]
        torch.manual_seed(0)
        if name == "resnet18":
            base, loss_fn = resnet18_cifar().to(device), classification_loss
            batches = [image_batch(config["batch"], device, seed=s) for s in range(8)]
        else:
            base, loss_fn = GPT(d=config["d"], layers=config["layers"], heads=config["heads"], context=config["context"]).to(device), next_token_loss
            batches = [token_batch(config["batch"], config["context"], 512, device, seed=s) for s in range(8)]
        arms = {}
        for arm in ("plain", "gradient statistics", "everything (defaults)"):
            model = copy.deepcopy(base)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            monitor = None
            if arm != "plain":
                check_every = 0 if arm == "gradient statistics" else args.check_every
                monitor = Monitor(model, loss_fn, optimizer=optimizer, check_every=check_every, sub_batch=args.sub_batch)
            arms[arm] = {"model": model, "optimizer": optimizer, "monitor": monitor, "seconds": 0.0, "peak": 0, "step": 0}
        for _ in range(0, args.steps, args.block):
            for arm, state in arms.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.block):
                    batch = batches[state["step"] % len(batches)]
                    state["optimizer"].zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        loss = loss_fn(state["model"], batch)
                    loss.backward()
                    if state["monitor"]:
                        state["monitor"].after_backward()
                    state["optimizer"].step()
                    if state["monitor"]:
                        state["monitor"].after_step(batch, loss)
                    state["step"] += 1
                synchronize(device)
                state["seconds"] += time.perf_counter() - start
                if device.type == "cuda":
                    state["peak"] = max(state["peak"], torch.cuda.max_memory_allocated(device))
        plain = arms["plain"]
        row = {"model": name, "config": config, "steps": args.steps, "check_every": args.check_every, "arms": {}}
        print(f"\n== {name} {config}, {args.steps} steps per arm, blocks of {args.block}")
        for arm, state in arms.items():
            slowdown = state["seconds"] / plain["seconds"] - 1
            peak = state["peak"] / plain["peak"] if plain["peak"] else None
            checks = len(state["monitor"].checks) if state["monitor"] else 0
            row["arms"][arm] = {"seconds": state["seconds"], "overhead": slowdown, "peak_memory_ratio": peak, "checks": checks}
            memory = f", peak memory {peak:.2f}x" if peak else ""
            print(f"  {arm:24s} {args.steps / state['seconds']:7.2f} steps/s, overhead {100 * slowdown:+5.1f}%{memory}, {checks} checks")
        rows.append(row)
    save_report(args.out or f"benchmarks/results/overhead-{device.type}.json", device, size, rows)


if __name__ == "__main__":
    main()
