"""`flowmatch-data`: build, encode, inspect and verify WebDataset shards. Each subcommand lives in its module."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

DEFAULT_SHARD_SIZE = 1000


def parser() -> argparse.ArgumentParser:
    from data_tools.autoencoder import AutoencoderSettings as AutoencoderDefaults

    p = argparse.ArgumentParser(prog="flowmatch-data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    folder = sub.add_parser("folder", help="images (png/jpg/webp) with same-name .txt or .json captions -> shards")
    folder.add_argument("src", help="folder of images and captions (searched recursively)")
    folder.add_argument("out", help="output directory for shard-*.tar and report.json")
    folder.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    folder.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    folder.add_argument("--keep-order", action="store_true", help="keep the sorted file order instead of shuffling")
    folder.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    folder.add_argument("--reference-field", default="reference",
                        help="the .json field naming an entry's reference image(s) for paired (editing) data")

    digits = sub.add_parser("digits", help="scikit-learn's 8x8 digits with varied captions -> train-*/val-* shards")
    digits.add_argument("out")
    digits.add_argument("--shard-size", type=int, default=256)
    digits.add_argument("--overwrite", action="store_true")

    edit = sub.add_parser("digits-edit", help="the digits editing job: reference digit + 'add K' -> (d + K) mod 10 "
                          "(paired train-*/val-* shards)")
    edit.add_argument("out")
    edit.add_argument("--shard-size", type=int, default=2048)
    edit.add_argument("--overwrite", action="store_true")

    jsonl = sub.add_parser("jsonl", help='rows of {"image": path or url, "caption": text} -> shards')
    jsonl.add_argument("file")
    jsonl.add_argument("out")
    jsonl.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    jsonl.add_argument("--threads", type=int, default=8, help="parallel downloads for URL rows")
    jsonl.add_argument("--overwrite", action="store_true")
    jsonl.add_argument("--reference-field", default="reference",
                       help="the row field naming its reference image(s), path or URL, for paired (editing) data")

    encode = sub.add_parser("encode", help="precompute latents and text embeddings into new shards (resumable)")
    encode.add_argument("src", metavar="IN", help="raw shards: directory, glob or brace pattern")
    encode.add_argument("out", help="output directory (re-run the same command to resume)")
    encode.add_argument("--recipe", required=True, help="recipe YAML naming the encoders and the data section")
    encode.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, e.g. --set data.resolution=256 (repeatable)")
    encode.add_argument("--batch-size", type=int, default=64)
    encode.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="storage dtype (fp16 keeps pixel-space data more exactly)")
    encode.add_argument("--text-quant", default="", choices=("", "int8", "fp8"),
                        help="store text features as int8 or fp8 with a per-token scale (about half of bf16)")
    encode.add_argument("--processes", type=int, default=1, help="shards encoded at once (one encoder copy each)")
    encode.add_argument("--device", default="auto", help="auto (spread over GPUs, else CPU), cpu, cuda or cuda:N")
    encode.add_argument("--no-progress", action="store_true")

    ae = sub.add_parser("autoencoder", help="train a small diffusers AutoencoderKL on the shards' images (resumable)")
    ae.add_argument("shards", help="training shards: directory, glob or brace pattern (val-* shards: held-out PSNR)")
    ae.add_argument("out", help="output folder for save_pretrained (re-run the same command to resume)")
    defaults = AutoencoderDefaults()
    ae.add_argument("--resolution", type=int, default=defaults.resolution, help="image side in pixels")
    ae.add_argument("--channels", type=int, default=defaults.channels, choices=(1, 3))
    ae.add_argument("--latent-channels", type=int, default=defaults.latent_channels)
    ae.add_argument("--downsample", type=int, default=defaults.downsample, help="pixels per latent (power of two)")
    ae.add_argument("--width", type=int, default=defaults.width, help="channels of the first level")
    ae.add_argument("--steps", type=int, default=defaults.steps)
    ae.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ae.add_argument("--lr", type=float, default=defaults.lr)
    ae.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    ae.add_argument("--seed", type=int, default=defaults.seed)
    ae.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    ae.add_argument("--no-progress", action="store_true")

    inspect = sub.add_parser("inspect", help="counts, member kinds, caption lengths and a preview grid PNG")
    inspect.add_argument("shards")
    inspect.add_argument("--preview", default="inspect-preview.png", help="grid PNG path ('' = none)")
    inspect.add_argument("--limit", type=int, default=None, help="read only the first N samples")

    verify = sub.add_parser("verify", help="list corrupt members (exit status 1 when any)")
    verify.add_argument("shards")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, ImportError) as err:
        print(f"flowmatch-data {args.command}: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.command == "folder":
        from data_tools.folder import build_folder

        report = build_folder(args.src, args.out, shard_size=args.shard_size, seed=args.seed,
                              shuffle=not args.keep_order, overwrite=args.overwrite,
                              reference_field=args.reference_field)
        print(report.summary())
    elif args.command == "digits":
        from data_tools.digits import write_digits

        counts = write_digits(args.out, shard_size=args.shard_size, overwrite=args.overwrite)
        print(f"wrote {counts['train']} train and {counts['val']} val digits to {args.out}")
    elif args.command == "digits-edit":
        from data_tools.digits_edit import write_digits_edit

        counts = write_digits_edit(args.out, shard_size=args.shard_size, overwrite=args.overwrite)
        print(f"wrote {counts['train']} train and {counts['val']} val edits to {args.out}")
    elif args.command == "jsonl":
        from data_tools.jsonl import build_jsonl

        report = build_jsonl(args.file, args.out, shard_size=args.shard_size, threads=args.threads,
                             overwrite=args.overwrite, reference_field=args.reference_field)
        print(report.summary())
    elif args.command == "encode":
        from data_tools.encode import EncodeSettings, encode_shards, launcher_rank

        settings = EncodeSettings(args.recipe, tuple(args.overrides), args.batch_size, args.dtype, args.device,
                                  args.text_quant)
        rank, world_size = launcher_rank()
        report = encode_shards(args.src, args.out, settings, processes=args.processes,
                               progress=not args.no_progress and rank == 0, rank=rank, world_size=world_size)
        bad = ", ".join(f"{n} {r}" for r, n in sorted(report.bad.items())) or "none"
        print(f"encoded {report.encoded} shards ({report.samples} samples; {report.already_done} already done); "
              f"skipped: {bad}; encoders: {report.encoders}")
    elif args.command == "autoencoder":
        from data_tools.autoencoder import AutoencoderSettings, train_autoencoder

        settings = AutoencoderSettings(
            resolution=args.resolution, channels=args.channels, latent_channels=args.latent_channels,
            downsample=args.downsample, width=args.width, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            kl_weight=args.kl_weight, seed=args.seed, checkpoint_every=args.checkpoint_every,
        )
        print(train_autoencoder(args.shards, args.out, settings, progress=not args.no_progress).summary())
    elif args.command == "inspect":
        from data_tools.summary import inspect_shards

        summary = inspect_shards(args.shards, preview=args.preview or None, limit=args.limit)
        print("\n".join(summary.lines()))
    elif args.command == "verify":
        from data_tools.verify import verify_pattern

        report = verify_pattern(args.shards)
        for line in report.problems:
            print(line)
        print(f"{report.shards} shards, {report.samples} samples, {len(report.problems)} problems")
        return 1 if report.problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
