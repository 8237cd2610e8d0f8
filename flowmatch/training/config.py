"""The recipe's `train` section: what the training loop and the run's assembly read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    """The recipe's `train` section: the loop."""

    max_steps: int = 2000
    """Optimizer steps to train for."""
    batch_size: int = 128
    """Global batch: micro_batch_size x gradient accumulation x processes."""
    micro_batch_size: Optional[int] = None
    """Samples per process per forward; None = batch_size / processes (no accumulation)."""
    seed: int = 0
    """Seeds the model init, the data order and the noise (each rank offsets it by its rank)."""
    checkpoint_every: int = 500
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    log_every: int = 50
    """Steps between logged scalars: the loop reads nothing back from the device between them, except the one
    finiteness flag per optimizer step that the engine's update reads anyway."""
    validate_every: int = 0
    """Steps between validation (sample grid + held-out loss); 0 = at the end only."""
    ema_decay: float = 0.999
    """EMA decay of the weights, kept in fp32; 0 = no EMA."""
    max_bad_steps: int = 10
    """Stop after this many consecutive optimizer steps discarded for a non-finite loss."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("max_steps, batch_size, checkpoint_every and keep_checkpoints must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.log_every < 1 or self.validate_every < 0 or self.max_bad_steps < 1:
            raise ValueError("log_every and max_bad_steps must be >= 1 and validate_every >= 0")
