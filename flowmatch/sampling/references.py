"""Reference images for generation (image editing): what ``Pipeline.generate(images=...)`` accepts, resized and
scaled to [-1, 1] as the model's pipeline does, and grouped so that one batch holds one reference layout.

Accepted (:data:`ReferenceImages`): a tensor (B, C, H, W) in [0, 1], one reference per prompt; or a list with one
entry per prompt, each a PIL image or a (C, H, W) tensor in [0, 1], or a list of those (several references for
that prompt). Resizing and the map to [-1, 1] are diffusers' ``VaeImageProcessor``'s, the processor
FluxKontextPipeline runs (Lanczos for PIL images, nearest-neighbour interpolation for tensors), so the pixels
the autoencoder sees are the ones diffusers' pipeline encodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["ReferenceImages", "group_rows", "reference_pixels", "references_per_prompt", "resized_reference",
           "stack_references"]

ReferenceImages = Union[Tensor, Sequence[Any]]
"""A (B, C, H, W) tensor in [0, 1], or per prompt a PIL image, a (C, H, W) tensor or a list of them."""


def _is_pil(item: Any) -> bool:
    return hasattr(item, "getbands") and hasattr(item, "size")  # PIL.Image.Image, without importing PIL here


def _check_tensor(item: Tensor, where: str) -> Tensor:
    if item.ndim != 3 or not item.is_floating_point():
        raise ValueError(f"{where} must be a (C, H, W) float tensor in [0, 1], got {item.dtype} {tuple(item.shape)}")
    if item.numel() and (item.min() < 0 or item.max() > 1):
        raise ValueError(f"{where} has values in [{item.min().item():.3g}, {item.max().item():.3g}]; reference "
                         "tensors are images in [0, 1] (map [-1, 1] pixels with (x + 1) / 2)")
    return item[None].float()


def references_per_prompt(images: ReferenceImages, prompts: int) -> list[list[Any]]:
    """``images`` as one list per prompt of its references: (1, C, H, W) float tensors in [0, 1] or PIL images.
    ValueError naming what does not fit (the count, a shape, a range)."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[0] != prompts:
            raise ValueError(f"images must be a ({prompts}, C, H, W) tensor in [0, 1] (one reference per prompt) or "
                             f"a list of {prompts} entries, got a tensor of shape {tuple(images.shape)}")
        return [[_check_tensor(images[i], f"images[{i}]")] for i in range(prompts)]
    if not isinstance(images, (list, tuple)) or len(images) != prompts:
        got = f"{len(images)} entries" if isinstance(images, (list, tuple)) else type(images).__name__
        raise ValueError(f"images must give the references of each of the {prompts} prompts (a list of {prompts} "
                         f"PIL images, (C, H, W) tensors or lists of them), got {got}")
    out = []
    for i, entry in enumerate(images):
        items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        checked = []
        for k, item in enumerate(items):
            where = f"images[{i}][{k}]" if isinstance(entry, (list, tuple)) else f"images[{i}]"
            if isinstance(item, Tensor):
                checked.append(_check_tensor(item, where))
            elif _is_pil(item):
                checked.append(item)
            else:
                raise ValueError(f"{where} is a {type(item).__name__}; give a PIL image or a (C, H, W) tensor in "
                                 "[0, 1]")
        out.append(checked)
    return out


def _size(item: Any) -> tuple[int, int]:
    """(height, width) in pixels of a (1, C, H, W) tensor or a PIL image."""
    return (item.height, item.width) if _is_pil(item) else (item.shape[2], item.shape[3])


def resized_reference(item: Any, size: Callable[[int, int], tuple[int, int]], multiple: int) -> Any:
    """One reference resized to ``size(height, width)`` (floored to a multiple of ``multiple``: the
    autoencoder's factor times the patch size): a PIL image stays one, a (1, C, H, W) tensor stays one in [0, 1].
    What QwenImageEditPipeline shows its vision-language text encoder."""
    # reason: diffusers is a heavy import, needed only when references are given
    from diffusers.image_processor import VaeImageProcessor

    height, width = size(*_size(item))
    height, width = height // multiple * multiple, width // multiple * multiple
    if height < multiple or width < multiple:
        raise ValueError(f"a reference image of {_size(item)} pixels is smaller than {multiple}x{multiple}, the "
                         "smallest size the model's patches allow")
    return VaeImageProcessor(vae_scale_factor=multiple).resize(item, height, width)


def reference_pixels(resized: Any, multiple: int) -> Tensor:
    """A reference :func:`resized_reference` gave, mapped to [-1, 1] at its size: (C, h, w) float32 (the
    pipelines' order: resize, then preprocess to float at the same size)."""
    # reason: diffusers is a heavy import, needed only when references are given
    from diffusers.image_processor import VaeImageProcessor

    height, width = _size(resized)
    return VaeImageProcessor(vae_scale_factor=multiple).preprocess(resized, height, width)[0].float()


def group_rows(keys: Sequence[Any]) -> list[list[int]]:
    """Row indices grouped by equal key, in order of first appearance (rows keep their order in each group)."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def stack_references(pixels: Sequence[Sequence[Tensor]]) -> tuple[Tensor, ...]:
    """Per row of one group, its references (C, h_k, w_k) -> one (G, C, h_k, w_k) tensor per reference."""
    return tuple(torch.stack([row[k] for row in pixels]) for k in range(len(pixels[0])))
