"""Text -> image generation: the one implementation behind the Python API, `flowmatch sample`, `flowmatch eval`
and validation during training.

Captions -> conditioning (the frozen encoders) -> noise from a CPU `torch.Generator` per image (seed + index, so
the same seed gives the same image on any device and in any batch) -> `sample_ode` with classifier-free guidance
on the schedule's shift -> decode -> images in [0, 1]. Loading a pipeline from a checkpoint or a diffusers folder
lives a floor above, in :mod:`flowmatch.pipeline` (``flowmatch.Pipeline`` is this class with its loaders);
writing images lives in :mod:`flowmatch.images`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from flowmatch.conditioning import Conditioning
from flowmatch.data.pixels import model_to_unit, pixels_to_model
from flowmatch.families import check_references, family_of, get_family
from flowmatch.flow import FlowConfig, Formulation, TimeSchedule, with_guidance
from flowmatch.flow.timesteps import shift_time
from flowmatch.sampling.diffusion import check_sampler, is_diffusion_sampler, sample_diffusion
from flowmatch.sampling.fewstep import sample_average
from flowmatch.sampling.guidance import guided_velocity
from flowmatch.sampling.references import (
    ReferenceImages,
    group_rows,
    reference_pixels,
    references_per_prompt,
    resized_reference,
    stack_references,
)
from flowmatch.sampling.solvers import jumps_with_average, sample_ode

if TYPE_CHECKING:
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.sampling.diffusers_schedule import PipelineGrid

VelocityModel = Callable[..., Tensor]
"""``model(x (B, C, h, w), t (B,), cond) -> velocity (B, C, h, w)``; the ``average`` solver also passes
``r=`` (B,), the end of the step (the MMDiT's second time)."""


@dataclass
class SamplingConfig:
    """The recipe's `sampling` section: defaults of generation (Python API, CLI) and the validation grids."""

    steps: int = 20
    """ODE steps."""
    solver: str = "euler"
    """ODE solver (see flowmatch.sampling.SOLVERS); average = few-step jumps of a MeanFlow / shortcut model; or a
    diffusion sampler: ddim | ancestral | pc (flowmatch/sampling/diffusion.py)."""
    eta: float = 0.0
    """DDIM's eta: 0 deterministic, 1 the ancestral sampler's noise (Song et al. 2020)."""
    corrector_steps: int = 1
    """Langevin corrector steps per grid time of the pc sampler (Song et al. 2021)."""
    corrector_snr: float = 0.16
    """Signal-to-noise ratio r of the Langevin step size 2 (r ||z|| / ||score||)^2 (Song et al. 2021 use 0.16)."""
    clip_x0: float = 0.0
    """ddim/ancestral/pc: clamp the predicted data to [-clip_x0, clip_x0] (1 for [-1, 1] pixels, as DDPM); 0 = off."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale (1 = no guidance)."""
    seed: int = 0
    """Seed of the validation noise."""
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red apple on a wooden table",
                                                        "a city street at night"])
    """Validation prompts: one row of the sample grid each."""
    per_prompt: int = 4
    """Images per prompt in the validation grid."""

    def __post_init__(self) -> None:
        check_sampler(self.solver, "sampling.solver")
        if self.steps < 1 or self.per_prompt < 1 or not self.prompts:
            raise ValueError("steps and per_prompt must be >= 1 and prompts must not be empty")


