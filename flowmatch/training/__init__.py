"""Training: :mod:`.config` (the recipe's `train` section), :mod:`.assembly` (a run built from a recipe),
:mod:`.loop` (the loss of a micro batch and the loop), :mod:`.checkpointing` (resume, checkpoints and the stop
checkpoint) and :mod:`.validation` (sample grids and held-out loss during training).
"""

from __future__ import annotations

from typing import Any

from flowmatch.training.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    # `train` (flowmatch.training.loop.train) is loaded on first use: the recipe tree imports training.config,
    # and importing the recipe must not load the engine, the data pipeline and the loop.
    if name == "train":
        from flowmatch.training.loop import train  # reason: start-up cost (the recipe tree imports this package)

        return train
    raise AttributeError(f"module 'flowmatch.training' has no attribute {name!r}")
