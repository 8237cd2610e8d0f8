"""Parameter counts and training-FLOP estimates of an MMDiT, for model-FLOPs utilisation (MFU) reporting.

The estimate is the usual 6 x parameters x tokens (forward 2, backward 4 FLOPs per weight and token; Kaplan et
al. 2020), applied to each weight with the tokens it actually sees: image-stream weights see image tokens,
text-stream weights text tokens, single-stream weights both, and the conditioning path (timestep, guidance and
pooled-text MLPs, the interval MLP of few-step models, every adaLN modulation, FLUX.2's shared one) runs once
per sample. Normalisation scales (QK-norm, the text input norm) multiply elementwise and are not counted. A text
stream whose output nothing reads (the last joint block's, when no single block follows and the block keeps its
whole text stream, as Qwen-Image's) runs its output projection and MLP forward only: 2 FLOPs per weight and
token, no backward. Attention adds 12 x B x queries x keys x width per block (and per MMDiT-X image-only
attention).
Recomputation by activation checkpointing is not counted (model FLOPs, as MFU is defined).

A frozen weight (``requires_grad`` False: the base of a LoRA run) costs 4 FLOPs per token instead of 6: its forward
and the gradient of its input, no gradient of its own. Adapters (peft's ``lora_A`` / ``lora_B`` of rank r on a
targeted linear of in x out features: r (in + out) weights) train, 6 FLOPs per adapter weight and token, counted
with the tokens their linear sees and reported apart (``StepFlops.adapter_weights``). The input gradients of every
layer are counted in both cases, as the independent count does with inputs that need gradients. DoRA's weight
norms, LoHa's and LoKr's products are not counted (LoRA's factors only).
Works on a meta-device model, so sizing a large preset allocates nothing.

Backbones without such a count (diffusers' U-Net, ``model.kind: unet``) are counted instead:
:func:`counted_training_flops_per_step` runs one forward under ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions and attention, as the estimate above) and takes the backward as twice the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flowmatch.models.lora import is_adapter
from flowmatch.models.mmdit import MMDiT

#: Forward + backward FLOPs per weight per token (2 forward, 4 backward).
TRAIN_FLOPS_PER_PARAM_TOKEN = 6
#: Training FLOPs of attention per (query, key, channel): QK^T and AV at 2 each forward, times 3 with backward.
TRAIN_FLOPS_PER_ATTENTION_ENTRY = 12
#: Training FLOPs per forward FLOP: the backward computes the gradients of both the inputs and the weights.
TRAIN_FLOPS_PER_FORWARD_FLOP = 3
#: Forward + backward FLOPs per frozen weight per token: forward 2, the input's gradient 2, no weight gradient.
FROZEN_FLOPS_PER_PARAM_TOKEN = 4
#: Forward FLOPs per weight per token.
FORWARD_FLOPS_PER_PARAM_TOKEN = 2


@dataclass
class ParamCount:
    """Parameters of an MMDiT by what they are applied to."""

    image_token: int
    """Applied to every image token (patch embedding, image streams, final projection)."""
    text_token: int
    """Applied to every text token (context projection, text streams)."""
    joint_token: int
    """Applied to every token of the joint sequence (single-stream blocks)."""
    per_sample: int
    """Applied once per sample (timestep, guidance, interval and pooled MLPs, adaLN modulations)."""
    elementwise: int = 0
    """Normalisation scales (QK-norm, the text input norm): elementwise products, no matmul FLOPs."""

    @property
    def total(self) -> int:
        """All parameters."""
        return self.image_token + self.text_token + self.joint_token + self.per_sample + self.elementwise


@dataclass
class StepFlops:
    """Training FLOPs (forward + backward) of one optimizer step, by source."""

    token_weights: float
    """Per-token weight matmuls."""
    sample_weights: float
    """Conditioning path, once per sample."""
    attention: float
    """Attention scores and weighted sums."""
    adapter_weights: float = 0.0
    """LoRA adapters' matmuls (their tokens and the per-sample ones), forward and backward."""

    @property
    def total(self) -> float:
        """All FLOPs of the step."""
        return self.token_weights + self.sample_weights + self.attention + self.adapter_weights


def _group(name: str) -> str:
    if name.endswith("norm.weight"):
        return "elementwise"
    if ".mod." in name or name.startswith((
            "time_embed.", "guidance_embed.", "interval_embed.", "pooled_embed.", "approximator.", "shared_mod.")):
        return "per_sample"
    if name.startswith("single_blocks."):
        return "joint_token"
    if name.startswith("context_embed.") or ".txt." in name:
        return "text_token"
    return "image_token"


