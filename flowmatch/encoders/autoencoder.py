"""Frozen autoencoders between pixels and the space the flow is trained in.

`vae` wraps `diffusers.AutoencoderKL` and normalises its latents as `(z - shift) * scale` with the factors of a
named preset; `identity` trains in pixel space (images in [-1, 1] are the "latents"). A folder holding
`AutoencoderKLQwenImage` (Qwen-Image's causal 3D VAE) is used with one frame, and its config's per-channel
``latents_mean`` / ``latents_std`` are the shift and 1 / scale (preset ``config``), as QwenImagePipeline applies
them. A folder holding `AutoencoderKLFlux2` (FLUX.2's 32-channel VAE) is normalised by its batch-norm statistics
(``bn.running_mean``, ``bn.running_var``), which Flux2Pipeline applies per feature of 2x2-patchified latents: here
the same numbers act on the unpatchified latents, each channel's 2x2 statistics tiled over the latent grid (the
feature (c, row % 2, column % 2) of a latent value), so the latents keep their 32 channels and the family packs
them as FLUX.1's (preset ``config``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from flowmatch.dtypes import DTYPES, resolve_dtype
from flowmatch.encoders.loading import load_pretrained
from flowmatch.errors import choice_error
from flowmatch.tasks import check_task_name, get_task

if TYPE_CHECKING:
    from flowmatch.data.config import DataConfig

log = logging.getLogger("flowmatch.encoders")

# Latent normalisation (scale, shift) of released VAEs, from their diffusers configs:
# SD3 / SD3.5 VAE (stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json),
# FLUX.1 VAE (black-forest-labs/FLUX.1-dev, ae/vae config), SDXL and SD 1.x (4-channel, no shift).
LATENT_PRESETS: dict[str, tuple[float, float]] = {
    "sd3": (1.5305, 0.0609),
    "flux": (0.3611, 0.1159),
    "sdxl": (0.13025, 0.0),
    "sd": (0.18215, 0.0),
    "config": (float("nan"), float("nan")),  # read scaling_factor / shift_factor from the VAE's own config
}
KINDS = ("vae", "identity")
#: The diffusers VAE classes a `vae` folder may hold; the video ones encode and decode one frame.
VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderKLFlux2")
VIDEO_VAES = ("AutoencoderKLQwenImage",)
#: The VAE classes normalised by statistics held in their weights (preset ``config``), not by config factors.
STATISTICS_VAES = ("AutoencoderKLFlux2",)


@dataclass
class AutoencoderConfig:
    """The recipe's `autoencoder` section."""

    kind: str = "vae"
    """vae (diffusers AutoencoderKL) or identity (train in pixel space)."""
    name_or_path: str = "stabilityai/stable-diffusion-3-medium-diffusers"
    """Hub id or local directory of the VAE (pkg:<package>/<subdir> also works); from_init = model.init_from's
    pipeline, whose VAE then keeps its own latent factors unless the recipe states a preset."""
    subfolder: str = "vae"
    """Subfolder of name_or_path holding the VAE ('' when the folder is the VAE itself)."""
    preset: str = "sd3"
    """Latent scale/shift preset: sd3, flux, sdxl, sd, or config (use the VAE config's factors)."""
    scaling_factor: Optional[float] = None
    """Overrides the preset's scale."""
    shift_factor: Optional[float] = None
    """Overrides the preset's shift."""
    sample_posterior: bool = False
    """Encode to a posterior sample instead of its mean (the mean is the default, as SD3 training caches)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."""
    prepare: str = ""
    """A task (flowmatch.tasks) whose autoencoder builder trains the VAE into name_or_path/subfolder when that
    local folder holds none, e.g. digits; '' = never build."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise choice_error("autoencoder.kind", self.kind, KINDS)
        check_task_name(self.prepare, "autoencoder.prepare", also=("",))
        if self.preset not in LATENT_PRESETS:
            raise choice_error("autoencoder.preset", self.preset, LATENT_PRESETS)
        if self.dtype not in ("auto", *DTYPES):
            raise choice_error("autoencoder.dtype", self.dtype, ("auto", *DTYPES))


def vae_sizes(class_name: str, config: Mapping[str, Any]) -> tuple[int, int]:
    """(spatial downsampling, latent channels) of a diffusers VAE config of class ``class_name`` (one of
    :data:`VAE_CLASSES`)."""
    channels = int(config.get("latent_channels") or config["z_dim"])
    if class_name in VIDEO_VAES:  # one spatial halving per entry of temperal_downsample (QwenImagePipeline's factor)
        return 2 ** len(config["temperal_downsample"]), channels
    return 2 ** (len(config["block_out_channels"]) - 1), channels


def _load_vae(path: str, subfolder: str, dtype: torch.dtype):
    """The diffusers VAE of a folder, of the class its config names (:data:`VAE_CLASSES`)."""
    # reason: diffusers' import costs seconds; only runs that load a VAE pay it.
    import diffusers

    found = diffusers.AutoencoderKL.load_config(path, subfolder=subfolder or None).get("_class_name",
                                                                                      "AutoencoderKL")
    if found not in VAE_CLASSES:
        raise ValueError(f"autoencoder.name_or_path holds a {found}; flowmatch reads {', '.join(VAE_CLASSES)}")
    return getattr(diffusers, found).from_pretrained(path, subfolder=subfolder or None, torch_dtype=dtype)


def ensure_autoencoder(cfg: AutoencoderConfig, data: "DataConfig") -> None:
    """Train the VAE with the `cfg.prepare` task's builder when its local folder holds none (call on rank 0, with the
    shards built, before anyone loads it); the builder writes into a new folder renamed into place."""
    if cfg.kind != "vae" or not cfg.prepare:
        return
    target = Path(cfg.name_or_path).expanduser() / cfg.subfolder
    if (target / "config.json").is_file():
        return
    builder = get_task(cfg.prepare, "autoencoder.prepare").autoencoder
    if builder is None:
        raise ValueError(f"autoencoder.prepare={cfg.prepare!r}: that task trains no autoencoder; set "
                         "autoencoder.prepare='' and train one with flowmatch-data autoencoder")
    log.warning("autoencoder: none at %s; training one with the %r task's builder (autoencoder.prepare)", target,
                cfg.prepare)
    builder(data, target)


class Autoencoder:
    """encode: images (B, C, H, W) in [-1, 1] -> latents (B, c, H/f, W/f); decode inverts it (clamped to [-1, 1])."""

    def __init__(self, cfg: AutoencoderConfig, *, image_channels: int = 3, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.image_channels = image_channels
        self.vae = None
        self.video = False
        if cfg.kind == "identity":
            self.scale, self.shift = 1.0, 0.0
            self._fingerprint = f"identity:c{image_channels}"
            return
        dtype = resolve_dtype(cfg.dtype, self.device)
        self.vae = load_pretrained(
            f"VAE (subfolder {cfg.subfolder!r})", cfg.name_or_path, lambda path: _load_vae(path, cfg.subfolder, dtype),
            key="autoencoder.name_or_path", hint=", or use autoencoder.kind=identity for pixel space",
        )
        self.vae.to(self.device).eval().requires_grad_(False)
        config = self.vae.config
        self.video = type(self.vae).__name__ in VIDEO_VAES  # (B, C, T, H, W) videos: images go as one frame
        scale, shift = LATENT_PRESETS[cfg.preset]
        if cfg.preset == "config" and type(self.vae).__name__ in STATISTICS_VAES:
            scale, shift = _patch_statistics(self.vae)
        elif cfg.preset == "config" and config.get("latents_std") is not None:
            # Per-channel statistics (c, 1, 1), computed as QwenImagePipeline computes them (1 / std in float32).
            scale = (1.0 / torch.tensor(config.latents_std)).view(-1, 1, 1).to(self.device)
            shift = torch.tensor(config.latents_mean).view(-1, 1, 1).to(self.device)
        elif cfg.preset == "config":
            scale = config.scaling_factor
            shift = config.get("shift_factor") or 0.0
        self.scale = cfg.scaling_factor if cfg.scaling_factor is not None else scale
        self.shift = cfg.shift_factor if cfg.shift_factor is not None else shift
        in_channels = config.get("in_channels", config.get("input_channels"))
        if in_channels != image_channels:
            raise ValueError(f"the VAE takes {in_channels}-channel images but data.channels is {image_channels}")
        digest = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode()).hexdigest()
        factors = [f.flatten().tolist() if isinstance(f, torch.Tensor) else f for f in (self.scale, self.shift)]
        self._fingerprint = f"vae:{cfg.name_or_path}/{cfg.subfolder}:{factors[0]}:{factors[1]}:{digest[:12]}"

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the flow model sees."""
        if self.vae is None:
            return self.image_channels
        return vae_sizes(type(self.vae).__name__, self.vae.config)[1]

    @property
    def downsample(self) -> int:
        """Spatial reduction factor from pixels to latents."""
        if self.vae is None:
            return 1
        return vae_sizes(type(self.vae).__name__, self.vae.config)[0]

    def fingerprint(self) -> str:
        """Identifies the autoencoder and its latent normalisation, so cached latents from another are refused."""
        return self._fingerprint

    def drop_encoder(self) -> None:
        """Free the encoder half (training on cached latents only decodes, for validation); encode then raises."""
        if self.vae is not None:
            self.vae.encoder = None
            self.vae.quant_conv = None

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None, *,
               mean: bool = False) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> normalised latents (B, c, h, w), float32: a posterior sample when
        autoencoder.sample_posterior (training targets), its mean when it is off or ``mean`` (reference images,
        which are never noised: FluxKontextPipeline encodes them with the mode)."""
        if self.vae is None:
            return images.float()
        if self.vae.encoder is None:
            raise RuntimeError("the autoencoder's encoder half was freed (training on cached latents): images cannot "
                               "be encoded in this process")
        x = images.to(self.device, self.vae.dtype)
        dist = self.vae.encode(x[:, :, None] if self.video else x).latent_dist
        z = dist.sample(generator) if self.cfg.sample_posterior and not mean else dist.mean
        z = z[:, :, 0] if self.video else z
        return (z.float() - _tiled(self.shift, z)) * _tiled(self.scale, z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1], float32."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        z = latents.to(self.device, self.vae.dtype) / _tiled(self.scale, latents) + _tiled(self.shift, latents)
        if self.video:
            return self.vae.decode(z[:, :, None].to(self.vae.dtype)).sample[:, :, 0].float().clamp(-1, 1)
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def _patch_statistics(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / std, mean), each (c, 2, 2), of an AutoencoderKLFlux2's batch-norm over its 2x2-patchified latents,
    whose feature order is (channel, row, column) (Flux2Pipeline._patchify_latents); std = sqrt(var + eps)."""
    channels = vae.config.latent_channels
    std = torch.sqrt(vae.bn.running_var.float() + vae.config.batch_norm_eps)
    return (1.0 / std).view(channels, 2, 2), vae.bn.running_mean.float().view(channels, 2, 2)


def _tiled(factor, z: torch.Tensor):
    """A latent factor as it applies to latents z (B, c, h, w): a number or (c, 1, 1) as it is, a (c, p, p) patch
    statistic tiled over the h x w grid."""
    if not isinstance(factor, torch.Tensor) or factor.shape[-1] == 1:
        return factor
    p = factor.shape[-1]
    h, w = z.shape[-2:]
    if h % p or w % p:
        raise ValueError(f"latents of {h}x{w} cannot take {p}x{p}-patch statistics: use sizes divisible by "
                         f"{p} latent pixels")
    return factor.repeat(1, h // p, w // p).to(z.device)
