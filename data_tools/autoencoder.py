"""`flowmatch-data autoencoder SHARDS OUT_DIR`: train a small `diffusers.AutoencoderKL` on a shard set's images.

The images stream through the project's loader (flowmatch.data: the train split, resized and center-cropped to
the resolution as training does). The loss is L1 + MSE reconstruction of a posterior sample plus a small KL
term (latent diffusion's KL-regularised autoencoder; no perceptual or adversarial term, which would not be
cheap on a CPU). When training ends:

- the latent scale and shift are computed from data, as the SD3 and FLUX VAEs' `scaling_factor` /
  `shift_factor` were chosen: over the posterior means of every training image, shift = their mean and
  scale = 1 / their standard deviation, so `(z - shift) * scale` has zero mean and unit variance; both are
  written into the saved config (recipes load them with `autoencoder.preset: config`);
- the reconstruction PSNR of the held-out images (val-* shards, else a hash-chosen 5% of the keys) is measured
  on the posterior means, as training the flow uses them;
- the model is written with `save_pretrained` into a temporary folder renamed to OUT_DIR, so
  `autoencoder.name_or_path: OUT_DIR` (with `subfolder: ''`) loads it like any hub VAE, and
  OUT_DIR/training.json records the settings and figures.

Training is resumable: every `checkpoint_every` steps the weights, the AdamW moments, the posterior-noise
generator and the loader position go into OUT_DIR.training/state.safetensors (one file, written under another
name and renamed, never pickled); the same command continues from it and ends where an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from flowmatch.data import DataConfig, build_loader
from flowmatch.data.config import resolution_hw

STATE_FILE = "state.safetensors"
INFO_FILE = "training.json"
# Latent diffusion's KL-f autoencoders weight the KL term 1e-6 against a reconstruction loss summed over
# pixels; the loss here is a per-pixel mean, so the KL (summed over latent elements) is divided by the pixel
# count to keep that ratio.
KL_WEIGHT = 1e-6
# Without val-* shards, this fraction of the keys (a stable hash) is held out for the PSNR.
HOLDOUT_FRACTION = 0.05
WARMUP_STEPS = 50


@dataclass(frozen=True)
class AutoencoderSettings:
    """How to build and train the autoencoder (the `flowmatch-data autoencoder` options)."""

    resolution: Union[int, tuple[int, int]] = 32
    """Training image size (side or (height, width)); the same as the flow recipe's data.resolution."""
    channels: int = 1
    """Image channels (1 grayscale, 3 RGB)."""
    latent_channels: int = 4
    """Channels of the latents."""
    downsample: int = 4
    """Pixels per latent along each side: a power of two (one encoder level per factor of two)."""
    width: int = 16
    """Channels of the first encoder level (later levels have twice as many)."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to zero)."""
    kl_weight: float = KL_WEIGHT
    """Weight of the KL term per pixel (see KL_WEIGHT)."""
    seed: int = 0
    """Seed of the initial weights, the data order and the posterior samples."""
    checkpoint_every: int = 200
    """Steps between resumable checkpoints (0 = only at the end)."""

    def levels(self) -> int:
        """Encoder levels: log2(downsample) + 1."""
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"--downsample must be a power of two, got {self.downsample}")
        return int(math.log2(self.downsample)) + 1

    def block_channels(self) -> tuple[int, ...]:
        """Channels per level: width, then 2 x width."""
        return (self.width,) + (2 * self.width,) * (self.levels() - 1)


@dataclass
class AutoencoderReport:
    """What a finished training wrote and measured."""

    out: str
    steps: int
    resumed_from: int
    heldout_psnr: float
    """dB, 10 log10(1 / MSE) over all held-out pixels in [0, 1] (the mean MSE, not a mean of per-image PSNRs)."""
    heldout_images: int
    scaling_factor: float
    shift_factor: float
    seconds: float

    def summary(self) -> str:
        resumed = f" (resumed at step {self.resumed_from})" if self.resumed_from else ""
        return (f"wrote {self.out}: {self.steps} steps{resumed} in {self.seconds:.0f} s; held-out PSNR "
                f"{self.heldout_psnr:.2f} dB on {self.heldout_images} images; scaling_factor "
                f"{self.scaling_factor:.4f}, shift_factor {self.shift_factor:.4f}")


def build_autoencoder(s: AutoencoderSettings):
    """A freshly initialised AutoencoderKL of the settings' size (seeded)."""
    from diffusers import AutoencoderKL

    levels = s.levels()
    torch.manual_seed(s.seed)
    return AutoencoderKL(
        in_channels=s.channels, out_channels=s.channels, latent_channels=s.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=s.block_channels(), layers_per_block=1, norm_num_groups=min(8, s.width),
        sample_size=max(resolution_hw(s.resolution)),
    )


def data_config(shards: str, s: AutoencoderSettings) -> DataConfig:
    """The loader settings: the shards at the autoencoder's resolution, read in the training process."""
    resolution = list(s.resolution) if isinstance(s.resolution, tuple) else s.resolution
    return DataConfig(shards=shards, resolution=resolution, channels=s.channels, cached=False,
                      num_workers=0, holdout_fraction=HOLDOUT_FRACTION)


def lr_at(step: int, s: AutoencoderSettings) -> float:
    """Linear warm-up over WARMUP_STEPS, then cosine decay to zero at s.steps."""
    warm = min(WARMUP_STEPS, max(1, s.steps // 10))
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, s.steps - warm)))


