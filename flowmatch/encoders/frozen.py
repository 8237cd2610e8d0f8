"""The frozen encoders of a run as one component: text encoder(s) and autoencoder, built from their sub-configs.

Everything that needs the encoders (the trainer, validation, `flowmatch sample`/`eval`, the Python API and
`flowmatch-data encode`) goes through :class:`FrozenEncoders`: it encodes a batch (or takes the cached features
the batch already carries), gives the empty caption's conditioning, the fingerprints that cached shards are
checked against, and the input sizes the model must have.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.encoders.autoencoder import Autoencoder, AutoencoderConfig
from flowmatch.encoders.combine import TextPart
from flowmatch.encoders.text import TextEncoderConfig
from flowmatch.encoders.text_set import TextEncoders, TextEncodersConfig
from flowmatch.errors import RecipeError

if TYPE_CHECKING:
    from flowmatch.data import Batch

# Which recipe section decides each model input size (named in mismatch errors).
_SIZE_SOURCES = {"in_channels": "autoencoder", "context_dim": "text encoder", "pooled_dim": "text encoder"}


def seen_references(ref_images: torch.Tensor) -> list[torch.Tensor]:
    """Reference images (B, R, C, H, W) in [-1, 1] -> each sample's first as a (C, H, W) tensor in [0, 1]: what a
    text encoder that sees images reads with the caption (QwenImageEditPipeline shows its Qwen2.5-VL the reference
    image it encodes)."""
    return [((refs[0].float() + 1) / 2).clamp(0, 1) for refs in ref_images]


class FrozenEncoders:
    """The text encoder(s) and the autoencoder of a run; never trained, never inside the engine.

    Args:
        text_cfg: the recipe's text encoders (``Recipe.text``), or one ``text_encoder`` section.
        autoencoder_cfg: the recipe's ``autoencoder`` section.
        image_channels: channels of the images (the data section's ``channels``).
        device: where encoding runs and its outputs live.
    """

    def __init__(self, text_cfg: TextEncoderConfig | TextEncodersConfig, autoencoder_cfg: AutoencoderConfig, *,
                 image_channels: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if isinstance(text_cfg, TextEncoderConfig):
            text_cfg = TextEncodersConfig().resolved(text_cfg)
        self.text = TextEncoders(text_cfg, device=self.device)
        self.autoencoder = Autoencoder(autoencoder_cfg, image_channels=image_channels, device=self.device)
        self._null: Optional[Conditioning] = None
        self._dropout_null: Optional[Conditioning] = None
        self._frozen_facts: dict[str, Any] = {}
        """After :meth:`release`: the fingerprints and input sizes, remembered from before."""

    # -- conditioning ----------------------------------------------------------------------------------------------

    def encode_text(self, captions: list[str], images: Optional[list] = None) -> Conditioning:
        """Captions -> conditioning on :attr:`device` (hidden (B, L, D) float32, mask (B, L), pooled (B, Dp)).

        ``images``: one reference image per caption (a PIL image or a (C, H, W) tensor in [0, 1]), which a
        text encoder that sees images (:attr:`sees_images`: Qwen-Image-Edit's Qwen2.5-VL) reads with the caption
        through its processor; the other encoders ignore them."""
        return self.text.encode(list(captions), list(images) if images is not None else None).to(self.device)

    @property
    def sees_images(self) -> bool:
        """Whether a text encoder reads the reference image with the caption (:meth:`encode_text`'s images)."""
        return self.text.sees_images

    def release(self, keep: Sequence[str]) -> None:
        """Free the text encoders' weights and the autoencoder's encoder half once training reads cached features.

        The captions in ``keep`` (the sampling prompts) and the empty caption are encoded first, one at a time,
        and served from memory afterwards (:meth:`TextEncoders.release`); the fingerprints and input sizes are
        remembered. The decoder stays, for validation grids.
        """
        self.null(), self.dropout_null()
        self._frozen_facts = {"fingerprints": self.fingerprints(), "input_sizes": self.input_sizes()}
        self.text.release(list(keep))
        self.autoencoder.drop_encoder()
        gc.collect()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` freed the text encoders and the autoencoder's encoder half."""
        return bool(self._frozen_facts)

    def null(self) -> Conditioning:
        """The empty caption's conditioning (batch 1): the unconditional input of classifier-free guidance at
        sampling, and caption dropout's replacement in training unless an encoder says ``dropped: zeros``."""
        if self._null is None:
            self._null = self.text.null().to(self.device)
        return self._null

    def dropout_null(self) -> Conditioning:
        """Caption dropout's replacement (batch 1): per encoder, its encoded empty caption or zeros."""
        if self._dropout_null is None:
            self._dropout_null = self.text.dropout_null().to(self.device)
        return self._dropout_null

    def dropout_parts(self, default: float) -> list[tuple[TextPart, float]]:
        """Each encoder's share of the conditioning and its caption dropout probability (``default`` =
        flow.caption_dropout, for encoders that set none)."""
        return self.text.dropout_parts(default)

    def encode_references(self, images: torch.Tensor) -> torch.Tensor:
        """Reference images (B, R, C, H, W) in [-1, 1] -> their latents (B, R, c, h, w) float32 on :attr:`device`:
        the autoencoder's posterior mean, normalised like the targets (references are never noised)."""
        b, r = images.shape[:2]
        latents = self.autoencoder.encode(images.flatten(0, 1).to(self.device), mean=True)
        return latents.reshape(b, r, *latents.shape[1:])

    def encode_batch(self, batch: "Batch") -> tuple[torch.Tensor, Conditioning]:
        """A loader batch -> (latents (B, C, h, w) float32, conditioning), both on :attr:`device`.

        Cached features the batch carries are used as they are (several encoders' combined as the recipe says);
        raw images and captions go through the encoders. A paired batch's reference images (cached latents, or
        pixels encoded here) become ``cond.reference``, one (B, c, h, w) tensor per reference; ``x0`` is the
        target's latents only.
        """
        x0 = batch.latents if batch.latents is not None else self.autoencoder.encode(batch.images.to(self.device))
        if batch.text_parts is not None:
            cond = self.text.combine(batch.text_parts)
        elif batch.text is not None:
            cond = self.text.combine({self.text.single_name: batch.text}) if self.text.single_name else batch.text
        elif self.sees_images:
            cond = self.encode_text(batch.captions, self._seen_references(batch))
        else:
            cond = self.encode_text(batch.captions)
        cond = cond.to(self.device)
        refs = batch.ref_latents if batch.ref_images is None else self.encode_references(batch.ref_images)
        if refs is not None:
            cond = cond.with_reference(refs.to(self.device).float().unbind(1))
        return x0.to(self.device).float(), cond

    def _seen_references(self, batch: "Batch") -> list[torch.Tensor]:
        """Each sample's first reference image, for a text encoder that sees it (:func:`seen_references`)."""
        if batch.ref_images is None:
            raise RecipeError("the text encoder reads each caption with its reference image (text_encoder."
                              "processor_subfolder), but the batch has no reference pixels: use data.paired: true "
                              "with shards holding the reference images (or features cached by flowmatch-data "
                              "encode with this recipe), or remove processor_subfolder")
        return seen_references(batch.ref_images)

    # -- images ----------------------------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, C_img, H, W) in [-1, 1]."""
        return self.autoencoder.decode(latents)

    @property
    def downsample(self) -> int:
        """Pixels per latent along each side."""
        return self.autoencoder.downsample

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the model sees."""
        return self.autoencoder.latent_channels

    @property
    def pixel_space(self) -> bool:
        """Whether the "latents" are the images themselves (identity autoencoder)."""
        return self.autoencoder.vae is None

    # -- what others check against ---------------------------------------------------------------------------------

    def fingerprints(self) -> dict[str, str]:
        """Which encoders make this run's features: recorded in cached shards and checked when they are read."""
        if self.released:
            return dict(self._frozen_facts["fingerprints"])
        return {**self.text.fingerprints(), "autoencoder": self.autoencoder.fingerprint()}

    def input_sizes(self) -> dict[str, int]:
        """The model input sizes these encoders decide: in_channels, context_dim and pooled_dim."""
        if self.released:
            return dict(self._frozen_facts["input_sizes"])
        return {"in_channels": self.latent_channels, "context_dim": self.text.hidden_size,
                "pooled_dim": self.text.pooled_size}

    def fill_model_config(self, model_cfg: Any) -> Any:
        """A copy of the model config with :meth:`input_sizes` filled in (recipes leave them None); a size the
        recipe sets explicitly must agree, or a RecipeError names the key and the encoder's value."""
        sizes = self.input_sizes()
        for name, value in sizes.items():
            given = getattr(model_cfg, name)
            if name == "pooled_dim" and given == 0 and value:
                raise RecipeError(f"model.pooled_dim=0 (this model takes no pooled text vector) but the text encoder "
                                  f"gives {value}: set pooling: none on its text encoder")
            if given is not None and given != value:
                raise RecipeError(f"model.{name}={given} but the {_SIZE_SOURCES[name]} gives {value}: remove "
                                  f"model.{name} from the recipe to take it from the encoder")
        return dataclasses.replace(model_cfg, **sizes)
