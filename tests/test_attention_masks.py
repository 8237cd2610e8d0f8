"""No attention mask reaches ``scaled_dot_product_attention`` when no text token is padding, for every family.

A boolean or float mask rules out SDPA's flash kernels on CUDA. ``Conditioning.all_valid`` carries "no padding"
from where the mask is made (fixed-length encoders, cached rows of one length) through caption dropout, guidance's
[cond; null] batch and every other Conditioning operation, decided on the host; the models then pass no mask. The
tests intercept every SDPA call of a training step (caption dropout included) and of guided sampling of each
registered family's tiny preset, so a family registered in ``flowmatch.families.FAMILIES`` is covered here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flowmatch.conditioning import Conditioning
from flowmatch.encoders.combine import SINGLE, TextPart, combine_outputs
from flowmatch.families import FAMILIES
from flowmatch.families.config import ModelConfig
from flowmatch.families.presets import preset_values
from flowmatch.flow import FlowConfig, TimeSchedule, drop_captions
from flowmatch.flow.guided import with_guidance
from flowmatch.models import key_padding, layers
from flowmatch.models.parallelize import set_attention
from flowmatch.sampling.generate import sample_latents
from flowmatch.training.config import TrainConfig
from flowmatch.training.loop import micro_loss

#: Sizes the encoders would fill in.
SIZES = dict(in_channels=4, context_dim=16, pooled_dim=12)


@contextlib.contextmanager
def attention_masks():
    """Record the ``attn_mask`` of every ``F.scaled_dot_product_attention`` call (flowmatch's and diffusers') and
    the ``block_mask`` (a BlockMask) of every flex_attention call of flowmatch's attention."""
    seen: list = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)

    def recording_flex(*args, **kwargs):
        seen.append(kwargs["block_mask"])
        return flex_attention(*args, **kwargs)

    F.scaled_dot_product_attention, layers.flex_attention = recording, recording_flex
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention, layers.flex_attention = sdpa, flex_attention


def _model(name: str):
    values = preset_values(FAMILIES[name].tiny)  # the sizes it leaves open (a model without a pooled vector keeps none)
    cfg = ModelConfig(**{**values, **{k: v for k, v in SIZES.items() if values.get(k) is None}})
    torch.manual_seed(0)
    return cfg, FAMILIES[name].build(cfg)


def _cond(cfg, lengths, seed=0) -> Conditioning:
    """Text features as the loader stacks cached rows (``from_rows``), with FLUX-dev's guidance value if embedded."""
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning.from_rows([torch.randn(n, cfg.context_dim, generator=g) for n in lengths],
                                  [torch.randn(cfg.pooled_dim, generator=g) for _ in lengths])
    return with_guidance(cond, 3.5) if cfg.guidance_embed else cond


def _train_step_and_sample(name: str, lengths: list[int], null_length: int, kernel: str = "auto") -> list:
    """The masks SDPA received in one training step (caption dropout 0.5) and two guided sampling steps, the
    model's attention set to ``kernel``."""
    cfg, model = _model(name)
    if hasattr(model, "attention_kernel"):
        set_attention(model, kernel)
    cond, null = _cond(cfg, lengths), _cond(cfg, [null_length], seed=1)
    flow = FlowConfig(caption_dropout=0.5)
    x0 = torch.randn(len(lengths), cfg.in_channels, 8, 8)
    with attention_masks() as seen:
        out = micro_loss(model, x0, cond, null, schedule=TimeSchedule(flow), flow=flow, patch_size=cfg.patch_size,
                         generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        trained = len(seen)
        sample_latents(model.eval(), cond, null, torch.randn_like(x0), steps=2, solver="euler",
                       guidance_scale=2.0, shift=1.0)
    assert 0 < trained < len(seen), "the step and the sampler both ran attention"
    return seen


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unpadded_text_reaches_attention_without_a_mask(name):
    """Bugs caught: the model building its mask whatever ``all_valid`` says; caption dropout, ``where`` or ``cat``
    (guidance's [cond; null]) dropping the fact; ``from_rows`` not deciding it from equal row lengths."""
    seen = _train_step_and_sample(name, [5, 5], null_length=5)
    assert all(mask is None for mask in seen), f"{sum(m is not None for m in seen)} of {len(seen)} calls masked"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_padded_text_is_masked(name):
    """Bug caught: ``all_valid`` claimed for rows of different lengths, or for a shorter null padded into the batch
    (padding would then be attended to)."""
    for lengths, null_length in (([3, 5], 5), ([5, 5], 2)):
        seen = _train_step_and_sample(name, lengths, null_length)
        assert any(mask is not None for mask in seen)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_dropping_the_mask_of_unpadded_text_changes_nothing(name):
    cfg, model = _model(name)
    cond = _cond(cfg, [4, 4])
    assert cond.all_valid and bool(cond.mask.all())
    masked = Conditioning(cond.hidden, cond.mask, cond.pooled, dict(cond.extra), all_valid=False)
    x, t = torch.randn(2, cfg.in_channels, 8, 8), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), model(x, t, masked))


