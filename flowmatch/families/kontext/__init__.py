"""The FLUX.1 Kontext family (``model.family: kontext``): FLUX.1's MMDiT taking clean reference-image latents
(``Conditioning.reference``) as extra image tokens at RoPE image index 1, the velocity predicted for the
target's tokens only (Labs et al. 2025, "FLUX.1 Kontext"; diffusers' FluxKontextPipeline). Converters in
:mod:`.convert` (FLUX's key tables), presets in :mod:`.presets`.

Any MMDiT with RoPE over (image index, rows, columns) and ``model.references >= 1`` is this family's: the released
FLUX.1 Kontext [dev] and models trained from scratch with Kontext-style conditioning (recipes/digits-edit.yaml).
"""

from __future__ import annotations

import dataclasses

from flowmatch.families import flux, mmdit
from flowmatch.families.kontext import convert, lora_formats
from flowmatch.families.kontext.presets import PRESETS
from flowmatch.families.spec import Capabilities, Family, LatentLayout
from flowmatch.models.flops import FROZEN_FLOPS_PER_PARAM_TOKEN, TRAIN_FLOPS_PER_PARAM_TOKEN


def claims(cfg) -> bool:
    """An MMDiT with RoPE in FLUX's layout that takes reference images (``model.references``)."""
    return (mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == flux.ROPE_LAYOUT
            and getattr(cfg, "references", 0) > 0)


def flops(cfg, *, batch_size: int, latent_size: tuple[int, int], text_len: int, adapt=None) -> float:
    """Training FLOPs of one step with ``cfg.references`` reference images the target's size (as the loader sizes
    them): the MMDiT's count over the target's and the references' tokens, taken as one image that many times as
    wide, less what the reference tokens do not cost: the final layer (it reads the target's tokens only) and the
    patch embedding's input gradient (the clean references need none). ``adapt`` as for :func:`mmdit.flops` (a
    frozen final layer costs 4 FLOPs per weight and token, not 6)."""
    height, width = latent_size
    total = mmdit.flops(cfg, batch_size=batch_size, latent_size=(height, width * (1 + cfg.references)),
                        text_len=text_len, adapt=adapt)
    p = cfg.patch_size
    ref_tokens = cfg.references * (height // p) * (width // p)
    channels_out = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
    final = (cfg.width + 1) * p * p * channels_out  # the final linear's weights and bias
    embed = p * p * cfg.in_channels * cfg.width  # the patch embedding's weights (its input gradient: 2 per weight)
    per_final_weight = TRAIN_FLOPS_PER_PARAM_TOKEN if adapt is None else FROZEN_FLOPS_PER_PARAM_TOKEN
    return total - batch_size * ref_tokens * (per_final_weight * final + 2 * embed)


def reference_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The (height, width) in pixels FluxKontextPipeline resizes a reference image of height x width to (its
    ``_auto_resize``): the released resolution of nearest aspect ratio, floored to a multiple of ``multiple``
    (the VAE's factor times the 2x2 packing)."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return h // multiple * multiple, w // multiple * multiple


#: (width, height) of the resolutions FLUX.1 Kontext was trained on (diffusers' PREFERRED_KONTEXT_RESOLUTIONS,
#: from BFL's flux repository), each about one megapixel.
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)

FAMILY = Family(
    name="kontext",
    kind=mmdit.KIND,
    summary="FLUX.1 Kontext: FLUX.1 with clean reference-image tokens at RoPE image index 1 (image editing)",
    presets=PRESETS,
    tiny="tiny-flux-kontext-dev",
    build=mmdit.build,
    claims=claims,
    mismatch="model.kind: mmdit with model.rope: true and model.references >= 1",
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=True, block_transforms=True,
                              references=convert.REFERENCES),
    time_scale=mmdit.TIME_SCALE,
    flops=flops,
    latents=LatentLayout(channels=16, pack=convert.PACK),
    converter=convert,
    lora_targets=flux.lora_targets,
    lora_formats=lora_formats.FORMATS,
    text=flux.FAMILY.text,  # FluxKontextPipeline.encode_prompt is FluxPipeline's
    # FluxKontextPipeline encodes prompts, walks the grid (its shift from the target's tokens alone) and embeds
    # guidance as FluxPipeline does, with the same defaults (28 steps, guidance 3.5); it resizes references.
    diffusers=dataclasses.replace(flux.FAMILY.diffusers, pipeline_class="FluxKontextPipeline",
                                  reference_size=reference_size),
)
