"""Training: :mod:`.config` (the recipe's `train` section), :mod:`.assembly` (a run built from a recipe),
:mod:`.loop` (the loss of a micro batch, the loop, resume and checkpoints) and :mod:`.validation` (sample grids
and held-out loss during training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowmatch.training.config import TrainConfig

if TYPE_CHECKING:
    from flowmatch.config import Recipe
    from flowmatch.training.loop import TrainSummary

__all__ = ["TrainConfig", "train"]


def train(recipe: "Recipe") -> "TrainSummary":
    """Train a recipe (resuming from run_dir's newest checkpoint) and return a summary."""
    from flowmatch.training.assembly import assemble
    from flowmatch.training.loop import Trainer

    with assemble(recipe) as run:  # shuts the process group down cleanly and releases run_dir's lock
        return Trainer(run).fit()
