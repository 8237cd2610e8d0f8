"""Errors that are the user's input, files or run (subclasses of ``flowmatch.errors.UsageError``) reach the command
line as one line and exit 1, without a traceback."""

from __future__ import annotations

import pytest

from flowmatch.checkpoint import CheckpointError
from flowmatch.cli import main
from flowmatch.data import DataUnavailable, EncoderMismatch
from flowmatch.engine.launch import LaunchError
from flowmatch.errors import RecipeError, UsageError
from flowmatch.runlock import RunLocked
from flowmatch.training.loop import TrainingError


def test_the_user_errors_share_one_base():
    """Bug caught: an error class left out of UsageError (the CLI would print its traceback)."""
    for error in (RecipeError, CheckpointError, EncoderMismatch, LaunchError, TrainingError, RunLocked,
                  DataUnavailable):
        assert issubclass(error, UsageError), error


@pytest.mark.parametrize("command", ["sample", "export", "eval"])
def test_a_damaged_checkpoint_is_one_line_and_exit_1(tmp_path, capsys, command):
    """Bug caught: UsageError dropped from the command line's handled errors (a CheckpointError traceback)."""
    ckpt = tmp_path / "run" / "checkpoints" / "5"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    args = {"sample": ["--prompt", "a 3"], "export": [str(tmp_path / "out")], "eval": []}[command]
    assert main([command, str(ckpt), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"flowmatch {command}: checkpoint {ckpt} is damaged") and "Traceback" not in err
