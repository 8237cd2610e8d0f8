"""`flowmatch lora check FILE --base PIPELINE_DIR`: does a LoRA file do, in another tool, what it does in flowmatch?

The same prompts are generated from the same latent noise, steps and guidance four ways: the base pipeline and
the pipeline with the LoRA, each in flowmatch (the file read by :mod:`flowmatch.models.convert.lora_read`, applied
through peft) and in a reference:

    diffusers  diffusers' own pipeline class from PIPELINE_DIR with ``pipe.load_lora_weights(FILE)`` (diffusers
               converts the layouts it knows itself)
    merged     the file merged into the release's single-file weights as ComfyUI and kohya's tools merge it
               (W += alpha / rank x up @ down on the weight each key names, found by the key alone), loaded back
               through the release's key table: for files in the release's module names (comfyui, kohya, fal)

An editing family (one that takes reference images: FLUX.1 Kontext, Qwen-Image-Edit) is checked with the
reference image ``--image`` gives, the same one on every side, resized as each pipeline resizes it; a
text-to-image family takes none. ``auto`` (the default) takes diffusers when it applies the file, else the merge,
and says why in one line. The check passes when the LoRA images of flowmatch and of the reference differ by less
than the tolerance (max absolute pixel difference, images in [0, 1]) and the LoRA moves flowmatch's images by at
least the tolerance and by more than ten times that difference. A file diffusers loads nothing from is a failure
under ``--reference diffusers``: that is the silent no-op users meet.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torch import Tensor

from flowmatch.errors import choice_error
from flowmatch.families import Family, diffusers_pipeline, family_of
from flowmatch.families.convert import read_config, to_original
from flowmatch.families.lora import apply_file_adapters, lora_formats
from flowmatch.families.spec import DiffusersPipeline
from flowmatch.models.convert.keymap import to_ours
from flowmatch.models.convert.lora_formats import split_key
from flowmatch.models.convert.lora_read import file_adapters, read_lora_file
from flowmatch.pipeline import Pipeline

REFERENCES = ("auto", "diffusers", "merged")
#: The LoRA must move the images by more than this many times the difference between the two tools.
EFFECT_RATIO = 10.0
#: What the merged reference is, for the notes.
MERGED = "the file merged into the release's single-file weights as ComfyUI and kohya's tools merge it"
#: ComfyUI's and kohya's spellings of an original-key module (generic peft keys, kohya's underscored names).
MERGE_PREFIXES = ("diffusion_model.", "lora_unet_")


@dataclass
class LoraCheck:
    """What :func:`check_lora` measured."""

    file: Path
    """The LoRA file."""
    family: str
    """The base pipeline's model family."""
    format: str
    """The family's LoRA format the file uses."""
    reference: str
    """diffusers | merged | none (no reference could apply the file)."""
    max_diff: float
    """Max |flowmatch - reference| over the LoRA images' pixels (inf without a reference)."""
    effect: float
    """Max |LoRA - base| over flowmatch's images' pixels."""
    tolerance: float
    """The largest max_diff that passes."""
    notes: list[str] = field(default_factory=list)
    """How the reference was chosen, what did not apply."""

    @property
    def passed(self) -> bool:
        """The two agree and the LoRA has an effect well above their difference."""
        return (self.max_diff < self.tolerance and self.effect >= self.tolerance
                and self.effect > EFFECT_RATIO * self.max_diff)

    def describe(self) -> str:
        """A few lines for the command line, the verdict first."""
        if self.reference == "none":
            verdict = "FAIL: no reference applies the file (below: why)"
        elif self.effect < self.tolerance:
            verdict = f"FAIL: the LoRA has no effect (it moves flowmatch's images by {self.effect:.2e})"
        elif self.max_diff >= self.tolerance or self.effect <= EFFECT_RATIO * self.max_diff:
            verdict = (f"FAIL: flowmatch and {self.reference} differ by {self.max_diff:.2e} (tolerance "
                       f"{self.tolerance:g}, effect {self.effect:.2e})")
        else:
            verdict = "OK"
        lines = [f"{verdict}", f"  file {self.file}: {self.family} family, {self.format} format"]
        if self.reference != "none":
            lines.append(f"  max |flowmatch - {self.reference}| = {self.max_diff:.2e} (tolerance {self.tolerance:g})")
        ratio = "" if self.reference == "none" else f" ({self.effect / max(self.max_diff, 1e-12):.0f}x the difference)"
        lines.append(f"  LoRA effect max |LoRA - base| = {self.effect:.2e}{ratio}")
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _noise(pipe: Pipeline, n: int, size: int, seed: int) -> Tensor:
    """(n, C, h, w) latent noise for size x size images from a CPU generator."""
    c, h, w = pipe.latent_shape(size, size)
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def reference_image(path: Optional[str | Path], family: Family) -> Optional[Image.Image]:
    """The RGB reference image at ``path`` for an editing family, None for a text-to-image family; ValueError when
    the family and ``--image`` do not go together, or the file is not an image."""
    takes = family.capabilities.references > 0
    if path is None and takes:
        raise ValueError(f"the {family.name} family edits a reference image ({family.summary}): give the image the "
                         "LoRA is checked on with --image PATH")
    if path is not None and not takes:
        raise ValueError(f"--image {path}: the {family.name} family is text to image (its pipeline takes no "
                         "reference image); leave --image out")
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path} does not exist (give a PNG or JPEG reference image)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a file that is not an image
        raise ValueError(f"--image {path} is not an image PIL can read ({type(err).__name__}: {err})") from None