@dataclass
class GenerationConfig:
    """What generation reads of a run's recipe, and nothing else: the pipeline takes these sections, not the recipe."""

    flow: FlowConfig
    """The time schedule (shift) and what the model predicts on which path."""
    sampling: SamplingConfig
    """Defaults of generation: steps, solver, guidance scale."""
    patch_size: int
    """The model's patch size: image sides must be multiples of it times the autoencoder's factor."""
    guidance_embed: bool = False
    """The model takes the guidance scale as an input (FLUX-dev, few-step models): no unconditional pass."""
    size: tuple[int, int] = (256, 256)
    """The default image (height, width) in pixels."""
    family: Optional[str] = None
    """The model's family (flowmatch.families): whether, and how many, reference images it takes."""
    guidance_renorm: int = 0
    """Rescale each p x p latent patch's guided velocity to the conditional one's norm (p = this; 0 = plain
    classifier-free guidance): the family's pipeline guides so (Qwen-Image's true CFG)."""
    guidance_renorm_rows: bool = False
    """Rescale each latent row's guided velocity (one channel, across the width) to the conditional one's norm:
    the family's pipeline guides so (Lumina2Pipeline's cfg_normalization)."""

    @classmethod
    def of(cls, recipe: Any) -> "GenerationConfig":
        """The sections of a recipe (:class:`flowmatch.config.Recipe`): flow, sampling, the model's patch size,
        guidance input and family (and how it guides), the data's image size."""
        family = family_of(recipe.model)
        schedule = family.diffusers.schedule if family.diffusers else None
        renorm = family.latents.pack if schedule and schedule.guidance_renorm else 0
        return cls(recipe.flow, recipe.sampling, recipe.model.patch_size, bool(recipe.model.guidance_embed),
                   tuple(recipe.data.size), family.name, renorm, bool(schedule and schedule.guidance_renorm_rows))


