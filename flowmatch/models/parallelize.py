"""Training-time transformations applied to an MMDiT from outside the model, one block at a time
(the torchtitan `parallelize_*` pattern): activation checkpointing, torch.compile and the attention kernel for
padded text.

Both act in place and keep parameter names unchanged, so state dicts, optimizer groups and DeepSpeed's
parameter partitioning see the same model with or without them. Apply checkpointing before compilation.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

from flowmatch.models.key_padding import ATTENTION_KERNELS
from flowmatch.models.mmdit import MMDiT

_CHECKPOINTED = "_flowmatch_checkpointed"


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: MMDiT) -> MMDiT:
    """Recompute each block's activations in the backward pass instead of storing them.

    Uses non-reentrant `torch.utils.checkpoint`, so outputs and gradients are identical to the plain model.
    The block's `forward` is replaced on the instance (not wrapped in a new module), which keeps parameter
    names. Idempotent.
    """
    for block in model.blocks():
        if getattr(block, _CHECKPOINTED, False):
            continue
        block.forward = _checkpointed(block.forward)
        setattr(block, _CHECKPOINTED, True)
    return model


def apply_compile(
    model: MMDiT, *, fullgraph: bool = True, dynamic: bool | None = None, backend: str | Callable = "inductor"
) -> MMDiT:
    """torch.compile each block in place (`nn.Module.compile`). Per-block graphs stay small, and blocks of the
    same kind share their code, so compiled graphs are reused across depth instead of growing with it.

    `backend` is torch.compile's: "inductor" generates kernels (on CPU it needs a C++ compiler and minutes even
    for a tiny model); "aot_eager", like the counting backend of tests/test_parallelize.py, traces forward and
    backward the same way (AOTAutograd) but runs the graphs eagerly, which exercises compilation in seconds.
    """
    block: nn.Module
    for block in model.blocks():
        block.compile(fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    model.blocks_compiled = True  # attention "auto" picks FlexAttention for padded text on CUDA now
    return model


def set_attention(model: MMDiT, kernel: str) -> MMDiT:
    """How ``model`` masks padded text: one of :data:`flowmatch.models.key_padding.ATTENTION_KERNELS` (``auto``:
    FlexAttention on CUDA once :func:`apply_compile` has run, SDPA with a boolean mask otherwise)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {ATTENTION_KERNELS}")
    model.attention_kernel = kernel
    return model
