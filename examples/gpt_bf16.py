"""A small GPT with `F.scaled_dot_product_attention` trained under bf16 autocast, with `hessdiag.Monitor`.

Training uses the fused attention kernels under autocast; the curvature checks run in float32 on
the math attention backend automatically (the fused kernels have no second derivative), so the
model needs no change. Tokens are random (no download): the curvature of a real workload, not of
real text.

    python examples/gpt_bf16.py --steps 300
"""

from __future__ import annotations

import argparse

import torch
from models import GPT, next_token_loss, token_batch
from torch.utils.tensorboard import SummaryWriter

import hessdiag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--logdir", default="runs/gpt-bf16")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps, for the tests")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.smoke:
        config, steps, check_every = dict(vocab=64, d=32, layers=2, heads=2, context=16), 6, 3
    else:
        config, steps, check_every = dict(vocab=512, d=384, layers=6, heads=6, context=256), args.steps, 100
    model = GPT(**config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    writer = SummaryWriter(args.logdir)
    # The optimizer is AdamW: the edge-of-stability rule compares the *preconditioned* sharpness.
    monitor = hessdiag.Monitor(model, next_token_loss, optimizer=optimizer, writer=writer, check_every=check_every,
                               log_every=min(10, steps), sub_batch=8)  # fmt: skip
    for step in range(steps):
        batch = token_batch(32 if not args.smoke else 4, config["context"], config["vocab"], device, seed=step)
        optimizer.zero_grad()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = next_token_loss(model, batch)
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(batch, loss)
    monitor.flush()
    for check in monitor.checks:
        print(f"step {check.step}: lambda_max {check.lambda_max:.4g}, lambda_min {check.lambda_min:.4g}, "
              f"preconditioned sharpness {check.sharpness:.4g} vs {check.stability.threshold:.4g}, "
              f"{check.num_hvps} HVPs in {check.seconds:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
