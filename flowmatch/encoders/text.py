"""Frozen text encoders: T5 and CLIP (as SD3 and FLUX use them) or any encoder `transformers.AutoModel` loads;
decoder LLMs behind a chat template (kind ``decoder_llm``) are :mod:`flowmatch.encoders.decoder_llm`'s.

One encoder turns captions into per-token hidden states, the padding mask and one pooled vector per caption, as
a :class:`Conditioning` of its own; :mod:`flowmatch.encoders.text_set` combines several. It never trains:
parameters are frozen and every call runs under `torch.no_grad`.

Three ways to pad (``padding``): ``longest`` pads a batch to its longest caption, gives the encoder the attention
mask and masks the padding out of the model's attention (and out of cached features); ``max_length`` is how
diffusers' SD3 and FLUX pipelines run their encoders: every caption padded to ``max_length``, no attention mask,
and every position, padding included, a token the model attends to; ``max_length_plus_one`` is how Chroma's
pipeline runs its T5: padded to ``max_length``, the encoder given the attention mask, and the model attending to
the real tokens and the first padding token only (the rest masked out, as ``longest`` masks them).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.dtypes import DTYPES, resolve_dtype
from flowmatch.encoders.loading import load_pretrained
from flowmatch.errors import choice_error
from flowmatch.quantize import QUANTIZATIONS, missing_backend, quantize_frozen

KINDS = ("t5", "clip", "auto", "decoder_llm")
POOLINGS = ("mean", "pooler", "first", "projection", "none")
PADDINGS = ("longest", "max_length", "max_length_plus_one")
DROPPED = ("empty", "zeros")
# transformers model types each kind's class loads faithfully.
MODEL_TYPES = {"t5": ("t5", "mt5"), "clip": ("clip", "clip_text_model")}
# The transformers class each kind loads with.
MODEL_CLASSES = {"t5": "T5EncoderModel", "clip": "CLIPTextModel", "auto": "AutoModel"}


@dataclass
class TextEncoderConfig:
    """The recipe's `text_encoder` section."""

    kind: str = "t5"
    """t5 (transformers T5EncoderModel), clip (CLIPTextModel, the text tower of a CLIP checkpoint), auto (any
    text encoder transformers.AutoModel loads: BERT, MiniLM, ...) or decoder_llm (a causal LLM behind a chat
    template: Qwen2.5-VL for Qwen-Image; flowmatch.encoders.decoder_llm)."""
    name_or_path: str = "google/t5-v1_1-xxl"
    """Hub id, local directory, or pkg:<python package>/<subdir> for a model shipped inside an installed package;
    from_init = model.init_from's pipeline (flowmatch.config.resolve_from_init)."""
    subfolder: str = ""
    """Subfolder of name_or_path holding the encoder (a diffusers pipeline's text_encoder_2, ...); '' = itself."""
    tokenizer_subfolder: Optional[str] = None
    """Subfolder holding the tokenizer (a pipeline's tokenizer_2, ...); None = the encoder's subfolder."""
    max_length: int = 256
    """Longest caption in tokens; longer ones are truncated (SD3 uses 256 T5 tokens, FLUX 512, CLIP 77)."""
    padding: str = "longest"
    """longest (attention mask, padding masked out), max_length (no mask, every position a token: the
    SD3 / FLUX pipelines' way) or max_length_plus_one (attention mask, the first padding token kept visible:
    Chroma's pipeline); see the module docstring."""
    hidden_layer: Optional[int] = None
    """Per-token states: None = the model's output (after any final norm), or an index into its hidden states
    (-2 = the penultimate layer, as SD3 takes from CLIP)."""
    pooling: str = "mean"
    """Pooled vector: mean (masked mean of hidden states), pooler (the model's pooler output, e.g. CLIP), first
    token, projection (CLIPTextModelWithProjection's projected pooled output, as SD3), or none (no pooled vector:
    width 0, for models that take none, e.g. Qwen-Image)."""
    normalize_pooled: bool = False
    """L2-normalise the pooled vector (sentence-transformers' MiniLM is trained with normalised embeddings)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."""
    cache_size: int = 0
    """Remember the encodings of this many recent distinct captions (useful when captions repeat); 0 = off."""
    caption_dropout: Optional[float] = None
    """Probability that training replaces this encoder's output by its null, independently of the other
    encoders; None = flow.caption_dropout."""
    dropped: str = "empty"
    """This encoder's output for a dropped caption: empty (its encoding of the empty caption, the pipelines'
    negative prompt) or zeros (as StableDiffusion3Pipeline gives without its T5)."""
    template: str = "{}"
    """decoder_llm: the text the LLM reads, with {} where the caption goes (a chat template: Qwen-Image's system
    prompt and turns)."""
    drop_tokens: int = 0
    """decoder_llm: leading tokens of every text whose states are dropped (the template's fixed prefix:
    QwenImagePipeline's drop_idx, 34); max_length counts the tokens after them."""
    stack_layers: list[int] = field(default_factory=list)
    """decoder_llm: hidden layers whose states are concatenated along the width, in this order (FLUX.2 takes
    three); [] = hidden_layer's states alone."""
    model_class: Optional[str] = None
    """decoder_llm: the transformers class to load (e.g. Qwen2_5_VLForConditionalGeneration); None = the
    checkpoint config's architectures[0]."""
    empty_template: Optional[str] = None
    """decoder_llm: the text the LLM reads for the empty caption (the unconditional input, caption dropout's
    replacement); None = the template with nothing in it. Lumina2Pipeline reads its empty negative prompt as ''
    alone, without the system prompt its prompts get."""
    caption_remove: list[str] = field(default_factory=list)
    """decoder_llm: strings removed from every caption before it goes into the template (Flux2Pipeline removes
    Pixtral's image placeholder ``[IMG]``, which a text-only call cannot fill); [] = none."""
    processor_subfolder: Optional[str] = None
    """decoder_llm: subfolder of the processor (Qwen2VLProcessor) through which a vision-language LLM also sees
    images (Qwen-Image-Edit's reference image; the template then holds its image placeholder); None = text only."""
    quantize: Optional[str] = None
    """Hold the encoder's linear weights quantised: int8 | fp8 (torchao, weight-only, per row) | nf4
    (bitsandbytes); null = in its dtype. Its features change slightly, so caches record it."""
    offload: bool = False
    """Keep the encoder in CPU memory between uses and move it to the device for each batch of captions: its
    device memory is free while the model trains, for a copy per encode (not needed with cached features, which
    free the encoders)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise choice_error("text_encoder.kind", self.kind, KINDS)
        if self.pooling not in POOLINGS:
            raise choice_error("text_encoder.pooling", self.pooling, POOLINGS)
        if self.pooling == "projection" and self.kind != "clip":
            raise ValueError(f"text_encoder.pooling=projection needs text_encoder.kind=clip, got {self.kind!r}; "
                             "use pooling=mean")
        if self.padding not in PADDINGS:
            raise choice_error("text_encoder.padding", self.padding, PADDINGS)
        if self.dropped not in DROPPED:
            raise choice_error("text_encoder.dropped", self.dropped, DROPPED)
        if self.caption_dropout is not None and not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"text_encoder.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.max_length < 1:
            raise ValueError(f"text_encoder.max_length must be >= 1, got {self.max_length}")
        if self.dtype not in ("auto", *DTYPES):
            raise choice_error("text_encoder.dtype", self.dtype, ("auto", *DTYPES))
        if self.cache_size < 0:
            raise ValueError(f"text_encoder.cache_size must be >= 0, got {self.cache_size}")
        llm_only = {"template": self.template != "{}", "drop_tokens": self.drop_tokens != 0,
                    "stack_layers": bool(self.stack_layers), "model_class": self.model_class is not None,
                    "processor_subfolder": self.processor_subfolder is not None,
                    "empty_template": self.empty_template is not None, "caption_remove": bool(self.caption_remove)}
        if self.kind != "decoder_llm" and any(llm_only.values()):
            wrong = [k for k, v in llm_only.items() if v]
            raise ValueError(f"text_encoder.{wrong[0]} is for text_encoder.kind=decoder_llm (a chat-template LLM), "
                             f"got kind={self.kind!r}: remove it or set kind: decoder_llm")
        if self.template.count("{}") != 1:
            raise ValueError(f"text_encoder.template must hold one {{}} where the caption goes, got {self.template!r}")
        if self.drop_tokens < 0:
            raise ValueError(f"text_encoder.drop_tokens must be >= 0, got {self.drop_tokens}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZATIONS:
                raise choice_error("text_encoder.quantize", self.quantize, QUANTIZATIONS)
            package = missing_backend(self.quantize)
            if package is not None:
                raise ValueError(f"text_encoder.quantize: {self.quantize} needs the {package} package, which is "
                                 f"not installed: pip install {package} (or remove quantize)")


class TextEncoder:
    """A frozen caption encoder. `encode(captions) -> Conditioning` on `device`, hidden/pooled in float32."""

    def __init__(self, cfg: TextEncoderConfig, *, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self._home = torch.device("cpu") if cfg.offload else self.device  # where the weights wait between uses
        self.tokenizer, self.model = load_pretrained("text encoder", cfg.name_or_path, self._load,
                                                     key="text_encoder.name_or_path")
        self.model.to(self._home).eval().requires_grad_(False)
        if cfg.quantize is not None:
            quantize_frozen(self.model, cfg.quantize)
        if cfg.pooling == "pooler" and getattr(self._run(["a photo"]), "pooler_output", None) is None:
            raise ValueError(f"text_encoder.pooling=pooler but {cfg.name_or_path!r} has no pooler output; use mean")
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._fingerprint = self._make_fingerprint()

    def _load(self, path: str):
        """(tokenizer, model) of the resolved path, the model in the recipe's dtype."""
        # reason: transformers' import costs seconds; only runs that load an encoder pay it.
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        cfg = self.cfg
        # Only the class the kind needs is resolved (transformers loads a model family's module on first access).
        model_cls = getattr(transformers, "CLIPTextModelWithProjection" if cfg.pooling == "projection"
                            else MODEL_CLASSES[cfg.kind])
        # A T5 or CLIP class would load another architecture's checkpoint with random weights and a warning.
        found = AutoConfig.from_pretrained(path, subfolder=cfg.subfolder).model_type
        if cfg.kind in MODEL_TYPES and found not in MODEL_TYPES[cfg.kind]:
            raise ValueError(f"text_encoder.kind={cfg.kind} but {cfg.name_or_path!r} is a {found!r} model; "
                             f"set text_encoder.kind=auto (any AutoModel encoder) or point at a {cfg.kind} model")
        return (AutoTokenizer.from_pretrained(path, subfolder=self.tokenizer_subfolder),
                model_cls.from_pretrained(path, subfolder=cfg.subfolder, dtype=resolve_dtype(cfg.dtype, self.device)))

    @property
    def tokenizer_subfolder(self) -> str:
        """Where the tokenizer is: its own subfolder, else the encoder's."""
        return self.cfg.subfolder if self.cfg.tokenizer_subfolder is None else self.cfg.tokenizer_subfolder

    @property
    def sees_images(self) -> bool:
        """Whether it also reads an image per caption (a vision-language LLM with its processor:
        ``encode_with_images``); plain text encoders do not."""
        return False

    @property
    def hidden_size(self) -> int:
        """D of `Conditioning.hidden`."""
        config = getattr(self.model.config, "text_config", self.model.config)  # two-tower configs nest it
        return int(config.hidden_size if hasattr(config, "hidden_size") else config.d_model)

    @property
    def pooled_size(self) -> int:
        """Dp of `Conditioning.pooled` (same as hidden_size except for CLIP's projection, and 0 for none)."""
        if self.cfg.pooling == "none":
            return 0
        if self.cfg.pooling == "projection":
            return int(self.model.config.projection_dim)
        return self.hidden_size

    def fingerprint(self) -> str:
        """Identifies the encoder and its settings, so cached features from another encoder are refused."""
        return self._fingerprint

    def release(self) -> None:
        """Free the weights and tokenizer (training on cached features needs them no more); encoding then fails."""
        self.model = self.tokenizer = None
        self._cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _make_fingerprint(self) -> str:
        config = json.dumps(self.model.config.to_dict(), sort_keys=True, default=str)
        digest = hashlib.sha256(config.encode()).hexdigest()[:12]
        c = self.cfg
        where = f"{c.name_or_path}/{c.subfolder}" if c.subfolder else c.name_or_path
        # The pre-existing settings keep their old spelling, so features cached before the new ones existed stay valid.
        extras = "" if (c.padding, c.hidden_layer) == ("longest", None) else f":{c.padding}:layer{c.hidden_layer}"
        extras += "" if c.quantize is None else f":{c.quantize}"
        return f"{c.kind}:{where}:len{c.max_length}:{c.pooling}:norm{int(c.normalize_pooled)}{extras}:{digest}"

    @torch.no_grad()
    def _run(self, captions: list[str]):
        """Tokenize and run the model: (the model's output, attention mask (B, L) bool)."""
        padding = self.cfg.padding
        fixed = padding == "max_length"
        tokens = self.tokenizer(captions, padding="longest" if padding == "longest" else "max_length",
                                truncation=True, max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
        given = tokens["attention_mask"]
        # The SD3 / FLUX pipelines run their encoders without an attention mask: padding positions attend and are
        # attended to. Chroma's gives its T5 the mask, then lets the model see one padding token past the caption.
        if fixed:
            mask = torch.ones_like(tokens["input_ids"], dtype=torch.bool)
        elif padding == "max_length_plus_one":
            positions = torch.arange(given.shape[1], device=given.device)
            mask = positions[None, :] <= given.sum(dim=1, keepdim=True)  # (B, L): real tokens and the first pad
        else:
            mask = given.bool()
        out = self._call(input_ids=tokens["input_ids"], attention_mask=None if fixed else given,
                         output_hidden_states=self.cfg.hidden_layer is not None)
        out.mask = mask
        return out

    def _call(self, **inputs):
        """The model on ``inputs``; with ``offload`` it is moved in for this call and back to the CPU after it
        (otherwise it is already on the device and both moves are no-ops)."""
        self.model.to(self.device)
        try:
            return self.model(**inputs)
        finally:
            self.model.to(self._home)

    @torch.no_grad()
    def _encode_batch(self, captions: list[str]) -> Conditioning:
        out = self._run(captions)
        mask = out.mask
        states = out.last_hidden_state if self.cfg.hidden_layer is None else out.hidden_states[self.cfg.hidden_layer]
        hidden = states.float() * mask[..., None]  # (B, L, D), zero at padding
        # No padding, known without reading the mask: fixed-length padding attends to every position, and one
        # caption padded to its own length has none (Chroma's max_length_plus_one pads and masks whatever the count).
        all_valid = self.cfg.padding == "max_length" or (self.cfg.padding == "longest" and len(captions) == 1)
        return Conditioning(hidden, mask, self._pool(hidden, mask, out), all_valid=all_valid)

    def _pool(self, hidden, mask, out) -> torch.Tensor:
        """The pooled vector (B, Dp) of zero-padded states hidden (B, L, D) with mask (B, L)."""
        if self.cfg.pooling == "none":
            return hidden.new_zeros(hidden.shape[0], 0)
        if self.cfg.pooling == "mean":
            pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        elif self.cfg.pooling == "first":
            pooled = hidden[:, 0]
        elif self.cfg.pooling == "projection":
            pooled = out.text_embeds.float()
        else:
            pooled = out.pooler_output.float()
        if self.cfg.normalize_pooled:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled

    def encode(self, captions: list[str]) -> Conditioning:
        """Encode captions. hidden (B, L, D) with L the longest caption's token count, mask (B, L), pooled (B, Dp)."""
        if not self.cfg.cache_size:
            return self._encode_batch(list(captions))
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        # One caption at a time: a cached embedding must not depend on the batch (padding) it first came in with,
        # or a resumed run, whose cache starts empty, would drift from an uninterrupted one.
        for caption in missing:
            fresh = self._encode_batch([caption])
            # the visible tokens only (a prefix): the masked-out padding is padding again when rows are stacked
            self._cache[caption] = (fresh.hidden[0][fresh.mask[0]].clone(), fresh.pooled[0].clone())
        for caption in captions:
            self._cache.move_to_end(caption)
        hidden, pooled = zip(*(self._cache[c] for c in captions))
        while len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)
        return Conditioning.from_rows(hidden, pooled).to(self.device)
