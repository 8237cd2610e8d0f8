"""The distributed engine: the only package that touches DeepSpeed and ``torch.distributed``.

The training loop sees a small API: process facts (``rank``, ``world_size``, ``device``), a few collectives,
``setup`` (wraps the trainable model in DeepSpeed with AdamW and a warmup + cosine/constant schedule),
``forward`` / ``backward`` / ``step``, an fp32 EMA, consolidated state dicts for export, and ``save`` / ``load``
of the full training state. Frozen modules (text encoder, autoencoder) never enter the engine: they are built
outside :meth:`Engine.model_init` and so are neither partitioned nor given optimizer state, under any ZeRO stage.
Frozen parameters inside the trainable model (a LoRA's base weights: ``requires_grad`` False) are partitioned under
ZeRO-3 like the rest, but have no optimizer state, no EMA and no place in :meth:`Engine.model_state_dict`.

Launching: ``torchrun`` and the ``deepspeed`` launcher export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, which the engine reads; a plain ``python`` process becomes a one-process group on a free local port
so that DeepSpeed code paths are the same everywhere. gloo is used on CPU, NCCL on GPUs.

Failure handling: wrap each process's main in :func:`run_guarded`. A rank that raises prints its traceback,
leaves a notice in the rendezvous store and exits; every other rank sees the notice (or the store vanishing)
within about a second and exits non-zero too, instead of blocking in a collective until ``timeout_s``.

Non-finite losses: the engine alone decides. :meth:`Engine.backward` notes on the device whether each loss is
finite (no host sync); :meth:`Engine.step` agrees across ranks once per update and discards the whole window on
every rank when any of its losses was non-finite, leaving weights, AdamW moments and the LR schedule untouched.

Modules: :mod:`.config` (the ``distributed`` recipe section and the DeepSpeed JSON config), :mod:`.optim` (the
``optim`` recipe section, AdamW and the LR schedules), :mod:`.failure` (:func:`run_guarded` and the abort watch),
and the parts :class:`Engine` (:mod:`.core`) is composed of: :mod:`.group` (process group and collectives),
:mod:`.zero` (ZeRO layout, whole weights), :mod:`.trainable` (DeepSpeed wrapping, forward/backward/step),
:mod:`.nonfinite` (the window's finiteness), :mod:`.ema` (the fp32 EMA) and :mod:`.state` (save and load of
the full training state, ``engine.json``).

Usage (every rank runs the same code; checkpoint files are laid out by :mod:`flowmatch.checkpoint`)::

    def main():
        with Engine(recipe.distributed) as engine:    # leaving the block calls engine.shutdown()
            with engine.model_init():                 # ZeRO-3: modules built here are partitioned on creation
                model = MMDiT(recipe.model)
            with engine.gathered_params(model, modify=True):
                model.init_weights()                  # rank 0's init is kept (a no-op wrapper below ZeRO-3)
            engine.setup(model, model.parameters(), recipe.optim, max_steps=max_steps, micro_batch_size=8,
                         grad_accum_steps=2)
            ema = engine.init_ema(0.9999)              # engine.ema: update, weights(), state_dict(), profiles
            step, ckpt = 0, latest_checkpoint(run_dir)
            if ckpt is not None:                      # weights, AdamW, schedule, EMA, RNG; returns client_state
                step = load_checkpoint(engine, ckpt)["step"]
            while step < max_steps:
                for _ in range(2):                    # grad_accum_steps micro-batches per update
                    loss = loss_fn(engine.forward(x.to(engine.dtype), t, cond), target)
                    engine.backward(loss)             # finiteness is noted on the device: no host sync
                result = engine.step()                # one update per window, like a torch optimizer
                if result.skipped:                    # a non-finite loss somewhere: nothing changed
                    continue                          # (engine.skipped_steps counts these windows)
                ema.update()
                step += 1
                if step % checkpoint_every == 0:
                    save_checkpoint(engine, run_dir, step, client_state={"step": step, "data": loader.state_dict()},
                                    recipe_yaml=recipe_yaml, keep=2, ema=True)

    run_guarded(main)
"""

from flowmatch.engine.config import BACKENDS, PRECISIONS, ZERO_STAGES, DistributedConfig, build_deepspeed_config
from flowmatch.engine.core import Engine
from flowmatch.engine.failure import run_guarded
from flowmatch.engine.optim import SCHEDULES, OptimConfig, lr_factor
from flowmatch.engine.state import EngineMeta, read_engine_meta
from flowmatch.engine.trainable import StepResult

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "SCHEDULES",
    "ZERO_STAGES",
    "DistributedConfig",
    "Engine",
    "EngineMeta",
    "OptimConfig",
    "StepResult",
    "build_deepspeed_config",
    "lr_factor",
    "read_engine_meta",
    "run_guarded",
]
