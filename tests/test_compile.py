"""Whole-graph compilation of every block type of every family, and bounded recompiles across aspect buckets.

A graph break splits a block into several graphs with Python between them (host work, lost fusion); a recompile
costs minutes on a GPU. Every block type of every family whose blocks are compiled (``capabilities.
block_transforms``), in its tiny preset, must trace to one graph with ``fullgraph=True``, with and
without a text mask, plain and with LoRA and activation checkpointing, forward and backward; and a run over
aspect buckets recompiles each block type at most once after its first compile (the sequence length becomes
dynamic). Tracing runs eagerly (``aot_eager``-style backends): inductor would spend minutes on C++ for tiny blocks.
A family registered in ``flowmatch.families.FAMILIES`` is covered here.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from flowmatch.conditioning import Conditioning
from flowmatch.families import FAMILIES
from flowmatch.families.config import ModelConfig
from flowmatch.families.lora import apply_lora
from flowmatch.families.presets import PRESET_FAMILY, preset_values
from flowmatch.models.lora import LoraConfig
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile, set_attention

SIZES = dict(in_channels=4, context_dim=16, pooled_dim=12)
COMPILED = [name for name, f in FAMILIES.items() if f.capabilities.block_transforms]


def _config(preset: str) -> ModelConfig:
    """The preset with the encoder sizes it leaves open filled from SIZES (a model without a pooled vector, as
    Qwen-Image's, keeps none)."""
    values = preset_values(preset)
    return ModelConfig(**{**values, **{k: v for k, v in SIZES.items() if values.get(k) is None}})


def _build(preset: str, *, lora: bool = False, checkpointing: bool = False):
    cfg = _config(preset)
    torch.manual_seed(0)
    model = PRESET_FAMILY[preset].build(cfg)
    with torch.no_grad():  # zero-initialised parts perturbed, so every weight gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if lora:
        torch.manual_seed(1)
        apply_lora(model, LoraConfig(rank=2, alpha=2))
    if checkpointing:
        apply_activation_checkpointing(model)
    return cfg, model


def _cond(cfg, batch: int, length: int, *, padded: bool = False, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    rows = [length - (i if padded else 0) for i in range(batch)]
    cond = Conditioning.from_rows([torch.randn(n, cfg.context_dim, generator=g) for n in rows],
                                  [torch.randn(cfg.pooled_dim, generator=g) for _ in rows])
    return cond.with_extra({"guidance": torch.full((batch,), 3.5)}) if cfg.guidance_embed else cond


def _block_inputs(cfg, model, cond: Conditioning) -> list[tuple]:
    """(block index, args) of each block in one forward."""
    calls: list[tuple] = []
    hooks = [block.register_forward_pre_hook(lambda m, args, i=i: calls.append((i, args)))
             for i, block in enumerate(model.blocks())]
    model(torch.randn(len(cond), cfg.in_channels, 8, 8), torch.rand(len(cond)), cond)
    for hook in hooks:
        hook.remove()
    return calls


def _block_types(preset: str) -> dict[tuple, int]:
    """One block index per distinct block type (the structure of its modules) of a preset."""
    _, model = _build(preset)
    return _types_of(model)


def _released_block_classes(preset: str) -> set[str]:
    """The block classes of the released preset a tiny one mirrors (``tiny-NAME`` -> ``NAME``), built on the meta
    device (nothing allocated)."""
    with torch.device("meta"):
        return {key[0] for key in _types_of(PRESET_FAMILY[preset].build(_config(preset.removeprefix("tiny-"))))}


def _key(block) -> tuple:
    return type(block).__name__, tuple(name for name, _ in block.named_modules())


def _types_of(model) -> dict[tuple, int]:
    types: dict[tuple, int] = {}
    for i, block in enumerate(model.blocks()):
        types.setdefault(_key(block), i)
    return types


def _fresh(args: tuple) -> tuple:
    return tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _backward(out) -> None:
    sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,)) if o is not None).backward()


