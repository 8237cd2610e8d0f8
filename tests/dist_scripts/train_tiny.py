"""A tiny training run through flowmatch.engine and flowmatch.checkpoint, launched by tests/test_engine.py.

Run as ``python train_tiny.py --run-dir DIR ...`` (one process) or under ``torchrun``. Every configuration sees the
same global batches in the same order, so runs that differ only in ZeRO stage, process count or gradient
accumulation must follow the same trajectory. Rank 0 writes ``DIR/result.json`` (per-step losses, learning rates,
gradient norms, step times, and the outcome of the checks requested on the command line).

The inputs also draw noise from the global torch, numpy and python RNGs (seeded identically on every rank, each
rank taking its slice of a global-batch draw), so an exact resume needs the RNG states from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, so no install is needed

from flowmatch.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint  # noqa: E402
from flowmatch.engine import DistributedConfig, Engine, OptimConfig, run_guarded  # noqa: E402

GLOBAL_BATCH = 8
DIM = 16
WIDTH = 48
SEED = 0
NOISE_SCALE = 0.05
RUN_MARK = "=== train_tiny run "  # starts each run's output when one process trains several (`--then`)


class TinyNet(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear, times a buffer: weight matrices big enough to be partitioned under
    ZeRO-3 with the tests' persistence threshold, vectors small enough to stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.out = nn.Linear(WIDTH, DIM)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, DIM) -> (B, DIM)
        return self.out(self.norm(F.gelu(self.inp(x)))) * self.scale


def dataset(n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n_steps * GLOBAL_BATCH, DIM, generator=g)
    w = torch.randn(DIM, DIM, generator=g) / DIM**0.5
    return x, torch.sin(x @ w)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--ema-decay", type=float, default=0.9)
    p.add_argument("--persistence-threshold", type=int, default=100)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--nan-at", type=int, nargs="*", default=[], help="insert a window with a non-finite loss "
                   "(on the last rank only) before these steps")
    p.add_argument("--fail-rank", type=int, default=-1, help="this rank raises after --fail-at steps")
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--others-sleep", type=float, default=0.0, help="meanwhile the other ranks sleep this long, "
                   "outside any collective, so only the failure notice can stop them early")
    p.add_argument("--kill-in-save-at", type=int, default=-1, help="SIGKILL itself in the middle of this save")
    p.add_argument("--ema-eval-at", type=int, default=-1, help="check EMA swapping against a plain model here")
    p.add_argument("--check-loaded", action="store_true", help="compare the restored weights with the checkpoint")
    p.add_argument("--refuse-torch-load", action="store_true", help="make torch.load raise: nothing may be unpickled")
    return p.parse_args(argv)


def _refuse_torch_load() -> None:
    """Every way in to torch.load raises: resuming must read no pickle (DeepSpeed calls torch.load by attribute)."""
    def refuse(*args, **kwargs):
        raise RuntimeError(f"torch.load was called on {args[0] if args else kwargs.get('f')!r}")

    torch.load = torch.serialization.load = refuse


def main(argv: list[str] | None = None) -> None:
    """One run, on one torch thread as a launched run (OMP_NUM_THREADS=1, tests/launching.py) has it: a run in a
    test's own process must give the launched reference's bits, and other thread counts sum in other orders."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(argv)
    finally:
        torch.set_num_threads(threads)


