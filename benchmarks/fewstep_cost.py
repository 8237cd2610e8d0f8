"""Training cost per step of each objective, as a ratio to plain flow matching, on the digits model.

One optimizer step (forward, the objective's extra target forwards or JVP, backward, AdamW) through the real
engine (one process, ZeRO-0, fp32) and the trainer's own model callables, on synthetic digits-sized batches
(8x8 pixels, MiniLM-sized text of 12 tokens). The configurations are timed round-robin, each step in turn, so a
shared or throttled machine slows all alike; the figure to read is each configuration's median step time divided
by plain flow matching's, by wall time and by this process's CPU time. Absolute seconds on a loaded machine mean
little; the ratios carry over.

    python benchmarks/fewstep_cost.py                     # the digits model, batch 128, 20 timed rounds
    python benchmarks/fewstep_cost.py --rounds 40 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.engine import DistributedConfig, Engine, OptimConfig
from flowmatch.families.presets import config_from_preset
from flowmatch.flow import (
    FlowConfig,
    GuidanceInputConfig,
    MeanFlowConfig,
    ShortcutConfig,
    TimeSchedule,
    objective_loss,
    with_guidance,
)
from flowmatch.models import MMDiT
from flowmatch.training.assembly import EngineVelocity
from flowmatch.training.fewstep import objective_models

# name -> (flow.objective, JVP backend, guidance as an input, distillation from a teacher, flow map (--teacher-steps))
CONFIGS = {
    "flow": ("flow", "exact", False, False, False),
    "flow + guidance input": ("flow", "exact", True, False, False),
    "meanflow exact": ("meanflow", "exact", True, False, False),
    "meanflow finite_difference": ("meanflow", "finite_difference", True, False, False),
    "meanflow exact, teacher": ("meanflow", "exact", True, True, False),
    "shortcut": ("shortcut", "exact", True, False, False),
    "shortcut, teacher": ("shortcut", "exact", True, True, False),
    "shortcut, teacher flow map": ("shortcut", "exact", True, True, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--interval-fraction", type=float, default=0.5, help="flow.meanflow.interval_fraction")
    p.add_argument("--consistency-fraction", type=float, default=0.25, help="flow.shortcut.consistency_fraction")
    p.add_argument("--teacher-steps", type=int, default=4, help="flow.teacher_steps of the flow-map row")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(DistributedConfig())
    g = torch.Generator().manual_seed(0)
    b, text_len, width = args.batch, 12, 384
    x0 = torch.randn(b, 1, 8, 8, generator=g)
    cond = Conditioning(torch.randn(b, text_len, width, generator=g), torch.ones(b, text_len, dtype=torch.bool),
                        torch.randn(b, width, generator=g))
    null = Conditioning(torch.randn(1, text_len, width, generator=g), torch.ones(1, text_len, dtype=torch.bool),
                        torch.randn(1, width, generator=g))
    cfg = config_from_preset("digits", context_dim=width, pooled_dim=width, interval_embed=True, guidance_embed=True)
    torch.manual_seed(0)
    model = MMDiT(cfg)
    engine.setup(model, model.parameters(), OptimConfig(lr=1e-4, warmup_steps=0), max_steps=10**6,
                 micro_batch_size=b, grad_accum_steps=1)
    velocity = EngineVelocity(engine)
    teacher_model = MMDiT(config_from_preset("digits", context_dim=width, pooled_dim=width)).requires_grad_(False)

    def teacher(x, t, c):
        return teacher_model(x, t, c)

    runs = {}
    for name, (objective, jvp, guided, distill, flow_map) in CONFIGS.items():
        teacher_steps = args.teacher_steps if flow_map else 0
        flow = FlowConfig(objective=objective, meanflow=MeanFlowConfig(interval_fraction=args.interval_fraction,
                                                                       jvp=jvp),
                          shortcut=ShortcutConfig(consistency_fraction=args.consistency_fraction),
                          guidance=GuidanceInputConfig(1.0, 2.0), teacher_steps=teacher_steps)
        models = objective_models(velocity, engine, exact_jvp=objective == "meanflow" and jvp == "exact",
                                  teacher=teacher if distill else None)
        runs[name] = (flow, models, guided, jvp)
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    gen = torch.Generator().manual_seed(1)
    for round_ in range(args.warmup + args.rounds):
        for name, (flow, models, guided, jvp) in runs.items():
            # One model serves every configuration: the unguided ones pass the scale 1 as a fixed input.
            c, n = (cond, null) if guided else (with_guidance(cond, 1.0), with_guidance(null, 1.0))
            t0, c0 = time.perf_counter(), time.process_time()
            loss = objective_loss(models, x0, c, n, schedule=TimeSchedule(flow), flow=flow, seq_len=16,
                                  generator=gen, guided=guided, jvp_backend=jvp).loss
            engine.backward(loss)
            engine.step()
            if round_ >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    base_w, base_c = statistics.median(wall["flow"]), statistics.median(cpu["flow"])
    print(f"batch {b}, {args.rounds} rounds, torch threads {torch.get_num_threads()}; meanflow interval fraction "
          f"{args.interval_fraction}, shortcut consistency fraction {args.consistency_fraction}")
    print(f"{'configuration':<30} {'wall s':>8} {'ratio':>6} {'cpu s':>8} {'ratio':>6}  JVP backend")
    for name in runs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        backend = runs[name][3] if runs[name][0].objective == "meanflow" else "-"
        print(f"{name:<30} {w:8.4f} {w / base_w:6.2f} {c:8.4f} {c / base_c:6.2f}  {backend}")
    engine.shutdown()


if __name__ == "__main__":
    main()
