"""What the training loop shows and records on rank 0: a progress bar, TensorBoard and RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass
class LoggingConfig:
    """The recipe's `logging` section."""

    tensorboard: bool = True
    """Write TensorBoard scalars and sample grids under RUN_DIR/tb."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device in the training precision, for the MFU estimate (H100 SXM bf16: 989);
    0 = report achieved TFLOP/s only."""


class Monitor:
    """Rank 0 writes; other ranks get a Monitor whose methods do nothing."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, *, enabled: bool, total_steps: int,
                 start_step: int) -> None:
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.metrics_file = None
        if not enabled:
            return
        self.metrics_file = (run_dir / "metrics.jsonl").open("a")
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def message(self, text: str) -> None:
        """A line for the user, printed above the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(steps)

    def scalars(self, step: int, values: dict[str, float], *, postfix: Optional[dict[str, str]] = None) -> None:
        """Record scalars at `step` (TensorBoard + metrics.jsonl) and show `postfix` on the bar."""
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        self.record(step, values)
        if self.bar is not None and postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def record(self, step: int, info: dict[str, Any]) -> None:
        """Append ``info`` at ``step`` to metrics.jsonl only (e.g. the precision the run computes in)."""
        if self.enabled:
            self.metrics_file.write(json.dumps({"step": step, "time": time.time(), **info}) + "\n")
            self.metrics_file.flush()

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """A (C, H, W) image in [0, 1] to TensorBoard."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image.clamp(0, 1), step)

    def close(self) -> None:
        """Flush and close everything."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.metrics_file.close()
        self.enabled = False  # closing twice is harmless