def _run(argv: list[str] | None) -> None:
    args = parse(argv)
    run_dir = Path(args.run_dir)
    if args.refuse_torch_load:
        _refuse_torch_load()
    engine = Engine(DistributedConfig(zero_stage=args.zero_stage, precision=args.precision, timeout_s=args.timeout,
                                      zero3_persistence_threshold=args.persistence_threshold))
    rank, world = engine.rank, engine.world_size
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    micro = GLOBAL_BATCH // (world * args.grad_accum)
    torch.manual_seed(SEED)
    encoder = nn.Linear(DIM, DIM).requires_grad_(False)  # frozen, outside the engine (a stand-in text encoder)
    with engine.model_init():
        model = TinyNet()
    optim = OptimConfig(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, eps=1e-8, warmup_steps=2, schedule="cosine",
                        min_lr_ratio=0.1, grad_clip=0.5)
    engine.setup(model, model.parameters(), optim, max_steps=args.steps, micro_batch_size=micro,
                 grad_accum_steps=args.grad_accum)
    engine.init_ema(args.ema_decay)
    xs, ys = dataset(args.steps)
    result: dict = {"world_size": world, "zero_stage": args.zero_stage, "losses": {}, "lrs": {}, "grad_norms": {},
                    "step_times": [], "resumed_from": None}

    step = 0
    gen = torch.Generator().manual_seed(SEED)  # its state travels in client_state as a tensor
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        client = load_checkpoint(engine, ckpt)
        step = client["step"]
        assert client["data"] == {"position": step * GLOBAL_BATCH, "layout": (GLOBAL_BATCH, DIM)}, client
        gen.set_state(client["generator"])
        result["resumed_from"] = str(ckpt)
        if engine.is_main:
            print(f"resuming from {ckpt} at step {step}", flush=True)
        if args.check_loaded:
            weights, ema = engine.model_state_dict(), engine.ema.state_dict()
            if engine.is_main:
                result["loaded_weights_match"] = _same(weights, load_weights(ckpt, ema=False))
                result["loaded_ema_match"] = _same(ema, load_weights(ckpt, ema=True))
    else:
        # Seed after setup so that whatever DeepSpeed draws during setup cannot shift the streams between configs.
        torch.manual_seed(SEED)
        np.random.seed(SEED)
        random.seed(SEED)

    save_step = -1  # the step being saved, read by killing_model_state_dict
    if args.kill_in_save_at >= 0:
        real_model_state_dict = engine.model_state_dict

        def killing_model_state_dict() -> dict:
            # Called by save_checkpoint after the engine state is on disk and before the weights are.
            if save_step == args.kill_in_save_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_model_state_dict()

        engine.model_state_dict = killing_model_state_dict  # type: ignore[method-assign]

    def batch(s: int, m: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = rank * micro * args.grad_accum + m * micro
        idx = slice(s * GLOBAL_BATCH + lo, s * GLOBAL_BATCH + lo + micro)
        with torch.no_grad():
            return encoder(xs[idx] + noise[lo:lo + micro]), ys[idx]

    while step < args.steps:
        if step in args.nan_at:
            _bad_window(engine, args, batch, step, result)
        t0 = time.perf_counter()
        jitter = 1.0 + random.random() + float(np.random.rand())
        noise = NOISE_SCALE * (jitter * torch.randn(GLOBAL_BATCH, DIM) + torch.randn(GLOBAL_BATCH, DIM, generator=gen))
        losses = []
        for m in range(args.grad_accum):
            x, y = batch(step, m, noise)
            loss = F.mse_loss(engine.forward(x.to(engine.dtype)).float(), y)
            engine.backward(loss)
            losses.append(loss.detach())
        res = engine.step()
        assert res.stepped and not res.skipped and res.grad_norm is not None, res
        engine.ema.update()
        mean_loss = engine.all_reduce_mean(torch.stack(losses).mean()).item()
        result["step_times"].append(time.perf_counter() - t0)
        step += 1
        result["losses"][step] = mean_loss
        result["grad_norms"][step] = float(res.grad_norm)
        result["lrs"][step] = engine.lr
        if step == args.fail_at:
            if rank == args.fail_rank:
                raise RuntimeError(f"injected failure at step {step}")
            time.sleep(args.others_sleep)
        if step == args.ema_eval_at:
            _check_ema_eval(engine, result)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_step = step
            client = {"step": step, "data": {"position": step * GLOBAL_BATCH, "layout": (GLOBAL_BATCH, DIM)},
                      "generator": gen.get_state()}
            save_checkpoint(engine, run_dir, step, client_state=client, recipe_yaml=f"run_dir: {run_dir}\n",
                            keep=args.keep, ema=True)

    result["skipped"] = engine.skipped_steps
    result["optimizer_steps"] = engine.optimizer_steps
    if engine.is_main:
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    engine.shutdown()



def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bad_window(engine: Engine, args: argparse.Namespace, batch, step: int, result: dict) -> None:
    """One accumulation window whose last micro-batch has an infinite loss on the last rank only: it must be
    discarded on every rank with weights, EMA-relevant state, LR and step count untouched. Draws no randomness,
    so the run afterwards must match a run without it."""
    before, lr, n = engine.model_state_dict(), engine.lr, engine.optimizer_steps
    zeros = torch.zeros(GLOBAL_BATCH, DIM)
    for m in range(args.grad_accum):
        x, y = batch(step, m, zeros)
        loss = F.mse_loss(engine.forward(x.to(engine.dtype)).float(), y)
        if m == args.grad_accum - 1 and engine.rank == engine.world_size - 1:
            loss = loss * float("inf")
        engine.backward(loss)
    res = engine.step()
    assert res.skipped and not res.stepped and res.grad_norm is None, res
    after = engine.model_state_dict()
    if engine.is_main:
        assert _same(before, after), "a skipped window changed the weights"
    assert engine.lr == lr and engine.optimizer_steps == n, (engine.lr, lr, engine.optimizer_steps, n)
    result.setdefault("bad_windows_checked", 0)
    result["bad_windows_checked"] += 1


def _check_ema_eval(engine: Engine, result: dict) -> None:
    """The model under ema.weights() computes what a plain TinyNet with ema.state_dict() computes, and the
    training weights come back afterwards (the rest of the run must still match the reference)."""
    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(7))
    engine.eval()
    with torch.no_grad():
        with engine.ema.weights():
            out_ema = engine.forward(x)
        out_live = engine.forward(x)
    engine.train()
    ema_sd, live_sd = engine.ema.state_dict(), engine.model_state_dict()
    if engine.is_main:
        with torch.random.fork_rng():  # rank 0 alone builds it: keep the ranks' RNG streams in step
            plain = TinyNet()
        with torch.no_grad():
            plain.load_state_dict(ema_sd)
            ref_ema = plain(x)
            plain.load_state_dict(live_sd)
            ref_live = plain(x)
        result["ema_eval_max_diff"] = (out_ema - ref_ema).abs().max().item()
        result["live_eval_max_diff"] = (out_live - ref_live).abs().max().item()
        result["ema_vs_live_diff"] = (ref_ema - ref_live).abs().max().item()


if __name__ == "__main__":
    # `ARGS --then ARGS ...`: one process trains the runs one after the other (each its own engine), which saves a
    # launch's start-up per run where the runs need no process of their own.
    runs = [[]]
    for arg in sys.argv[1:]:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    for i, run in enumerate(runs):
        if len(runs) > 1:  # a line a test splits the shared log at (tests/test_engine.py: Runs.in_turn)
            sys.stderr.flush()
            print(f"{RUN_MARK}{i}", flush=True)
        run_guarded(main, run)
