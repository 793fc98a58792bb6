"""The JSON report every benchmark writes: the device, torch, the date, the size, the rows."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count (CPU figures depend on both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save_report(out: str | Path, device: torch.device, size: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Write the report to `out` (folders made as needed), say where, and return it."""
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "size": size,
        **extra,
        "rows": rows,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\ndevice: {report['device']}, torch {report['torch']}; saved {path}")
    return report
