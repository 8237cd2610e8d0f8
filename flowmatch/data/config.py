"""The recipe's `data` section: where the shards are and how they are streamed.

The defaults describe no particular data set (256x256 RGB from `data/shards`, never built automatically); a
recipe names its shards, and `prepare` names a task (flowmatch.tasks) whose builder writes them when missing, as
recipes/digits.yaml does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Union

from flowmatch.data.opener import RetryPolicy
from flowmatch.data.shardformat import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES, MIB
from flowmatch.errors import choice_error
from flowmatch.tasks import check_task_name

CHANNELS = (1, 3)
CACHE_DTYPES = ("bf16", "fp16", "fp32")  # flowmatch.data.features.DTYPES
TEXT_QUANTS = ("", "int8", "fp8")  # flowmatch.data.quantize.KINDS, or none
DEFAULT_SHARDS = "data/shards"


@dataclass
class SourceConfig:
    """One entry of `data.sources`: a data set mixed into training by weight."""

    shards: str = ""
    """This source's shards (the forms data.shards takes); its val-* shards are its held-out split."""
    weight: float = 1.0
    """Share of training samples drawn from this source (weights are normalised over the sources)."""
    caption_key: str = ""
    """Where the caption is: a member extension (txt) or a field of the .json; '' = .txt, else .json caption/text."""
    val_shards: str = ""
    """Held-out shards of this source; empty = its val-* shards, or the keys data.holdout_fraction sets aside."""
    name: str = ""
    """Name in logs (per-source sample counts, validation loss); '' = source<i>."""

    def __post_init__(self) -> None:
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ValueError("each data.sources entry needs shards: a directory, glob, brace pattern, URL or pipe:")
        if not self.weight > 0:
            raise ValueError(f"data.sources weight must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """The recipe's `data` section."""

    shards: str = DEFAULT_SHARDS
    """Training shards: a directory of .tar shards, a glob, a brace pattern (x-{000000..000009}.tar), http(s) URLs or
    pipe: commands; '::' joins several. Shards named val-* are the held-out split, never trained on."""
    val_shards: str = ""
    """Held-out shards for validation loss and eval (same forms as shards); empty = the val-* shards among shards, or
    the keys holdout_fraction sets aside."""
    holdout_fraction: float = 0.0
    """When there are no val shards: this fraction of keys (chosen by a stable hash of the key) is held out of training
    and forms the val split."""
    prepare: str = ""
    """A task (flowmatch.tasks) whose builder writes the shards into the shards directory when it holds none, e.g.
    digits; '' = never build."""
    resolution: Union[int, list[int]] = 256
    """Training image size in pixels: the side of a square, or [height, width]; with buckets, their common area."""
    channels: int = 3
    """Image channels the model sees: 1 (grayscale) or 3 (RGB); images are converted on load."""
    masks: bool = True
    """Read per-sample loss masks (a sample's mask.png: ``flowmatch-data folder`` stores NAME.mask.png as it;
    flowmatch/data/masks.py): the loss then counts inside them only. Cached features carry them
    (``flowmatch-data encode``)."""
    alpha_masks: bool = False
    """With ``masks``, a sample without a mask.png takes its image's alpha channel as its mask. Off by default:
    transparency is often not meant as one (product photos cut out on a transparent background would train on
    the object alone); a NAME.mask.png is."""
    shuffle: bool = True
    """Shuffle shards and samples (seeded, reproducible); the val split is never shuffled."""
    shuffle_buffer: int = 1000
    """Samples each loader worker mixes in its shuffle buffer (larger = better mixing, more memory)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead of the trainer."""
    resampled: bool = False
    """Draw shards with replacement per worker instead of epochs (multi-node runs over few or uneven shards); the stream
    is still seeded and resumable."""
    buckets: int = 0
    """Aspect-ratio buckets: 0 = resize and center-crop everything to resolution; n >= 1 = n resolutions of about
    resolution's area (equal token counts), each image goes to the nearest aspect and each batch to one bucket."""
    bucket_max_aspect: float = 2.0
    """Widest bucket aspect (width / height); the tallest is its inverse."""
    bucket_multiple: int = 16
    """Bucket sides are multiples of this (autoencoder downsampling x patch size, 8 x 2 for SD3-style VAEs)."""
    drop_last: bool = False
    """Drop each worker's final partial batch of an epoch (uniform batch shapes; those samples skip that epoch)."""
    cached: Union[bool, str] = "auto"
    """Shards hold precomputed latents and text embeddings (flowmatch-data encode): true, false, or auto (look at
    the first sample)."""
    cache: str = ""
    """A directory of cached features of `shards` (val-* included) made with this recipe's encoders: encoded when
    missing or incomplete, then read instead of `shards` (the encoders are freed once training starts); '' = off."""
    cache_dtype: str = "bf16"
    """Storage dtype of the features `cache` makes: bf16, fp16 or fp32."""
    cache_text_quant: str = ""
    """'' = text features stored in cache_dtype; int8 or fp8 = one byte per value with a per-token scale (about
    half of bf16's size; flowmatch.data.quantize)."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Images with more pixels (width x height, read from the header before decoding) are skipped as oversized."""
    max_member_mb: int = MAX_MEMBER_BYTES // MIB
    """Tar members larger than this many MiB are skipped unread."""
    caption_key: str = ""
    """Where the caption is: a member extension (txt) or a field of the .json; '' = .txt, else .json caption/text."""
    paired: bool = False
    """Editing data: each sample pairs its target image with reference images (ref.EXT, ref_1.EXT, ...;
    flowmatch.data.shardformat) and an instruction caption; samples without them are skipped as bad. Only for a
    family with reference support."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture instead of data.shards: [{shards, weight, caption_key, val_shards, name}, ...]; each
    worker draws every next sample's source by weight (seeded, resumable); validation reads each source's split."""
    remote: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries, back-off and timeout for http(s) and pipe: shards."""
    stored_in: ClassVar[str] = ""
    """Not a recipe key: where a recipe read back from disk was stored (set by flowmatch.config.recipe_from_yaml);
    such a recipe's shards may not run commands (flowmatch.data.trust)."""

    def __post_init__(self) -> None:
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ValueError("data.shards must name shards: a directory, glob, brace pattern, URL or pipe: command")
        check_task_name(self.prepare, "data.prepare", also=("",))
        if self.channels not in CHANNELS:
            raise ValueError(f"data.channels must be one of {CHANNELS}, got {self.channels!r}")
        if not (isinstance(self.cached, bool) or self.cached == "auto"):
            raise ValueError(f"data.cached must be true, false or 'auto', got {self.cached!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise choice_error("data.cache_dtype", self.cache_dtype, CACHE_DTYPES)
        if self.cache_text_quant not in TEXT_QUANTS:
            raise choice_error("data.cache_text_quant", self.cache_text_quant, TEXT_QUANTS)
        if self.cache and self.val_shards:
            raise ValueError("data.cache holds the val-* shards of data.shards: set data.val_shards='' with it")
        height, width = resolution_hw(self.resolution)
        if height < 1 or width < 1:
            raise ValueError(f"data.resolution must be positive, got {self.resolution!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"data.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (1 = no sample shuffling), got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.buckets < 0:
            raise ValueError(f"data.buckets must be 0 (off) or a number of buckets >= 1, got {self.buckets}")
        if self.bucket_max_aspect < 1.0:
            raise ValueError(f"data.bucket_max_aspect must be >= 1, got {self.bucket_max_aspect}")
        if self.bucket_multiple < 1:
            raise ValueError(f"data.bucket_multiple must be >= 1, got {self.bucket_multiple}")
        if self.max_image_pixels < 1 or self.max_member_mb < 1:
            raise ValueError("data.max_image_pixels and data.max_member_mb must be >= 1")
        if self.sources and self.shards != DEFAULT_SHARDS:
            raise ValueError("data.shards and data.sources are alternatives: name the shards in data.sources[].shards")
        if self.sources and (self.prepare or self.val_shards):
            raise ValueError("with data.sources, set no data.prepare or data.val_shards "
                             "(use data.sources[].val_shards)")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of `resolution`."""
        return resolution_hw(self.resolution)

    @property
    def read_from(self) -> str:
        """The shards the loader reads: the cache when there is one, else `shards`."""
        return self.cache or self.shards

    @property
    def max_member_bytes(self) -> int:
        """`max_member_mb` in bytes."""
        return self.max_member_mb * MIB


def resolution_hw(resolution: Union[int, list[int], tuple[int, ...]]) -> tuple[int, int]:
    """(height, width) from an int side or a [height, width] pair; ValueError otherwise."""
    if isinstance(resolution, bool):
        raise ValueError(f"data.resolution must be an int or [height, width], got {resolution!r}")
    if isinstance(resolution, int):
        return resolution, resolution
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in resolution
    ):
        return int(resolution[0]), int(resolution[1])
    raise ValueError(f"data.resolution must be an int or [height, width], got {resolution!r}")
