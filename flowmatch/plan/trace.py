"""What a model costs, read from the model itself on the meta device: its parameter bytes, and the exact bytes
autograd keeps for the backward pass in one forward (saved-tensor hooks), per block and outside the blocks.

Nothing is allocated: the network is built on the meta device (its family's ``build``), run once on meta inputs of
the training batch's shapes, and every tensor autograd saves is recorded by its storage, so views of one tensor
count once and the parameters autograd keeps a reference to count as weights, not activations.

Attention is traced as the fused kernels run it (PyTorch's flash attention on CPU, flash or memory-efficient
attention on CUDA): they keep q, k, v, the output and a float32 log-sum-exp per query row, never the L x L
matrix that the meta device's reference path would keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from flowmatch.engine.optimizers import build_optimizer

#: bitsandbytes' 8-bit AdamW layout: tensors under this many elements keep two fp32 moments; larger ones two uint8
#: moments with one fp32 absmax per block of this many values each, and two 256-entry fp32 code tables shared by
#: every tensor (bitsandbytes.optim.Optimizer8bit: min_8bit_size 4096, block-wise quantisation in blocks of 256).
ADAMW8BIT_MIN_SIZE, ADAMW8BIT_BLOCK = 4096, 256


@dataclass(frozen=True)
class ParamCount:
    """Parameter elements of a model, split by whether the optimizer trains them."""

    trainable: int
    frozen: int
    largest_block: int
    """Elements of the largest transformer block (ZeRO-3 gathers one block at a time)."""


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for one forward of a given batch (backward not yet run)."""

    blocks: list[int]
    """Per transformer block, in execution order: what it saves."""
    in_blocks: int
    """What all the blocks save together (a tensor several blocks save, such as the conditioning, once)."""
    block_inputs: int
    """What activation checkpointing keeps instead: every block's inputs (shared ones once)."""
    outside: int
    """What the embedders, the final layer and the loss's inputs save outside the blocks."""
    frozen_linears: tuple[int, ...] = ()
    """Per block: elements of the frozen linear weights autograd keeps (a layer whose input needs a gradient);
    under model.quantize each is a dequantised copy, not the parameter."""
    frozen_linears_outside: int = 0
    """The same outside the blocks."""

    @property
    def plain(self) -> int:
        """Kept at the end of the forward without activation checkpointing."""
        return self.outside + self.in_blocks

    @property
    def checkpointed(self) -> int:
        """The peak with activation checkpointing: the blocks' inputs, plus one block recomputed in backward."""
        return self.outside + self.block_inputs + max(self.blocks, default=0)


def _storage_key(t: Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


def count_params(model: nn.Module, blocks: list[nn.Module]) -> ParamCount:
    """Trainable and frozen parameter elements of ``model`` (each tensor once)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    return ParamCount(trainable, frozen, largest)


def optimizer_state_bytes(name: str, shapes: Sequence[torch.Size]) -> int:
    """Bytes of the state optimizer ``name`` (``optim.name``) keeps for fp32 parameters of ``shapes`` (what the
    optimizer steps: the parameters in fp32, or their fp32 masters).

    torch's optimizers (adamw, adafactor) are built as the engine builds them, over meta parameters, and stepped
    once on meta gradients; their state tensors are counted by storage. 8-bit AdamW's is its layout
    (:data:`ADAMW8BIT_MIN_SIZE`, :data:`ADAMW8BIT_BLOCK`) applied to the shapes: importing bitsandbytes to plan costs
    seconds (``tests/test_plan.py`` checks the layout against its optimizer's state).
    """
    if name == "adamw8bit":
        tables = 2 * 256 * 4 if any(s.numel() >= ADAMW8BIT_MIN_SIZE for s in shapes) else 0
        return tables + sum(8 * s.numel() if s.numel() < ADAMW8BIT_MIN_SIZE
                            else 2 * s.numel() + 2 * 4 * -(-s.numel() // ADAMW8BIT_BLOCK) for s in shapes)
    params = [nn.Parameter(torch.empty(shape, device="meta")) for shape in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = build_optimizer(name, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, implementation={})
    try:
        opt.step()
    except (NotImplementedError, RuntimeError):
        pass  # meta tensors have no values: Adafactor's step reads one (.item()) once its state is made
    if len(opt.state) != len(params):
        raise RuntimeError(f"optimizer {name} made state for {len(opt.state)} of {len(params)} meta parameters: "
                           "the planner cannot read its state shapes")
    seen = {_storage_key(v)[0]: v.untyped_storage().nbytes() for state in opt.state.values()
            for v in state.values() if isinstance(v, Tensor)}
    return sum(seen.values())


class FusedAttention(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to the flash kernel (it has meta shapes), so the trace keeps what
    fused attention keeps; a boolean mask becomes the additive mask that kernel takes."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
        return out


@contextmanager
def _recording(params: set[int], saved: dict[int, int], linears: dict[int, int], kept: dict[int, int]
               ) -> Iterator[None]:
    """Record into ``saved`` the bytes of each storage autograd keeps that is not a parameter, and into ``kept``
    the elements of each frozen linear weight (``linears``: storage -> elements) it keeps."""
    def pack(t: Tensor) -> Tensor:
        key, nbytes = _storage_key(t)
        if key in linears:
            kept.setdefault(key, linears[key])
        elif key not in params:
            saved.setdefault(key, nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FusedAttention():
        yield


def trace_activations(model: nn.Module, blocks: list[nn.Module], inputs: tuple, loss: Callable[[Tensor], Tensor]
                      ) -> Activations:
    """Run ``loss(model(*inputs))`` once (meta tensors) and return the bytes autograd keeps, per block (each
    block's forward records into its own set), for the blocks' inputs, and outside the blocks."""
    params = {_storage_key(p)[0] for p in model.parameters()}
    linears = {_storage_key(m.weight)[0]: m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and not m.weight.requires_grad}
    everything: dict[int, int] = {}
    kept_everywhere: dict[int, int] = {}
    per_block: list[dict[int, int]] = []
    kept_per_block: list[dict[int, int]] = []
    inputs_seen: dict[int, int] = {}
    handles = []
    open_blocks = ExitStack()  # the recording of the block running now (blocks do not nest)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            for t in _tensors(value):
                key, nbytes = _storage_key(t)
                inputs_seen.setdefault(key, nbytes)
        per_block.append({})
        kept_per_block.append({})
        open_blocks.enter_context(_recording(params, per_block[-1], linears, kept_per_block[-1]))

    def post(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        open_blocks.close()

    for block in blocks:
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with _recording(params, everything, linears, kept_everywhere):
            loss(model(*inputs))
    finally:
        open_blocks.close()
        for h in handles:
            h.remove()
    inside = {key: n for block in per_block for key, n in block.items()}
    outside = sum(n for key, n in everything.items() if key not in inside)
    kept_inside = {key for block in kept_per_block for key in block}
    return Activations(blocks=[sum(b.values()) for b in per_block], in_blocks=sum(inside.values()),
                       block_inputs=sum(inputs_seen.values()), outside=outside,
                       frozen_linears=tuple(sum(b.values()) for b in kept_per_block),
                       frozen_linears_outside=sum(n for key, n in kept_everywhere.items() if key not in kept_inside))


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif hasattr(value, "__dataclass_fields__"):  # a Conditioning or a RoPE table
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name))
