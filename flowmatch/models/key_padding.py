"""The text key-padding mask in the form the attention kernel takes: a boolean SDPA mask or a FlexAttention
``BlockMask``.

A boolean (or float) ``attn_mask`` rules out SDPA's flash kernels on CUDA; FlexAttention keeps a fused kernel for
padded text when compiled (``torch.nn.attention.flex_attention``), skipping the key blocks that are padding in a
row. Which kernel a model uses is the attention setting (``ATTENTION_KERNELS``):

- ``sdpa``: the boolean mask (B, 1, 1, S) through ``scaled_dot_product_attention`` (every device, every mode);
- ``flex``: a ``BlockMask`` through ``flex_attention``. Uncompiled, flex materialises the whole score matrix (as
  SDPA's math kernel does), and torch has no flex backward pass on CPU: training with it needs CUDA;
- ``auto`` (the default): flex where it pays, on CUDA with compiled blocks (``models.parallelize.apply_compile``);
  SDPA elsewhere.

Only keys are ever masked (image and reference tokens are always valid, text padding never is), so the mask does
not depend on the query: one mask per batch serves every block, and the blocks whose queries are the image tokens
alone (SD3's last joint block) take the same mask built for that query length. Nothing here reads the device:
the kernel is chosen from host facts (the setting, the device type, whether the blocks are compiled) and the block
mask is built from the device mask with device operations.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

#: The attention settings (``train.attention``; :func:`uses_flex` resolves ``auto``).
ATTENTION_KERNELS = ("auto", "sdpa", "flex")

#: What a block receives as its attention mask: None (no padding), an SDPA boolean mask or a flex BlockMask.
AttentionMask = Optional[Union[Tensor, BlockMask]]


def uses_flex(kernel: str, *, device_type: str, compiled: bool) -> bool:
    """Whether the attention setting ``kernel`` means FlexAttention for padded text on ``device_type``, with the
    blocks ``compiled`` or not (host facts only)."""
    return kernel == "flex" or (kernel == "auto" and device_type == "cuda" and compiled)


def key_padding_mask(keep: Tensor, query_len: int, *, flex: bool) -> Union[Tensor, BlockMask]:
    """The attention mask of keys ``keep`` (B, S) bool (True = attend) for ``query_len`` queries.

    -> (B, 1, 1, S) bool for SDPA (broadcast over heads and queries), or, with ``flex``, a ``BlockMask`` of
    (B, 1 head (shared), query_len, S) whose mask_mod reads ``keep[b, kv]``: row b of the batch, key kv.
    """
    if not flex:
        return keep[:, None, None, :]

    def attend(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return keep[b, kv]

    return create_block_mask(attend, keep.shape[0], None, query_len, keep.shape[1], device=keep.device)
