"""FLUX.1 Kontext's LoRA file formats: FLUX.1's (:mod:`flowmatch.families.flux.lora_formats`). Kontext's weights are
a FLUX.1 transformer's under the same names in every layout (diffusers' FluxTransformer2DModel, BFL's single file),
and the tools read its LoRAs as FLUX.1's (diffusers' FluxKontextPipeline through FluxLoraLoaderMixin, ComfyUI's
FLUX key map, kohya's ``lora_unet_double_blocks_*``)."""

from __future__ import annotations

from flowmatch.families.flux.lora_formats import FORMATS  # noqa: F401 - this family's formats are FLUX.1's
