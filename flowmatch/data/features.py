"""The cached-feature member of encoded shards: one safetensors blob per sample.

`key.safetensors` holds `latents` (c, h, w), `hidden` (n, D) with n the caption's real token count (padding is not
stored), `pooled` (Dp,), in bf16 or fp16; its metadata names the encoders that made it, so training refuses features
from a different text encoder or autoencoder. A run with several text encoders stores each one's output under its
own name instead: `hidden.NAME` (n_i, D_i) and `pooled.NAME` (Dp_i,), fingerprinted as `text_encoder.NAME`; the
loader re-pads each and the encoders combine them (flowmatch.encoders.combine). With `text_quant` each hidden state
is stored as one-byte codes (int8 or fp8 e4m3) plus a per-token `hidden_scale` (n,) (`hidden_scale.NAME` beside
`hidden.NAME`; flowmatch.data.quantize) and read back as float32. A paired (editing) sample adds `references`
(R, c, h', w'): its reference images' latents, made by the same autoencoder as `latents`. safetensors rather than
numpy or torch.save: it stores bf16, and reading it never unpickles anything. The header alone (shapes, metadata)
can be read without the data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from flowmatch.data import quantize
from flowmatch.errors import UsageError

EXT = "safetensors"
FORMAT = "flowmatch-features-1"
FORMAT_PARTS = "flowmatch-features-2"  # one hidden.NAME / pooled.NAME pair per text encoder
FORMATS = (FORMAT, FORMAT_PARTS)
ENCODER_FIELDS = ("text_encoder", "autoencoder")
TEXT_FIELD = "text_encoder"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "I8": "int8", "F8_E4M3": "fp8"}
# safetensors layout: 8-byte little-endian header length, then the JSON header.
HEADER_LEN = struct.Struct("<Q")
MAX_HEADER_BYTES = 1 << 20
TENSOR_RANKS = {"latents": 3, "hidden": 2, "pooled": 1}
REFERENCES = "references"
"""A paired sample's reference latents (R, c, h', w'), when it has any."""


class EncoderMismatch(ValueError, UsageError):
    """Cached features were made by other encoders than the ones training uses."""


@dataclass
class FeatureHeader:
    """Shapes and provenance of one cached sample, read without its data."""

    latent_shape: tuple[int, ...]
    tokens: int
    """Stored text tokens (summed over the encoders when there are several)."""
    hidden_dim: int
    """Hidden width (the widest encoder's when there are several)."""
    pooled_dim: int
    """Pooled width (summed over the encoders when there are several)."""
    dtype: str
    encoders: dict[str, str]
    parts: tuple[str, ...] = ()
    """The text encoders' names when each is stored on its own (empty for a single encoder)."""
    text_dtype: str = ""
    """The stored dtype of the hidden states (int8 / fp8 when quantised)."""
    reference_shape: tuple[int, ...] = ()
    """(R, c, h', w') of a paired sample's reference latents; () when it has none."""


@dataclass
class Features:
    """One cached sample in the stored dtype: latents (c, h, w) and either hidden (n, D), pooled (Dp,) of a single
    text encoder, or ``parts``: {name: (hidden (n_i, D_i), pooled (Dp_i,))} of several."""

    latents: torch.Tensor
    hidden: Optional[torch.Tensor]
    pooled: Optional[torch.Tensor]
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    references: Optional[torch.Tensor] = None
    """(R, c, h', w') reference latents of a paired sample, else None."""


def _text_names(encoders: Mapping[str, str]) -> list[str]:
    return [k for k in encoders if k == TEXT_FIELD or k.startswith(TEXT_FIELD + ".")]