def _rows(*lengths) -> Conditioning:
    return Conditioning.from_rows([torch.ones(n, 3) for n in lengths], [torch.ones(2) for _ in lengths])


def test_all_valid_is_kept_exactly_while_no_padding_appears():
    """Each operation keeps the fact when it adds no padding and drops it when it does; it never claims a mask
    with a False entry. Bugs caught: ``pad_to`` keeping it, ``cat``/``where`` ignoring one side or the lengths,
    ``_map`` (``to``, ``expand``, ``rows``) or ``with_extra`` losing it."""
    equal, ragged = _rows(4, 4), _rows(2, 4)
    assert equal.all_valid and not ragged.all_valid and not _rows(0, 0).all_valid
    drop = torch.tensor([True, False])
    cases = {
        "to": (equal.to("cpu", torch.float64), True),
        "expand": (_rows(4).expand(3), True),
        "rows": (equal.rows(1), True),
        "with_extra": (equal.with_extra({"guidance": torch.ones(2)}), True),
        "pad_to same": (equal.pad_to(4), True),
        "pad_to longer": (equal.pad_to(6), False),
        "cat equal": (Conditioning.cat([equal, _rows(4)]), True),
        "cat longer": (Conditioning.cat([equal, _rows(6)]), False),
        "cat ragged": (Conditioning.cat([ragged, _rows(4)]), False),
        "where equal": (equal.where(drop, _rows(4)), True),
        "where shorter null": (equal.where(drop, _rows(1)), False),
        "where ragged": (ragged.where(drop, _rows(4)), False),
    }
    for what, (cond, expected) in cases.items():
        assert cond.all_valid is expected, what
        if cond.all_valid:
            assert bool(cond.mask.all()), what


def test_combined_encoders_are_unpadded_only_when_each_is():
    """SD3's layout concatenates CLIP's and T5's tokens; FLUX's takes T5's: the fact follows the token sources."""
    fixed, ragged = _rows(4, 4), _rows(2, 4)
    assert combine_outputs(SINGLE, {"t": fixed}, {"t": "auto"}, guidance=3.5).all_valid
    for family in ("sd3", "flux"):
        layout = FAMILIES[family].text
        both = {"clip_l": fixed, "t5": fixed}
        if not layout.one_clip:
            both["clip_g"] = fixed
        kinds = {n: "t5" if n == "t5" else "clip" for n in both}
        assert combine_outputs(layout, both, kinds).all_valid, family
        assert not combine_outputs(layout, {**both, "t5": ragged}, kinds).all_valid, family


def test_dropping_one_encoders_share_keeps_the_fact_of_both_sides():
    """Per-encoder caption dropout (several encoders) replaces a token range by the null's: its padding counts."""
    part = [(TextPart("t5", slice(2, None), slice(None), slice(None)), 1.0)]
    equal = _rows(4, 4)
    padded_null = _rows(2).pad_to(4)
    assert drop_captions(equal, _rows(4), 0.0, parts=part).all_valid
    assert not drop_captions(equal, padded_null, 0.0, parts=part).all_valid


# FlexAttention for padded text (train.attention: flex, or auto on CUDA with compiled blocks): the same attention as
# the masked SDPA path, with no mask reaching SDPA.
MMDIT_FAMILIES = [name for name, f in FAMILIES.items() if f.capabilities.block_transforms]


def _perturbed(name: str):
    """The family's tiny model with its zero-initialised parts perturbed (every weight gets a gradient)."""
    cfg, model = _model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model


