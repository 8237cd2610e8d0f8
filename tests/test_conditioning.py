"""The one conditioning type: padding, stacking, concatenation and row replacement keep padding masked out."""

import pytest
import torch

from flowmatch.conditioning import Conditioning


def _cond(batch: int, length: int, seed: int, real: int | None = None) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, : real or length] = True
    return Conditioning(torch.randn(batch, length, 4, generator=g) * mask[..., None], mask,
                        torch.randn(batch, 3, generator=g))


def test_cat_pads_every_item_to_the_longest_with_masked_zeros():
    a, null = _cond(2, 3, seed=0), _cond(1, 5, seed=1, real=2)
    both = Conditioning.cat([a, null.expand(2)])
    assert both.hidden.shape == (4, 5, 4) and both.mask.shape == (4, 5) and both.pooled.shape == (4, 3)
    assert not both.mask[:2, 3:].any() and both.hidden[:2, 3:].abs().sum() == 0
    torch.testing.assert_close(both.hidden[:2, :3], a.hidden)
    torch.testing.assert_close(both.hidden[2:], null.hidden.expand(2, 5, 4))
    with pytest.raises(ValueError, match="only batch 1 expands"):
        a.expand(3)


def test_from_rows_stacks_ragged_rows_as_float32():
    rows = [torch.ones(2, 4, dtype=torch.bfloat16), torch.full((3, 4), 2.0, dtype=torch.bfloat16)]
    c = Conditioning.from_rows(rows, [torch.zeros(3), torch.ones(3)])
    assert c.hidden.dtype == torch.float32 and c.hidden.shape == (2, 3, 4)
    assert c.mask.tolist() == [[True, True, False], [True, True, True]]
    assert c.hidden[0, 2].abs().sum() == 0 and torch.equal(c.pooled[1], torch.ones(3))
    assert Conditioning.from_rows([torch.zeros(0, 4)], [torch.zeros(3)]).length == 1  # an empty caption: one slot


def test_where_replaces_rows_and_extras_travel_with_them():
    a = _cond(3, 4, seed=0)
    a.extra["guidance"] = torch.tensor([1.0, 2.0, 3.0])
    null = _cond(1, 6, seed=1, real=1)
    null.extra["guidance"] = torch.tensor([0.0])
    out = a.where(torch.tensor([False, True, False]), null)
    assert out.length == 6 and out.extra["guidance"].tolist() == [1.0, 0.0, 3.0]
    torch.testing.assert_close(out.hidden[1], null.hidden[0])
    assert out.mask[1].tolist() == [True] + [False] * 5 and not out.mask[0, 4:].any()
    torch.testing.assert_close(out.hidden[0, :4], a.hidden[0])


def test_bad_shapes_name_the_field():
    with pytest.raises(ValueError, match="mask must be bool"):
        Conditioning(torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="pooled"):
        Conditioning(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="extra input 'guidance'"):
        Conditioning(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 5),
                     {"guidance": torch.zeros(3)})


def test_to_casts_floats_and_keeps_the_mask_bool():
    c = _cond(2, 3, seed=0).to(dtype=torch.bfloat16)
    assert c.hidden.dtype == c.pooled.dtype == torch.bfloat16 and c.mask.dtype == torch.bool
