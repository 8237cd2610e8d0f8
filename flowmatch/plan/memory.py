"""Peak memory of one training rank: the bytes of each kind of state under a set of :class:`Settings`, from the
model's own counts (:mod:`flowmatch.plan.trace`, :mod:`flowmatch.plan.live`).

Every term is a product of counted elements and bytes per element; the ZeRO stage divides what it shards by the
number of processes (stage 1: optimizer state and fp32 masters; 2: also gradients; 3: also weights and the EMA,
which follows the weights' partition). Optimizer state is the recipe's optimizer's, read from its state on the
model's trained shapes (:func:`flowmatch.plan.trace.optimizer_state_bytes`); a few-step objective adds what it
holds while it makes its own targets (a JVP's tangents, no-grad forwards) where that exceeds the trained step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from flowmatch.dtypes import DTYPES
from flowmatch.plan.devices import size
from flowmatch.plan.frozen import AUTOENCODER, FrozenPart
from flowmatch.plan.trace import Activations, ParamCount

#: Bytes per weight of a quantised frozen base: int8 and fp8 one byte; nf4 half a byte plus one fp32 scale per
#: block of 64 (bitsandbytes' 4-bit layout without double quantisation).
QUANT_BYTES: dict[str, float] = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64}
#: Optimizer state bytes per trained parameter, for a cost counted without the model's shapes: AdamW's two fp32
#: moments; 8-bit AdamW's two uint8 moments plus an fp32 scale per block of 256 of each.
OPTIMIZER_BYTES: dict[str, float] = {"adamw": 8.0, "adamw8bit": 2.0 + 2 * 4 / 256}
#: DeepSpeed's default bucket sizes in elements (reduce_bucket_size, allgather_bucket_size: 5e8; ZeRO-3's
#: stage3_prefetch_bucket_size: 5e7), which flowmatch's DeepSpeed config leaves as they are.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
#: What a CUDA process holds beyond tensors: the context and cuBLAS/cuDNN workspaces (a planner's allowance, not
#: measured here), and the caching allocator's fragmentation as a share of the tensors' peak.
CUDA_CONTEXT = 768 * 2**20
FRAGMENTATION = 0.10
#: The host link a block swap streams over: PCIe 4.0 x16, about 25 GB/s in practice of its 32 GB/s (an estimate
#: for the time a swap adds, not measured here).
HOST_LINK_BYTES_PER_S = 25e9


def dtype_bytes(name: str) -> int:
    """Bytes per element of a precision name (fp32, bf16, fp16)."""
    return DTYPES[name].itemsize


@dataclass(frozen=True)
class Settings:
    """The recipe settings the peak depends on; :mod:`flowmatch.plan.levers` changes them to fit."""

    micro_batch: int
    checkpointing: bool
    zero_stage: int
    precision: str
    """Working weights and activations (distributed.precision)."""
    world: int
    offload_optimizer: bool = False
    offload_params: bool = False
    cached: bool = False
    """Training reads cached features: the text encoders and the autoencoder are freed before the first step."""
    base_quant: Optional[str] = None
    """model.quantize: the frozen base of a LoRA run held in int8 | fp8 | nf4 (its linear layers' weights)."""
    encoder_quant: Optional[str] = None
    """Every text encoder quantised (a what-if; an encoder's own text_encoders.encoders.*.quantize comes first)."""
    block_swap: int = 0
    """train.block_swap: the last N blocks' frozen weights in host memory, streamed in per use (LoRA only)."""
    optimizer: str = "adamw"
    """optim.name: adamw | adamw8bit | adafactor."""
    accumulating: bool = False
    """Gradient accumulation over several micro batches: the earlier ones' gradients stay while the next forward's
    activations build up (without it the backward frees activations as the gradients fill)."""
    ema_copies: int = 0
    """fp32 copies the EMA keeps: the EMA itself and each post-hoc profile."""

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Line:
    """One term of the peak."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class ModelCost:
    """What a recipe's model and frozen parts cost, counted once; activations at micro batches 1 and 2 give the
    per-sample slope (the step's activations are affine in the micro batch)."""

    params: ParamCount
    quantisable: int
    """Frozen elements in the linear layers' weights (what a quantised base stores in fewer bits)."""
    act1: Activations
    act2: Activations
    encoders: list[FrozenPart]
    """The frozen networks: text encoders, then the autoencoder."""

    optimizer_state: dict[str, int] = field(default_factory=dict)
    """Bytes of each optimizer's state (by optim.name) for the trained parameters; a name not here is priced per
    parameter (:data:`OPTIMIZER_BYTES`)."""
    targets: tuple[int, int] = (0, 0)
    """Bytes alive at once while the objective makes its own targets for 1 and 2 rows (before the trained
    forward): a JVP's tangents and its fp32 weights, or the no-grad forwards of shortcut targets."""
    interval_rows: Callable[[int], int] = field(default=lambda micro: 0)
    """How many rows of a micro batch get the objective's own targets."""
    targets_note: str = ""
    conditioning: tuple[int, int] = (0, 0)
    """Bytes of a micro batch's conditioning as the encoders or the cache deliver it, at micro batches 1 and 2,
    where caption dropout makes the copy the model takes (and keeps) a second one; (0, 0) without dropout."""
    block_frozen: tuple[int, ...] = ()
    """Frozen elements of each transformer block, in execution order (what a block swap moves)."""
    block_quantisable: tuple[int, ...] = ()
    """Of those, the elements in linear layers' weights (held quantised under model.quantize)."""

    def optimizer_bytes(self, name: str) -> int:
        """The state optimizer ``name`` keeps for the trained parameters."""
        if name in self.optimizer_state:
            return self.optimizer_state[name]
        if name not in OPTIMIZER_BYTES:
            raise ValueError(f"optimizer {name} is priced from the model's trained shapes, which this cost lacks")
        return int(self.params.trainable * OPTIMIZER_BYTES[name])

    def target_bytes(self, micro: int) -> int:
        """Bytes alive at once while the objective makes the targets of a micro batch's interval rows."""
        n = self.interval_rows(micro)
        return 0 if n == 0 else int(self.targets[0] + (self.targets[1] - self.targets[0]) * (n - 1))

    def activations(self, micro: int, checkpointing: bool) -> int:
        one, two = ((a.checkpointed if checkpointing else a.plain) for a in (self.act1, self.act2))
        return int(one + (two - one) * (micro - 1))


def _frozen_bytes(frozen: int, quantisable: int, s: Settings) -> float:
    """Bytes of ``frozen`` elements, ``quantisable`` of them in linear weights, under model.quantize."""
    if not s.base_quant:
        return frozen * dtype_bytes(s.precision)
    return quantisable * QUANT_BYTES[s.base_quant] + (frozen - quantisable) * dtype_bytes(s.precision)


@dataclass(frozen=True)
class Swap:
    """What ``train.block_swap`` moves (flowmatch.models.offload): the last blocks' frozen weights wait in pinned
    host memory and are copied in before each use; the adapters stay on the device."""

    host: int
    """Bytes of the swapped blocks' frozen weights in host memory."""
    in_flight: int
    """Device bytes at the peak: the block running and the next one prefetched (the two largest swapped blocks)
    with activation checkpointing; every swapped block without it (autograd keeps each device copy until its
    backward)."""
    crossings: int
    """Copies of the swapped weights per micro batch: the forward, and checkpointing's recomputation."""

    @property
    def seconds(self) -> float:
        """Host-link time per micro batch at :data:`HOST_LINK_BYTES_PER_S` (an estimate; overlapped with
        compute where the link keeps up)."""
        return self.host * self.crossings / HOST_LINK_BYTES_PER_S


def dequantised(cost: ModelCost, s: Settings) -> int:
    """Bytes of the dequantised weights autograd keeps under model.quantize: flowmatch.quantize.QuantizedLinear
    makes each weight in the working precision per forward, and the matmul keeps it for its input's gradient (the
    trace records which frozen linears' weights are kept: those whose input needs a gradient)."""
    a = cost.act1
    blocks = max(a.frozen_linears, default=0) if s.checkpointing else sum(a.frozen_linears)
    return int((a.frozen_linears_outside + blocks) * dtype_bytes(s.precision))


def block_swap(cost: ModelCost, s: Settings) -> Swap:
    """What ``s.block_swap`` keeps on the host and on the device."""
    n = s.block_swap
    if not n:
        return Swap(0, 0, 0)
    each = sorted((int(_frozen_bytes(f, q, s)) for f, q in zip(cost.block_frozen[-n:], cost.block_quantisable[-n:])),
                  reverse=True)
    host = sum(each)
    return Swap(host, sum(each[:2]) if s.checkpointing else host, 2 if s.checkpointing else 1)


def breakdown(cost: ModelCost, s: Settings, *, cuda: bool) -> list[Line]:
    """The peak of one rank under ``s``, term by term (bytes on the device; offloaded state counts zero)."""
    n, w = s.world, dtype_bytes(s.precision)
    p = cost.params
    shard_w = n if s.zero_stage == 3 else 1
    shard_o = n if s.zero_stage >= 1 else 1
    shard_g = n if s.zero_stage >= 2 else 1
    lines: list[Line] = []
    base_note = f"{p.trainable / 1e6:.1f}M trained in {s.precision}"
    frozen_bytes = _frozen_bytes(p.frozen, cost.quantisable, s)
    if p.frozen:
        base_note += f", {p.frozen / 1e6:.1f}M frozen " + (f"({s.base_quant} linears)" if s.base_quant
                                                           else f"in {s.precision}")
    swap = block_swap(cost, s)
    if swap.host:
        frozen_bytes -= swap.host
        base_note += f", the last {s.block_swap} blocks' frozen {size(swap.host)} in host memory (train.block_swap)"
    weights = (p.trainable * w + frozen_bytes) / shard_w
    if s.offload_params:  # ZeRO-3 keeps what it has not gathered on the host
        weights, base_note = 0, base_note + ", offloaded to the CPU"
    lines.append(Line("weights", int(weights), base_note))
    if p.frozen and s.base_quant:
        lines.append(Line("dequantised weights", dequantised(cost, s),
                          "what autograd keeps of the quantised linears' working-precision weights (each forward "
                          "dequantises them): " + ("the layers outside the blocks and one block recomputed"
                                                   if s.checkpointing else "every layer, until its backward")))
    if swap.host:
        lines.append(Line("swapped blocks on device", swap.in_flight,
                          "the block running and the next, prefetched" if s.checkpointing else
                          "all of them: without activation checkpointing autograd keeps each device copy until "
                          "its backward (no saving)"))
    grads = int(p.trainable * w / shard_g)
    lines.append(Line("gradients", grads, f"{s.precision}" + (f", sharded over {n}" if shard_g > 1 else "")))
    on_host = s.offload_optimizer
    if s.precision != "fp32":
        lines.append(Line("master weights", 0 if on_host else int(p.trainable * 4 / shard_o),
                          "fp32" + (", offloaded" if on_host else "")))
        lines.append(Line("master gradients", 0 if on_host else int(p.trainable * 4 / shard_o),
                          "fp32, what the optimizer steps on" + (", offloaded" if on_host else "")))
    opt = cost.optimizer_bytes(s.optimizer)
    lines.append(Line("optimizer state", 0 if on_host else int(opt / shard_o),
                      f"{s.optimizer} {opt / max(p.trainable, 1):.3g} B/param" + (", offloaded" if on_host else "")))
    lines.append(Line("EMA", int(p.trainable * 4 * s.ema_copies / shard_w),
                      f"{s.ema_copies} fp32 cop{'y' if s.ema_copies == 1 else 'ies'}"))
    act = cost.activations(s.micro_batch, s.checkpointing)
    lines.append(Line("activations", act, f"micro batch {s.micro_batch}, "
                      + ("checkpointed" if s.checkpointing else "no checkpointing")))
    if not s.accumulating:  # the backward frees a block's activations as it makes that block's gradients
        lines.append(Line("backward overlap", -min(act, grads), "activations freed as the gradients fill "
                          "(no gradient accumulation)"))
    targets = cost.target_bytes(s.micro_batch)
    if targets:  # made before the trained forward: they count only where they exceed what it and its backward
        # add (activations and, without accumulation, the gradients that replace them; with accumulation the
        # earlier micro batches' gradients are there in both phases)
        forward = max(act, grads) if not s.accumulating else act
        lines.append(Line("objective targets", max(0, targets - forward),
                          f"{cost.targets_note}: {targets / 2**20:.1f} MiB alive at once before the trained "
                          "forward; the excess over the trained forward and backward"))
    if any(cost.conditioning):  # the model saves the dropped copy (in the activations); the batch's stays too
        one, two = cost.conditioning
        lines.append(Line("batch conditioning", int(one + (two - one) * (s.micro_batch - 1)),
                          "the batch's text features beside their caption-dropped copy"))
    enc, notes = 0, []
    for part in cost.encoders:
        dtype = ("bf16" if cuda else "fp32") if part.dtype == "auto" else part.dtype  # flowmatch.dtypes' auto
        text = part.name != AUTOENCODER
        if text and s.cached:  # freed once the empty caption and the sampling prompts are encoded
            notes.append(f"{part.name} freed")
            continue
        quant = (part.quant or s.encoder_quant) if text else None
        enc += int(part.params * (QUANT_BYTES[quant] if quant else dtype_bytes(dtype)))
        notes.append(f"{part.name} {part.params / 1e6:.0f}M {quant or dtype}")
    lines.append(Line("frozen encoders", enc, ", ".join(notes) or "none"))
    comm = 0
    if n > 1:
        comm = min(p.trainable, REDUCE_BUCKET) * w * (2 if s.zero_stage in (1, 2) else 1)
    if s.offload_params:  # the block in use and the next, fetched whole from the host
        comm += 2 * p.largest_block * w
    elif s.zero_stage == 3 and n > 1:  # a block gathered whole, and the next prefetched
        comm += 2 * min(p.largest_block, PREFETCH_BUCKET) * w
    lines.append(Line("communication buffers", int(comm), f"ZeRO-{s.zero_stage} over {n} processes"))
    if cuda:
        tensors = sum(line.bytes for line in lines)
        lines.append(Line("allocator headroom", int(CUDA_CONTEXT + FRAGMENTATION * tensors),
                          f"CUDA context {CUDA_CONTEXT / 2**30:.2f} GiB + {FRAGMENTATION:.0%} fragmentation"))
    return lines


def peak(cost: ModelCost, s: Settings, *, cuda: bool) -> int:
    """The peak bytes of one rank under ``s``."""
    return sum(line.bytes for line in breakdown(cost, s, cuda=cuda))
