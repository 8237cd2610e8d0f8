"""Frozen text encoders: T5 (as SD3 and FLUX use) or any encoder `transformers.AutoModel` loads.

The encoder turns captions into per-token hidden states, the padding mask and one pooled vector per caption.
It never trains: parameters are frozen and every call runs under `torch.no_grad`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import torch

from flowmatch.dtypes import DTYPES, resolve_dtype
from flowmatch.encoders.conditioning import Conditioning
from flowmatch.encoders.loading import load_pretrained
from flowmatch.errors import choice_error

KINDS = ("t5", "clip", "auto")
POOLINGS = ("mean", "pooler", "first")
# transformers model types each kind's class loads faithfully.
MODEL_TYPES = {"t5": ("t5", "mt5"), "clip": ("clip", "clip_text_model")}


@dataclass
class TextEncoderConfig:
    """The recipe's `text_encoder` section."""

    kind: str = "t5"
    """t5 (transformers T5EncoderModel), clip (CLIPTextModel, the text tower of a CLIP checkpoint) or auto (any
    text encoder transformers.AutoModel loads: BERT, MiniLM, ...)."""
    name_or_path: str = "google/t5-v1_1-xxl"
    """Hub id, local directory, or pkg:<python package>/<subdir> for a model shipped inside an installed package."""
    max_length: int = 256
    """Longest caption in tokens; longer ones are truncated (SD3 uses 256 T5 tokens)."""
    pooling: str = "mean"
    """Pooled vector: mean (masked mean of hidden states), pooler (the model's pooler output, e.g. CLIP) or first token."""
    normalize_pooled: bool = False
    """L2-normalise the pooled vector (sentence-transformers' MiniLM is trained with normalised embeddings)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."""
    cache_size: int = 0
    """Remember the encodings of this many recent distinct captions (useful when captions repeat); 0 = off."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise choice_error("text_encoder.kind", self.kind, KINDS)
        if self.pooling not in POOLINGS:
            raise choice_error("text_encoder.pooling", self.pooling, POOLINGS)
        if self.max_length < 1:
            raise ValueError(f"text_encoder.max_length must be >= 1, got {self.max_length}")
        if self.dtype not in ("auto", *DTYPES):
            raise choice_error("text_encoder.dtype", self.dtype, ("auto", *DTYPES))
        if self.cache_size < 0:
            raise ValueError(f"text_encoder.cache_size must be >= 0, got {self.cache_size}")


class TextEncoder:
    """A frozen caption encoder. `encode(captions) -> Conditioning` on `device`, hidden/pooled in float32."""

    def __init__(self, cfg: TextEncoderConfig, *, device: torch.device | str = "cpu") -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.cfg = cfg
        self.device = torch.device(device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        model_cls = {"t5": T5EncoderModel, "clip": CLIPTextModel, "auto": AutoModel}[cfg.kind]

        def load(path: str):
            # A T5 or CLIP class would load another architecture's checkpoint with random weights and a warning.
            found = AutoConfig.from_pretrained(path).model_type
            if cfg.kind in MODEL_TYPES and found not in MODEL_TYPES[cfg.kind]:
                raise ValueError(f"text_encoder.kind={cfg.kind} but {cfg.name_or_path!r} is a {found!r} model; "
                                 f"set text_encoder.kind=auto (any AutoModel encoder) or point at a {cfg.kind} model")
            return AutoTokenizer.from_pretrained(path), model_cls.from_pretrained(path, dtype=dtype)

        self.tokenizer, self.model = load_pretrained("text encoder", cfg.name_or_path, load,
                                                     key="text_encoder.name_or_path")
        self.model.to(self.device).eval().requires_grad_(False)
        if cfg.pooling == "pooler" and getattr(self._run(["a photo"]), "pooler_output", None) is None:
            raise ValueError(f"text_encoder.pooling=pooler but {cfg.name_or_path!r} has no pooler output; use mean")
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._fingerprint = self._make_fingerprint()

    @property
    def hidden_size(self) -> int:
        """D of `Conditioning.hidden`."""
        config = getattr(self.model.config, "text_config", self.model.config)  # two-tower configs nest it
        return int(config.hidden_size if hasattr(config, "hidden_size") else config.d_model)

    @property
    def pooled_size(self) -> int:
        """Dp of `Conditioning.pooled` (same as hidden_size for mean and first-token pooling)."""
        return self.hidden_size

    def fingerprint(self) -> str:
        """Identifies the encoder and its settings, so cached features from another encoder are refused."""
        return self._fingerprint

    def _make_fingerprint(self) -> str:
        config = json.dumps(self.model.config.to_dict(), sort_keys=True, default=str)
        digest = hashlib.sha256(config.encode()).hexdigest()[:12]
        c = self.cfg
        return f"{c.kind}:{c.name_or_path}:len{c.max_length}:{c.pooling}:norm{int(c.normalize_pooled)}:{digest}"

    @torch.no_grad()
    def _run(self, captions: list[str]):
        """Tokenize and run the model: (the model's output, attention mask (B, L) bool)."""
        tokens = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        out.mask = tokens["attention_mask"].bool()
        return out

    @torch.no_grad()
    def _encode_batch(self, captions: list[str]) -> Conditioning:
        out = self._run(captions)
        mask = out.mask
        hidden = out.last_hidden_state.float() * mask[..., None]  # (B, L, D), zero at padding
        if self.cfg.pooling == "mean":
            pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        elif self.cfg.pooling == "first":
            pooled = hidden[:, 0]
        else:
            pooled = out.pooler_output.float()
        if self.cfg.normalize_pooled:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return Conditioning(hidden, mask, pooled)

    def encode(self, captions: list[str]) -> Conditioning:
        """Encode captions. hidden (B, L, D) with L the longest caption's token count, mask (B, L), pooled (B, Dp)."""
        if not self.cfg.cache_size:
            return self._encode_batch(list(captions))
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        # One caption at a time: a cached embedding must not depend on the batch (padding) it first came in with,
        # or a resumed run, whose cache starts empty, would drift from an uninterrupted one.
        for caption in missing:
            fresh = self._encode_batch([caption])
            self._cache[caption] = (fresh.hidden[0].clone(), fresh.pooled[0].clone())
        for caption in captions:
            self._cache.move_to_end(caption)
        hidden, pooled = zip(*(self._cache[c] for c in captions))
        while len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)
        return Conditioning.from_rows(hidden, pooled).to(self.device)
