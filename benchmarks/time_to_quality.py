"""Quality per second of training: the digits recipe against a plain rectified-flow loop on diffusers' SD3 model.

Both train on the same data (the recipe's shards, captions encoded by the same frozen text encoder) for the same
wall-clock budget, in one run, and are judged alike by the recipe's task (the digits task: prompt accuracy of an
independent classifier, paraphrase accuracy, Frechet distance) at the same Euler step counts and guidance scale:

- ``flowmatch``: ``flowmatch train RECIPE`` as shipped, then its default weights (what `flowmatch eval` judges).
  Its wall time, start-up excluded, is the budget.
- ``baseline``: what a user would write with diffusers: ``SD3Transformer2DModel`` of the recipe's width, depth and
  patch size, torch AdamW at a constant learning rate (the recipe's peak), times drawn logit-normal with an
  unweighted MSE on ``noise - x0``, 10% empty captions for guidance, no EMA, trained until the budget is spent.

    python benchmarks/time_to_quality.py                                 # recipes/digits.yaml, data/digits
    python benchmarks/time_to_quality.py --shards /tmp/digits --samples 20 --out /tmp/ttq

Run it on a quiet machine: both sides are timed by the wall clock.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flowmatch.config import load_recipe
from flowmatch.data import build_loader, ensure_shards
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.evaluate import EvalPlan, evaluate
from flowmatch.families.sd3.convert import FIXED as SD3_FIXED
from flowmatch.sampling import GenerationConfig, Pipeline
from flowmatch.tasks import get_task
from flowmatch.training import train

BASELINE_CAPTION_DROPOUT = 0.1  # the usual share of empty captions that makes classifier-free guidance possible


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/digits.yaml")
    parser.add_argument("--shards", default=None, help="data.shards (default: the recipe's)")
    parser.add_argument("--out", default="runs/time-to-quality", help="run directory of the flowmatch side")
    parser.add_argument("--steps", default="4,8,20", help="Euler step counts to judge at")
    parser.add_argument("--samples", type=int, default=50, help="images per class prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides for both sides")
    return parser.parse_args()


def train_baseline(recipe, encoders: FrozenEncoders, budget_s: float, seed: int):
    """A minimal rectified-flow loop on diffusers' SD3Transformer2DModel; returns (model, steps, seconds)."""
    from diffusers import SD3Transformer2DModel

    m = recipe.model
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=recipe.data.size[0] // encoders.downsample, patch_size=m.patch_size,
        in_channels=encoders.latent_channels, out_channels=encoders.latent_channels, num_layers=m.depth,
        attention_head_dim=m.head_dim, num_attention_heads=m.num_heads, joint_attention_dim=m.context_dim,
        caption_projection_dim=m.num_heads * m.head_dim, pooled_projection_dim=m.pooled_dim,
        pos_embed_max_size=m.pos_embed_max_size,
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.optim.lr)
    loader = build_loader(recipe.data, rank=0, world_size=1, batch_size=recipe.train.batch_size, seed=seed,
                          encoders=encoders.fingerprints())
    null = encoders.null()
    steps, start = 0, time.perf_counter()
    batches = iter(loader)
    try:
        while time.perf_counter() - start < budget_s:
            x0, cond = encoders.encode_batch(next(batches))
            drop = torch.rand(len(cond)) < BASELINE_CAPTION_DROPOUT
            cond = cond.where(drop, null)
            t = torch.sigmoid(torch.randn(len(x0)))  # logit-normal(0, 1)
            noise = torch.randn_like(x0)
            x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            v = model(hidden_states=x_t, encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled,
                      timestep=t * SD3_FIXED["time_scale"]).sample
            loss = F.mse_loss(v, noise - x0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    finally:
        batches.close()
    seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)

    def velocity(x, t, cond):  # diffusers' SD3 takes no text mask: padding rows are zeros from the encoder
        return model(hidden_states=x, encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled,
                     timestep=t * SD3_FIXED["time_scale"]).sample

    return velocity, steps, seconds


def main() -> None:
    args = parse_args()
    overrides = [*args.overrides, f"run_dir={args.out}", "logging.progress=false", "logging.tensorboard=false"]
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    recipe = load_recipe(args.recipe, overrides)
    ensure_shards(recipe.data)
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists: the flowmatch side must train from scratch (pass another --out)")
    steps = [int(s) for s in args.steps.split(",")]

    summary = train(recipe)  # the shipped recipe; its wall time is the budget
    budget = summary.seconds
    ours = evaluate(args.out, steps=steps, solvers=["euler"], samples_per_prompt=args.samples,
                    likelihood_samples=0)

    encoders = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels)
    resolved = load_recipe(args.recipe, overrides)
    resolved.model = encoders.fill_model_config(resolved.model)
    velocity, base_steps, base_seconds = train_baseline(resolved, encoders, budget, args.seed)
    judge = get_task(resolved.eval.task, "eval.task").judge
    plan = EvalPlan({"euler": steps}, args.samples, resolved.sampling.guidance_scale)
    theirs = judge(Pipeline(velocity, encoders, GenerationConfig.of(resolved), recipe=resolved), plan)

    print(f"budget {budget:.0f} s of training; {args.samples} images per digit, guidance "
          f"{resolved.sampling.guidance_scale:g}, Euler; frechet floor {theirs.reference['frechet_floor']:.1f}")
    print(f"{'':>10} {'steps':>6} {'seconds':>7} {'euler':>5} {'accuracy':>8} {'paraphr.':>8} {'frechet':>8}")
    for name, n, s, rows in (("flowmatch", summary.final_step, summary.seconds, ours.scores.rows),
                             ("baseline", base_steps, base_seconds, theirs.rows)):
        for r in rows:
            mt = r.metrics
            print(f"{name:>10} {n:>6} {s:>7.0f} {r.steps:>5} {mt['accuracy']:>8.3f} "
                  f"{mt['paraphrase_accuracy']:>8.3f} {mt['frechet']:>8.1f}")


if __name__ == "__main__":
    main()
