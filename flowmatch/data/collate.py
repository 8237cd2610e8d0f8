"""A group of one bucket's samples decoded into one `Batch`: step 4 of a stream (flowmatch.data.stream).

Raw samples become pixels resized to their bucket (with their reference images and loss masks when the data has
them); cached ones become latents and text features, each encoder's re-padded on its own. A sample that fails to
decode drops out of its batch and is returned as a bad record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.data import decode
from flowmatch.data.batch import Batch
from flowmatch.data.masks import cached_mask, decode_mask, masks_to_tensor
from flowmatch.data.tarstream import BadRecord, RawSample

if TYPE_CHECKING:
    from flowmatch.data.stream import StreamSpec


@dataclass
class Group:
    """Samples of one bucket that will make one batch, plus the bad records met since the previous group."""

    bucket: object
    samples: list[tuple[RawSample, decode.SampleInfo]]
    bad: list[BadRecord]


def decode_group(spec: StreamSpec, group: Group) -> tuple[Optional[Batch], list[BadRecord], list[int]]:
    """The group's Batch (None when every sample failed), the samples that failed to decode, and the source of
    each kept sample."""
    kept: list[tuple[RawSample, decode.SampleInfo]] = []
    tensors: list = []
    refs: list = []
    masks: list = []
    failed: list[BadRecord] = []
    for record, info in group.samples:
        try:
            if spec.cached:
                tensors.append(decode.decode_cached(record))
                if spec.masks:
                    masks.append(cached_mask(record, spec.max_pixels))
            else:
                target = spec.buckets[group.bucket[0]]
                size = dict(height=target.height, width=target.width, channels=spec.channels,
                            max_pixels=spec.max_pixels)
                pixels = decode.decode_pixels(record.files[info.image_ext], **size)
                if info.references:
                    refs.append(decode.decode_references(record, info, **size))
                if spec.masks:
                    masks.append(decode_mask(record, info.image_ext, height=target.height, width=target.width,
                                             max_pixels=spec.max_pixels, alpha=spec.alpha_masks))
                tensors.append(pixels)
            kept.append((record, info))
        except decode.BadSample as err:
            failed.append(BadRecord(record.url, record.key, err.reason, err.detail))
    if not kept:
        return None, failed, []
    captions = [info.caption for _, info in kept]
    keys = [record.key for record, _ in kept]
    meta = [sample_meta(record) for record, _ in kept]
    sources = [record.source for record, _ in kept]
    if spec.cached:
        latents = torch.stack([f.latents for f in tensors]).float()
        shown = [m for m in masks if m is not None]  # a cached group shares one latent shape: one pixel size
        cached_masks = masks_to_tensor(masks, *shown[0].shape) if shown else None
        ref_latents = torch.stack([f.references for f in tensors]).float() if spec.paired else None
        if tensors[0].parts:  # several text encoders: each re-padded on its own, combined by the encoders
            parts = {n: Conditioning.from_rows([f.parts[n][0] for f in tensors], [f.parts[n][1] for f in tensors])
                     for n in tensors[0].parts}
            return Batch(captions, keys, latents=latents, meta=meta, text_parts=parts, ref_latents=ref_latents,
                         masks=cached_masks), failed, sources
        text = Conditioning.from_rows([f.hidden for f in tensors], [f.pooled for f in tensors])
        return Batch(captions, keys, latents=latents, text=text, meta=meta, ref_latents=ref_latents,
                     masks=cached_masks), failed, sources
    ref_images = None
    if refs:  # (B, R, H, W, C) uint8 -> (B, R, C, H, W) in [-1, 1], one conversion per batch
        b, r = len(refs), len(refs[0])
        ref_images = decode.pixels_to_tensor([p for sample in refs for p in sample])
        ref_images = ref_images.reshape(b, r, *ref_images.shape[1:])
    size = spec.buckets[group.bucket[0]]
    return Batch(captions, keys, images=decode.pixels_to_tensor(tensors), meta=meta, ref_images=ref_images,
                 masks=masks_to_tensor(masks, size.height, size.width) if masks else None), failed, sources


def sample_meta(record: RawSample) -> dict:
    """The sample's .json as a dict ({} when absent or not an object)."""
    try:
        meta = json.loads(record.files["json"]) if "json" in record.files else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}
