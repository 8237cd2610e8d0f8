"""Per-token int8 / fp8 text caches: error bounds, the cache format, and damaged blobs counted like bad images."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as save_tensors

from flowmatch.data import build_loader, features, quantize
from flowmatch.data.shardformat import ShardSink
from tests.test_data_loader import ENCODERS, cfg_for


def rows(n: int = 9, d: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # token norms spread over three orders of magnitude, as in real encoders
    return torch.randn(n, d, generator=gen) * torch.logspace(-2, 1, n)[:, None]


def test_int8_error_is_at_most_half_a_step_per_token():
    x = rows()
    codes, scale = quantize.quantize(x, "int8")
    assert codes.dtype == torch.int8 and scale.shape == (9,)
    err = (quantize.dequantize(codes, scale) - x).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)  # per token: the small rows keep their precision
    assert torch.equal(codes.abs().amax(1), torch.full((9,), 127, dtype=torch.int8))


@pytest.mark.skipif(not quantize.fp8_supported(), reason="this torch has no float8_e4m3fn")
def test_fp8_relative_error_is_e4m3_sized():
    x = rows()
    codes, scale = quantize.quantize(x, "fp8")
    back = quantize.dequantize(codes, scale)
    rel = ((back - x).norm(dim=1) / x.norm(dim=1)).max()
    assert rel < 2 ** -4  # 3 mantissa bits: at most 2^-4 relative per element
    assert quantize.dequantize(*quantize.quantize(torch.zeros(2, 4), "fp8")).abs().sum() == 0


def blob(hidden: torch.Tensor, quant: str) -> bytes:
    return features.encode(torch.zeros(4, 2, 2), hidden, torch.zeros(5), dtype="bf16", encoders=ENCODERS,
                           text_quant=quant)


def test_quantised_features_round_trip_and_are_half_the_size():
    hidden = rows(12, 384)
    plain, int8 = blob(hidden, ""), blob(hidden, "int8")
    header = features.read_header(int8)
    assert header.text_dtype == "int8" and header.tokens == 12 and header.hidden_dim == 384
    back = features.decode(int8).hidden
    assert back.dtype == torch.float32
    rel = (back - hidden).norm() / hidden.norm()
    # rounding to steps of amax / 127 leaves an error of step / sqrt(12) rms: 0.7% of a Gaussian row's rms
    # (amax ~ 3 rms at D = 384); stored unquantised (the one-line bug), the bf16 error would be ~0.2%
    assert 0.004 < rel < 0.01
    text_bytes = lambda b: len(b) - 4 * 2 * 2 * 2 - 5 * 2  # noqa: E731 - drop latents and pooled
    assert text_bytes(int8) < 0.6 * text_bytes(plain)


def test_damaged_quantised_blobs_are_skipped_and_counted(tmp_path):
    good = blob(rows(3, 6), "int8")
    (length,) = struct.unpack_from("<Q", good)
    header = json.loads(good[8:8 + length])
    start, end = header["hidden_scale"]["data_offsets"]
    nan_scale = bytearray(good)
    nan_scale[8 + length + start:8 + length + end] = struct.pack("<3f", float("nan"), 1.0, 1.0)
    no_scale = features.encode(torch.zeros(4, 2, 2), torch.zeros(3, 6), torch.zeros(5), dtype="bf16",
                               encoders=ENCODERS)
    missing = save_tensors({"latents": torch.zeros(4, 2, 2, dtype=torch.bfloat16),
                            "hidden": torch.zeros(3, 6, dtype=torch.int8),  # codes without their scales
                            "pooled": torch.zeros(5, dtype=torch.bfloat16)},
                           metadata={"format": features.FORMAT, **ENCODERS})
    with ShardSink(tmp_path, prefix="train") as sink:
        for i in range(5):
            sink.write(f"good{i}", {features.EXT: good, "txt": "ok"})
        sink.write("nan", {features.EXT: bytes(nan_scale), "txt": "bad"})
        sink.write("noscale", {features.EXT: missing, "txt": "bad"})
        sink.write("plain", {features.EXT: no_scale, "txt": "plain bf16 beside int8"})
    loader = build_loader(cfg_for(tmp_path, shuffle=False), rank=0, world_size=1, batch_size=8, seed=0, epochs=1,
                          encoders=ENCODERS)
    keys = sorted(k for b in loader for k in b.keys)
    assert keys == sorted([f"good{i}" for i in range(5)] + ["plain"])
    assert loader.stats.reasons == {"non-finite features": 1, "unreadable features": 1}
