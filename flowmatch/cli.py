"""The `flowmatch` command: train, sample, eval, check, export, lora check, ema. Each command parses, builds, runs
and closes.

`python -m flowmatch ...` is the same command, so `torchrun --nproc_per_node N -m flowmatch train ...` works.
Each command imports what it runs when it runs (`flowmatch --help` and argument errors answer before torch loads).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from pathlib import Path
from typing import Optional

from flowmatch.errors import RecipeError, UsageError
from flowmatch.runlock import RunLock

# Errors that are the user's input or files, printed without a traceback.
USAGE_ERRORS = (ValueError, FileNotFoundError, UsageError)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def split_recipe_args(args: list[str]) -> tuple[Optional[str], list[str]]:
    """`[RECIPE] [key=value ...]` -> (recipe path or None, overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def relocations(pairs: Optional[list[str]]) -> dict[str, str]:
    """`--relocate KEY=PATH` options -> {recipe path key: path}."""
    out = {}
    for pair in pairs or []:
        key, eq, path = pair.partition("=")
        if not eq or not key or not path:
            raise ValueError(f"--relocate takes KEY=PATH (e.g. autoencoder.name_or_path=/new/vae), got {pair!r}")
        out[key] = path
    return out


def cmd_train(ns: argparse.Namespace) -> int:
    from flowmatch.config import load_recipe  # reason: CLI start-up cost
    from flowmatch.engine import run_guarded  # reason: CLI start-up cost
    from flowmatch.training.loop import train  # reason: CLI start-up cost

    path, overrides = split_recipe_args(ns.args)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"expected section.key=value overrides after the recipe, got {bad}")
    recipe = load_recipe(path, overrides)

    def guarded():
        try:
            return train(recipe)
        # Problems of the recipe, the files or the run get a clear message and no traceback (other ranks stop
        # too); anything else is a bug and keeps its traceback.
        except (FileNotFoundError, UsageError) as err:
            print(f"flowmatch train: {err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"flowmatch train: the disk is full ({err.strerror}) writing {err.filename or recipe.run_dir}: "
                  "free some space or set run_dir= to another disk, then run the same command; checkpoints are "
                  "written atomically, so it resumes from the newest intact one", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    # On any failure run_guarded ends this process at once and tells the other ranks to stop, so no rank
    # hangs in a collective until its timeout.
    summary = run_guarded(guarded)
    interrupted = summary.stop_signal == "SIGINT"  # Ctrl-C: the shell's status for it, after the checkpoint
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":  # one summary per job
        return 130 if interrupted else 0
    if interrupted:
        print(f"flowmatch train: interrupted at step {summary.final_step}; checkpoint {summary.last_checkpoint}; run "
              "the same command to resume", file=sys.stderr)
        return 130
    print(
        f"{'stopped early' if summary.preempted else 'trained'} {summary.run_dir}: steps {summary.start_step} -> "
        f"{summary.final_step} in {summary.seconds:.0f} s, loss {summary.final_loss:.4f}, skipped "
        f"{summary.skipped_steps}; checkpoint {summary.last_checkpoint}"
        + ("; run the same command to resume" if summary.preempted else "")
    )
    return 0


def cmd_sample(ns: argparse.Namespace) -> int:
    from flowmatch import images, pipeline  # reason: CLI start-up cost

    if (Path(ns.path) / pipeline.MODEL_INDEX).is_file():  # a diffusers SD3 / FLUX pipeline folder
        pipe = pipeline.load_diffusers_pipeline(ns.path)
    else:
        pipe = pipeline.load_pipeline(ns.path, ema=False if ns.no_ema else ns.ema, relocate=relocations(ns.relocate))
    prompts = [p for p in ns.prompt for _ in range(ns.num)]
    grid = pipe.generate(prompts, steps=ns.steps, solver=ns.solver, guidance_scale=ns.guidance, seed=ns.seed)
    images.save_png(images.image_grid(grid, rows=len(ns.prompt)), ns.out, scale=ns.scale)
    print(f"wrote {ns.out}: {len(ns.prompt)} rows x {ns.num} images, {pipe.last_nfe} velocity evaluations")
    return 0


def trust_run_dir(ns: argparse.Namespace) -> None:
    """--trust-run-dir: the stored recipe may run the commands its shards name (flowmatch.data.trust)."""
    from flowmatch.data.trust import TRUST_ENV  # reason: CLI start-up cost (flowmatch.data loads torch)

    if ns.trust_run_dir:
        os.environ[TRUST_ENV] = "1"


def cmd_eval(ns: argparse.Namespace) -> int:
    from flowmatch import evaluate  # reason: CLI start-up cost

    trust_run_dir(ns)
    report = evaluate.evaluate(
        ns.path,
        steps=[int(s) for s in ns.steps.split(",")] if ns.steps else None,
        solvers=ns.solvers.split(",") if ns.solvers else None,
        nfe=[int(s) for s in ns.nfe.split(",")] if ns.nfe else None,
        guidance_scale=ns.guidance,
        samples_per_prompt=ns.samples,
        likelihood_samples=ns.likelihood_samples,
        out=ns.out,
        relocate=relocations(ns.relocate),
    )
    print(evaluate.format_report(report))
    return 0


def cmd_check(ns: argparse.Namespace) -> int:
    from flowmatch import checkpoint  # reason: CLI start-up cost

    statuses = checkpoint.check_run(ns.run)
    print(checkpoint.format_check(statuses))
    return 1 if checkpoint.newest_is_damaged(statuses) else 0


def cmd_export(ns: argparse.Namespace) -> int:
    from flowmatch.export import export  # reason: CLI start-up cost

    with RunLock(ns.out_dir, "flowmatch export"):
        print(export(ns.path, ns.out_dir, weights=ns.weights, fmt=ns.format, dtype=ns.dtype, lora=ns.lora,
                     merge=ns.merge, overwrite=ns.overwrite).describe())
    return 0


def cmd_lora_check(ns: argparse.Namespace) -> int:
    from flowmatch.lora_check import check_lora  # reason: CLI start-up cost

    result = check_lora(ns.file, ns.base, prompts=ns.prompt, steps=ns.steps, size=ns.size, seed=ns.seed,
                        guidance=ns.guidance, reference=ns.reference, tolerance=ns.tolerance, device=ns.device,
                        image=ns.image)
    print(result.describe())
    return 0 if result.passed else 1


def cmd_ema(ns: argparse.Namespace) -> int:
    from flowmatch import checkpoint, posthoc  # reason: CLI start-up cost

    trust_run_dir(ns)
    ckpt = checkpoint.resolve_checkpoint(ns.path)
    run_dir = ckpt.parent.parent
    with RunLock(run_dir, "flowmatch ema"):  # it writes RUN_DIR/ema/
        made = posthoc.reconstruct_ema(run_dir, [float(s) for s in ns.sigma_rel.split(",")], step=ns.step)
    for m in made:
        print(f"wrote {m.path}: sigma_rel {m.sigma_rel:g} at step {m.step} from {m.snapshots} snapshots "
              f"(profile misfit {m.residual:.1e}); load it with ema={m.name!r}")
    if not ns.eval:
        return 0
    from flowmatch.evaluate import compare_emas  # reason: CLI start-up cost

    scores = compare_emas(ckpt, [m.name for m in made], samples_per_prompt=ns.samples,
                          relocate=relocations(ns.relocate))
    names = list(dict.fromkeys(k for s in scores for k in s.metrics))
    print(f"{'weights':>16} {'val_loss':>9} " + " ".join(f"{n:>9}" for n in names))
    for s in scores:
        loss = "-" if s.val_loss is None else f"{s.val_loss:.5f}"
        print(f"{s.weights:>16} {loss:>9} " + " ".join(f"{s.metrics[n]:>9.3f}" for n in names))
    measured = [s for s in scores if s.val_loss is not None]
    if measured:
        print(f"best by validation loss: {min(measured, key=lambda s: s.val_loss).weights}")
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    from flowmatch.plan.report import plan_command  # reason: CLI start-up cost

    path, overrides = split_recipe_args(ns.args)
    print(plan_command(path, overrides, device=ns.device, memory_gb=ns.memory_gb, gpus=ns.gpus,
                       quantize=ns.quantize, optimizer=ns.optimizer, as_json=ns.json))
    return 0


RELOCATE_HELP = ("point the run at an asset moved since it was trained, e.g. autoencoder.name_or_path=/new/vae "
                 "(repeat for more; relative paths the run recorded are otherwise read where it was trained)")
TRUST_HELP = ("let the run's stored recipe run the pipe: commands its shards name (off: a run directory from "
              "elsewhere runs no code)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe (resumes from RUN_DIR's newest checkpoint)")
    p.add_argument("args", nargs="*", metavar="[RECIPE] [section.key=value ...]",
                   help="a recipe YAML (default: the built-in digits recipe) and dotted overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="peak memory per GPU of a recipe, and what to change so that it fits")
    p.add_argument("args", nargs="*", metavar="[RECIPE] [section.key=value ...]",
                   help="a recipe YAML and dotted overrides, as for train")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", default="h100", help="h100, h200, a100-40, a100-80, l40s, rtx4090, rtx4080 "
                                                        "(default h100)")
    where.add_argument("--memory-gb", type=finite_float, default=None, help="plan for this many GiB per GPU")
    p.add_argument("--gpus", type=positive_int, default=1, help="processes (GPUs) the job runs on")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (peak_bytes, fits, breakdown, ...)")
    p.add_argument("--quantize", choices=("int8", "fp8", "nf4"), default=None,
                   help="plan a LoRA run's frozen base quantised so, in place of the recipe's model.quantize "
                        "(a what-if)")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit", "adafactor"), default=None,
                   help="plan with this optimizer's state (default: the recipe's optim.name)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sample", help="generate an image grid from a run, a checkpoint or a diffusers pipeline")
    p.add_argument("path", help="a run directory (newest checkpoint), one checkpoint directory, or a diffusers "
                                "SD3 / FLUX pipeline folder")
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for more rows")
    p.add_argument("--num", type=positive_int, default=8, help="images per prompt (one grid row each prompt)")
    p.add_argument("--steps", type=positive_int, default=None, help="ODE steps (default: the recipe's)")
    p.add_argument("--solver", default=None,
                   help="euler, heun, midpoint, rk4, dpm++2m, dopri5 ..., or ddim, ancestral, pc")
    p.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.add_argument("--scale", type=positive_int, default=1, help="upscale the grid (nearest) for viewing")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights whatever the checkpoint's default")
    p.add_argument("--ema", default=None, help="an EMA reconstructed by `flowmatch ema`, e.g. sigma_rel-0.1")
    p.add_argument("--relocate", action="append", metavar="KEY=PATH", help=RELOCATE_HELP)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="prompt accuracy, Frechet distance and bits/dim of a run")
    p.add_argument("path", help="a run directory or checkpoint directory")
    p.add_argument("--steps", default=None, help="comma-separated step counts (default: the recipe's eval.steps)")
    p.add_argument("--solvers", default=None, help="comma-separated solvers (default: the recipe's eval.solvers)")
    p.add_argument("--guidance", type=finite_float, default=None, help="guidance scale (default: the recipe's)")
    p.add_argument("--nfe", default=None, help="comma-separated velocity-evaluation budgets (instead of --steps)")
    p.add_argument("--samples", type=positive_int, default=None, help="images per class prompt")
    p.add_argument("--likelihood-samples", type=int, default=None, help="held-out images for bits/dim (0 = skip)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.add_argument("--relocate", action="append", metavar="KEY=PATH", help=RELOCATE_HELP)
    p.add_argument("--trust-run-dir", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("check", help="verify every checkpoint of a run (exit 1 when the newest is damaged)")
    p.add_argument("run", help="a run directory")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", help="write a run's transformer for diffusers (or in original single-file keys)")
    p.add_argument("path", help="a run directory (newest checkpoint) or one checkpoint directory")
    p.add_argument("out_dir", help="output directory: OUT_DIR/transformer/ (diffusers) or "
                                   "OUT_DIR/transformer.safetensors (original), and OUT_DIR/scheduler/")
    p.add_argument("--weights", choices=("ema", "raw"), default=None, help="default: EMA when the run kept one")
    p.add_argument("--format", default="diffusers",
                   help="diffusers: a folder from_pretrained loads; original: SD3 joint_blocks.* / BFL FLUX keys; "
                   "with --lora: diffusers (peft keys), comfyui (diffusion_model.* keys) or kohya (lora_unet_* keys)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="weights dtype of the export (the checkpoint's is fp32; the releases are bf16)")
    p.add_argument("--lora", action="store_true", help="a LoRA run's adapters: OUT_DIR/"
                   "pytorch_lora_weights.safetensors for diffusers' load_lora_weights, or OUT_DIR/"
                   "lora_<format>.safetensors with --format comfyui | kohya")
    p.add_argument("--merge", action="store_true", help="a LoRA run's adapters merged into its base weights, "
                   "written as a whole transformer (--format applies)")
    p.add_argument("--overwrite", action="store_true", help="replace the output parts (transformer, scheduler, "
                   "pipeline components) that OUT_DIR already holds and this export writes; without it they are "
                   "an error")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lora", help="LoRA files: `lora check FILE --base PIPELINE_DIR`")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    p = lora_sub.add_parser("check", help="generate with a LoRA file in flowmatch and in diffusers (or merged as "
                            "ComfyUI merges it) from the same noise; exit 1 when they differ or it has no effect")
    p.add_argument("file", help="a LoRA .safetensors file: diffusers', ComfyUI's or kohya's keys, or another "
                                "trainer's")
    p.add_argument("--base", required=True, help="the diffusers pipeline folder the LoRA was made for")
    p.add_argument("--prompt", action="append", default=None, help="a caption; repeat for more (default: one)")
    p.add_argument("--steps", type=positive_int, default=4, help="sampling steps (default 4)")
    p.add_argument("--size", type=positive_int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared latent noise")
    p.add_argument("--guidance", type=finite_float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--reference", choices=("auto", "diffusers", "merged"), default="auto",
                   help="diffusers: load_lora_weights; merged: merged into the release's weights as ComfyUI does; "
                   "auto: diffusers when it applies the file, else merged")
    p.add_argument("--image", default=None, help="the reference image (PNG, JPEG) an editing family's pipeline "
                   "edits (FLUX.1 Kontext, Qwen-Image-Edit): the same one on both sides, resized as each pipeline "
                   "resizes it; required for those families, refused for text-to-image ones")
    p.add_argument("--tolerance", type=finite_float, default=1e-3, help="largest max pixel difference that passes")
    p.add_argument("--device", default="cpu", help="where both generate (default cpu)")
    p.set_defaults(func=cmd_lora_check)

    p = sub.add_parser("ema", help="post-hoc EMA: reconstruct EMAs of other lengths from a run's snapshots")
    p.add_argument("path", help="a run directory trained with train.ema_profiles (or one of its checkpoints)")
    p.add_argument("--sigma-rel", required=True, help="comma-separated relative EMA widths, e.g. 0.05,0.1,0.15")
    p.add_argument("--step", type=int, default=None, help="reconstruct at this snapshot's step (default: newest)")
    p.add_argument("--eval", action="store_true", help="also score raw, EMA and each reconstruction")
    p.add_argument("--samples", type=int, default=None, help="images per class prompt for the task's judge")
    p.add_argument("--relocate", action="append", metavar="KEY=PATH", help=RELOCATE_HELP)
    p.add_argument("--trust-run-dir", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_ema)
    return parser


def take_local_rank(argv: list[str]) -> list[str]:
    """Remove the `--local_rank=N` / `--local-rank N` that launchers insert anywhere in the command line (the
    deepspeed launcher puts it before the subcommand) and export it as LOCAL_RANK, which the engine reads."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                if i + 1 == len(argv):
                    raise SystemExit(f"flowmatch: {name} needs a value")
                value, i = argv[i + 1], i + 1
            if not value.isdigit():
                raise SystemExit(f"flowmatch: {name} must be a non-negative integer, got {value!r}")
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports take seconds) or in a command
        print("flowmatch: interrupted", file=sys.stderr)
        return 130


def _main(argv: Optional[list[str]]) -> int:
    ns = build_parser().parse_args(take_local_rank(sys.argv[1:] if argv is None else list(argv)))
    try:
        return ns.func(ns)
    except RecipeError as err:
        print(f"flowmatch: recipe error: {err}", file=sys.stderr)
        return 2
    except USAGE_ERRORS as err:
        print(f"flowmatch {ns.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
