"""benchmarks/mfu.py: its CPU smoke path runs real training steps through the engine and reports consistent figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flowmatch.conditioning import Conditioning
from flowmatch.families import FAMILIES
from flowmatch.training.loop import Trainer

_SPEC = importlib.util.spec_from_file_location("mfu", Path(__file__).parents[1] / "benchmarks" / "mfu.py")
mfu = importlib.util.module_from_spec(_SPEC)
sys.modules["mfu"] = mfu  # dataclasses look their module up there
_SPEC.loader.exec_module(mfu)

SMOKE = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--text-len", "8", "--batch", "2",
         "--warmup", "1", "--steps", "1", "--peak-size", "64"]
#: Every family's test-sized preset: the CPU path covers each registered family.
TINY = ",".join(f.tiny for f in FAMILIES.values())


def test_the_cpu_path_trains_every_family_and_counts_its_flops_twice(capsys):
    """Bugs caught: a family's FLOP count off by a term (a block's attention, the single blocks, the backward
    factor) against FlopCounterMode's independent count; a family the benchmark cannot build or feed."""
    results = mfu.main([*SMOKE, "--preset", TINY, "--tokens", "16,64"])
    assert [(m.preset, m.tokens) for m in results] == [(f.tiny, n) for f in FAMILIES.values() for n in (16, 64)]
    for m in results:
        # One timed step: its time is the sum of its phases, each of which ran.
        assert m.step == pytest.approx(m.forward + m.backward + m.optimizer)
        assert min(m.forward, m.backward, m.optimizer) > 0 and m.peak_memory > 0
        assert m.counted_flops == pytest.approx(m.flops, rel=0.02), m.preset
    for small, large in zip(results[::2], results[1::2]):
        # Four times the image tokens cost more FLOPs (the counts see the token count; Z-Image pads 16 of them to
        # 32, so its count grows by half).
        assert large.flops > 1.4 * small.flops
    out = capsys.readouterr().out
    assert out.count("MFU") == len(results) and "of the measured fp32 matmul peak" in out
    assert out.count("FlopCounterMode") == len(results)


def test_the_default_presets_are_one_per_family():
    assert [mfu.PRESET_FAMILY[p] for p in mfu.parse_args([]).preset] == list(FAMILIES.values())


#: Every family with LoRA, in its test-sized preset.
TINY_LORA = ",".join(f.tiny for f in FAMILIES.values() if f.capabilities.lora)


def test_lora_trains_only_the_adapters_and_every_family_counts_them(monkeypatch):
    """With --lora the engine is given the adapters only, and each LoRA family's count (the frozen base without
    weight gradients, the adapters' forward and backward) agrees with FlopCounterMode's within 2%, below full
    training's (about two thirds of it) and above the frozen base alone. Bugs caught: the adapters left out of the
    count (rank 16 on tiny blocks is ~20% of the step), the frozen base counted with weight gradients, an adapter
    counted with the wrong tokens (a text-stream one with image tokens), the benchmark dividing the full count."""
    given = []
    setup = mfu.Engine.setup

    def keep(self, model, params, *args, **kwargs):
        given.append({n for n, p in model.named_parameters() if any(p is q for q in params)})
        return setup(self, model, params, *args, **kwargs)

    monkeypatch.setattr(mfu.Engine, "setup", keep)
    results = mfu.main([*SMOKE, "--preset", TINY_LORA, "--tokens", "16", "--lora", "16"])
    assert [m.preset for m in results] == TINY_LORA.split(",")
    assert all(names and all("lora_" in n for n in names) for names in given)
    for m in results:
        cfg = mfu.model_config(m.preset)
        full = mfu.family_of(cfg).flops(cfg, batch_size=2, latent_size=(8, 8), text_len=8)
        assert m.counted_flops == pytest.approx(m.flops, rel=0.02), m.preset
        assert m.used_flops == m.flops
        assert 0.55 * full < m.flops < 0.95 * full, m.preset


def test_each_step_updates_the_weights(monkeypatch):
    """The timed optimizer phase is the engine's real step: the weights move."""
    seen = {}
    build = mfu.build_model

    def keep(cfg, args, engine):
        model = build(cfg, args, engine)
        seen["model"], seen["before"] = model, [p.detach().clone() for p in model.parameters()]
        return model

    monkeypatch.setattr(mfu, "build_model", keep)
    mfu.main([*SMOKE, "--tokens", "16"])
    # adaLN-Zero: at first only the zero-initialised layers receive gradients, so only some weights move.
    assert any(not torch.equal(a, p) for a, p in zip(seen["before"], seen["model"].parameters()))


def test_datasheet_peaks_match_pcie_before_sxm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert mfu.datasheet_peak(torch.device("cuda"))[0] == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert mfu.datasheet_peak(torch.device("cuda"))[0] == 989e12
    assert mfu.datasheet_peak(torch.device("cpu")) is None


def test_token_counts_must_be_squares():
    with pytest.raises(SystemExit):
        mfu.parse_args(["--tokens", "16,50"])


def test_every_family_has_a_release_preset_and_its_pipelines_text_length():
    """Bug caught: a family left out of RELEASE_PRESETS (measured at whatever preset comes first) or whose text
    length the default path cannot tell (a decoder-LLM family has no T5 tokens): known answers per family."""
    args = mfu.parse_args([])
    lengths = {name: mfu.text_length(f, args) for name, f in FAMILIES.items()}
    assert {n: lengths[n] for n in ("sd3", "flux", "kontext", "qwen_image", "chroma", "lumina2")} == {
        "sd3": 77 + 256, "flux": 512, "kontext": 512, "qwen_image": 512, "chroma": 512, "lumina2": 256}
    # A family with more than its test size is measured at another (the U-Net's one preset is both).
    assert all(mfu.release_preset(f) in f.presets and (mfu.release_preset(f) != f.tiny or len(f.presets) == 1)
               for f in FAMILIES.values()), {n: (mfu.release_preset(f), f.tiny) for n, f in FAMILIES.items()}


def test_the_trainers_mfu_log_counts_a_lora_runs_adapters():
    """The trainer's FLOPs per step (its TFLOP/s and MFU log) is the LoRA-aware count for a LoRA run. Bug caught:
    the trainer asking the family for full training's count (``lora`` not passed)."""
    values = {**mfu.preset_values("tiny-flux-dev"), "in_channels": 4, "context_dim": 16, "pooled_dim": 12}
    lora = mfu.LoraConfig(rank=4, alpha=4)
    cfg = mfu.ModelConfig(**values, init_from="base", lora=lora)
    hidden = torch.zeros(2, 6, 16)
    text = Conditioning(hidden, torch.ones(2, 6, dtype=torch.bool), torch.zeros(2, 12))
    trainer = SimpleNamespace(
        recipe=SimpleNamespace(model=cfg, data=SimpleNamespace(size=(32, 32)), train=SimpleNamespace(batch_size=4),
                               sampling=SimpleNamespace(prompts=["a", "b"])),
        run=SimpleNamespace(encoders=SimpleNamespace(downsample=4, encode_text=lambda prompts: text)))
    sizes = dict(batch_size=4, latent_size=(8, 8), text_len=6)
    assert Trainer.flops_per_step(trainer) == mfu.training_flops(cfg, lora, **sizes) < 0.95 * mfu.training_flops(
        cfg, None, **sizes)
