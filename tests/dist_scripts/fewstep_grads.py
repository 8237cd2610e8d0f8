"""Few-step objectives across processes, launched by tests/test_fewstep.py.

A tiny MMDiT (interval and guidance inputs, weights perturbed off their zero init) trains a few steps of
``flow.objective`` (meanflow or shortcut, guidance from data) through the engine and the trainer's own model
callables (:func:`flowmatch.training.fewstep.objective_models`). Micro-batch slot k of the global batch always
holds the same rows and draws from its own generator, so one process accumulating two micro batches and two
processes with one each must compute the same gradients. Each ``--config`` trains one configuration with an engine of
its own, one after the other in the same processes (a launch costs seconds; a run, a fraction of one), and rank 0
writes OUT/NAME/result.json (losses, gradient norms) and OUT/NAME/weights.safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, so no install is needed

from flowmatch.conditioning import Conditioning  # noqa: E402
from flowmatch.engine import DistributedConfig, Engine, OptimConfig, run_guarded  # noqa: E402
from flowmatch.families.presets import config_from_preset  # noqa: E402
from flowmatch.flow import FlowConfig, MeanFlowConfig, ShortcutConfig, TimeSchedule, objective_loss  # noqa: E402
from flowmatch.models import MMDiT  # noqa: E402
from flowmatch.training.assembly import EngineVelocity  # noqa: E402
from flowmatch.training.fewstep import objective_models  # noqa: E402

GLOBAL_BATCH = 8
MICRO = 4
SEED = 0
STEPS = 2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--config", action="append", required=True, metavar="NAME:ZERO_STAGE:JVP:OBJECTIVE",
                   help="one configuration, trained into OUT/NAME; repeat it to train several in this launch")
    p.add_argument("--steps", type=int, default=STEPS)
    args = p.parse_args()
    # Under torchrun the process group is opened once here, so the engines below share it instead of leaving
    # and re-joining the agent's rendezvous between configurations.
    shared_group = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if shared_group:
        dist.init_process_group("gloo")
    for spec in args.config:
        name, stage, jvp, objective = spec.split(":")
        run_one(Path(args.out) / name, int(stage), jvp, objective, args.steps)
    if shared_group:
        dist.destroy_process_group()


def run_one(out: Path, zero_stage: int, jvp: str, objective: str, steps: int) -> None:
    """Train one configuration with an engine of its own (set up and shut down here)."""
    engine = Engine(DistributedConfig(zero_stage=zero_stage, zero3_persistence_threshold=100))
    accum = GLOBAL_BATCH // (MICRO * engine.world_size)
    cfg = config_from_preset("tiny", in_channels=1, context_dim=8, pooled_dim=8, interval_embed=True,
                             guidance_embed=True)
    torch.manual_seed(SEED)
    with engine.model_init():
        model = MMDiT(cfg)
    torch.manual_seed(SEED)
    with engine.gathered_params(model, modify=True):
        model.init_weights()
        with torch.no_grad():  # off the zero init, so outputs, the interval input and every gradient are non-zero
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    # AdamW with eps = 1 updates about lr * g (the moments are tiny against eps), so the weights compare the
    # gradients linearly; with a small eps its g / |g| would magnify the rounding of near-zero gradients.
    optim = OptimConfig(lr=0.1, eps=1.0, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=100.0)
    engine.setup(model, model.parameters(), optim, max_steps=steps, micro_batch_size=MICRO,
                 grad_accum_steps=accum)
    data = torch.Generator().manual_seed(1)
    x0 = torch.randn(steps, GLOBAL_BATCH, 1, 4, 4, generator=data)
    hidden = torch.randn(GLOBAL_BATCH, 3, 8, generator=data)
    pooled = torch.randn(GLOBAL_BATCH, 8, generator=data)
    null = Conditioning(torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 8))
    flow = FlowConfig(objective=objective, caption_dropout=0.25,
                      meanflow=MeanFlowConfig(interval_fraction=0.5, jvp=jvp),
                      shortcut=ShortcutConfig(consistency_fraction=0.5, levels=3))
    schedule = TimeSchedule(flow)
    models = objective_models(EngineVelocity(engine), engine, exact_jvp=jvp == "exact")
    result: dict = {"world_size": engine.world_size, "losses": [], "grad_norms": []}
    for step in range(steps):
        losses = []
        for m in range(accum):
            slot = engine.rank * accum + m
            rows = slice(slot * MICRO, (slot + 1) * MICRO)
            cond = Conditioning(hidden[rows], torch.ones(MICRO, 3, dtype=torch.bool), pooled[rows])
            gen = torch.Generator().manual_seed(1000 * step + slot)
            loss = objective_loss(models, x0[step, rows], cond, null, schedule=schedule, flow=flow, seq_len=4,
                                  generator=gen, guided=True, jvp_backend=jvp).loss
            engine.backward(loss)
            losses.append(loss.detach())
        res = engine.step()
        assert res.stepped and res.grad_norm is not None, res
        result["losses"].append(engine.all_reduce_mean(torch.stack(losses).mean()).item())
        result["grad_norms"].append(float(res.grad_norm))
    weights = engine.model_state_dict()
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / "weights.safetensors"))
        (out / "result.json").write_text(json.dumps(result))
    engine.shutdown()


if __name__ == "__main__":
    run_guarded(main)