@pytest.mark.slow  # traces each block type of the family's tiny preset, forward and backward: ~4 s of CPU each
@pytest.mark.parametrize("name", COMPILED)
def test_every_block_type_compiles_to_one_graph_forward_and_backward(name):
    """Each block type of the family's tiny preset: ``torch._dynamo.explain`` finds one graph and no break (plain
    weights, no mask: the unpadded path); with LoRA, activation checkpointing and a padded mask, ``fullgraph=True``
    compiles forward and backward (it raises on any break) and gives eager's gradients. Bugs caught: a
    ``.item()``, ``bool(tensor)`` branch, data-dependent shape or unsupported call inside a block, and compiled
    gradients that differ from eager ones."""
    preset = FAMILIES[name].tiny
    types = _block_types(preset)
    # The tiny preset holds every block class of the release it mirrors (Qwen-Image's: one, FLUX's: two).
    assert _released_block_classes(preset) <= {key[0] for key in types}, types
    for key, index in types.items():
        cfg, model = _build(preset)
        (args,) = [a for i, a in _block_inputs(cfg, model, _cond(cfg, 2, 5)) if i == index]
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.blocks()[index])(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (key[0], explained.break_reasons)

        cfg, model = _build(preset, lora=True, checkpointing=True)
        block = model.blocks()[index]
        (args,) = [a for i, a in _block_inputs(cfg, model, _cond(cfg, 2, 5, padded=True)) if i == index]
        eager_args, compiled_args = _fresh(args), _fresh(args)
        _backward(block(*eager_args))
        eager = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
        assert eager and all("lora" in n for n in eager), key[0]  # only the adapters train
        block.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        _backward(torch.compile(block, fullgraph=True, backend="aot_eager")(*compiled_args))
        for n, grad in eager.items():
            torch.testing.assert_close(block.get_parameter(n).grad, grad, msg=n)
        for a, b in zip(eager_args, compiled_args):
            if isinstance(a, torch.Tensor) and a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad)


#: The tiny presets that hold every block class between them: SD3's joint, pre-only and MMDiT-X blocks, FLUX's joint
#: and single blocks. The other families build the same classes; the mask reaches each through one ``attention``.
FLEX_PRESET_FAMILIES = ["sd3", "flux"]


@pytest.mark.slow  # traces each block type with a block mask, forward and backward: ~5 s of CPU per family
@pytest.mark.parametrize("name", FLEX_PRESET_FAMILIES)
def test_every_block_type_compiles_with_flex_attention(name, cpu_flex_backward):
    """Padded text with ``train.attention: flex``: each block type takes the batch's BlockMask and compiles with
    ``fullgraph=True`` (which raises on any graph break), and compiled forward and backward give eager's
    gradients. Bugs caught: a block branching on the mask's kind in a way dynamo cannot trace, a host read in
    using the mask."""
    preset = FAMILIES[name].tiny
    for key, index in _block_types(preset).items():
        cfg, model = _build(preset)
        set_attention(model, "flex")
        (args,) = [a for i, a in _block_inputs(cfg, model, _cond(cfg, 2, 5, padded=True)) if i == index]
        assert any(isinstance(a, BlockMask) for a in args), key[0]
        block = model.blocks()[index]
        eager_args, compiled_args = _fresh(args), _fresh(args)
        _backward(block(*eager_args))
        eager = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
        block.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        _backward(torch.compile(block, fullgraph=True, backend="aot_eager")(*compiled_args))
        for n, grad in eager.items():
            torch.testing.assert_close(block.get_parameter(n).grad, grad, msg=n)


class CompileCounter:
    """A torch.compile backend that counts dynamo's compiles and runs the captured graphs as they are (whether
    dynamo compiles again does not depend on the backend)."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.compiles += 1
        return gm.forward


@pytest.mark.slow  # dynamo traces each block type two or three times: ~3 s of CPU per family
@pytest.mark.parametrize("name", COMPILED)
def test_aspect_buckets_recompile_each_block_type_at_most_once(name):
    """Bugs caught: a block specialising on the token count (a Python int from a shape used as a constant, which
    dynamic shapes cannot generalise), or first-block inputs of another kind than the others' (views of the
    embedding matmuls: one graph more per type and bucket change). Text features padded to the recipe's length
    (fixed-length encoders) never recompile when the captions change."""
    cfg, model = _build(FAMILIES[name].tiny)
    types = len({(type(b).__name__, tuple(n for n, _ in b.named_modules())) for b in model.blocks()})
    # A block type that runs at two sequence lengths in one forward (Z-Image's modulated blocks: the noise refiner
    # over the image, the main blocks over image and text) turns dynamic in the first forward: one graph more.
    lengths: dict[tuple, set[int]] = {}
    for i, args in _block_inputs(cfg, model, _cond(cfg, 2, 6)):  # the first forward's inputs (8 x 8 latents)
        lengths.setdefault(_key(model.blocks()[i]), set()).add(args[0].shape[1])
    first = sum(min(2, len(seen)) for seen in lengths.values())
    torch._dynamo.reset()
    counter = CompileCounter()
    apply_compile(model, backend=counter)
    compiles = []
    for seed, (height, width) in enumerate([(8, 8), (8, 12), (12, 16)]):
        x = torch.randn(2, cfg.in_channels, height, width)
        model(x, torch.rand(2), _cond(cfg, 2, 6, seed=seed))
        compiles.append(counter.compiles)
    assert compiles[0] == first, compiles  # one graph per block type, shared across depth
    assert compiles[-1] <= 2 * types, compiles  # at most one recompile per type after the first ...
    assert compiles[-1] == compiles[1], compiles  # ... and once the sequence length is dynamic, no more
