"""``python -m flowmatch train`` with every micro batch's sample keys recorded, launched by tests/test_elastic_keys.py.

Run as ``python train_keys.py KEYS_DIR RECIPE OVERRIDES...`` (one process) or under ``torchrun``. Each rank appends
one JSON line per micro batch it trains on (``{"step": optimizer step, "keys": [...], "epochs": [...]}``) to
``KEYS_DIR/rank{RANK}-of{WORLD_SIZE}.jsonl``. The keys are host strings the loader already carries with the batch,
and each sample's epoch is read from the stream position the loader pairs with the batch (stamped into
``batch.meta``; the shards these runs use hold no metadata of their own): recording them adds no device work and no
synchronisation to the training step. Stamping happens where the stream is iterated, so it needs
``data.num_workers=0`` or forked workers (which inherit the patch).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, so no install is needed

from flowmatch.cli import main  # noqa: E402
from flowmatch.data import loader  # noqa: E402
from flowmatch.training.loop import Trainer  # noqa: E402

Patch = Callable[[Any, str, Any], None]  # setattr, or a test's monkeypatch.setattr (undone after the run)


def stamp_epochs(patch: Patch = setattr) -> None:
    """Each batch's ``meta`` says the epoch its stream position is in (the epoch the batch was drawn from)."""
    real = loader._WorkerStreams.__iter__

    def iterate(self):
        for batch, stream, drain, position in real(self):
            if position is not None:  # None: a DataUnavailable handed over as a value
                batch.meta = [{"epoch": position.epoch} for _ in batch.keys]
            yield batch, stream, drain, position

    patch(loader._WorkerStreams, "__iter__", iterate)


def record_keys(out: Path, patch: Patch = setattr) -> None:
    """Wrap Trainer.micro_loss so that each batch's keys go to this rank's file before its loss is computed."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank{os.environ.get('RANK', '0')}-of{os.environ.get('WORLD_SIZE', '1')}.jsonl"
    real = Trainer.micro_loss

    def micro_loss(self: Trainer, batch, generator):
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step + 1, "keys": list(batch.keys),
                                "epochs": [m["epoch"] for m in batch.meta]}) + "\n")
        return real(self, batch, generator)

    patch(Trainer, "micro_loss", micro_loss)


if __name__ == "__main__":
    stamp_epochs()
    record_keys(Path(sys.argv[1]))
    sys.exit(main(["train", *sys.argv[2:]]))