def encode(latents: torch.Tensor, hidden: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None, *,
           dtype: str, encoders: Mapping[str, str],
           parts: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] = None, text_quant: str = "",
           references: Optional[torch.Tensor] = None) -> bytes:
    """Serialize one sample. latents (c, h, w); hidden (n, D) real tokens only; pooled (Dp,). With several text
    encoders, ``parts`` {name: (hidden (n_i, D_i), pooled (Dp_i,))} instead, each fingerprinted in ``encoders``
    as ``text_encoder.NAME``. ``text_quant``: "" stores hidden states in ``dtype``; "int8" or "fp8" stores
    per-token quantised codes and scales. ``references`` (R, c, h', w'): a paired sample's reference latents."""
    if dtype not in DTYPES:
        raise ValueError(f"feature dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    texts = {f".{name}": pair for name, pair in parts.items()} if parts else {"": (hidden, pooled)}
    need = ["autoencoder", *(TEXT_FIELD + suffix for suffix in texts)]
    missing = [f for f in need if f not in encoders]
    if missing:
        raise ValueError(f"encoders must name {need}, missing {missing}")
    cast = DTYPES[dtype]
    tensors = {"latents": latents.detach().to("cpu", cast).contiguous()}
    if references is not None:
        if references.dim() != 4 or references.shape[0] < 1:
            raise ValueError(f"expected references (R, c, h, w) with R >= 1, got {tuple(references.shape)}")
        tensors[REFERENCES] = references.detach().to("cpu", cast).contiguous()
    for suffix, (h, p) in texts.items():
        if latents.dim() != 3 or h is None or p is None or h.dim() != 2 or p.dim() != 1:
            raise ValueError(
                f"expected latents (c, h, w), hidden{suffix} (n, D), pooled{suffix} (Dp,); got "
                f"{tuple(latents.shape)}, {None if h is None else tuple(h.shape)}, "
                f"{None if p is None else tuple(p.shape)}"
            )
        tensors[f"hidden{suffix}"] = h.detach().to("cpu", cast).contiguous()
        if text_quant:
            tensors[f"hidden{suffix}"], tensors[f"hidden_scale{suffix}"] = quantize.quantize(h.detach().cpu(),
                                                                                             text_quant)
        tensors[f"pooled{suffix}"] = p.detach().to("cpu", cast).contiguous()
    metadata = {"format": FORMAT_PARTS if parts else FORMAT, "autoencoder": str(encoders["autoencoder"]),
                **{TEXT_FIELD + suffix: str(encoders[TEXT_FIELD + suffix]) for suffix in texts}}
    return _sorted_metadata(save_tensors(tensors, metadata=metadata))


def _sorted_metadata(blob: bytes) -> bytes:
    """``blob`` with its header's metadata in sorted key order: safetensors writes it in hash-map order, which
    changes from process to process, and a cache must not depend on which process encoded it."""
    (length,) = HEADER_LEN.unpack_from(blob)
    raw = blob[HEADER_LEN.size:HEADER_LEN.size + length]
    header = json.loads(raw)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > length:  # never happens for the same keys and values; keep the original then
        return blob
    return blob[:HEADER_LEN.size] + text + b" " * (length - len(text)) + blob[HEADER_LEN.size + length:]


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
    if meta.get("format") not in FORMATS:
        raise ValueError(f"features member is not {FORMAT} (format {meta.get('format')!r})")
    parts = tuple(k[len("hidden."):] for k in header if k.startswith("hidden."))
    hidden_keys = [f"hidden.{n}" for n in parts] if parts else ["hidden"]
    ranks = {"latents": 3, **{f"{t}.{n}": TENSOR_RANKS[t] for n in parts for t in ("hidden", "pooled")}} \
        if parts else dict(TENSOR_RANKS)
    if REFERENCES in header:
        ranks[REFERENCES] = 4
    try:
        dtype = str(header["latents"]["dtype"])
        shapes = {name: tuple(int(v) for v in header[name]["shape"]) for name in ranks}
        data_end = max(int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__")
        text_dtype = str(header[hidden_keys[0]]["dtype"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"features header lacks latents/hidden/pooled: {err}") from None
    wrong = [f"{name} {list(shape)}" for name, shape in shapes.items() if len(shape) != ranks[name]]
    if wrong:
        raise ValueError(f"features have the wrong number of dimensions: {', '.join(wrong)}")
    for key in hidden_keys:
        entry = header.get(key.replace("hidden", "hidden_scale", 1))
        scale_shape = entry.get("shape") if isinstance(entry, dict) else None
        if SAFETENSORS_DTYPES.get(str(header[key]["dtype"])) in quantize.KINDS and scale_shape != [shapes[key][0]]:
            raise ValueError(f"quantised {key} {list(shapes[key])} needs a hidden_scale of shape "
                             f"[{shapes[key][0]}], found {scale_shape}")
    # Checked here, before batching, so a cut-off blob is counted without costing a batch its slot.
    if data_end != len(data) - HEADER_LEN.size - length:
        raise ValueError(f"features data is {len(data) - HEADER_LEN.size - length} bytes, the header says {data_end}")
    if REFERENCES in shapes and shapes[REFERENCES][0] < 1:
        raise ValueError("features hold an empty references tensor")
    hidden = [shapes[k] for k in shapes if k.startswith("hidden")]
    pooled = [shapes[k] for k in shapes if k.startswith("pooled")]
    return FeatureHeader(
        latent_shape=shapes["latents"],
        tokens=sum(h[0] for h in hidden),
        hidden_dim=max(h[1] for h in hidden),
        pooled_dim=sum(p[0] for p in pooled),
        dtype=SAFETENSORS_DTYPES.get(dtype, dtype),
        encoders={f: str(meta.get(f, "")) for f in ("autoencoder", *_text_names(meta))} if parts else
        {f: str(meta.get(f, "")) for f in ENCODER_FIELDS},
        parts=parts,
        text_dtype=SAFETENSORS_DTYPES.get(text_dtype, text_dtype),
        reference_shape=shapes.get(REFERENCES, ()),
    )


def decode(data: bytes) -> Features:
    """Load the tensors (stored dtype: the batch collation converts to float32 once); ValueError on a corrupt blob."""
    try:
        tensors = load_tensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt data
        raise ValueError(f"corrupt features: {err}") from None
    try:
        names = [k[len("hidden."):] for k in tensors if k.startswith("hidden.")]
        references = tensors.get(REFERENCES)
        if names:
            return Features(tensors["latents"], None, None,
                            {n: (_hidden(tensors, f".{n}"), tensors[f"pooled.{n}"]) for n in names}, references)
        return Features(tensors["latents"], _hidden(tensors, ""), tensors["pooled"], references=references)
    except KeyError as err:
        raise ValueError(f"features lack tensor {err}") from None


def _hidden(tensors: Mapping[str, torch.Tensor], suffix: str) -> torch.Tensor:
    """hidden{suffix}, dequantised to float32 when stored with a per-token scale."""
    hidden = tensors[f"hidden{suffix}"]
    scale = tensors.get(f"hidden_scale{suffix}")
    if scale is None:
        return hidden
    if scale.shape != hidden.shape[:1]:
        raise ValueError(f"hidden_scale{suffix} {list(scale.shape)} does not match hidden{suffix} {list(hidden.shape)}")
    return quantize.dequantize(hidden, scale)


def check_finite(f: Features) -> None:
    """ValueError naming the tensors holding NaN or infinity (bytes damaged inside the tensor data load fine)."""
    named = {"latents": f.latents, "hidden": f.hidden, "pooled": f.pooled, REFERENCES: f.references,
             **{f"{t}.{n}": pair[i] for n, pair in f.parts.items() for i, t in enumerate(("hidden", "pooled"))}}
    bad = [name for name, x in named.items() if x is not None and not bool(torch.isfinite(x).all())]
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
