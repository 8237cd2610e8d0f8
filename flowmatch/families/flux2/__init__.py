"""The FLUX.2 family (``model.family: flux2``): black-forest-labs' FLUX.2 dev and klein, FLUX.1's double-then-single
block structure (the shared MMDiT of :mod:`flowmatch.models`) with every block's modulation computed once per
forward and shared (``modulation: shared``), SwiGLU MLPs (``mlp: swiglu``), no biases, four-axis RoPE with the text
rotated by its position (``rope_layout: flux2``), no pooled text vector and (dev) a guidance embedding
(diffusers' Flux2Transformer2DModel). Converters in :mod:`.convert`, presets in :mod:`.presets`.

Latents: AutoencoderKLFlux2's 32 channels, packed 2x2 into 128 token features by the pipeline; the release
normalises those 128 packed features by its batch-norm statistics (``vae.bn``), per packed feature, not per
latent channel.
"""

from __future__ import annotations

from flowmatch.families import mmdit
from flowmatch.families.flux2 import convert
from flowmatch.families.flux2.presets import PRESETS
from flowmatch.families.spec import Capabilities, Family, LatentLayout
from flowmatch.models.lora import ATTENTION

#: FLUX.2's feed-forward layers and single-block projections (diffusers' names), which
#: examples/dreambooth/train_dreambooth_lora_flux2.py adapts beside the attention.
FLUX2_EXTRA = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
               "attn.to_qkv_mlp_proj", "attn.to_out"]


def claims(cfg) -> bool:
    """An MMDiT with FLUX.2's four-axis RoPE layout."""
    return mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == convert.FIXED["rope_layout"]


def lora_targets(cfg) -> list[str]:
    """The joint attention's projections, the feed-forward layers and the single blocks' fused projections."""
    return ATTENTION + FLUX2_EXTRA


FAMILY = Family(
    name="flux2",
    kind=mmdit.KIND,
    summary="FLUX.2 dev and klein: FLUX.1's block layout with shared modulation, SwiGLU, no biases, 4-axis RoPE",
    presets=PRESETS,
    tiny="tiny-flux2",
    build=mmdit.build,
    claims=claims,
    mismatch="model.kind: mmdit with model.rope: true and model.rope_layout: flux2",
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=True, block_transforms=True),
    time_scale=mmdit.TIME_SCALE,
    flops=mmdit.flops,
    latents=LatentLayout(channels=32, pack=convert.PACK),
    converter=convert,
    lora_targets=lora_targets,
)
