"""Several text encoders in one recipe: their sub-configs, where each one's output lies in the combined
conditioning, and caption dropout per encoder (no model is loaded here; tests/test_from_diffusers.py runs them)."""

from __future__ import annotations

import pytest
import torch

from flowmatch.conditioning import Conditioning
from flowmatch.config import RecipeError, load_recipe, recipe_from_yaml, to_yaml
from flowmatch.encoders.combine import EncoderShape, combine_outputs, combined_sizes, parts
from flowmatch.families import text_layout
from flowmatch.flow import drop_captions

SD3_SHAPES = {"clip_l": EncoderShape("clip", 77, 32, 32), "clip_g": EncoderShape("clip", 77, 48, 48),
              "t5": EncoderShape("t5", 256, 96, 96)}
SD3_KINDS = {n: s.kind for n, s in SD3_SHAPES.items()}
SD3_OVERRIDES = [
    "text_encoders.combine=sd3",
    "text_encoders.encoders.clip_l={kind: clip, subfolder: text_encoder, max_length: 77, padding: max_length, "
    "hidden_layer: -2, pooling: projection}",
    "text_encoders.encoders.clip_g={kind: clip, subfolder: text_encoder_2, max_length: 77, padding: max_length, "
    "hidden_layer: -2, pooling: projection}",
    "text_encoders.encoders.t5={kind: t5, subfolder: text_encoder_3, max_length: 256, padding: max_length, "
    "dropped: zeros, caption_dropout: 0.3}",
]


def _outputs(batch: int, seed: int, shapes=SD3_SHAPES) -> dict[str, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    return {n: Conditioning(torch.randn(batch, s.tokens, s.hidden, generator=g),
                            torch.ones(batch, s.tokens, dtype=torch.bool), torch.randn(batch, s.pooled, generator=g))
            for n, s in shapes.items()}


def test_recipe_with_several_encoders_round_trips_and_names_bad_keys():
    recipe = load_recipe(None, SD3_OVERRIDES)
    assert list(recipe.text.encoders) == ["clip_l", "clip_g", "t5"] and recipe.text.combine == "sd3"
    t5 = recipe.text.encoders["t5"]
    assert (t5.dropped, t5.caption_dropout, recipe.text.encoders["clip_g"].subfolder) == ("zeros", 0.3,
                                                                                    "text_encoder_2")
    assert recipe_from_yaml(to_yaml(recipe)) == recipe
    # Without text_encoders.encoders the text_encoder section is the only encoder.
    plain = load_recipe(None, [])
    assert plain.text.combine == "single" and plain.text.encoders == {"text_encoder": plain.text_encoder}
    with pytest.raises(RecipeError, match=r"max_lenght.*'text_encoders.encoders.t5.max_length'"):
        load_recipe(None, [*SD3_OVERRIDES, "text_encoders.encoders.t5.max_lenght=3"])
    with pytest.raises(RecipeError, match="padding=max_length"):
        load_recipe(None, [*SD3_OVERRIDES, "text_encoders.encoders.t5.padding=longest"])
    with pytest.raises(RecipeError, match="kind clip and one of kind t5"):
        load_recipe(None, [*SD3_OVERRIDES, "text_encoders.combine=flux"])
    with pytest.raises(RecipeError, match="did you mean 'flux'"):
        load_recipe(None, [*SD3_OVERRIDES, "text_encoders.combine=flx"])


def test_sd3_layout_of_each_encoder():
    assert combined_sizes(text_layout("sd3"), SD3_SHAPES) == (96, 80)
    outputs = _outputs(2, 0)
    cond = combine_outputs(text_layout("sd3"), outputs, SD3_KINDS)
    assert cond.hidden.shape == (2, 77 + 256, 96) and cond.pooled.shape == (2, 80)
    for part in parts(text_layout("sd3"), SD3_SHAPES):
        out = outputs[part.name]
        region = cond.hidden[:, part.tokens, part.hidden]
        if part.name == "t5":
            assert torch.equal(region, out.hidden)
        else:  # the CLIP states side by side on the first 77 tokens
            assert torch.equal(region, out.hidden) and torch.equal(cond.pooled[:, part.pooled], out.pooled)
    assert cond.hidden[:, :77, 80:].abs().max() == 0  # zero padding up to T5's width
    flux_shapes = {"clip_l": SD3_SHAPES["clip_l"], "t5": SD3_SHAPES["t5"]}
    flux = combine_outputs(text_layout("flux"), {n: outputs[n] for n in flux_shapes},
                           {n: SD3_KINDS[n] for n in flux_shapes}, guidance=1.0)
    assert torch.equal(flux.hidden, outputs["t5"].hidden) and torch.equal(flux.pooled, outputs["clip_l"].pooled)
    assert torch.equal(flux.extra["guidance"], torch.ones(2))


def test_caption_dropout_drops_each_encoder_alone_and_independently():
    shapes = SD3_SHAPES
    sd3 = text_layout("sd3")
    cond, null = combine_outputs(sd3, _outputs(64, 1), SD3_KINDS), combine_outputs(sd3, _outputs(1, 2), SD3_KINDS)
    layout = parts(text_layout("sd3"), shapes)
    only_g = [(p, 1.0 if p.name == "clip_g" else 0.0) for p in layout]
    dropped = drop_captions(cond, null, 0.0, generator=torch.Generator().manual_seed(0), parts=only_g)
    g = layout[1]
    expect = cond.hidden.clone()
    expect[:, g.tokens, g.hidden] = null.hidden[:, g.tokens, g.hidden]
    assert torch.equal(dropped.hidden, expect)
    assert torch.equal(dropped.pooled[:, g.pooled], null.pooled[:, g.pooled].expand(64, -1))
    assert torch.equal(dropped.pooled[:, :32], cond.pooled[:, :32])

    halves = [(p, 0.5) for p in layout]
    dropped = drop_captions(cond, null, 0.0, generator=torch.Generator().manual_seed(0), parts=halves)
    rows = {p.name: (dropped.hidden[:, p.tokens, p.hidden] != cond.hidden[:, p.tokens, p.hidden]).flatten(1).any(1)
            for p in layout}
    assert all(8 < int(r.sum()) < 56 for r in rows.values())
    assert not torch.equal(rows["clip_l"], rows["t5"]) and not torch.equal(rows["clip_l"], rows["clip_g"])
    # The same draw again: reproducible from the generator.
    again = drop_captions(cond, null, 0.0, generator=torch.Generator().manual_seed(0), parts=halves)
    assert torch.equal(again.hidden, dropped.hidden)


def test_single_encoder_dropout_is_the_whole_row_as_before():
    cond = Conditioning(torch.randn(16, 5, 4), torch.ones(16, 5, dtype=torch.bool), torch.randn(16, 3))
    null = Conditioning(torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), torch.randn(1, 3))
    (whole,) = parts(text_layout("single"), {"text_encoder": EncoderShape("auto", None, 4, 3)})
    by_part = drop_captions(cond, null, 0.5, generator=torch.Generator().manual_seed(3), parts=[(whole, 0.5)])
    by_row = drop_captions(cond, null, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(by_part.hidden, by_row.hidden) and torch.equal(by_part.mask, by_row.mask)
    assert not torch.equal(by_row.hidden[:, :5], cond.hidden)
