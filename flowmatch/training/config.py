"""The recipe's `train` section: what the training loop and the run's assembly read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from flowmatch.engine.power_ema import MAX_SIGMA_REL
from flowmatch.errors import choice_error
from flowmatch.models.key_padding import ATTENTION_KERNELS


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
    """The EMA's longest memory: no update's decay exceeds this (kept in fp32); 0 = no EMA."""
    ema_warmup: float = 0.1
    """EMA warm-up as a relative width sigma_rel (Karras et al. 2024): the n-th update decays by
    min(ema_decay, (1 - 1/n)^(gamma + 1)), gamma given by sigma_rel, so the EMA is the weights after the first
    update and then a power-function average of the latest ~sigma_rel of the run, until ema_decay caps it after
    about (gamma + 1) / (1 - ema_decay) updates (0.1: gamma 6.94, 7,900 updates at 0.999); 0 = no warm-up (the
    EMA starts at the initial weights)."""
    ema_profiles: list[float] = field(default_factory=list)
    """sigma_rel of power-function EMAs tracked for post-hoc EMA (`flowmatch ema RUN --sigma-rel ...`): Karras et
    al. track two, e.g. [0.05, 0.10]; [] = none. Needs ema_decay > 0."""
    ema_snapshot_every: int = 0
    """Steps between snapshots of the profiles in RUN_DIR/ema/snapshots/ (also taken at every checkpoint, where
    resume reads them); each holds one fp32 copy of the weights per profile; 0 = at checkpoints only."""
    max_bad_steps: int = 10
    """Stop after this many consecutive optimizer steps discarded for a non-finite loss."""
    divergence_factor: float = 1000.0
    """A log window diverges when its loss or gradient norm exceeds this many times the lowest seen so far (its
    first step's loss included): a warning each time (flowmatch.training.divergence); 0 = only non-finite values
    count."""
    max_bad_windows: int = 3
    """Stop after this many log windows in a row that diverged or skipped updates for a non-finite loss; 0 = warn
    only."""
    compile: bool = False
    """torch.compile each transformer block."""
    attention: str = "auto"
    """How padded text is masked in attention (flowmatch.models.key_padding): "sdpa" (a boolean mask; no flash
    kernel on CUDA), "flex" (FlexAttention with a block mask; CUDA only for training, fused when compiled) or
    "auto" (flex on CUDA with train.compile, sdpa otherwise). Unpadded text passes no mask with any of them."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    block_swap: int = 0
    """Keep the frozen weights of this many transformer blocks (the last ones) in CPU memory and stream each to the
    device just before it runs (flowmatch.models.offload); for a LoRA run on one GPU; 0 = off."""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("max_steps, batch_size, checkpoint_every and keep_checkpoints must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name, value in [("ema_warmup", self.ema_warmup)] + [("ema_profiles", s) for s in self.ema_profiles]:
            if not 0.0 <= value < MAX_SIGMA_REL or (name == "ema_profiles" and value == 0):
                raise ValueError(f"{name} holds relative widths sigma_rel in (0, {MAX_SIGMA_REL:.3f}) (typical "
                                 f"0.05-0.15{'; 0 = no warm-up' if name == 'ema_warmup' else ''}), got {value}")
        if self.ema_profiles and self.ema_decay == 0:
            raise ValueError("ema_profiles needs an EMA: set ema_decay > 0 (e.g. 0.999) or ema_profiles: []")
        if self.ema_snapshot_every < 0:
            raise ValueError(f"ema_snapshot_every must be >= 0 (0 = at checkpoints only), got "
                             f"{self.ema_snapshot_every}")
        if self.divergence_factor != 0 and not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1 (e.g. 1000: three orders of magnitude) or 0 (off), got "
                             f"{self.divergence_factor}")
        if self.max_bad_windows < 0:
            raise ValueError(f"max_bad_windows must be >= 0 (0 = warn only), got {self.max_bad_windows}")
        if self.block_swap < 0:
            raise ValueError(f"block_swap must be >= 0 (0 = off), got {self.block_swap}")
        if self.attention not in ATTENTION_KERNELS:
            raise choice_error("train.attention", self.attention, ATTENTION_KERNELS)
        if self.log_every < 1 or self.validate_every < 0 or self.max_bad_steps < 1:
            raise ValueError("log_every and max_bad_steps must be >= 1 and validate_every >= 0")
