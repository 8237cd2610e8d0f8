"""Qwen-Image-Edit's LoRA file formats: Qwen-Image's (:mod:`flowmatch.families.qwen_image.lora_formats`). Its
transformer is a QwenImageTransformer2DModel under the same names, and the tools read its LoRAs as Qwen-Image's
(diffusers' QwenImageEditPipeline through QwenImageLoraLoaderMixin, ComfyUI's key map)."""

from __future__ import annotations

from flowmatch.families.qwen_image.lora_formats import FORMATS  # noqa: F401 - this family's formats are Qwen-Image's