def autoencoder_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float) -> torch.Tensor:
    """L1 + MSE reconstruction of a posterior sample (per-pixel means) + kl_weight x KL per pixel; images (B, C, H, W)
    in [-1, 1]."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / images[0].numel()
    return F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * kl


# ----------------------------------------------------------------------------------------------- resume state


def save_state(path: Path, step: int, vae, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               loader_state: dict, settings: AutoencoderSettings) -> None:
    """Weights, AdamW moments and the generator as tensors, the rest as JSON metadata, in one file renamed into
    place (a crash leaves the previous state intact)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in vae.state_dict().items()}
    opt = optimizer.state_dict()
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).contiguous()
    tensors["generator"] = generator.get_state()
    meta = {"step": step, "loader": loader_state, "settings": asdict(settings)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: Path, vae, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               settings: AutoencoderSettings) -> tuple[int, dict]:
    """Restore what save_state wrote; returns (step, loader state). Refuses a state made with other settings."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    saved = meta["settings"]
    if "resolution" in saved and isinstance(saved["resolution"], list):
        saved["resolution"] = tuple(saved["resolution"])
    if saved != asdict(settings):
        differ = sorted(k for k in saved if saved[k] != asdict(settings).get(k))
        raise ValueError(f"{path} was saved with other settings ({', '.join(differ)}); use them again, or delete "
                         f"{path.parent} to start over")
    tensors = load_file(str(path))
    vae.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt = optimizer.state_dict()
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    generator.set_state(tensors["generator"])
    return int(meta["step"]), meta["loader"]


# ----------------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def latent_statistics(vae, shards: str, s: AutoencoderSettings) -> tuple[float, float]:
    """(scaling_factor, shift_factor) making the posterior means of every training image zero-mean, unit-variance."""
    loader = build_loader(data_config(shards, s), rank=0, world_size=1, batch_size=256, seed=0, epochs=1)
    total, total_sq, count = 0.0, 0.0, 0
    for batch in loader:
        z = vae.encode(batch.images).latent_dist.mean.double()
        total, total_sq, count = total + z.sum().item(), total_sq + (z * z).sum().item(), count + z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 1e-12))
    return 1.0 / std, mean


@torch.no_grad()
def heldout_psnr(vae, shards: str, s: AutoencoderSettings) -> tuple[float, int]:
    """(PSNR in dB over all held-out pixels in [0, 1], images) of reconstructions from the posterior means."""
    loader = build_loader(data_config(shards, s), rank=0, world_size=1, batch_size=256, seed=0, split="val")
    squared, pixels, images = 0.0, 0, 0
    for batch in loader:
        recon = vae.decode(vae.encode(batch.images).latent_dist.mean).sample.clamp(-1, 1)
        squared += ((recon - batch.images) / 2).pow(2).sum().item()  # [-1, 1] -> [0, 1] halves the error
        pixels, images = pixels + batch.images.numel(), images + len(batch)
    return 10 * math.log10(pixels / max(squared, 1e-20)), images


# ----------------------------------------------------------------------------------------------- training


def train_autoencoder(shards: str, out: str | Path, settings: AutoencoderSettings = AutoencoderSettings(), *,
                      progress: bool = True, stop_after: Optional[int] = None) -> Optional[AutoencoderReport]:
    """Train (or resume training) an autoencoder on `shards` and write it to `out`; see the module docstring.

    `stop_after` ends the run after that many steps with a checkpoint and returns None, as an interruption
    would (the same call without it continues).
    """
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new OUT_DIR")
    work = out.with_name(out.name + ".training")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    vae = build_autoencoder(settings)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = build_loader(data_config(shards, settings), rank=0, world_size=1, batch_size=settings.batch_size,
                          seed=settings.seed)
    step = 0
    if (work / STATE_FILE).is_file():
        step, loader_state = load_state(work / STATE_FILE, vae, optimizer, generator, settings)
        loader.load_state_dict(loader_state)
    resumed_from = step
    vae.train()
    batches = iter(loader)
    bar = tqdm(total=settings.steps, initial=step, desc="autoencoder", unit="step", disable=not progress)
    try:
        while step < settings.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            loss = autoencoder_loss(vae, next(batches).images, generator, settings.kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == settings.steps:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            interrupted = stop_after is not None and step - resumed_from >= stop_after
            if (settings.checkpoint_every and step % settings.checkpoint_every == 0) or interrupted:
                save_state(work / STATE_FILE, step, vae, optimizer, generator, loader.state_dict(), settings)
            if interrupted and step < settings.steps:
                return None
    finally:
        bar.close()
        batches.close()
    vae.eval()
    scale, shift = latent_statistics(vae, shards, settings)
    psnr, count = heldout_psnr(vae, shards, settings)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    report = AutoencoderReport(str(out), step, resumed_from, psnr, count, scale, shift, time.time() - started)
    building = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    vae.save_pretrained(building)
    (building / INFO_FILE).write_text(json.dumps({"settings": asdict(settings), "report": asdict(report),
                                                  "shards": shards}, indent=2) + "\n")
    if out.is_dir():
        out.rmdir()  # empty (checked above): os.replace cannot rename a directory onto a non-empty one
    os.replace(building, out)
    shutil.rmtree(work, ignore_errors=True)
    return report
