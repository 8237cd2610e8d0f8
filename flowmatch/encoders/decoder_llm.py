"""A decoder LLM as a frozen text encoder (``text_encoder.kind: decoder_llm``): the captions go through a chat
template, a causal LLM reads them, and the states of chosen hidden layers, without the template's fixed prefix,
are the per-token conditioning. Qwen-Image reads Qwen2.5-VL's last layer this way; Z-Image (Qwen3), Lumina-2
(Gemma-2) and FLUX.2 (dev's Mistral-3, klein's Qwen3: several layers side by side) take the same path with other
settings.

What the recipe says (``text_encoder`` or ``text_encoders.encoders.NAME``, :class:`TextEncoderConfig`)::

    kind: decoder_llm
    template: "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n"
    drop_tokens: 34        # the template's prefix, dropped from the states (QwenImagePipeline's drop_idx)
    hidden_layer: -1       # which layer's states (hidden_states index; None = the model's last_hidden_state)
    stack_layers: []       # or several layers, concatenated along the width in order ([10, 20, 30] for FLUX.2)
    max_length: 512        # caption tokens kept after the prefix (the pipeline's max_sequence_length)
    pooling: none          # no pooled vector (width 0); mean also works
    dtype: bf16            # weights dtype; the states are returned in float32
    model_class: null      # the transformers class; null = the checkpoint's architectures[0]
    caption_remove: []     # strings taken out of each caption first (["[IMG]"] for FLUX.2 dev's Flux2Pipeline)
    processor_subfolder: null  # a VL processor: encode_with_images also shows the LLM images (Qwen-Image-Edit)

How it runs, as ``QwenImagePipeline._get_qwen_prompt_embeds`` does: the templated texts of a batch are
tokenized together (with the tokenizer's special tokens, unless the template starts with its BOS token, as
Mistral's chat template for ``Flux2Pipeline`` does: then none is added, as ``apply_chat_template`` adds none),
padded to the longest (``padding: max_length``: to ``drop_tokens + max_length``, every position then kept as a
token, as ``Flux2KleinPipeline`` does) and truncated at ``drop_tokens + max_length`` tokens, the LLM runs with the
attention mask, each text's real tokens are taken and its first ``drop_tokens`` dropped, and the rows are
right-padded into a :class:`Conditioning` whose mask marks the kept tokens. A causal
LLM's states of the first n tokens do not depend on the tokens after them, so truncating before the LLM runs or
after gives the same states.
With a processor (``processor_subfolder``), :meth:`DecoderLLMEncoder.encode_with_images` runs the texts and one
image per text through it (its image placeholder tokens expanded to the image's patches, as
``QwenImageEditPipeline._get_qwen_prompt_embeds`` does) and the LLM sees both; the kept states are cut to
``max_length`` after the prefix.

The long, wide states (3584 channels for Qwen2.5-VL-7B) are cached like any encoder's
(:mod:`flowmatch.encoders.cache`): real tokens only, in the compact int8 / fp8 text cache (``data.text_quant``).
"""

from __future__ import annotations

import hashlib

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.dtypes import resolve_dtype
from flowmatch.encoders.loading import load_pretrained
from flowmatch.encoders.text import TextEncoder, TextEncoderConfig

__all__ = ["DecoderLLMEncoder"]