def _diffusers_images(base: Path, file: Path, family: Family, spec: DiffusersPipeline, prompts: list[str],
                      noise: Tensor, steps: int,
                      guidance: float, size: int, device: str, image: Optional[Image.Image] = None,
                      ) -> tuple[Optional[Tensor], str]:
    """diffusers' LoRA images, or (None, why diffusers did not apply the file). With a reference ``image``, one
    call per prompt (QwenImageEditPipeline shows its vision-language encoder one image per call)."""
    from diffusers import DiffusionPipeline  # optional heavy dependency, loaded on use
    from peft.tuners.tuners_utils import BaseTunerLayer  # comes with diffusers' LoRA support

    pipe = DiffusionPipeline.from_pretrained(base).to(device)
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    except Exception as err:  # noqa: BLE001 - any failure of diffusers' loader is the finding reported
        return None, (f"diffusers' {type(pipe).__name__}.load_lora_weights fails on it ({type(err).__name__}: "
                      f"{_first_line(err)})")
    loaded = sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    if not loaded:
        return None, (f"diffusers' {type(pipe).__name__}.load_lora_weights loads nothing from it (no LoRA layer "
                      "in its transformer: a silent no-op in diffusers)")
    latents = noise.to(device)
    if spec.pack_latents is not None:
        latents = spec.pack_latents(latents)
    elif family.latents.pack > 1:
        b, c, h, w = noise.shape
        latents = type(pipe)._pack_latents(latents, b, c, h, w)
    params = inspect.signature(type(pipe).__call__).parameters
    common = dict(num_inference_steps=steps, height=size, width=size, output_type="pt")
    if "max_area" in params:  # FluxKontextPipeline rescales height x width to max_area (a megapixel) first
        common["max_area"] = size * size
    batches = [slice(None)] if image is None else [slice(i, i + 1) for i in range(len(prompts))]
    try:
        images = torch.cat([pipe(**_prompt_inputs(pipe, spec, prompts[rows], guidance), latents=latents[rows],
                                 **common, **({} if image is None else dict(image=image))).images
                            for rows in batches])
    except Exception as err:  # noqa: BLE001 - any failure of the pipeline is the finding reported
        return None, (f"diffusers' {type(pipe).__name__} fails to generate with it: {type(err).__name__}: "
                      f"{_first_line(err)}")
    return images.float().cpu(), ""


def _first_line(err: Exception) -> str:
    """An exception's message on one line."""
    return str(err).strip().splitlines()[0] if str(err).strip() else "(no message)"


def _prompt_inputs(pipe, spec: DiffusersPipeline, prompts: list[str], guidance: float) -> dict:
    """The prompt and guidance arguments of a diffusers pipeline's call that make it guide and mask as flowmatch
    does (a classifier-free family guides against the empty caption unless told otherwise)."""
    params = inspect.signature(type(pipe).__call__).parameters
    negative = [""] * len(prompts)
    guidance = guidance + spec.guidance_offset  # flowmatch's scale as this pipeline spells it
    if spec.schedule.classifier_free and "true_cfg_scale" in params:
        # Qwen-Image: its classifier-free guidance is true_cfg_scale, only against a negative prompt it is given
        return dict(prompt=prompts, guidance_scale=guidance, true_cfg_scale=guidance, negative_prompt=negative)
    if spec.t5_padding == "max_length_plus_one":
        # ChromaPipeline (the one whose T5 mask leaves a padding token visible) hands the transformer its text mask
        # as floats, which attention adds to the scores instead of masking (diffusers issue #12116): it is given
        # its own embeddings with the mask as booleans.
        embeds, _, mask, neg, _, neg_mask = pipe.encode_prompt(prompts, negative_prompt=negative)
        return dict(prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=neg,
                    negative_prompt_attention_mask=neg_mask.bool(), guidance_scale=guidance)
    return dict(prompt=prompts, guidance_scale=guidance)


