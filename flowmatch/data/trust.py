"""Which shard lists may run a program: never those of a recipe read back from a run, a checkpoint or an export.

The recipe a user passes and the command line are theirs; a run directory, a checkpoint or an exported folder may
come from anyone, and reading it must not run code. `flowmatch.config.recipe_from_yaml` (which reads every
stored recipe) marks the recipe's data section with where it came from (`DataConfig.stored_in`); resolving its
shards then refuses every `pipe:` command and every URL webdataset opens by running a program (gs:, scp:, ...:
`opener.runs_command`) unless the user vouches for the folder: `--trust-run-dir` on the command line, which sets
FLOWMATCH_TRUST_RUN_DIR=1 (the same for the Python API). Every `pipe:` command, wherever it comes from, must also
parse without a shell (`opener.pipe_argv`).
"""

from __future__ import annotations

import os
from typing import Iterator

from flowmatch.data.config import DataConfig
from flowmatch.data.opener import pipe_argv, runs_command
from flowmatch.errors import RecipeError

TRUST_ENV = "FLOWMATCH_TRUST_RUN_DIR"


class UntrustedCommand(RecipeError):
    """A stored recipe names a shard that runs a program, and the user did not vouch for where it came from."""


def trust_run_dirs() -> bool:
    """Whether the user vouched for the run directories this process reads (--trust-run-dir)."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


def shard_keys(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(recipe key, shard pattern) of every key that names shards."""
    yield "data.shards", cfg.shards
    yield "data.val_shards", cfg.val_shards
    yield "data.cache", cfg.cache
    for i, src in enumerate(cfg.sources):
        yield f"data.sources[{i}].shards", src.shards
        yield f"data.sources[{i}].val_shards", src.val_shards


def check_commands(cfg: DataConfig) -> None:
    """Raise RecipeError for a `pipe:` command that needs a shell, and UntrustedCommand for any command of a stored
    recipe the user did not vouch for; both name the key and the command."""
    for key, pattern in shard_keys(cfg):
        for url in filter(None, (p.strip() for p in pattern.split("::"))):
            if url.startswith("pipe:"):
                try:
                    pipe_argv(url[len("pipe:"):])
                except ValueError as err:
                    raise RecipeError(f"{key}: {err}") from None
            if cfg.stored_in and runs_command(url) and not trust_run_dirs():
                raise UntrustedCommand(
                    f"{key} of the recipe stored in {cfg.stored_in} runs a program to read its shards ({url!r}); a "
                    "run, checkpoint or export folder may come from anyone, so flowmatch does not run commands it "
                    f"names. If you trust this folder, pass --trust-run-dir (or set {TRUST_ENV}=1).")
