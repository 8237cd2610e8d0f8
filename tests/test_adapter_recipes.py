"""The adapter-kind recipes (recipes/sd3-dora.yaml, sd3-loha.yaml, flux-lokr.yaml) run on the tiny random SD3 and
FLUX.1-dev pipelines of tests.tiny_pipelines: train with the pipeline's encoders on the digits (as 32x32 RGB),
checkpoint, resume, and export: the adapters file loaded onto diffusers' transformer, and the merged transformer,
give the run's own velocities; a layout that cannot hold the kind says so and points to --merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from flowmatch import Pipeline
from flowmatch.conditioning import Conditioning
from flowmatch.config import load_recipe
from flowmatch.export import export
from flowmatch.models.convert.adapters import load_into
from flowmatch.models.convert.lora import LORA_FILE
from flowmatch.training import train
from tests.interop_models import one_thread, reference, rel_err  # noqa: F401 - applies the module-wide fixture
from tests.test_lora import REL_TOL

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # whole pipelines' encoders, three short runs and their exports


def run_recipe(name: str, pipeline: Path, run: Path, shards: Path, steps: int):
    overrides = {
        "run_dir": str(run), "model.init_from": str(pipeline), "model.preset": None, "data.shards": str(shards),
        "data.resolution": 32, "data.channels": 3, "data.num_workers": 0, "train.max_steps": steps,
        "train.batch_size": 4, "train.micro_batch_size": 4, "train.checkpoint_every": 2, "train.log_every": 1,
        "train.validate_every": 0, "train.activation_checkpointing": False, "distributed.precision": "fp32",
        "optim.lr": 0.05, "optim.warmup_steps": 0, "logging.tensorboard": False, "logging.progress": False,
        "sampling.steps": 1, "sampling.prompts": ["a photo of a cat"],
    }
    return train(load_recipe(ROOT / "recipes" / f"{name}.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))


def inputs(transformer):
    """(x, t, cond) sized for a diffusers transformer's config."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(1)
    channels = cfg.in_channels // 4 if isinstance(transformer, FluxTransformer2DModel) else cfg.in_channels
    x, t = torch.randn(2, channels, 8, 8, generator=g), torch.rand(2, generator=g)
    hidden = torch.randn(2, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    extra = {"guidance": torch.full((2,), 3.5)} if getattr(cfg, "guidance_embeds", False) else {}
    return x, t, Conditioning(hidden, torch.ones(2, 5, dtype=torch.bool), pooled, extra)


@pytest.mark.parametrize("name,family", [("sd3-dora", "sd3"), ("sd3-loha", "sd3"), ("flux-lokr", "flux")])
def test_adapter_recipes_train_resume_and_export(name, family, tiny_sd3_pipeline, tiny_flux_pipeline, digit_shards,
                                                 tmp_path):
    pipeline = tiny_sd3_pipeline if family == "sd3" else tiny_flux_pipeline
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    run = tmp_path / "run"
    assert run_recipe(name, pipeline, run, digit_shards, steps=2).final_step == 2
    resumed = run_recipe(name, pipeline, run, digit_shards, steps=3)
    assert (resumed.start_step, resumed.final_step) == (2, 3)

    ours = Pipeline.from_checkpoint(run, ema=False, device="cpu").model
    base = cls.from_pretrained(pipeline, subfolder="transformer").eval()
    x, t, cond = inputs(base)
    with torch.no_grad():
        want = ours(x, t, cond)
        assert rel_err(reference(base, x, t, cond), want) > 100 * REL_TOL  # the adapters trained

    export(run, tmp_path / "merged", merge=True, weights="raw")
    merged = cls.from_pretrained(tmp_path / "merged" / "transformer").eval()
    with torch.no_grad():
        assert rel_err(reference(merged, x, t, cond), want) < REL_TOL

    if name == "flux-lokr":  # one Kronecker product per fused projection: no diffusers layout, a ComfyUI one
        with pytest.raises(ValueError, match="LoKr.*--merge"):
            export(run, tmp_path / "lora", lora=True, weights="raw")
        written = export(run, tmp_path / "comfy", lora=True, fmt="comfyui", weights="raw").files[0]
        keys = load_file(written)
        assert keys and all(k.startswith("diffusion_model.") for k in keys)
        assert any(k.endswith(".linear1.lokr_w1") for k in keys)  # the single blocks' fused QKV + MLP input
        return
    (written,) = export(run, tmp_path / "lora", lora=True, weights="raw").files
    assert written.name == LORA_FILE
    if name == "sd3-dora":  # diffusers' own loader reads DoRA; LoHa goes through peft
        base.load_lora_adapter(str(written.parent), weight_name=LORA_FILE, prefix="transformer")
    else:
        with safe_open(str(written), framework="pt") as f:
            load_into(base, {k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    with torch.no_grad():
        assert rel_err(reference(base, x, t, cond), want) < REL_TOL
