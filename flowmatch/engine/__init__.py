"""The distributed engine: the only package that touches DeepSpeed and ``torch.distributed``.

The training loop sees a small API: process facts (``rank``, ``world_size``, ``device``), a few collectives,
``setup`` (wraps the trainable model in DeepSpeed with AdamW and a warmup + cosine/constant schedule),
``forward`` / ``backward`` / ``step``, an fp32 EMA, consolidated state dicts for export, and ``save`` / ``load``
of the full training state. Frozen modules (text encoder, autoencoder) never enter the engine: they are built
outside :meth:`Engine.model_init` and so are neither partitioned nor given optimizer state, under any ZeRO stage.

Launching: ``torchrun`` and the ``deepspeed`` launcher export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, which the engine reads; a plain ``python`` process becomes a one-process group on a free local port
so that DeepSpeed code paths are the same everywhere. gloo is used on CPU, NCCL on GPUs.

Failure handling: wrap each process's main in :func:`run_guarded`. A rank that raises prints its traceback,
leaves a notice in the rendezvous store and exits; every other rank sees the notice (or the store vanishing)
within about a second and exits non-zero too, instead of blocking in a collective until ``timeout_s``.

Modules: :mod:`.config` (the ``distributed`` recipe section and the DeepSpeed JSON config), :mod:`.optim` (AdamW
and the LR schedule), :mod:`.failure` (:func:`run_guarded` and the abort watch), :mod:`.core` (:class:`Engine`:
process group, collectives, setup and the update step), with the Engine's :mod:`.weights` (ZeRO-3 construction,
consolidated weights), :mod:`.ema` and :mod:`.state` (save and load of the full training state).

Usage (every rank runs the same code; checkpoint files are laid out by :mod:`flowmatch.checkpoint`)::

    def main():
        with Engine(DistributedConfig(zero_stage=2)) as engine:   # leaving the block calls engine.shutdown()
            with engine.model_init():                 # ZeRO-3: modules built here are partitioned on creation
                model = MMDiT(cfg.model)
            with engine.gathered_params(model, modify=True):
                model.init_weights()                  # rank 0's init is kept (a no-op wrapper below ZeRO-3)
            engine.setup(model, model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8,
                         warmup_steps=100, max_steps=10_000, schedule="cosine", min_lr_ratio=0.1,
                         micro_batch_size=8, grad_accum_steps=2, grad_clip=1.0)
            engine.ema_init(0.9999)
            step, ckpt = 0, latest_checkpoint(run_dir)
            if ckpt is not None:                      # weights, AdamW, schedule, EMA, RNG; returns client_state
                step = load_checkpoint(engine, ckpt)["step"]
            while step < max_steps:
                for _ in range(2):                    # grad_accum_steps micro-batches per update
                    loss = loss_fn(engine.forward(x, t, ctx, pooled), target)
                    engine.backward(loss)             # a non-finite loss (on any rank) poisons the window
                result = engine.step()                # one update per window, like a torch optimizer
                if result.stepped:
                    engine.ema_update()
                    step += 1
                elif result.skipped:
                    bad_steps += 1                    # weights, moments and LR schedule are untouched
                if step % checkpoint_every == 0:
                    save_checkpoint(engine, run_dir, step, client_state={"step": step, "data": loader.state_dict()},
                                    recipe_yaml=recipe_yaml, keep=2, ema=True)

    run_guarded(main)
"""

from flowmatch.engine.config import BACKENDS, PRECISIONS, ZERO_STAGES, DistributedConfig, build_deepspeed_config
from flowmatch.engine.core import Engine, StepResult
from flowmatch.engine.failure import run_guarded
from flowmatch.engine.optim import SCHEDULES, lr_factor

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "SCHEDULES",
    "ZERO_STAGES",
    "DistributedConfig",
    "Engine",
    "StepResult",
    "build_deepspeed_config",
    "lr_factor",
    "run_guarded",
]