def _merged_model(pipe: Pipeline, family: Family, tensors: dict[str, Tensor]) -> tuple[Optional[torch.nn.Module],
                                                                                       str]:
    """A copy of the base model with the file merged into its release single-file weights, key by key, or (None,
    why the file does not name the release's modules)."""
    cfg = pipe.model.cfg
    original = to_original(pipe.model, prefix="")
    modules = {k[:-len(".weight")] for k in original if k.endswith(".weight")}
    named = {f"{p}{m if p.endswith('.') else m.replace('.', '_')}": m for m in modules for p in MERGE_PREFIXES}
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        parsed = split_key(key)
        if parsed is None or parsed[0] not in named:
            return None, f"its key {key} names no module of the release's single-file weights"
        factors.setdefault(named[parsed[0]], {})[parsed[2]] = value
    merged = dict(original)
    for module, f in factors.items():
        rank = f["A"].shape[0]
        alpha = f["alpha"].item() if "alpha" in f else rank
        weight = original[f"{module}.weight"]
        merged[f"{module}.weight"] = weight + (alpha / rank) * (f["B"].double() @ f["A"].double()).to(weight.dtype)
    ours, _ = to_ours(merged, family.converter.original_rules(cfg), what="the merged release weights")
    model = family.build(cfg, device="meta")
    model.load_state_dict(ours, strict=True, assign=True)
    device = next(pipe.model.parameters()).device
    return model.to(device).eval().requires_grad_(False), ""


def check_lora(file: str | Path, base: str | Path, *, prompts: Optional[list[str]] = None, steps: int = 4,
               size: int = 256, seed: int = 0, guidance: Optional[float] = None, reference: str = "auto",
               tolerance: float = 1e-3, device: str = "cpu", image: Optional[str | Path] = None) -> LoraCheck:
    """Generate with and without the LoRA ``file`` on the diffusers pipeline folder ``base``, in flowmatch and in
    the ``reference`` (auto | diffusers | merged), from the same noise (and, for an editing family, the reference
    ``image``: a file path); see the module docstring."""
    if reference not in REFERENCES:
        raise choice_error("--reference", reference, REFERENCES)
    file, base = Path(file), Path(base)
    tensors, metadata = read_lora_file(file)
    edited = reference_image(image, family_of(read_config(base)))  # before the pipeline loads: an error is quick
    pipe = Pipeline.from_diffusers(base, device=device)
    family = family_of(pipe.model.cfg)
    found = file_adapters(tensors, metadata, lora_formats(family), pipe.model.cfg, what=str(file))
    # the folder's own pipeline class (a family may have several: FLUX.2's klein and dev), not the family's default
    spec = diffusers_pipeline(pipe.pipeline_grid.pipeline)
    prompts = prompts or ["a photo of a cat"]
    guidance = spec.guidance_scale if guidance is None else guidance
    noise = _noise(pipe, len(prompts), size, seed)

    def generate() -> Tensor:
        references = None if edited is None else [edited] * len(prompts)
        return pipe.generate(prompts, images=references, steps=steps, guidance_scale=guidance,
                             noise=noise).float().cpu()

    base_images = generate()
    merged, why_not_merged = (None, "") if reference == "diffusers" else _merged_model(pipe, family, tensors)
    base_model = pipe.model
    apply_file_adapters(pipe.model, found)
    ours = generate()
    notes = [f"{len(found.adapters)} adapted projections, rank {found.rank}; {len(prompts)} prompts, {steps} steps, "
             f"guidance {guidance:g}, {size}x{size}, seed {seed}"
             + ("" if edited is None else f", reference image {Path(image).name} ({edited.width}x{edited.height})")]
    theirs, used, why = None, "none", ""
    if reference in ("auto", "diffusers"):
        theirs, why = _diffusers_images(base, file, family, spec, prompts, noise, steps, guidance, size, device, edited)
        used = "diffusers" if theirs is not None else used
    if theirs is None and reference in ("auto", "merged") and merged is not None:
        pipe.model = merged
        theirs, used = generate(), "merged"
        pipe.model = base_model
        # one line: why diffusers could not be the reference, and what was instead
        notes.append(f"{why}; checked against {MERGED} instead" if why else f"reference: {MERGED}")
    else:
        notes += [why] if why else []
        if theirs is None and reference != "diffusers":
            notes.append(f"merged reference: {why_not_merged}")
    max_diff = float("inf") if theirs is None else (theirs - ours).abs().max().item()
    return LoraCheck(file=file, family=family.name, format=found.format, reference=used, max_diff=max_diff,
                     effect=(ours - base_images).abs().max().item(), tolerance=tolerance, notes=notes)