#: The paddings a decoder LLM takes: longest (real tokens kept, padding masked) or max_length (FLUX.2's pipelines:
#: every text padded to drop_tokens + max_length tokens, the LLM given its mask, every position a token).
FIXED_PADDINGS = ("longest", "max_length")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class DecoderLLMEncoder(TextEncoder):
    """A frozen decoder LLM behind a chat template. ``encode(captions) -> Conditioning``: hidden (B, L, D * k)
    float32 with L the longest kept caption (k = the stacked layers, 1 without), mask (B, L), pooled (B, 0) with
    ``pooling: none``."""

    def __init__(self, cfg: TextEncoderConfig, *, device: torch.device | str = "cpu") -> None:
        if cfg.pooling in ("pooler", "projection"):
            raise ValueError(f"text_encoder.pooling={cfg.pooling} needs a pooler or projection, which a decoder LLM "
                             "has not: use pooling: none (no pooled vector) or mean")
        if cfg.padding not in FIXED_PADDINGS:
            raise ValueError(f"text_encoder.padding={cfg.padding} is not how decoder LLM pipelines run them: their "
                             "texts are padded to the longest and masked (padding: longest), or to max_length with "
                             "every position seen by the model (padding: max_length, FLUX.2's)")
        super().__init__(cfg, device=device)
        self.processor = None
        if cfg.processor_subfolder is not None:
            # reason: transformers' import costs seconds; only runs that load an encoder pay it.
            from transformers import AutoProcessor

            self.processor = load_pretrained(
                "text encoder's processor", cfg.name_or_path,
                lambda path: AutoProcessor.from_pretrained(path, subfolder=cfg.processor_subfolder),
                key="text_encoder.name_or_path")

    def _load(self, path: str):
        # reason: transformers' import costs seconds; only runs that load an encoder pay it.
        import transformers

        cfg = self.cfg
        config = transformers.AutoConfig.from_pretrained(path, subfolder=cfg.subfolder)
        name = cfg.model_class or (config.architectures or [None])[0]
        model_cls = getattr(transformers, name or "", None)
        if model_cls is None:
            raise ValueError(f"text_encoder.model_class: transformers has no class {name!r} for {cfg.name_or_path!r}; "
                             "name the LLM's class (e.g. Qwen2_5_VLForConditionalGeneration, Qwen3ForCausalLM)")
        return (transformers.AutoTokenizer.from_pretrained(path, subfolder=self.tokenizer_subfolder),
                model_cls.from_pretrained(path, subfolder=cfg.subfolder, dtype=resolve_dtype(cfg.dtype, self.device)))

    @property
    def _writes_bos(self) -> bool:
        """Whether the template writes the tokenizer's BOS token itself (Mistral's chat template): then the
        tokenizer adds no special tokens, as transformers' processors' ``apply_chat_template`` tokenizes it."""
        bos = self.tokenizer.bos_token
        return bool(bos) and self.cfg.template.startswith(bos)

    @property
    def sees_images(self) -> bool:
        return self.processor is not None

    @property
    def layers(self) -> list[int]:
        """The hidden_states indices whose states are concatenated (None: the model's last_hidden_state)."""
        return list(self.cfg.stack_layers) or [self.cfg.hidden_layer]

    @property
    def hidden_size(self) -> int:
        return super().hidden_size * len(self.layers)

    def _make_fingerprint(self) -> str:
        c = self.cfg
        template = _digest(c.template)
        seen = f":images:{c.processor_subfolder}" if c.processor_subfolder else ""
        empty = "" if c.empty_template is None else f":empty{_digest(c.empty_template)}"
        removed = f":rm{_digest(repr(c.caption_remove))}" if c.caption_remove else ""
        return (f"{super()._make_fingerprint()}:llm:t{template}:drop{c.drop_tokens}:layers{self.layers}{seen}"
                f"{empty}{removed}")

    @torch.no_grad()
    def _encode_batch(self, captions: list[str]) -> Conditioning:
        c = self.cfg
        for text in c.caption_remove:
            captions = [caption.replace(text, "") for caption in captions]
        texts = [c.empty_template if not caption and c.empty_template is not None else c.template.replace("{}", caption)
                 for caption in captions]
        tokens = self.tokenizer(texts, padding=c.padding, truncation=True, max_length=c.drop_tokens + c.max_length,
                                add_special_tokens=not self._writes_bos, return_tensors="pt").to(self.device)
        return self._states(tokens, captions)

    @torch.no_grad()
    def encode_with_images(self, captions: list[str], images: list) -> Conditioning:
        """Captions, each with one image (a PIL image or (C, H, W) tensor in [0, 1]) the LLM sees through the
        processor -> Conditioning as :meth:`encode`'s."""
        if self.processor is None:
            raise ValueError("this decoder LLM has no processor: set text_encoder.processor_subfolder (a "
                             "vision-language pipeline's processor) to show it images")
        if len(images) != len(captions):
            raise ValueError(f"encode_with_images takes one image per caption, got {len(images)} for {len(captions)}")
        texts = [self.cfg.template.replace("{}", caption) for caption in captions]
        # The processor reads a PIL image's bytes; a tensor in [0, 1] goes in as those bytes (a uint8 tensor reads
        # as the PIL image does; a float one is resized otherwise).
        images = [(image.float() * 255).round().clamp(0, 255).to(torch.uint8) if isinstance(image, torch.Tensor)
                  else image for image in images]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
        return self._states(inputs, captions)

    def _states(self, inputs, captions: list[str]) -> Conditioning:
        """The LLM on tokenized (and processed) inputs -> the kept states of each text, as a Conditioning."""
        c = self.cfg
        mask = inputs["attention_mask"].bool()
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        out = self._call(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         output_hidden_states=True, **extra)
        layers = [out.hidden_states[k] if k is not None else out.hidden_states[-1] for k in self.layers]
        states = torch.cat(layers, dim=-1)  # (B, T, D * k)
        short = [i for i, n in enumerate(mask.sum(1).tolist()) if n <= c.drop_tokens]
        if short:
            raise ValueError(f"text_encoder.drop_tokens={c.drop_tokens} drops every token of caption "
                             f"{captions[short[0]]!r} as templated: the template's prefix is shorter than that; "
                             "count its tokens with the tokenizer and set drop_tokens to it")
        # max_length: every position, padding included, is a token (FLUX.2's pipelines hand the model all of them)
        keep = torch.ones_like(mask) if c.padding == "max_length" else mask
        rows = [states[i][keep[i]][c.drop_tokens:c.drop_tokens + c.max_length]  # each (n_i, D * k)
                for i in range(len(captions))]
        cond = Conditioning.from_rows(rows, [row.new_zeros(0) for row in rows])
        # from_rows knows from the rows' lengths (host-side) whether any token is padding: kept, so that captions
        # of one length reach attention with no mask, as every other encoder's do.
        return Conditioning(cond.hidden.to(self.device), cond.mask.to(self.device),
                            self._pool(cond.hidden, cond.mask, out).to(self.device), all_valid=cond.all_valid)
