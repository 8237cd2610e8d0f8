"""Checkpoint, resume and stop of a training run: the part of the loop that writes and reads its files.

:class:`Checkpointing` resumes a run from the newest checkpoint of its run_dir that verifies (refusing recipe
changes that cannot take effect, and LoRA adapters trained on other base weights), writes a checkpoint of a
step (with the EMA profiles' snapshot of that step first), and ends a run early on a stop signal with a
checkpoint. The loop (:mod:`.loop`) holds one and says which step it reached; files are laid out by
:mod:`flowmatch.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from flowmatch.checkpoint import RECIPE_FILE, latest_checkpoint, read_meta, resume_checkpoint, save_checkpoint
from flowmatch.data import merge_loader_states
from flowmatch.errors import UsageError
from flowmatch.monitor import Monitor
from flowmatch.posthoc import restore_profiles, write_snapshot
from flowmatch.training.assembly import TrainingRun
from flowmatch.training.resume_policy import Change, changes_on_resume, refusal
from flowmatch.training.validation import Validator


class TrainingError(RuntimeError, UsageError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says what happened and what to do."""


class Checkpointing:
    """Resume, checkpoints and the stop checkpoint of an assembled run (``validator`` says which weights
    validation found better, recorded in each checkpoint)."""

    def __init__(self, run: TrainingRun, validator: Validator) -> None:
        self.run = run
        self.recipe = run.recipe
        self.engine = run.engine
        self.validator = validator
        self.saved_step: Optional[int] = None
        """Step of the newest checkpoint on disk (written or resumed from)."""
        self.changed_on_resume: list[Change] = []
        """Recipe keys that differ from the resumed checkpoint's and take effect (:mod:`.resume_policy`)."""

    def resume(self) -> int:
        """Load the newest checkpoint of run_dir that verifies, if any, and say so (damaged newer ones are reported
        and set aside by :func:`~flowmatch.checkpoint.resume_checkpoint`); the EMA profiles come from the snapshot
        of its step (and snapshots newer than it, left by an abandoned attempt, go). Returns the step to go on
        from (0 for a fresh run)."""
        run, e = self.run, self.engine
        resumed = resume_checkpoint(e, run.run_dir, check=self.check_recipe)
        profiles = self.recipe.train.ema_profiles
        if resumed is None:
            if profiles:
                restore_profiles(e, run.run_dir, 0, profiles)
            return 0
        ckpt, state = resumed.path, resumed.client_state
        if self.recipe.model.lora is not None:
            self.check_base(ckpt)
        step = self.saved_step = int(state["step"])
        # Not strict: another number of ranks or workers resumes exactly; other data changes skip to the next epoch.
        run.loader.load_state_dict(state["loader"], strict=False)
        generators = state["generator"]  # one state per micro-batch slot of the global batch
        if len(generators) == e.world_size * run.accum:  # else: another layout, keep the fresh seeds
            first_slot = e.rank * run.accum
            for m, g in enumerate(run.generators):
                g.set_state(generators[first_slot + m])
        if e.is_main:
            print(f"resuming from {ckpt} (step {step})", flush=True)
            for change in self.changed_on_resume:
                print(f"changed on resume: {change}", flush=True)
        if profiles:
            said = restore_profiles(e, run.run_dir, step, profiles)
            if e.is_main:
                print(said, flush=True)
        return step

    def check_recipe(self, ckpt: Path) -> None:
        """Refuse to resume ``ckpt`` when the recipe changed a key that cannot change (:mod:`.resume_policy`);
        note the keys that changed and take effect."""
        changes = changes_on_resume((ckpt / RECIPE_FILE).read_text(), self.run.recipe_yaml)
        refused = [c for c in changes if not c.safe]
        if refused:
            raise TrainingError(refusal(ckpt, refused))
        self.changed_on_resume = changes

    def check_base(self, ckpt: Path) -> None:
        """A LoRA checkpoint's adapters belong to the base weights it records: resuming on others is an error."""
        saved = read_meta(ckpt).init_from or {}
        here = self.run.init
        if here is None or saved.get("sha256") != here.sha256:
            now = "none" if here is None else f"{here.sha256[:16]}... ({here.source})"
            raise TrainingError(f"{ckpt} holds LoRA adapters trained on base weights with SHA-256 "
                                f"{str(saved.get('sha256'))[:16]}... ({saved.get('source')}); model.init_from now "
                                f"gives {now}: point model.init_from at the original base, or use a new run_dir")

    def save(self, step: int) -> Path:
        """Collective: write a checkpoint of ``step`` (atomically; keeps the newest train.keep_checkpoints)."""
        run, e = self.run, self.engine
        if self.recipe.train.ema_profiles:  # before the checkpoint that resumes from it, a stop's included
            write_snapshot(e, run.run_dir, step, self.recipe.train.ema_profiles)
        loaders = merge_loader_states(e.all_gather_object(run.loader.state_dict()))
        slots = [s for states in e.all_gather_object([g.get_state() for g in run.generators]) for s in states]
        state = {"step": step, "loader": loaders, "generator": slots}
        path = save_checkpoint(e, run.run_dir, step, client_state=state, recipe_yaml=run.recipe_yaml,
                               keep=self.recipe.train.keep_checkpoints, ema=self.recipe.train.ema_decay > 0,
                               ema_default=self.validator.ema_better,
                               init_from=None if run.init is None else dataclasses.asdict(run.init),
                               paths=run.paths)
        self.saved_step = step
        return path

    def stop(self, step: int, signal_name: str, monitor: Monitor) -> Optional[Path]:
        """Collective: end the run early at ``step`` on a stop signal: a checkpoint of this step (unless one is on
        disk, or no step was taken), and a line saying how to go on."""
        started = time.time()
        if step == 0 and self.saved_step is None:
            monitor.message(f"stopped by {signal_name} before the first step: nothing to save")
            return None
        ckpt = self.save(step) if self.saved_step != step else latest_checkpoint(self.run.run_dir)
        monitor.message(f"stopped by {signal_name} at step {step}: checkpoint {ckpt} written in "
                        f"{time.time() - started:.1f} s; run the same command to resume")
        return ckpt
