"""A quantised frozen model, applied from outside it (like :mod:`flowmatch.models.parallelize`), to the base of a
LoRA run (``model.quantize``) and to frozen text encoders (``text_encoder.quantize``): every frozen ``nn.Linear``
becomes a :class:`QuantizedLinear` that keeps its weight as weight-only int8, float8 or nf4 codes and dequantises
it for each forward. LoRA adapters (and anything else trainable) stay as they are, in full precision.

=========  ===============================================  =================================================
kind       backend                                          bytes per weight element
=========  ===============================================  =================================================
``int8``   torchao affine quantisation, symmetric per row   1 + one fp32 scale per row
``fp8``    torchao affine quantisation to float8 e4m3, per  1 + one fp32 scale per row
           row
``nf4``    bitsandbytes ``quantize_4bit`` (NormalFloat4,    0.5 + one fp32 absmax per 64
           blocks of 64)
=========  ===============================================  =================================================

The codes are non-persistent buffers: they are rebuilt from the base's weights (``model.init_from``, recorded by
hash in every checkpoint) when a run starts or resumes, so a checkpoint holds the adapters alone and an exported
LoRA loads on the unquantised base. Codes are stored as integer tensors (fp8 as its bytes), so a cast of the
model to bf16 leaves them alone; the forward computes in the input's dtype.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

# Backend package of each quantisation (the recipe's model.quantize / text encoder quantize values).
BACKENDS: dict[str, str] = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}
QUANTIZATIONS = tuple(BACKENDS)
# nf4 block size: bitsandbytes' (and QLoRA's) default, 64 weights per absmax.
NF4_BLOCK = 64


def missing_backend(kind: str) -> str | None:
    """The package quantisation ``kind`` needs that is not installed here, or None."""
    package = BACKENDS[kind]
    return package if importlib.util.find_spec(package) is None else None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is held quantised (weight-only) and dequantised at each forward.

    Args:
        linear: the layer to replace (its weight is read once; ``bias`` is kept as a frozen parameter).
        kind: int8, fp8 or nf4.
    """

    def __init__(self, linear: nn.Linear, kind: str) -> None:
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # (out, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if kind == "nf4":
            import bitsandbytes.functional as bnb  # optional heavy dependency, only for nf4

            packed, state = bnb.quantize_4bit(weight, blocksize=NF4_BLOCK, quant_type="nf4")
            self.register_buffer("codes", packed, persistent=False)
            self.register_buffer("scale", state.absmax, persistent=False)
            self.register_buffer("nf4_code", state.code, persistent=False)
        else:
            from torchao.quantization import quant_primitives as ao  # optional heavy dependency, int8 / fp8 only

            target = torch.int8 if kind == "int8" else torch.float8_e4m3fn
            block = (1, weight.shape[1])  # one scale per output row
            scale, zero = ao.choose_qparams_affine(weight, ao.MappingType.SYMMETRIC, block, target)
            codes = ao.quantize_affine(weight, block, scale, zero, target)
            self.register_buffer("codes", codes.view(torch.uint8) if kind == "fp8" else codes, persistent=False)
            self.register_buffer("scale", scale, persistent=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``(out_features, in_features)`` in ``dtype``."""
        shape = (self.out_features, self.in_features)
        if self.kind == "nf4":
            import bitsandbytes.functional as bnb  # optional heavy dependency, only for nf4

            state = bnb.QuantState(absmax=self.scale.float(), shape=torch.Size(shape), code=self.nf4_code.float(),
                                   blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32)
            return bnb.dequantize_4bit(self.codes, state).to(dtype)
        codes = self.codes.view(torch.float8_e4m3fn) if self.kind == "fp8" else self.codes
        return (codes.float() * self.scale.float().unsqueeze(1)).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight in the model's working dtype (which casts of the model give the float scales),
        for code that reads a layer's ``weight`` (its dtype, or peft's merge)."""
        return self.dequantized(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def quantize_frozen(model: nn.Module, kind: str) -> int:
    """Replace every ``nn.Linear`` of ``model`` whose weight is frozen by a :class:`QuantizedLinear` of ``kind``,
    in place (inside peft's LoRA layers too: their ``base_layer``); returns how many were replaced. Trainable
    linears (the adapters, or a layer a recipe trains) are left alone. Apply after the adapters are injected."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not module.weight.requires_grad]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear(module, kind))
    return len(targets)
