"""The U-Net backbone (model.kind: unet) and the DDPM digits recipe through the real trainer, checkpoints, EMA and
pipeline: the wiring of the text to the U-Net, a bit-identical resume, and sampling with DDIM."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flowmatch
from flowmatch.conditioning import Conditioning
from flowmatch.config import load_recipe
from flowmatch.families import build_backbone
from flowmatch.training import train

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = {"model.unet.block_out_channels": [16, 16], "model.unet.norm_num_groups": 8, "model.unet.heads": 2}


def ddpm_recipe(run_dir, shards, **extra):
    overrides = {
        "run_dir": str(run_dir), "data.shards": str(shards), **TINY_UNET, "train.max_steps": 4,
        "train.batch_size": 8, "train.checkpoint_every": 2, "train.log_every": 1, "optim.warmup_steps": 1,
        "optim.schedule": "constant", "data.num_workers": 0, "logging.tensorboard": False,
        "logging.progress": False, "sampling.per_prompt": 1, "sampling.steps": 2,
        "sampling.prompts": ["a handwritten 3", "a handwritten 7"], **extra,
    }
    return load_recipe(ROOT / "recipes" / "digits-ddpm.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def test_recipe_is_ddpm_with_the_unet_and_ddim():
    r = load_recipe(ROOT / "recipes" / "digits-ddpm.yaml")
    assert (r.model.kind, r.flow.path, r.flow.prediction, r.sampling.solver) == ("unet", "vp_linear", "eps", "ddim")
    assert r.sampling.steps == 20 and r.train.max_steps == 500  # the rectified-flow digits job's budget
    with pytest.raises(ValueError, match="model.kind.*unet"):
        build_backbone(load_recipe(None, ["model.kind=unte"]).model)


def test_unet_reads_the_text_tokens_their_mask_and_the_pooled_vector():
    r = load_recipe(None, ["model.preset=digits-unet", "model.in_channels=1", "model.context_dim=8",
                           "model.pooled_dim=6", *[f"{k}={json.dumps(v)}" for k, v in TINY_UNET.items()]])
    torch.manual_seed(0)
    model = build_backbone(r.model).eval()
    torch.nn.init.normal_(model.unet.conv_out.weight)  # zero-initialised: make the output depend on its input
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    hidden, pooled = torch.randn(2, 5, 8, generator=g), torch.randn(2, 6, generator=g)
    mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    base = model(x, t, Conditioning(hidden, mask, pooled))
    assert base.shape == x.shape
    padded = hidden.clone()
    padded[:, 3:] = 100.0  # masked tokens: no effect
    torch.testing.assert_close(model(x, t, Conditioning(padded, mask, pooled)), base, rtol=1e-5, atol=1e-5)
    changed = hidden.clone()
    changed[:, 0] += 1.0  # a real token: cross-attention sees it
    assert not torch.allclose(model(x, t, Conditioning(changed, mask, pooled)), base, atol=1e-4)
    assert not torch.allclose(model(x, t, Conditioning(hidden, mask, pooled + 1)), base, atol=1e-4)
    assert not torch.allclose(model(x, t + 0.1, Conditioning(hidden, mask, pooled)), base, atol=1e-4)


def test_ddpm_unet_recipe_trains_resumes_bit_identically_and_samples(tmp_path, digit_shards):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(ddpm_recipe(straight, digit_shards, **{"train.max_steps": 4}))
    train(ddpm_recipe(split, digit_shards, **{"train.max_steps": 2}))
    summary = train(ddpm_recipe(split, digit_shards, **{"train.max_steps": 4}))
    assert summary.start_step == 2 and summary.final_step == 4
    for name in ("checkpoints/4/model.safetensors", "checkpoints/4/ema.safetensors"):
        a, b = load_file(straight / name), load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith("unet.") for k in a)
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(row["tflops_per_s"] > 0 for row in logged if "loss" in row)  # the U-Net's FLOPs are counted

    pipe = flowmatch.Pipeline.from_checkpoint(split)
    assert pipe.formulation.path.name == "vp_linear" and pipe.formulation.prediction == "eps"
    images = pipe.generate(["a handwritten 3", "a handwritten 7"], steps=3, seed=1)
    assert images.shape == (2, 1, 8, 8) and pipe.last_nfe == 3
    # The pipeline samples the recipe's formulation: DDIM from the same noise, by hand, gives the same images.
    from flowmatch.data.pixels import model_to_unit
    from flowmatch.sampling import guided_velocity, image_noise
    from flowmatch.sampling.diffusion import sample_diffusion

    noise = image_noise([1, 2], (1, 8, 8))
    cond = pipe.encoders.encode_text(["a handwritten 3", "a handwritten 7"])
    predict = guided_velocity(pipe.model, cond, pipe.encoders.null(), pipe.recipe.sampling.guidance_scale)
    with torch.no_grad():
        by_hand = sample_diffusion(predict, noise, formulation=pipe.formulation, sampler="ddim", steps=3,
                                   clip_x0=pipe.recipe.sampling.clip_x0).x
    torch.testing.assert_close(images, model_to_unit(pipe.encoders.decode(by_hand)), rtol=0, atol=1e-5)
    euler = pipe.generate(["a handwritten 3"], steps=3, seed=1, solver="euler")
    assert torch.isfinite(euler).all() and not torch.allclose(euler, images[:1])


def test_the_unet_fields_are_the_model_sections_not_the_mmdits():
    """Bugs caught: model.kind / model.unet leaking into MMDiTConfig (converted or exported configs would carry
    them), and a U-Net run silently loading MMDiT weights or LoRA targets."""
    from flowmatch.errors import RecipeError
    from flowmatch.models.mmdit import MMDiTConfig

    r = load_recipe(ROOT / "recipes" / "digits-ddpm.yaml")
    assert r.model.unet.block_out_channels == [32, 32]
    assert not {"kind", "unet"} & set(vars(r.model.architecture()))
    assert "kind" not in {f.name for f in __import__("dataclasses").fields(MMDiTConfig)}
    with pytest.raises(RecipeError, match="model.init_from and model.lora.*model.kind: unet"):
        load_recipe(ROOT / "recipes" / "digits-ddpm.yaml", ["model.init_from=some/run"])


def test_the_digits_unet_has_no_attention_at_full_resolution():
    """Bug caught: the digits preset growing back attention at 8x8 (64 tokens an image) or 64 channels, which
    made a training step twice the MMDiT's on CPU instead of about half (recipes/digits-ddpm.yaml)."""
    r = load_recipe(ROOT / "recipes" / "digits-ddpm.yaml", ["model.in_channels=1", "model.context_dim=384",
                                                            "model.pooled_dim=384"])
    unet = build_backbone(r.model).unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"  # the text still reaches the 4x4 levels
    assert 0.4e6 < sum(p.numel() for p in unet.parameters()) < 0.6e6  # the MMDiT digits preset has 2.3M


def test_counted_unet_flops_are_one_forward_and_backward():
    """The U-Net's training FLOPs (no analytic count) are one meta-device forward counted, times 3 and the batch:
    within a few percent of a real forward and backward counted on CPU (whose first layer needs no input
    gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    from flowmatch.models.flops import counted_training_flops_per_step

    r = load_recipe(None, ["model.preset=digits-unet", "model.in_channels=1", "model.context_dim=8",
                           "model.pooled_dim=6", *[f"{k}={json.dumps(v)}" for k, v in TINY_UNET.items()]])

    def inputs(batch):
        return (torch.zeros(batch, 1, 8, 8), torch.full((batch,), 0.5),
                Conditioning(torch.zeros(batch, 5, 8), torch.ones(batch, 5, dtype=torch.bool), torch.zeros(batch, 6)))

    with torch.device("meta"):
        counted = counted_training_flops_per_step(build_backbone(r.model), inputs(1), batch_size=4)
    model = build_backbone(r.model)
    with FlopCounterMode(display=False) as real:
        model(*inputs(4)).sum().backward()
    assert 0.9 < real.get_total_flops() / counted <= 1.0