@pytest.mark.parametrize("name", MMDIT_FAMILIES)
def test_flex_attention_equals_masked_sdpa(name, cpu_flex_backward, monkeypatch):
    """Padded rows of three lengths: flex's outputs and the gradients of every weight and of the input equal SDPA's,
    and the block mask is built once per forward (twice with a pre-only block, SD3's last: its queries are the
    image tokens alone; twice with context refiners, whose sequence is the text alone). Bugs caught: the block
    mask reading the wrong row (``keep[0, kv]``, ``keep[h, kv]``), attending to padding (the image's ones extended
    over the text), the mask built in every block."""
    cfg, model = _perturbed(name)
    cond = _cond(cfg, [3, 6, 1])
    x, t = torch.randn(3, cfg.in_channels, 8, 8), torch.rand(3)
    built = []
    create = key_padding.create_block_mask
    monkeypatch.setattr(key_padding, "create_block_mask", lambda *a, **k: built.append(a[3]) or create(*a, **k))
    results = []
    for kernel in ("sdpa", "flex"):
        set_attention(model, kernel)
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = model(xg, t, cond)
        out.square().mean().backward()
        results.append((out.detach(), xg.grad, {n: p.grad for n, p in model.named_parameters()}))
    pre_only = any(block.context_pre_only for block in getattr(model, "joint_blocks", ()))
    # the single-stream networks (Z-Image, Lumina-2) also mask their context refiners' text-only sequence
    refined = len(getattr(model, "context_refiner", ())) > 0
    assert len(built) == 1 + pre_only + refined, built
    (sdpa_out, sdpa_dx, sdpa_grads), (flex_out, flex_dx, flex_grads) = results
    torch.testing.assert_close(flex_out, sdpa_out)
    torch.testing.assert_close(flex_dx, sdpa_dx)
    for n, grad in sdpa_grads.items():
        torch.testing.assert_close(flex_grads[n], grad, msg=n)


@pytest.mark.parametrize("name", MMDIT_FAMILIES)
def test_padded_text_with_flex_passes_no_mask_to_sdpa(name, cpu_flex_backward):
    """A training step and guided sampling of padded text with ``flex`` selected: every SDPA call is unmasked
    (the flash kernels stay eligible) and the text masks go to flex_attention as block masks. Bug caught: a path
    (training, guidance's [cond; null] batch) still building the SDPA mask with flex selected."""
    seen = _train_step_and_sample(name, [3, 5], null_length=5, kernel="flex")
    sdpa = [mask for mask in seen if not isinstance(mask, BlockMask)]
    assert all(mask is None for mask in sdpa), f"{sum(m is not None for m in sdpa)} of {len(sdpa)} SDPA calls masked"
    assert len(sdpa) < len(seen)


def test_the_block_mask_skips_padding_blocks_and_keeps_each_rows_keys():
    """Sequences longer than flex's 128-token blocks: a key block wholly padding in one row, a partial one in
    another, none in a third; flex with the block mask equals SDPA with the boolean mask row by row. Bugs caught: a
    fully padded block attended, a partial block treated as full, rows swapped."""
    g = torch.Generator().manual_seed(0)
    b, heads, length, hd = 3, 2, 300, 8
    keep = torch.zeros(b, length, dtype=torch.bool)
    for row, valid in enumerate((100, 290, 300)):
        keep[row, :valid] = True
    q, k, v = (torch.randn(b, length, heads, hd, generator=g) for _ in range(3))
    with torch.no_grad():
        flexed = layers.attention(q, k, v, key_padding.key_padding_mask(keep, length, flex=True))
        masked = layers.attention(q, k, v, key_padding.key_padding_mask(keep, length, flex=False))
    torch.testing.assert_close(flexed, masked)


def test_the_attention_setting_names_the_kernels():
    """A misspelt train.attention names the allowed kernels and the nearest one; auto picks flex only on CUDA with
    compiled blocks (eager flex materialises the scores; CPU flex has no backward)."""
    assert TrainConfig().attention == "auto"
    with pytest.raises(ValueError, match=r"attention = 'flx' is not one of auto, sdpa, flex \(did you mean 'flex'"):
        TrainConfig(attention="flx")
    picks = {(kernel, device, compiled): key_padding.uses_flex(kernel, device_type=device, compiled=compiled)
             for kernel in key_padding.ATTENTION_KERNELS for device in ("cpu", "cuda") for compiled in (False, True)}
    assert {k for k, flex in picks.items() if flex} == {("auto", "cuda", True), *(("flex", d, c) for d in (
        "cpu", "cuda") for c in (False, True))}