def image_noise(seeds: list[int], shape: tuple[int, ...]) -> Tensor:
    """(B, *shape) standard normal noise, row i drawn from a CPU generator seeded with seeds[i]."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows)


@torch.no_grad()
def sample_latents(model: VelocityModel, cond: Conditioning, null: Optional[Conditioning], noise: Tensor, *,
                   steps: int, solver: str, guidance_scale: Optional[float], shift: float,
                   grid: Optional[list[float]] = None, formulation: Optional[Formulation] = None,
                   options: Optional[SamplingConfig] = None,
                   generator: Optional[torch.Generator] = None, renorm: int = 0,
                   renorm_rows: bool = False) -> tuple[Tensor, int]:
    """Integrate noise (B, C, h, w) at t = 1 to latents at t = 0; returns (latents, model evaluations).

    With a guidance scale other than 1 the conditional and unconditional (``null``) inputs run as one batch.
    ``grid`` (steps + 1 times) replaces the grid of ``shift``. The ``average`` solver jumps with the model's
    average velocity over each step (:func:`~flowmatch.sampling.sample_average`, on the grid of ``shift``); the
    others integrate its velocity at r = t. ``formulation`` (default: rectified flow, velocity) says what the
    model predicts: an ODE solver integrates its probability-flow velocity; a diffusion sampler (``solver`` in
    ``ddim | ancestral | pc``) takes eta and the corrector settings from ``options`` and its fresh noise from
    ``generator``. ``renorm`` p rescales the guided velocity per p x p patch, ``renorm_rows`` per latent row
    (:func:`guided_velocity`).
    """
    guided = guidance_scale is not None and guidance_scale != 1.0
    if guided and null is None:
        raise ValueError("classifier-free guidance needs the empty caption's conditioning (null)")
    if jumps_with_average(solver):
        if grid is not None:
            raise ValueError("the average solver walks the flow's own grid; it takes no grid or sigmas")
        if formulation is not None and not formulation.is_rectified_velocity:
            raise ValueError("the average solver needs a rectified-flow model's average velocity; this model "
                             f"predicts {formulation.prediction} on the {formulation.path.name} path")
        velocity = guided_velocity(model, cond, null if guided else None, guidance_scale, r=True, renorm=renorm,
                                   renorm_rows=renorm_rows)
        solution = sample_average(velocity, noise, steps=steps, shift=shift)
        return solution.x, solution.nfe
    # Guidance mixes outputs linearly, and every prediction is affine in every other at fixed (x, t): guiding the
    # model's own output is guiding its velocity.
    predict = guided_velocity(model, cond, null if guided else None, guidance_scale, renorm=renorm,
                              renorm_rows=renorm_rows)
    if is_diffusion_sampler(solver):
        if grid is not None:
            raise ValueError(f"the {solver} sampler walks the flow's own grid; it takes no grid or sigmas")
        o = options or SamplingConfig()
        solution = sample_diffusion(predict, noise, formulation=formulation or Formulation(FlowConfig()),
                                    sampler=solver, steps=steps, shift=shift, eta=o.eta,
                                    corrector_steps=o.corrector_steps, corrector_snr=o.corrector_snr,
                                    clip_x0=o.clip_x0, generator=generator)
    else:
        velocity = formulation.to_velocity(predict) if formulation is not None else predict
        solution = sample_ode(velocity, noise, steps=steps, solver=solver, shift=shift, grid=grid)
    return solution.x, solution.nfe


class Pipeline:
    """Generate images from captions with a trained model.

    Load one with ``flowmatch.Pipeline.from_checkpoint`` / ``from_diffusers`` (:mod:`flowmatch.pipeline`); this
    class only generates, so validation during training uses it without the loaders.

    Args:
        model: the velocity model (an MMDiT, or the training engine's forward during validation).
        encoders: the run's frozen encoders.
        config: the sections generation reads (:meth:`GenerationConfig.of` a recipe): ``sampling`` gives the
            defaults, ``flow`` the time schedule (shift), ``patch_size`` and ``size`` the default image size.
        device: where noise and latents live.
        pipeline_grid: walk a diffusers pipeline's grid and timesteps instead of the schedule's (set by
            :func:`flowmatch.pipeline.load_diffusers_pipeline`).
        recipe: the run's whole recipe, when the pipeline comes from a run (eval and the tasks' judges read its
            data and eval sections); generation reads only ``config``.
        reference_size: ``(height, width, multiple) -> (height, width)``, the pixel size a reference image is
            resized to (a diffusers pipeline's rule, e.g. FluxKontextPipeline's released resolutions); None: the
            generated image's size, as training's loader sizes references to their target.
    """

    def __init__(self, model: VelocityModel, encoders: "FrozenEncoders", config: GenerationConfig, *,
                 device: torch.device | str = "cpu", pipeline_grid: Optional["PipelineGrid"] = None,
                 recipe: Any = None,
                 reference_size: Optional[Callable[[int, int, int], tuple[int, int]]] = None) -> None:
        self.model = model
        self.reference_size = reference_size
        self.encoders = encoders
        self.config = config
        self.recipe = recipe
        self.device = torch.device(device)
        self.schedule = TimeSchedule(config.flow)
        self.formulation = Formulation(config.flow)
        """What the model predicts on which path (``flow.path``, ``flow.prediction``)."""
        self.pipeline_grid = pipeline_grid
        self.last_nfe = 0

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height x width pixels (the recipe's resolution by default)."""
        default_h, default_w = self.config.size
        h, w, f = height or default_h, width or default_w, self.encoders.downsample
        p = self.config.patch_size
        if h % (f * p) or w % (f * p):
            raise ValueError(f"height and width must be multiples of {f * p} (autoencoder factor x patch size)")
        return (self.encoders.latent_channels, h // f, w // f)

    @torch.no_grad()
    def reconstruct(self, pixels: Tensor) -> Tensor:
        """8-bit images (B, C, H, W) through the autoencoder's encode and decode: (B, C, H, W) in [0, 1], the best
        the model's latent space can represent them (the images themselves in pixel space)."""
        latents = self.encoders.autoencoder.encode(pixels_to_model(pixels).to(self.device))
        return model_to_unit(self.encoders.decode(latents))

    @torch.no_grad()
    def generate(self, prompts: list[str], *, images: Optional[ReferenceImages] = None,
                 steps: Optional[int] = None, solver: Optional[str] = None,
                 guidance_scale: Optional[float] = None, seed: int = 0, height: Optional[int] = None,
                 width: Optional[int] = None, noise: Optional[Tensor] = None,
                 sigmas: Optional[list[float]] = None, auto_resize: bool = True,
                 negative_prompt: Optional[str | list[str]] = None) -> Tensor:
        """Images (B, C, H, W) in [0, 1] for B prompts; None arguments take the recipe's sampling defaults.

        Image i starts from noise seeded with ``seed + i``, or from ``noise[i]`` when ``noise`` (B, C, h, w), the
        latents at t = 1, is given (to start another library's sampler from the same latents); its size then sets
        the image size. ``sigmas`` (one per step, unshifted, as diffusers' pipelines take them) sets the grid:
        the shift applied to them, then 0. For a model with a guidance embedding (FLUX-dev) the guidance scale is
        the value it embeds, with no classifier-free guidance, as FluxPipeline does. :attr:`last_nfe` holds the
        velocity evaluations used (per image). Classifier-free guidance contrasts the prompts with
        ``negative_prompt`` (one for all, or one per prompt; QwenImagePipeline's negative prompt), by default with
        the empty caption.

        ``images`` are reference images for an editing family (FLUX.1 Kontext, Qwen-Image-Edit): a (B, C, H, W) tensor
        in [0, 1] (one per prompt), or per prompt a PIL image, a (C, H, W) tensor or a list of them
        (:mod:`flowmatch.sampling.references`). Each is resized as the pipeline does (:attr:`reference_size`;
        ``auto_resize=False`` keeps its own size floored to the patch grid, diffusers' ``_auto_resize=False``), encoded
        by the autoencoder's posterior mean and given to the model unnoised, the unconditional pass included. A text
        encoder that sees images (Qwen-Image-Edit's Qwen2.5-VL) reads each prompt, and its negative prompt, with the
        prompt's first reference as resized, as QwenImageEditPipeline shows it. Prompts whose references differ in count
        or size are sampled as separate batches, never padded. The image size is ``height`` x ``width`` as given
        (FluxKontextPipeline first rescales them to its ``max_area``).
        """
        s = self.config.sampling
        if noise is None:
            c, h, w = self.latent_shape(height, width)
            noise = image_noise([seed + i for i in range(len(prompts))], (c, h, w))
        else:
            if noise.ndim != 4:
                raise ValueError(f"noise must be (B, C, h, w) latents, got shape {tuple(noise.shape)}")
            f = self.encoders.downsample
            c, h, w = self.latent_shape(height or noise.shape[-2] * f, width or noise.shape[-1] * f)
            if tuple(noise.shape) != (len(prompts), c, h, w):
                raise ValueError(f"noise must be (B={len(prompts)}, {c}, {h}, {w}) for {len(prompts)} prompts at "
                                 f"{h * f}x{w * f} pixels, got {tuple(noise.shape)}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        steps = steps or (len(sigmas) if sigmas is not None else s.steps)
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) not in (1, len(prompts)):
                raise ValueError(f"negative_prompt: give one, or one per prompt ({len(prompts)}), got {len(negatives)}")
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        resized = self._resized_references(images, len(prompts), h * self.encoders.downsample,
                                           w * self.encoders.downsample, auto_resize)
        pixels = self._pixels(resized)
        out: list[Optional[Tensor]] = [None] * len(prompts)
        for rows in group_rows([tuple(tuple(r.shape) for r in refs) for refs in pixels]):
            reference = stack_references([pixels[i] for i in rows]) if pixels[rows[0]] else ()
            # A text encoder that sees images reads each prompt with its first reference, resized (Qwen-Image-Edit).
            seen = [_unit_image(resized[i][0]) for i in rows] if reference and self.encoders.sees_images else None
            decoded = self._sample([prompts[i] for i in rows], noise[rows], reference, steps=steps, solver=solver,
                                   guidance_scale=guidance_scale, seed=seed, sigmas=sigmas,
                                   negatives=None if negatives is None else [negatives[i] for i in rows], seen=seen)
            for i, image in zip(rows, decoded):
                out[i] = image
        return torch.stack(out)

    def _reference_pixels(self, images: Optional[ReferenceImages], prompts: int, height: int, width: int,
                          auto_resize: bool) -> list[list[Tensor]]:
        """Per prompt, its references resized and in [-1, 1] ((C, h_k, w_k) each; none without ``images``)."""
        return self._pixels(self._resized_references(images, prompts, height, width, auto_resize))

    def _pixels(self, resized: list[list[Any]]) -> list[list[Tensor]]:
        """Resized references (per prompt) -> their pixels (C, h_k, w_k) in [-1, 1]."""
        multiple = self.encoders.downsample * self.config.patch_size
        return [[reference_pixels(item, multiple) for item in refs] for refs in resized]

    def _resized_references(self, images: Optional[ReferenceImages], prompts: int, height: int, width: int,
                            auto_resize: bool) -> list[list[Any]]:
        """Per prompt, its references resized as the pipeline does (PIL images or (1, C, h_k, w_k) tensors in
        [0, 1]; none without ``images``)."""
        if images is None:
            return [[] for _ in range(prompts)]
        per_prompt = references_per_prompt(images, prompts)
        if self.config.family is not None:
            check_references(get_family(self.config.family), max(len(r) for r in per_prompt),
                             "Pipeline.generate(images=...)")
        multiple = self.encoders.downsample * self.config.patch_size

        def size(h: int, w: int) -> tuple[int, int]:  # a reference's pixel size before flooring to the grid
            if not auto_resize:
                return h, w
            if self.reference_size is not None:
                return self.reference_size(h, w, multiple)
            return height, width

        return [[resized_reference(item, size, multiple) for item in refs] for refs in per_prompt]

    def _sample(self, prompts: list[str], noise: Tensor, reference: tuple[Tensor, ...], *, steps: int,
                solver: Optional[str], guidance_scale: Optional[float], seed: int,
                sigmas: Optional[list[float]], negatives: Optional[list[str]] = None,
                seen: Optional[list[Any]] = None) -> Tensor:
        """One batch of one reference layout: noise (B, C, h, w), each reference's pixels (B, C, H_k, W_k) in
        [-1, 1] -> images (B, C, H, W) in [0, 1]; ``negatives``: one negative prompt per row (None: the empty
        caption); ``seen``: per row, the image a text encoder that sees images reads with the prompt and with the
        negative prompt (QwenImageEditPipeline shows both the reference)."""
        s = self.config.sampling
        seq_len = (noise.shape[-2] // self.config.patch_size) * (noise.shape[-1] // self.config.patch_size)
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        shift = self.schedule.shift_for(seq_len)  # the target's tokens alone, as FluxKontextPipeline's mu
        cond, model = self.encoders.encode_text(list(prompts), seen), self.model
        if reference:  # (B, R, C, H, W) -> one (B, c, h, w) latent per reference: the trainer's encoding
            cond = cond.with_reference([self.encoders.encode_references(r[:, None])[:, 0] for r in reference])
        if self.config.guidance_embed:  # guidance as a model input (FLUX-dev, few-step): no unconditional pass
            cond, scale = with_guidance(cond, scale), None
        elif self.pipeline_grid is not None and not self.pipeline_grid.classifier_free:
            scale = None  # FLUX-schnell: FluxPipeline runs no unconditional pass whatever its guidance_scale
        null = None
        if scale is not None and scale != 1.0:  # the unconditional input, encoded only when guidance uses it
            if negatives is None and seen is None:
                null = self.encoders.null()
            else:
                null = self.encoders.encode_text(negatives or [""] * len(prompts), seen)
        grid = None
        if self.pipeline_grid is not None:
            grid = self.pipeline_grid.grid(steps, seq_len=seq_len, sigmas=sigmas, channels=noise.shape[1])
            model = _timed(self.model, self.pipeline_grid.model_time)
        elif sigmas is not None:
            grid = [*shift_time(torch.tensor(sigmas, dtype=torch.float64), shift).tolist(), 0.0]
        latents, self.last_nfe = sample_latents(model, cond, null, noise.to(self.device, torch.float32), steps=steps,
                                                solver=solver or s.solver, guidance_scale=scale, shift=shift,
                                                grid=grid, formulation=self.formulation, options=s,
                                                generator=torch.Generator().manual_seed(seed),
                                                renorm=self.config.guidance_renorm,
                                                renorm_rows=self.config.guidance_renorm_rows)
        return model_to_unit(self.encoders.decode(latents))


def _unit_image(resized: Any) -> Any:
    """A resized reference as a text encoder takes it: a PIL image as it is, a (1, C, H, W) tensor as (C, H, W)."""
    return resized[0] if isinstance(resized, Tensor) else resized


def _timed(model: VelocityModel, model_time: Callable[[Tensor], Tensor]) -> VelocityModel:
    """``model`` seeing ``model_time(t)`` for ``t``."""
    return lambda x, t, cond: model(x, model_time(t), cond)
