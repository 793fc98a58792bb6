"""Which Lightning strategies the callback can see the model's Hessian under."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException


def refuse_unsupported_strategy(trainer: pl.Trainer) -> None:
    """MisconfigurationException for a strategy whose flat, partitioned parameters hide the Hessian.

    FSDP2 (`fully_shard`, e.g. in ModelParallelStrategy's `configure_model`) is supported: its
    parameters are DTensors. FSDPStrategy wraps in FSDP1 (flat parameters) and DeepSpeed partitions
    them its own way."""
    strategy = type(trainer.strategy).__name__
    if "FSDP" in strategy or "DeepSpeed" in strategy:
        raise MisconfigurationException(
            f"HessianDiagnostics does not support {strategy}: its flat, partitioned parameters hide the model's "
            "Hessian. Shard with FSDP2 instead: ModelParallelStrategy with `fully_shard` in `configure_model`, or "
            "DDP; or remove the callback."
        )
