"""The cached-feature member of encoded shards: one safetensors blob per sample.

`key.safetensors` holds `latents` (c, h, w), `hidden` (n, D) with n the caption's real token count (padding is
not stored), `pooled` (Dp,), in bf16 or fp16; its metadata names the encoders that made it, so training refuses
features from a different text encoder or autoencoder. With `text_quant` the hidden states are stored as one-byte
codes (int8 or fp8 e4m3) plus a per-token `hidden_scale` (n,) (flowmatch.data.quantize) and read back as float32. safetensors rather than numpy or torch.save: it stores
bf16, and reading it never unpickles anything. The header alone (shapes, metadata) can be read without the data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Mapping

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from flowmatch.data import quantize

EXT = "safetensors"
FORMAT = "flowmatch-features-1"
ENCODER_FIELDS = ("text_encoder", "autoencoder")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "I8": "int8", "F8_E4M3": "fp8"}
# safetensors layout: 8-byte little-endian header length, then the JSON header.
HEADER_LEN = struct.Struct("<Q")
MAX_HEADER_BYTES = 1 << 20
TENSOR_RANKS = {"latents": 3, "hidden": 2, "pooled": 1}


class EncoderMismatch(ValueError):
    """Cached features were made by other encoders than the ones training uses."""


@dataclass
class FeatureHeader:
    """Shapes and provenance of one cached sample, read without its data."""

    latent_shape: tuple[int, ...]
    tokens: int
    hidden_dim: int
    pooled_dim: int
    dtype: str
    encoders: dict[str, str]
    text_dtype: str = ""
    """The stored dtype of the hidden states (int8 / fp8 when quantised)."""


@dataclass
class Features:
    """One cached sample: latents (c, h, w), hidden (n, D), pooled (Dp,), in the stored dtype."""

    latents: torch.Tensor
    hidden: torch.Tensor
    pooled: torch.Tensor


def encode(latents: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor, *, dtype: str,
           encoders: Mapping[str, str], text_quant: str = "") -> bytes:
    """Serialize one sample. latents (c, h, w); hidden (n, D) real tokens only; pooled (Dp,).

    text_quant: "" stores hidden in `dtype`; "int8" or "fp8" stores per-token quantised codes and scales."""
    if dtype not in DTYPES:
        raise ValueError(f"feature dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    missing = [f for f in ENCODER_FIELDS if f not in encoders]
    if missing:
        raise ValueError(f"encoders must name {ENCODER_FIELDS}, missing {missing}")
    if latents.dim() != 3 or hidden.dim() != 2 or pooled.dim() != 1:
        raise ValueError(
            f"expected latents (c, h, w), hidden (n, D), pooled (Dp,); got {tuple(latents.shape)}, "
            f"{tuple(hidden.shape)}, {tuple(pooled.shape)}"
        )
    cast = DTYPES[dtype]
    tensors = {
        "latents": latents.detach().to("cpu", cast).contiguous(),
        "hidden": hidden.detach().to("cpu", cast).contiguous(),
        "pooled": pooled.detach().to("cpu", cast).contiguous(),
    }
    if text_quant:
        tensors["hidden"], tensors["hidden_scale"] = quantize.quantize(hidden.detach().cpu(), text_quant)
    metadata = {"format": FORMAT, **{f: str(encoders[f]) for f in ENCODER_FIELDS}}
    return save_tensors(tensors, metadata=metadata)


def read_header(data: bytes) -> FeatureHeader:
    """Parse the safetensors header only; ValueError when it is not a flowmatch feature blob."""
    if len(data) < HEADER_LEN.size:
        raise ValueError("features member is truncated")
    (length,) = HEADER_LEN.unpack_from(data)
    if length > MAX_HEADER_BYTES or HEADER_LEN.size + length > len(data):
        raise ValueError("features member has a bad header length")
    try:
        header = json.loads(data[HEADER_LEN.size:HEADER_LEN.size + length])
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"features header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError("features header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"features member is not {FORMAT} (format {meta.get('format')!r})")
    try:
        dtype = str(header["latents"]["dtype"])
        text_dtype = str(header["hidden"]["dtype"])
        shapes = {name: tuple(int(v) for v in header[name]["shape"]) for name in TENSOR_RANKS}
        data_end = max(int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__")
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"features header lacks latents/hidden/pooled: {err}") from None
    wrong = [f"{name} {list(shape)}" for name, shape in shapes.items() if len(shape) != TENSOR_RANKS[name]]
    if wrong:
        raise ValueError(f"features have the wrong number of dimensions: {', '.join(wrong)}")
    # Checked here, before batching, so a cut-off blob is counted without costing a batch its slot.
    if data_end != len(data) - HEADER_LEN.size - length:
        raise ValueError(f"features data is {len(data) - HEADER_LEN.size - length} bytes, the header says {data_end}")
    quantised = SAFETENSORS_DTYPES.get(text_dtype) in quantize.KINDS
    scale_shape = header.get("hidden_scale", {}).get("shape") if isinstance(header.get("hidden_scale"), dict) else None
    if quantised and scale_shape != [shapes["hidden"][0]]:
        raise ValueError(f"quantised hidden states {list(shapes['hidden'])} need a hidden_scale of shape "
                         f"[{shapes['hidden'][0]}], found {scale_shape}")
    return FeatureHeader(
        latent_shape=shapes["latents"],
        tokens=shapes["hidden"][0],
        hidden_dim=shapes["hidden"][1],
        pooled_dim=shapes["pooled"][0],
        dtype=SAFETENSORS_DTYPES.get(dtype, dtype),
        encoders={f: str(meta.get(f, "")) for f in ENCODER_FIELDS},
        text_dtype=SAFETENSORS_DTYPES.get(text_dtype, text_dtype),
    )


def decode(data: bytes) -> Features:
    """Load the tensors (stored dtype: the batch collation converts to float32 once); ValueError on a corrupt blob."""
    try:
        tensors = load_tensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt data
        raise ValueError(f"corrupt features: {err}") from None
    try:
        hidden = tensors["hidden"]
        if "hidden_scale" in tensors:
            if tensors["hidden_scale"].shape != hidden.shape[:1]:
                raise ValueError(f"hidden_scale {list(tensors['hidden_scale'].shape)} does not match hidden "
                                 f"{list(hidden.shape)}")
            hidden = quantize.dequantize(hidden, tensors["hidden_scale"])
        return Features(tensors["latents"], hidden, tensors["pooled"])
    except KeyError as err:
        raise ValueError(f"features lack tensor {err}") from None


def check_finite(f: Features) -> None:
    """ValueError naming the tensors holding NaN or infinity (bytes damaged inside the tensor data load fine)."""
    bad = [name for name in TENSOR_RANKS if not bool(torch.isfinite(getattr(f, name)).all())]
    if bad:
        raise ValueError(f"non-finite values in {', '.join(bad)}")


def check_encoders(found: Mapping[str, str], expected: Mapping[str, str], where: str = "") -> None:
    """Raise EncoderMismatch when any expected encoder fingerprint differs from the one that made the features."""
    for name, want in expected.items():
        have = found.get(name, "")
        if have != want:
            raise EncoderMismatch(
                f"cached features{' in ' + where if where else ''} were made by {name} {have!r}, but training uses "
                f"{want!r}. Re-encode the shards with this recipe (flowmatch-data encode IN OUT --recipe R) or "
                "point data.shards at the raw shards (data.cached=false)."
            )
