"""Writing generated images: grids and PNG files. Images are float tensors in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import torch

from flowmatch.data.pixels import unit_to_pixels


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> one (C, rows*H + pad, cols*W + pad) grid image, row-major."""
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu(), nrow=max(1, len(images) // rows), padding=1, pad_value=1.0)


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """Save a (C, H, W) image in [0, 1] as PNG, upscaled `scale` times with nearest neighbour."""
    from PIL import Image

    array = unit_to_pixels(image).permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
