"""The training step reads nothing back from the device between log intervals except the engine's one verdict.

A host read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ...) waits for every queued kernel
and leaves the accelerator idle while the host catches up. The loop keeps its sums on the device and reads them at
log steps; the one read per optimizer step is :meth:`FiniteWindow.agree` inside ``Engine.step``: whether the window
may be applied, which the step must know before it updates the weights.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.attention.flex_attention as flex_attention_module

from flowmatch.conditioning import Conditioning
from flowmatch.config import load_recipe
from flowmatch.families import FAMILIES
from flowmatch.families.config import ModelConfig
from flowmatch.families.presets import preset_values
from flowmatch.models.parallelize import set_attention
from flowmatch.monitor import Monitor
from flowmatch.training import train

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = str(ROOT / "flowmatch")
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def host_reads(roots: tuple[str, ...] = (PACKAGE,)):
    """Count the tensor-to-host reads made directly by code under ``roots`` (flowmatch's), as 'file:function
    method'."""
    seen: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name, read):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(roots):
                path = Path(caller.f_code.co_filename)
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                seen[f"{where}:{caller.f_code.co_name} {name}"] += 1
            return read(self, *args, **kwargs)

        return wrapper

    for name, read in originals.items():
        setattr(torch.Tensor, name, counting(name, read))
    try:
        yield seen
    finally:
        for name, read in originals.items():
            setattr(torch.Tensor, name, read)


def _reads_per_step(run_dir: Path, shards, overrides: list[str], steps: int = 3) -> list[Counter[str]]:
    """The reads of a ``steps``-step run between the ends of consecutive optimizer steps (``Monitor.advance``, once
    per step): each window holds the next step whole (batch, loss, backward, engine step, EMA) and what the step
    before did after its end, but no log step's reads (``train.log_every`` is never reached) and not the last
    step's logging, validation and checkpoint, which come after its end."""
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", [
        f"run_dir={run_dir}", f"data.shards={shards}", "model.preset=tiny", "train.batch_size=4",
        f"train.max_steps={steps}", "train.log_every=1000", "train.checkpoint_every=1000", "train.validate_every=0",
        "train.ema_profiles=[]", "optim.warmup_steps=0", "data.num_workers=0", "logging.tensorboard=false",
        "logging.progress=false", "sampling.per_prompt=1", "sampling.steps=1", "sampling.prompts=[a handwritten 3]",
        "optim.grad_clip=1.0", *overrides])
    ends: list[Counter[str]] = []
    advance = Monitor.advance

    def marked(monitor, *args, **kwargs):
        ends.append(seen.copy())
        return advance(monitor, *args, **kwargs)

    with host_reads() as seen, mock.patch.object(Monitor, "advance", marked):
        train(recipe)
    assert len(ends) == steps, ends
    return [later - earlier for earlier, later in zip(ends, ends[1:])]


#: The one read per optimizer step: the engine's verdict on the window.
VERDICT = Counter({"flowmatch/engine/nonfinite.py:agree item": 1})


def test_the_only_read_between_log_steps_is_the_engines_verdict(tmp_path, digit_shards):
    """Bugs caught: a per-step ``.item()`` of the loss or ``float()`` of the gradient norm (both only needed at
    log steps), or a ``bool(tensor)`` branch in the step path. Each middle step of one run reads exactly once."""
    assert _reads_per_step(tmp_path, digit_shards, []) == [VERDICT] * 2


def _family_data(family, request) -> tuple[Path, list[str]]:
    """The digits data and recipe keys a family's tiny preset trains on, decided from what it declares: an editing
    family (``capabilities.references`` > 0) gets the paired digits-edit shards, a model without a pooled vector
    (``pooled_dim: 0``) a text encoder that pools nothing."""
    overrides = [f"model.preset={family.tiny}"]
    if family.presets[family.tiny].get("pooled_dim") == 0:
        overrides.append("text_encoder.pooling=none")
    if family.capabilities.references:
        return request.getfixturevalue("digit_edit_shards"), [*overrides, "data.paired=true"]
    return request.getfixturevalue("digit_shards"), overrides


@pytest.mark.slow  # a tiny training run per family, and a LoRA run on it: ~3 s of CPU each
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_and_lora_reads_only_the_verdict(name, tmp_path, request):
    """The same for each registered family's tiny preset (sd3's flowmatch tiny MMDiT is the test above), and for
    LoRA on it, started from that run: a family's model, its conditioning or the adapters must not read back from
    the device either (e.g. a mask built with ``if mask.all():``). An editing family trains on paired data, so its
    reference images pass through the step too."""
    family = FAMILIES[name]
    shards, overrides = _family_data(family, request)
    assert _reads_per_step(tmp_path / "base", shards, overrides) == [VERDICT] * 2
    if family.capabilities.lora:
        lora = [*overrides, f"model.init_from={tmp_path / 'base'}", "model.lora={rank: 2, alpha: 2}"]
        assert _reads_per_step(tmp_path / "lora", shards, lora) == [VERDICT] * 2, "with LoRA"


#: torch's FlexAttention (the block mask's construction and the attention itself), in Python.
FLEX_SOURCES = str(Path(flex_attention_module.__file__).parent)


@pytest.mark.parametrize("name", ["sd3", "flux"])  # every block class: joint, pre-only, MMDiT-X, single
def test_flex_attention_reads_nothing_back(name, cpu_flex_backward):
    """A padded forward and backward with ``train.attention: flex``: building the batch's block mask and running
    flex read nothing back, in flowmatch or in torch's flex code. Bug caught: a mask built from host values (e.g.
    ``int(mask.sum())`` for the real length, or ``if mask.all():``)."""
    family = FAMILIES[name]
    values = preset_values(family.tiny)
    cfg = ModelConfig(**{**values, **{k: v for k, v in dict(in_channels=4, context_dim=16, pooled_dim=12).items()
                                      if values.get(k) is None}})
    model = set_attention(family.build(cfg), "flex")
    g = torch.Generator().manual_seed(0)
    cond = Conditioning.from_rows([torch.randn(n, 16, generator=g) for n in (3, 5)],
                                  [torch.randn(12, generator=g) for _ in range(2)])
    if cfg.guidance_embed:
        cond = cond.with_extra({"guidance": torch.full((2,), 3.5)})
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with host_reads((PACKAGE, FLEX_SOURCES)) as seen:
        model(x, torch.rand(2), cond).square().mean().backward()
    assert x.grad is not None and not seen, seen
