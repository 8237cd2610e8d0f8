"""Tiny random diffusers transformers of each released architecture, and diffusers' velocity for our inputs.

Everything is built on the spot from constructor arguments (nothing is downloaded). Every weight, the
zero-initialised ones included, is perturbed, so outputs and gradients depend on all of them.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders import single_file_utils
from torch import Tensor

from flowmatch.conditioning import Conditioning

CONTEXT_DIM, POOLED_DIM = 20, 12
LATENT_CHANNELS = 4
#: Architectures under test: SD3-medium (no QK-norm), SD3.5-large (QK-norm), SD3.5-medium (MMDiT-X), FLUX.1.
KINDS = ("sd3-medium", "sd3.5-large", "sd3.5-medium", "flux-dev", "flux-schnell")
#: FLUX's VAE downsampling, needed only by diffusers' (un)packing helpers.
FLUX_VAE_FACTOR = 8


def diffusers_model(kind: str, seed: int = 0, **overrides):
    """A tiny random diffusers transformer of architecture `kind` (see KINDS), in eval mode."""
    torch.manual_seed(seed)
    if kind.startswith("flux"):
        kwargs = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                      attention_head_dim=16, num_attention_heads=4, joint_attention_dim=CONTEXT_DIM,
                      pooled_projection_dim=POOLED_DIM, guidance_embeds=kind == "flux-dev", axes_dims_rope=(4, 6, 6))
        model = FluxTransformer2DModel(**{**kwargs, **overrides})
    else:
        kwargs = dict(sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=3, attention_head_dim=8,
                      num_attention_heads=4, joint_attention_dim=CONTEXT_DIM, caption_projection_dim=32,
                      pooled_projection_dim=POOLED_DIM, out_channels=6, pos_embed_max_size=12,
                      qk_norm=None if kind == "sd3-medium" else "rms_norm",
                      dual_attention_layers=(0, 1) if kind == "sd3.5-medium" else ())
        model = SD3Transformer2DModel(**{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def sample_inputs(height=8, width=8, batch=2, text_len=7, seed=1, guidance=True) -> tuple[Tensor, Tensor, Conditioning]:
    """(x, t, cond) with every text token real (diffusers' transformers take no text mask); with `guidance`,
    cond.extra["guidance"] holds FLUX-dev's guidance value per sample."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, LATENT_CHANNELS, height, width, generator=g), torch.rand(batch, generator=g)
    hidden, pooled = torch.randn(batch, text_len, CONTEXT_DIM, generator=g), torch.randn(batch, POOLED_DIM, generator=g)
    extra = {"guidance": 1 + 4 * torch.rand(batch, generator=g)} if guidance else {}
    return x, t, Conditioning(hidden, torch.ones(batch, text_len, dtype=torch.bool), pooled, extra)


def without_guidance(cond: Conditioning) -> Conditioning:
    return Conditioning(cond.hidden, cond.mask, cond.pooled, reference=cond.reference)


def reference(theirs, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """diffusers' velocity for our inputs, (B, C, H, W).

    SD3 takes the text tensors positionally and timestep = 1000 t. FLUX takes 2x2-packed latents, position ids
    (0, row, column) for the image and zeros for the text, t itself and the raw guidance value (it multiplies
    both by 1000), and returns packed velocities. Reference latents (cond.reference) go in as FluxKontextPipeline
    sends them: packed, after the image's tokens, with ids (1, row, column), the output cut to the image's tokens.
    """
    if isinstance(theirs, SD3Transformer2DModel):
        return theirs(x, cond.hidden, cond.pooled, t * 1000).sample
    b, c, h, w = x.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    tokens = FluxPipeline._pack_latents(x, b, c, h, w)
    n = tokens.shape[1]
    for ref in cond.reference:
        rh, rw = ref.shape[2:]
        ref_ids = FluxPipeline._prepare_latent_image_ids(b, rh // 2, rw // 2, x.device, x.dtype)
        ref_ids[..., 0] = 1
        tokens = torch.cat([tokens, FluxPipeline._pack_latents(ref, b, c, rh, rw)], dim=1)
        img_ids = torch.cat([img_ids, ref_ids])
    txt_ids = torch.zeros(cond.length, 3)
    guidance = cond.extra.get("guidance") if theirs.config.guidance_embeds else None
    packed = theirs(tokens, cond.hidden, cond.pooled, t, img_ids, txt_ids, guidance).sample[:, :n]
    return FluxPipeline._unpack_latents(packed, h * FLUX_VAE_FACTOR, w * FLUX_VAE_FACTOR, FLUX_VAE_FACTOR)


def ours_inputs(model, cond: Conditioning) -> Conditioning:
    """`cond` as our model takes it: the guidance value only for a model that embeds it."""
    return cond if model.cfg.guidance_embed else without_guidance(cond)


def diffusers_converter(model):
    """diffusers' original -> diffusers key converter for `model`'s architecture. Its FLUX and Chroma converters
    hard-code FLUX.1's width (3072) to split the single blocks' fused projection; the tiny models' width is put in
    its place, the code is otherwise diffusers' own."""
    if not model.cfg.rope:
        return single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers
    name = ("convert_chroma_transformer_checkpoint_to_diffusers" if model.approximator is not None
            else "convert_flux_transformer_checkpoint_to_diffusers")
    source = inspect.getsource(getattr(single_file_utils, name))
    assert "inner_dim = 3072" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {model.cfg.width}"), namespace)  # noqa: S102
    return namespace[name]


def max_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| of two tensors of one shape (images, embeddings), compared in float32 whatever their dtype."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are latency-bound: one intra-op thread runs them several times faster than two competing for
    a shared 2-core machine. Import this fixture into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