def count_parameters(model: MMDiT, keep: Callable[[str, nn.Parameter], bool] = lambda name, param: True
                     ) -> ParamCount:
    """Count `model`'s parameters by group (meta-device models work); only those ``keep(name, param)`` accepts."""
    counts = dict(image_token=0, text_token=0, joint_token=0, per_sample=0, elementwise=0)
    for name, param in model.named_parameters():
        if keep(name, param):
            counts[_group(name)] += param.numel()
    return ParamCount(**counts)


def _trained_base(name: str, param: nn.Parameter) -> bool:
    return param.requires_grad and not is_adapter(name)


def _frozen_base(name: str, param: nn.Parameter) -> bool:
    return not param.requires_grad and not is_adapter(name)


def _adapter(name: str, param: nn.Parameter) -> bool:
    return is_adapter(name)


def per_weight(param: nn.Parameter) -> int:
    """Training FLOPs per token of one weight: trained (adapters included) or frozen."""
    return TRAIN_FLOPS_PER_PARAM_TOKEN if param.requires_grad else FROZEN_FLOPS_PER_PARAM_TOKEN


def training_flops_per_step(model: MMDiT, *, batch_size: int, latent_size: tuple[int, int], text_len: int) -> StepFlops:
    """Estimated training FLOPs of one step on `batch_size` inputs of `latent_size` (H, W) and `text_len` tokens
    (the global batch if `batch_size` is global)."""
    cfg = model.cfg
    height, width = latent_size
    n_img = (height // cfg.patch_size) * (width // cfg.patch_size)
    seq = n_img + text_len
    trained, frozen, adapters = (count_parameters(model, keep) for keep in (_trained_base, _frozen_base, _adapter))

    def token_count(p: ParamCount) -> int:
        return p.image_token * n_img + p.text_token * text_len + p.joint_token * seq

    token_flops = batch_size * (TRAIN_FLOPS_PER_PARAM_TOKEN * token_count(trained)
                                + FROZEN_FLOPS_PER_PARAM_TOKEN * token_count(frozen))
    adapter_flops = TRAIN_FLOPS_PER_PARAM_TOKEN * batch_size * (token_count(adapters) + adapters.per_sample)
    last = model.joint_blocks[-1] if len(model.joint_blocks) else None
    if last is not None and not len(model.single_blocks) and not last.context_pre_only:
        # The final layer reads image tokens only: the last text stream's output projection and MLP (and their
        # adapters) get no backward; only their forward counts.
        for module in (last.txt.proj, last.txt.mlp):
            for name, w in module.named_parameters():
                unread = (per_weight(w) - FORWARD_FLOPS_PER_PARAM_TOKEN) * batch_size * w.numel() * text_len
                if is_adapter(name):
                    adapter_flops -= unread
                else:
                    token_flops -= unread
    # the modulation approximator (Chroma) runs once per modulation row of each sample, not once per sample
    approximator = model.approximator
    extra_rows = 0 if approximator is None else (approximator.rows - 1) * sum(
        per_weight(param) * param.numel() for param in approximator.parameters())
    sample_flops = batch_size * (TRAIN_FLOPS_PER_PARAM_TOKEN * trained.per_sample
                                 + FROZEN_FLOPS_PER_PARAM_TOKEN * frozen.per_sample + extra_rows)
    entries = 0
    for block in model.joint_blocks:
        queries = n_img if block.context_pre_only else seq
        entries += queries * seq
        if block.img.attn2 is not None:  # MMDiT-X: image tokens attend to image tokens a second time
            entries += n_img * n_img
    entries += len(model.single_blocks) * seq * seq
    attn_flops = TRAIN_FLOPS_PER_ATTENTION_ENTRY * batch_size * entries * cfg.width
    return StepFlops(token_weights=float(token_flops), sample_weights=float(sample_flops), attention=float(attn_flops),
                     adapter_weights=float(adapter_flops))


def counted_training_flops_per_step(model: nn.Module, inputs: tuple[Any, ...], *, batch_size: int) -> float:
    """Training FLOPs of one step of ``batch_size`` samples: the FLOPs counted in one forward ``model(*inputs)`` of
    one-sample ``inputs`` (e.g. ``(x (1, C, H, W), t (1,), cond)``), times ``batch_size`` and
    TRAIN_FLOPS_PER_FORWARD_FLOP. Meta-device models and inputs work (nothing is computed)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return float(TRAIN_FLOPS_PER_FORWARD_FLOP * batch_size * counter.get_total_flops())


def mfu(flops_per_step: float, step_time_s: float, peak_flops: float) -> float:
    """Model-FLOPs utilisation: achieved FLOP/s over the hardware peak (both for the same set of devices)."""
    if step_time_s <= 0 or peak_flops <= 0:
        raise ValueError(f"step_time_s and peak_flops must be positive, got {step_time_s} and {peak_flops}")
    return flops_per_step / step_time_s / peak_flops
