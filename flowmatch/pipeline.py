"""Text -> image generation: the one sampling implementation behind the Python API, the CLI and validation.

Text encode -> noise from a CPU `torch.Generator` per image (seed + index, so the same seed gives the same
image on any device and in any batch) -> `sample_ode` with classifier-free guidance -> decode -> [0, 1].
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch

from flowmatch.config import Recipe, RecipeError, recipe_from_yaml
from flowmatch.encoders.autoencoder import Autoencoder
from flowmatch.encoders.conditioning import Conditioning
from flowmatch.encoders.text import TextEmbeddings, TextEncoder
from flowmatch.flow import TimeSchedule
from flowmatch.sampling import guided_velocity, sample_ode

VelocityModel = Callable[..., torch.Tensor]


def build_encoders(recipe: Recipe, device: torch.device | str) -> tuple[TextEncoder, Autoencoder]:
    """The frozen text encoder and autoencoder a recipe names."""
    text = TextEncoder(recipe.text_encoder, device=device)
    auto = Autoencoder(recipe.autoencoder, image_channels=recipe.data.channels, device=device)
    return text, auto


def encoder_fingerprints(text: TextEncoder, auto: Autoencoder) -> dict[str, str]:
    """Which encoders made a set of features: recorded in cached shards and checked when they are read."""
    return {"text_encoder": text.fingerprint(), "autoencoder": auto.fingerprint()}


def encode_batch(batch, text: TextEncoder, auto: Autoencoder, device: torch.device | str
                 ) -> tuple[torch.Tensor, TextEmbeddings]:
    """A `flowmatch.data.Batch` -> (latents (B, C, h, w) float32, text embeddings), both on `device`; cached
    features are used as they are, raw images and captions go through the encoders."""
    x0 = batch.latents if batch.latents is not None else auto.encode(batch.images.to(device))
    emb = batch.text if batch.text is not None else text.encode(batch.captions)
    return x0.to(device).float(), emb.to(device)


def resolve_model_config(recipe: Recipe, text: TextEncoder, auto: Autoencoder) -> Recipe:
    """Fill the model's input sizes the encoders decide (left None in recipes), checking explicit ones agree."""
    m = recipe.model
    filled = {"in_channels": auto.latent_channels, "context_dim": text.hidden_size, "pooled_dim": text.pooled_size}
    for name, value in filled.items():
        given = getattr(m, name)
        if given is not None and given != value:
            raise RecipeError(
                f"model.{name}={given} but the {'autoencoder' if name == 'in_channels' else 'text encoder'} "
                f"gives {value}: remove model.{name} from the recipe to take it from the encoder"
            )
    return dataclasses.replace(recipe, model=dataclasses.replace(m, **filled))


def image_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard normal noise, row i drawn from a CPU generator seeded with seeds[i]."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows)


@torch.no_grad()
def sample_latents(
    model: VelocityModel,
    text: TextEmbeddings,
    null_text: Optional[TextEmbeddings],
    noise: torch.Tensor,
    *,
    steps: int,
    solver: str,
    guidance_scale: Optional[float],
    shift: float,
) -> tuple[torch.Tensor, int]:
    """Integrate noise (B, C, h, w) at t = 1 to latents at t = 0; returns (latents, velocity evaluations).

    `model(x, t, cond: Conditioning)` predicts the velocity. With a guidance scale other than 1 the
    conditional and unconditional (empty caption) inputs run as one batch.
    """
    def as_inputs(e: TextEmbeddings) -> Conditioning:
        return Conditioning(e.hidden, e.mask, e.pooled)

    guided = guidance_scale is not None and guidance_scale != 1.0
    if guided and null_text is None:
        raise ValueError("classifier-free guidance needs the empty caption's encoding (null_text)")
    uncond = as_inputs(null_text) if guided else None
    velocity = guided_velocity(model, as_inputs(text), uncond, guidance_scale)
    solution = sample_ode(velocity, noise, steps=steps, solver=solver, shift=shift)
    return solution.x, solution.nfe


class Pipeline:
    """Generate images from captions with a trained MMDiT.

    >>> pipe = Pipeline.from_checkpoint("runs/digits")
    >>> images = pipe.generate(["a handwritten digit seven"] * 8, steps=20, seed=0)  # (8, C, H, W) in [0, 1]
    """

    def __init__(
        self,
        model: VelocityModel,
        text_encoder: TextEncoder,
        autoencoder: Autoencoder,
        recipe: Recipe,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.recipe = recipe
        self.device = torch.device(device)
        self.schedule = TimeSchedule(recipe.flow)
        self.last_nfe = 0
        self._null: Optional[TextEmbeddings] = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: Optional[torch.device | str] = None, ema: Optional[bool] = None
    ) -> "Pipeline":
        """Load a run directory (its newest checkpoint) or one checkpoint directory; EMA weights when present
        unless ema=False."""
        from flowmatch.checkpoint import load_recipe_yaml, load_weights, resolve_checkpoint
        from flowmatch.models.mmdit import MMDiT

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ckpt = resolve_checkpoint(path)
        recipe = recipe_from_yaml(load_recipe_yaml(ckpt))
        text, auto = build_encoders(recipe, device)
        recipe = resolve_model_config(recipe, text, auto)
        model = MMDiT(recipe.model)
        model.load_state_dict(load_weights(ckpt, ema=ema))
        model.to(device).eval().requires_grad_(False)
        return cls(model, text, auto, recipe, device=device)

    def null_text(self) -> TextEmbeddings:
        """The empty caption's encoding: the unconditional input of guidance (as in training's caption dropout)."""
        if self._null is None:
            self._null = self.text_encoder.encode([""])
        return self._null

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height x width pixels (the recipe's resolution by default)."""
        default_h, default_w = self.recipe.data.size
        h, w, f = height or default_h, width or default_w, self.autoencoder.downsample
        p = self.recipe.model.patch_size
        if h % (f * p) or w % (f * p):
            raise ValueError(f"height and width must be multiples of {f * p} (autoencoder factor x patch size)")
        return (self.autoencoder.latent_channels, h // f, w // f)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        steps: Optional[int] = None,
        solver: Optional[str] = None,
        guidance_scale: Optional[float] = None,
        seed: int = 0,
        height: Optional[int] = None,
        width: Optional[int] = None,
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for B prompts; None arguments take the recipe's sampling defaults."""
        s = self.recipe.sampling
        steps = steps or s.steps
        solver = solver or s.solver
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        c, h, w = self.latent_shape(height, width)
        seq_len = (h // self.recipe.model.patch_size) * (w // self.recipe.model.patch_size)
        noise = image_noise([seed + i for i in range(len(prompts))], (c, h, w)).to(self.device)
        text = self.text_encoder.encode(list(prompts)).to(self.device)
        latents, self.last_nfe = sample_latents(
            self.model,
            text,
            self.null_text().to(self.device),
            noise,
            steps=steps,
            solver=solver,
            guidance_scale=guidance_scale,
            shift=self.schedule.shift_for(seq_len),
        )
        return (self.autoencoder.decode(latents) + 1) / 2


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> one (C, rows*H + pad, cols*W + pad) grid image, row-major."""
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu(), nrow=max(1, len(images) // rows), padding=1, pad_value=1.0)


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """Save a (C, H, W) image in [0, 1] as PNG, upscaled `scale` times with nearest neighbour."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
